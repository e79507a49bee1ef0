"""The few bpf(2) commands the agent needs, as raw syscalls through ctypes.

Why not bcc or libbpf: importing bcc (libbcc and its LLVM) costs the agent ~64 MiB of RSS
for as long as it runs, only to compile once; the eBPF backend compiles in a short-lived
child (bpfload.py) and the agent keeps just file descriptors of the loaded objects, which
these commands open (pins), attach, swap and read.

The attribute layouts are the members of `union bpf_attr` each command reads, copied from
the kernel UAPI (include/uapi/linux/bpf.h); the kernel zero-fills what a shorter attr
leaves out. Failures are `OSError` with the kernel's errno.
"""

from __future__ import annotations

import ctypes
import os
import platform
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

# enum bpf_cmd
MAP_CREATE = 0
MAP_LOOKUP_ELEM = 1
MAP_UPDATE_ELEM = 2
MAP_DELETE_ELEM = 3
MAP_GET_NEXT_KEY = 4
OBJ_PIN = 6
OBJ_GET = 7
OBJ_GET_INFO_BY_FD = 15
LINK_CREATE = 28
LINK_UPDATE = 29
LINK_DETACH = 34

# enum bpf_map_type
MAP_TYPE_HASH = 1
MAP_TYPE_ARRAY = 2
MAP_TYPE_LRU_HASH = 9
# enum bpf_prog_type
PROG_TYPE_SOCK_OPS = 13
PROG_TYPE_CGROUP_SOCK_ADDR = 18

UPDATE_ANY = 0  # BPF_ANY: create or replace

# __NR_bpf per architecture (arch/*/entry/syscalls, include/uapi/asm-generic/unistd.h)
_NR_BPF = {"x86_64": 321, "aarch64": 280, "arm64": 280, "riscv64": 280, "s390x": 351}

_u32 = ctypes.c_uint32
_u64 = ctypes.c_uint64


class MapCreateAttr(ctypes.Structure):
    _fields_ = [
        ("map_type", _u32),
        ("key_size", _u32),
        ("value_size", _u32),
        ("max_entries", _u32),
        ("map_flags", _u32),
    ]


class MapElemAttr(ctypes.Structure):
    """BPF_MAP_*_ELEM and BPF_MAP_GET_NEXT_KEY (`value` is `next_key` for the latter)."""

    _fields_ = [
        ("map_fd", _u32),
        ("pad", _u32),  # key is __aligned_u64
        ("key", _u64),
        ("value", _u64),
        ("flags", _u64),
    ]


class ObjAttr(ctypes.Structure):
    """BPF_OBJ_PIN / BPF_OBJ_GET."""

    _fields_ = [("pathname", _u64), ("bpf_fd", _u32), ("file_flags", _u32)]


class InfoAttr(ctypes.Structure):
    """BPF_OBJ_GET_INFO_BY_FD."""

    _fields_ = [("bpf_fd", _u32), ("info_len", _u32), ("info", _u64)]


class LinkCreateAttr(ctypes.Structure):
    _fields_ = [
        ("prog_fd", _u32),
        ("target_fd", _u32),
        ("attach_type", _u32),
        ("flags", _u32),
    ]


class LinkUpdateAttr(ctypes.Structure):
    _fields_ = [
        ("link_fd", _u32),
        ("new_prog_fd", _u32),
        ("flags", _u32),
        ("old_prog_fd", _u32),
    ]


class LinkDetachAttr(ctypes.Structure):
    _fields_ = [("link_fd", _u32)]


class MapInfo(ctypes.Structure):
    """The head of struct bpf_map_info (the kernel fills only as much as we pass)."""

    _fields_ = [
        ("type", _u32),
        ("id", _u32),
        ("key_size", _u32),
        ("value_size", _u32),
        ("max_entries", _u32),
        ("map_flags", _u32),
    ]


class ProgInfo(ctypes.Structure):
    """The head of struct bpf_prog_info, up to the ids of the maps the program uses."""

    _fields_ = [
        ("type", _u32),
        ("id", _u32),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", _u32),
        ("xlated_prog_len", _u32),
        ("jited_prog_insns", _u64),
        ("xlated_prog_insns", _u64),
        ("load_time", _u64),
        ("created_by_uid", _u32),
        ("nr_map_ids", _u32),
        ("map_ids", _u64),
    ]


class LinkInfo(ctypes.Structure):
    """The head of struct bpf_link_info."""

    _fields_ = [("type", _u32), ("id", _u32), ("prog_id", _u32)]


# A key or value as the map stores it: a ctypes structure or a plain integer.
Buffer = ctypes.Structure | ctypes.c_uint32 | ctypes.c_uint64 | ctypes.c_int
_Key = TypeVar("_Key", bound=Buffer)
_Info = TypeVar("_Info", MapInfo, ProgInfo, LinkInfo)

Syscall = Callable[[int, int, int, int], int]  # (nr, cmd, attr address, size) -> ret, -1


