"""The eBPF C source is package data: found after `pip install .`, not via the checkout."""

from __future__ import annotations

from pathlib import Path

import pytest

import nodeagent
from nodeagent.datapath import ebpf
from nodeagent.datapath.iptables import CaptureError


def test_the_bpf_source_is_read_from_the_package() -> None:
    assert ebpf.SOURCE.parent == Path(nodeagent.__file__).parent / "bpf"
    assert "connect4" in ebpf.read_source()


def test_a_missing_bpf_source_is_a_capture_error_naming_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "connect_redirect.c"
    with pytest.raises(CaptureError, match=str(missing)):
        ebpf.read_source(missing)
