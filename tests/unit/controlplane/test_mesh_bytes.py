"""The mesh file as bytes on disk: what is not UTF-8 is refused like any other mistake.

Found by the mesh_file fuzz target: a byte that is not UTF-8 escaped `load_mesh` as a
UnicodeDecodeError, which ended the control plane's reload watcher and made `--check`
print a traceback. Its input is kept in fuzz/crashes/mesh_file/.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from nodeagent.controlplane.mesh import MeshError, load_mesh


def test_a_byte_that_is_not_utf8_is_refused_with_file_line_and_column(tmp_path: Path) -> None:
    mesh = tmp_path / "mesh.yaml"
    mesh.write_bytes(b"nodes:\n- {name: n\xc3\xa9ud1, token: \x90t}\n")
    with pytest.raises(MeshError) as err:
        load_mesh(mesh)
    # Column 24 counts characters: the valid two-byte "é" before the bad byte is one.
    assert str(err.value) == f"{mesh}:2:24: not UTF-8: byte 0x90 (invalid start byte)"


def test_a_file_cut_inside_a_multibyte_character_is_refused(tmp_path: Path) -> None:
    mesh = tmp_path / "mesh.yaml"
    mesh.write_bytes(b"nodes: []\n# caf\xc3")
    with pytest.raises(MeshError, match=r"mesh\.yaml:2:6: not UTF-8: byte 0xc3 \(unexpected end"):
        load_mesh(mesh)


def test_utf8_text_is_read_whatever_the_locale(tmp_path: Path) -> None:
    mesh = tmp_path / "mesh.yaml"
    mesh.write_bytes("nodes:\n- {name: nœud, token: t}\n".encode())
    assert [n.name for n in load_mesh(mesh).nodes] == ["nœud"]