def _libc_syscall() -> Syscall:
    libc = ctypes.CDLL(None, use_errno=True)
    fn = libc.syscall
    fn.restype = ctypes.c_long
    fn.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_uint]
    return fn  # type: ignore[no-any-return]


class BpfSys:
    """bpf(2), one method per command; `syscall` is injectable (tests, other libcs)."""

    def __init__(self, syscall: Syscall | None = None, machine: str | None = None) -> None:
        arch = machine or platform.machine()
        if arch not in _NR_BPF:
            raise OSError(f"bpf(2): unknown syscall number on {arch}")
        self._nr = _NR_BPF[arch]
        self._syscall = syscall or _libc_syscall()

    def _call(self, cmd: int, attr: ctypes.Structure) -> int:
        ret = self._syscall(self._nr, cmd, ctypes.addressof(attr), ctypes.sizeof(attr))
        if ret < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return int(ret)

    # -- objects -----------------------------------------------------------------------------------

    def obj_get(self, path: Path | str) -> int:
        """An fd of the object pinned at `path`."""
        raw = ctypes.create_string_buffer(os.fsencode(str(path)))
        return self._call(OBJ_GET, ObjAttr(pathname=ctypes.addressof(raw)))

    def obj_pin(self, fd: int, path: Path | str) -> None:
        raw = ctypes.create_string_buffer(os.fsencode(str(path)))
        self._call(OBJ_PIN, ObjAttr(pathname=ctypes.addressof(raw), bpf_fd=fd))

    def map_info(self, fd: int) -> MapInfo:
        return self._info(fd, MapInfo())

    def prog_info(self, fd: int) -> tuple[ProgInfo, list[int]]:
        """A program's info and the ids of the maps it uses."""
        info = self._info(fd, ProgInfo())
        ids = (_u32 * max(info.nr_map_ids, 1))()
        info = ProgInfo(nr_map_ids=info.nr_map_ids, map_ids=ctypes.addressof(ids))
        info = self._info(fd, info)
        return info, list(ids[: info.nr_map_ids])

    def link_info(self, fd: int) -> LinkInfo:
        return self._info(fd, LinkInfo())

    def _info(self, fd: int, info: _Info) -> _Info:
        attr = InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info))
        self._call(OBJ_GET_INFO_BY_FD, attr)
        return info

    # -- links -------------------------------------------------------------------------------------

    def link_create(self, prog_fd: int, target_fd: int, attach_type: int) -> int:
        attr = LinkCreateAttr(prog_fd=prog_fd, target_fd=target_fd, attach_type=attach_type)
        return self._call(LINK_CREATE, attr)

    def link_update(self, link_fd: int, prog_fd: int) -> None:
        """Run `prog_fd` in the link from now on (atomically: no moment without a program)."""
        self._call(LINK_UPDATE, LinkUpdateAttr(link_fd=link_fd, new_prog_fd=prog_fd))

    def link_detach(self, link_fd: int) -> None:
        self._call(LINK_DETACH, LinkDetachAttr(link_fd=link_fd))

    # -- maps --------------------------------------------------------------------------------------

    def map_create(self, map_type: int, key_size: int, value_size: int, max_entries: int) -> int:
        attr = MapCreateAttr(
            map_type=map_type, key_size=key_size, value_size=value_size, max_entries=max_entries
        )
        return self._call(MAP_CREATE, attr)

    def map_lookup(self, fd: int, key: Buffer, value: Buffer) -> bool:
        """Fill `value` with the entry for `key`; False if there is none."""
        return self._elem(MAP_LOOKUP_ELEM, fd, key, value)

    def map_update(self, fd: int, key: Buffer, value: Buffer, flags: int = UPDATE_ANY) -> None:
        self._elem(MAP_UPDATE_ELEM, fd, key, value, flags)

    def map_delete(self, fd: int, key: Buffer) -> bool:
        """Remove the entry for `key`; False if there was none."""
        return self._elem(MAP_DELETE_ELEM, fd, key, None)

    def map_keys(self, fd: int, key_type: type[_Key]) -> Iterator[_Key]:
        """Every key of a map (entries changing meanwhile may be missed or repeated)."""
        prev: _Key | None = None
        while True:
            nxt = key_type()
            if not self._elem(MAP_GET_NEXT_KEY, fd, prev, nxt):
                return
            yield nxt
            prev = nxt

    def _elem(
        self, cmd: int, fd: int, key: Buffer | None, value: Buffer | None, flags: int = 0
    ) -> bool:
        attr = MapElemAttr(
            map_fd=fd,
            key=0 if key is None else ctypes.addressof(key),
            value=0 if value is None else ctypes.addressof(value),
            flags=flags,
        )
        try:
            self._call(cmd, attr)
        except OSError as exc:
            if exc.errno == 2 and cmd != MAP_UPDATE_ELEM:  # ENOENT: no such key / last key
                return False
            raise
        return True
