"""Put nodeagent-cni into the node's CNI configuration, or take it out again.

The primary network config is the lexically first `*.conflist` or `*.conf` in the CNI conf
dir (the one the runtime uses, and the one istio-cni's install-cni picks). Our entry,
`{"type": "nodeagent-cni", "agent_socket": ...}`, goes last in its `plugins`, so the runtime
calls us after the primary plugin has given the pod its addresses. A single-plugin `.conf`
becomes a `.conflist` (same stem; the `.conf` is removed so the runtime reads one file).

The file is edited as text, not re-serialized: install appends our entry after the last
plugin and uninstall removes exactly that span and its comma, so a file we installed into
is byte-for-byte what it was before. Installing twice leaves one entry (an outdated one is
replaced). Every write is a temp file renamed over the target.

CLI (the DaemonSet runs it):
    python -m nodeagent.cni.install install|uninstall --conf-dir D --bin-dir B --agent-socket S
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from nodeagent.cni.protocol import (
    DEFAULT_ADD_TIMEOUT_SECONDS,
    DEFAULT_AGENT_SOCKET,
    PLUGIN_TYPE,
    SUPPORTED_VERSIONS,
)

CONF_DIR = "/etc/cni/net.d"
BIN_DIR = "/opt/cni/bin"


class InstallError(RuntimeError):
    """The CNI configuration cannot take our entry (or cannot be read); says why."""


def plugin_entry(
    agent_socket: str = DEFAULT_AGENT_SOCKET,
    *,
    add_timeout_seconds: float = DEFAULT_ADD_TIMEOUT_SECONDS,
    log_file: str | None = None,
) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "type": PLUGIN_TYPE,
        "agent_socket": agent_socket,
        "add_timeout_seconds": add_timeout_seconds,
    }
    if log_file:
        entry["log_file"] = log_file
    return entry


# -- text edits (pure) -----------------------------------------------------------------------


def _skip_string(text: str, i: int) -> int:
    """Index just past the JSON string starting at text[i] == '"'."""
    i += 1
    while text[i] != '"':
        i += 2 if text[i] == "\\" else 1
    return i + 1


def _skip_value(text: str, i: int) -> int:
    """Index just past the JSON value starting at i (the text is known to be valid JSON)."""
    if text[i] == '"':
        return _skip_string(text, i)
    if text[i] not in "[{":
        while i < len(text) and text[i] not in ",]}" and not text[i].isspace():
            i += 1
        return i
    depth = 0
    while True:
        c = text[i]
        if c == '"':
            i = _skip_string(text, i)
            continue
        if c in "[{":
            depth += 1
        elif c in "]}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1


def _skip_ws(text: str, i: int) -> int:
    while text[i].isspace():
        i += 1
    return i


def _plugin_spans(text: str) -> tuple[int, list[tuple[int, int]]]:
    """Where the top-level `plugins` array closes, and the [start, end) of each element."""
    i = _skip_ws(text, 0)
    if text[i] != "{":
        raise InstallError("config is not a JSON object")
    i = _skip_ws(text, i + 1)
    while text[i] != "}":
        key_end = _skip_string(text, i)
        key = json.loads(text[i:key_end])
        i = _skip_ws(text, _skip_ws(text, key_end) + 1)  # past ':'
        if key == "plugins" and text[i] == "[":
            spans = []
            i = _skip_ws(text, i + 1)
            while text[i] != "]":
                end = _skip_value(text, i)
                spans.append((i, end))
                i = _skip_ws(text, end)
                if text[i] == ",":
                    i = _skip_ws(text, i + 1)
            return i, spans
        i = _skip_ws(text, _skip_value(text, i))
        if text[i] == ",":
            i = _skip_ws(text, i + 1)
    raise InstallError("config has no 'plugins' list")


def _load(text: str, name: str) -> dict[str, Any]:
    try:
        config = json.loads(text)
    except ValueError as exc:
        raise InstallError(f"{name} is not JSON: {exc}") from None
    if not isinstance(config, dict):
        raise InstallError(f"{name} is not a JSON object")
    return config


def _is_ours(plugin: object) -> bool:
    return isinstance(plugin, dict) and plugin.get("type") == PLUGIN_TYPE


def remove_entry(text: str) -> str:
    """The conflist text without our entries (and the comma before each); unchanged if none."""
    config = _load(text, "conflist")
    plugins = config.get("plugins")
    if not isinstance(plugins, list) or not any(_is_ours(p) for p in plugins):
        return text
    _, spans = _plugin_spans(text)
    for index in reversed(range(len(spans))):
        if not _is_ours(plugins[index]):
            continue
        start, end = spans[index]
        if index > 0:  # take the separator before it: from the previous element's end
            start = spans[index - 1][1]
        elif index + 1 < len(spans):  # first element: take the separator after it
            end = spans[index + 1][0]
        text = text[:start] + text[end:]
        spans = [s for j, s in enumerate(spans) if j != index]
    return text


def add_entry(text: str, entry: dict[str, Any]) -> str:
    """The conflist text with `entry` as its last plugin (once: an older one is replaced)."""
    config = _load(text, "conflist")
    version = config.get("cniVersion")
    if version not in SUPPORTED_VERSIONS:
        raise InstallError(
            f"conflist cniVersion {version!r} is not one {PLUGIN_TYPE} supports "
            f"({', '.join(SUPPORTED_VERSIONS)})"
        )
    plugins = config.get("plugins")
    if not isinstance(plugins, list) or not plugins:
        raise InstallError("conflist has no plugins to chain after")
    if plugins[-1] == entry and sum(_is_ours(p) for p in plugins) == 1:
        return text
    text = remove_entry(text)
    _, spans = _plugin_spans(text)
    last_end = spans[-1][1]
    # On its own line, indented like the last plugin, if that one is on its own line.
    line_start = text.rfind("\n", 0, spans[-1][0]) + 1
    indent = text[line_start : spans[-1][0]]
    sep = f",\n{indent}" if line_start > 0 and not indent.strip() else ", "
    return text[:last_end] + sep + json.dumps(entry) + text[last_end:]


def conf_to_conflist(text: str) -> str:
    """A single-plugin `.conf` as the equivalent one-plugin conflist."""
    config = _load(text, "conf")
    if "type" not in config:
        raise InstallError("conf has no plugin 'type'")
    top = {k: config[k] for k in ("cniVersion", "name") if k in config}
    plugin = {k: v for k, v in config.items() if k not in ("cniVersion", "name")}
    return json.dumps({**top, "plugins": [plugin]}, indent=2) + "\n"


# -- files -----------------------------------------------------------------------------------


def primary_config(conf_dir: Path) -> Path | None:
    """The network config the runtime uses: the lexically first .conflist/.conf."""
    names = sorted(
        p.name for p in conf_dir.iterdir() if p.suffix in (".conflist", ".conf") and p.is_file()
    )
    return conf_dir / names[0] if names else None


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        Path(tmp).chmod(mode)
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def default_plugin_executable() -> Path:
    """The installed `nodeagent-cni` script: beside this interpreter, else on PATH."""
    beside = Path(sys.executable).parent / PLUGIN_TYPE
    if beside.exists():
        return beside
    found = shutil.which(PLUGIN_TYPE)
    if found is None:
        raise InstallError(f"no {PLUGIN_TYPE} executable beside {sys.executable} or on PATH")
    return Path(found)


def install(
    conf_dir: Path,
    bin_dir: Path,
    entry: dict[str, Any],
    *,
    plugin: Path | None = None,
    link: bool = False,
) -> Path:
    """Put the executable in `bin_dir` and our entry in the primary config; returns the
    config file written. The executable goes first: the runtime must find it by the time
    the config names it."""
    source = plugin or default_plugin_executable()
    bin_dir.mkdir(parents=True, exist_ok=True)
    target = bin_dir / PLUGIN_TYPE
    if link:
        tmp = bin_dir / f".{PLUGIN_TYPE}.link"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(source.resolve())
        tmp.replace(target)
    elif not (target.exists() and target.read_bytes() == source.read_bytes()):
        _write_atomic(target, source.read_bytes(), 0o755)

    primary = primary_config(conf_dir)
    if primary is None:
        raise InstallError(f"no *.conflist or *.conf in {conf_dir} yet (primary CNI not installed)")
    text = primary.read_text()
    mode = primary.stat().st_mode & 0o777
    written = primary
    if primary.suffix == ".conf":
        written = primary.with_suffix(".conflist")
        text = conf_to_conflist(text)
    updated = add_entry(text, entry)
    if written != primary or updated != text:
        _write_atomic(written, updated.encode(), mode)
    if written != primary:
        primary.unlink()
    return written


def uninstall(conf_dir: Path, bin_dir: Path) -> Path | None:
    """Take our entry out of every config in `conf_dir` that has one, and our executable
    out of `bin_dir`; returns the primary config (None if there is none)."""
    for path in sorted(conf_dir.glob("*.conflist")):
        try:
            text = path.read_text()
            updated = remove_entry(text)
        except (OSError, InstallError):
            continue  # not ours to fix
        if updated != text:
            _write_atomic(path, updated.encode(), path.stat().st_mode & 0o777)
    (bin_dir / PLUGIN_TYPE).unlink(missing_ok=True)
    return primary_config(conf_dir) if conf_dir.is_dir() else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nodeagent.cni.install", description=__doc__)
    parser.add_argument("action", choices=("install", "uninstall"))
    parser.add_argument("--conf-dir", type=Path, default=Path(CONF_DIR))
    parser.add_argument("--bin-dir", type=Path, default=Path(BIN_DIR))
    parser.add_argument("--agent-socket", default=DEFAULT_AGENT_SOCKET)
    parser.add_argument("--add-timeout-seconds", type=float, default=DEFAULT_ADD_TIMEOUT_SECONDS)
    parser.add_argument("--log-file", default=None)
    parser.add_argument("--plugin", type=Path, default=None, help="executable to install")
    parser.add_argument("--link", action="store_true", help="symlink instead of copying")
    args = parser.parse_args(argv)
    try:
        if args.action == "install":
            entry = plugin_entry(
                args.agent_socket,
                add_timeout_seconds=args.add_timeout_seconds,
                log_file=args.log_file,
            )
            path = install(args.conf_dir, args.bin_dir, entry, plugin=args.plugin, link=args.link)
            print(f"{PLUGIN_TYPE}: installed in {path}")
        else:
            uninstall(args.conf_dir, args.bin_dir)
            print(f"{PLUGIN_TYPE}: removed from {args.conf_dir} and {args.bin_dir}")
    except (InstallError, OSError) as exc:
        print(f"{PLUGIN_TYPE}: {args.action} failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
