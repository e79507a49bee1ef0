"""Installing nodeagent-cni into a node's CNI configuration, and taking it out, on temp dirs."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from nodeagent.cni.install import (
    InstallError,
    add_entry,
    install,
    main,
    plugin_entry,
    primary_config,
    remove_entry,
    uninstall,
)

# As a primary CNI writes it: its own formatting, key order and a trailing newline.
CONFLIST = """{
  "cniVersion": "1.0.0",
  "name": "k8s-pod-network",
  "plugins": [
    {
      "type": "ptp",
      "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.22.0.0/16"}]]}
    },
    {"type": "portmap", "capabilities": {"portMappings": true}, "note": "a ] and a \\" in a string"}
  ]
}
"""
CONF = '{"cniVersion": "0.4.0", "name": "bridge-net", "type": "bridge", "bridge": "cni0"}\n'
ENTRY = plugin_entry("/run/nodeagent/cni.sock", add_timeout_seconds=5)


@pytest.fixture
def node(tmp_path: Path) -> tuple[Path, Path, Path]:
    conf_dir, bin_dir = tmp_path / "net.d", tmp_path / "bin"
    conf_dir.mkdir()
    plugin = tmp_path / "nodeagent-cni-src"
    plugin.write_text("#!/bin/sh\necho plugin\n")
    return conf_dir, bin_dir, plugin


def plugins(path: Path) -> list[dict[str, object]]:
    result: list[dict[str, object]] = json.loads(path.read_text())["plugins"]
    return result


def test_entry_goes_last_in_the_lexically_first_config(node: tuple[Path, Path, Path]) -> None:
    conf_dir, bin_dir, plugin = node
    (conf_dir / "10-primary.conflist").write_text(CONFLIST)
    (conf_dir / "99-other.conflist").write_text(CONFLIST)
    (conf_dir / "05-notes.txt").write_text("not a config")
    written = install(conf_dir, bin_dir, ENTRY, plugin=plugin)
    assert written == conf_dir / "10-primary.conflist"
    assert [p["type"] for p in plugins(written)] == ["ptp", "portmap", "nodeagent-cni"]
    assert plugins(written)[-1] == ENTRY
    assert (conf_dir / "99-other.conflist").read_text() == CONFLIST
    exe = bin_dir / "nodeagent-cni"
    assert exe.read_text() == plugin.read_text()
    assert stat.S_IMODE(exe.stat().st_mode) == 0o755


def test_installing_twice_leaves_one_entry_and_uninstall_restores_the_bytes(
    node: tuple[Path, Path, Path],
) -> None:
    conf_dir, bin_dir, plugin = node
    path = conf_dir / "10-primary.conflist"
    path.write_text(CONFLIST)
    install(conf_dir, bin_dir, ENTRY, plugin=plugin)
    once = path.read_text()
    install(conf_dir, bin_dir, ENTRY, plugin=plugin)
    assert path.read_text() == once
    newer = plugin_entry("/other/cni.sock")
    install(conf_dir, bin_dir, newer, plugin=plugin)
    assert [p for p in plugins(path) if p["type"] == "nodeagent-cni"] == [newer]
    uninstall(conf_dir, bin_dir)
    assert path.read_text() == CONFLIST
    assert not (bin_dir / "nodeagent-cni").exists()
    uninstall(conf_dir, bin_dir)  # idempotent
    assert path.read_text() == CONFLIST
    assert sorted(p.name for p in conf_dir.iterdir()) == ["10-primary.conflist"]  # no temp files


def test_a_conf_becomes_a_conflist_with_our_entry(node: tuple[Path, Path, Path]) -> None:
    conf_dir, bin_dir, plugin = node
    (conf_dir / "10-bridge.conf").write_text(CONF)
    written = install(conf_dir, bin_dir, ENTRY, plugin=plugin)
    assert written == conf_dir / "10-bridge.conflist"
    assert not (conf_dir / "10-bridge.conf").exists()
    config = json.loads(written.read_text())
    assert (config["cniVersion"], config["name"]) == ("0.4.0", "bridge-net")
    assert config["plugins"] == [{"type": "bridge", "bridge": "cni0"}, ENTRY]
    assert primary_config(conf_dir) == written
    uninstall(conf_dir, bin_dir)
    assert json.loads(written.read_text())["plugins"] == [{"type": "bridge", "bridge": "cni0"}]


def test_link_instead_of_copy(node: tuple[Path, Path, Path]) -> None:
    conf_dir, bin_dir, plugin = node
    (conf_dir / "10.conflist").write_text(CONFLIST)
    install(conf_dir, bin_dir, ENTRY, plugin=plugin, link=True)
    assert (bin_dir / "nodeagent-cni").resolve() == plugin.resolve()


def test_entry_removed_from_anywhere_in_the_list() -> None:
    config = {"cniVersion": "1.0.0", "plugins": [ENTRY, {"type": "a"}, ENTRY, {"type": "b"}]}
    text = json.dumps(config, indent=1)
    assert json.loads(remove_entry(text))["plugins"] == [{"type": "a"}, {"type": "b"}]
    only = json.dumps({"cniVersion": "1.0.0", "plugins": [ENTRY]})
    assert json.loads(remove_entry(only))["plugins"] == []
    assert remove_entry(CONFLIST) == CONFLIST


def test_compact_conflist_gets_a_compact_entry() -> None:
    text = json.dumps({"cniVersion": "1.0.0", "plugins": [{"type": "ptp"}]})
    added = add_entry(text, ENTRY)
    assert json.loads(added)["plugins"] == [{"type": "ptp"}, ENTRY]
    assert "\n" not in added
    assert remove_entry(added) == text


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('{"cniVersion": "1.1.0", "plugins": [{"type": "ptp"}]}', "1.1.0"),
        ('{"cniVersion": "1.0.0", "plugins": []}', "no plugins"),
        ('{"cniVersion": "1.0.0"', "not JSON"),
    ],
)
def test_configs_we_cannot_chain_into_are_refused(text: str, words: str) -> None:
    with pytest.raises(InstallError, match=words):
        add_entry(text, ENTRY)


def test_cli_installs_and_uninstalls(
    node: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    conf_dir, bin_dir, plugin = node
    (conf_dir / "10.conflist").write_text(CONFLIST)
    common = ["--conf-dir", str(conf_dir), "--bin-dir", str(bin_dir)]
    assert main(["install", *common, "--agent-socket", "/s.sock", "--plugin", str(plugin)]) == 0
    assert plugins(conf_dir / "10.conflist")[-1]["agent_socket"] == "/s.sock"
    assert main(["uninstall", *common]) == 0
    assert (conf_dir / "10.conflist").read_text() == CONFLIST
    empty = conf_dir.parent / "empty"
    empty.mkdir()
    assert main(["install", "--conf-dir", str(empty), "--bin-dir", str(bin_dir)]) == 1
    assert "no *.conflist" in capsys.readouterr().err
