"""The bpf(2) attribute layouts match the kernel UAPI's `union bpf_attr` members, and a
call passes the command, the attr and its size and turns -1 into the kernel's errno."""

from __future__ import annotations

import ctypes
import errno

import pytest

from nodeagent.datapath import bpfsys
from nodeagent.datapath.bpfsys import BpfSys


@pytest.mark.parametrize(
    ("struct", "size", "offsets"),
    [
        (bpfsys.MapElemAttr, 32, {"map_fd": 0, "key": 8, "value": 16, "flags": 24}),
        (bpfsys.ObjAttr, 16, {"pathname": 0, "bpf_fd": 8, "file_flags": 12}),
        (bpfsys.InfoAttr, 16, {"bpf_fd": 0, "info_len": 4, "info": 8}),
        (bpfsys.LinkCreateAttr, 16, {"prog_fd": 0, "target_fd": 4, "attach_type": 8}),
        (bpfsys.LinkUpdateAttr, 16, {"link_fd": 0, "new_prog_fd": 4, "old_prog_fd": 12}),
        (bpfsys.MapInfo, 24, {"key_size": 8, "value_size": 12, "max_entries": 16}),
        (bpfsys.ProgInfo, 64, {"tag": 8, "load_time": 40, "nr_map_ids": 52, "map_ids": 56}),
    ],
)
def test_attr_layouts_follow_the_uapi(struct: type, size: int, offsets: dict[str, int]) -> None:
    assert ctypes.sizeof(struct) == size
    for field, offset in offsets.items():
        assert getattr(struct, field).offset == offset


def test_a_call_passes_command_attr_and_size_and_raises_the_errno() -> None:
    seen: list[tuple[int, int, int]] = []

    def syscall(nr: int, cmd: int, attr: int, size: int) -> int:
        seen.append((nr, cmd, size))
        link = bpfsys.LinkUpdateAttr.from_address(attr)
        assert (link.link_fd, link.new_prog_fd) == (7, 9)
        ctypes.set_errno(errno.EINVAL)
        return -1

    sys_ = BpfSys(syscall, machine="x86_64")
    with pytest.raises(OSError) as raised:
        sys_.link_update(7, 9)
    assert raised.value.errno == errno.EINVAL
    assert seen == [(321, bpfsys.LINK_UPDATE, 16)]


def test_a_missing_key_is_false_not_an_error() -> None:
    def syscall(nr: int, cmd: int, attr: int, size: int) -> int:
        ctypes.set_errno(errno.ENOENT)
        return -1

    sys_ = BpfSys(syscall, machine="aarch64")
    assert sys_.map_lookup(3, ctypes.c_uint64(1), ctypes.c_uint64()) is False
    assert sys_.map_delete(3, ctypes.c_uint64(1)) is False
    assert list(sys_.map_keys(3, ctypes.c_uint64)) == []
    with pytest.raises(OSError):  # an update that fails is an error
        sys_.map_update(3, ctypes.c_uint64(1), ctypes.c_uint64(2))
