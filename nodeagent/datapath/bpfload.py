"""Compile and load BPF programs in a short-lived child, so bcc and LLVM never enter the agent.

The agent (ebpf.py `load_objects`) runs `python -m nodeagent.datapath.bpfload FD` with a
JSON request on stdin: the program text, which functions to load (name, program type,
expected attach type), which maps to hand back, and where to pin the programs (none: the
agent holds them only by the descriptors it receives). The child compiles with bcc, loads,
pins, sends the programs' and maps' descriptors over the unix socket FD (SCM_RIGHTS) with
one JSON line naming them in order, and exits: what stays loaded is only what the agent
holds or what is pinned. Maps the text declares pinned (BPF_TABLE_PINNED) are reused by bcc
if they exist, else created and pinned.

A failure is a message on stderr (the compiler's diagnostics, then one line) and a non-zero
exit; the agent reports that stderr.
"""

from __future__ import annotations

import json
import socket
import sys
from typing import Any

from nodeagent.datapath.bpfsys import BpfSys

MAX_FDS = 16  # plenty: three programs and four maps today


def load(request: dict[str, Any]) -> tuple[list[str], list[int]]:
    """Compile and load per `request`; the names and descriptors to hand back."""
    from bcc import BPF  # here: this import is the ~64 MiB the agent must not carry

    bpf = BPF(text=request["text"].encode())
    names: list[str] = []
    fds: list[int] = []
    sys_ = BpfSys()
    for prog in request["programs"]:
        fn = bpf.load_func(
            prog["name"].encode(), prog["prog_type"], attach_type=prog["attach_type"]
        )
        if prog.get("pin"):
            sys_.obj_pin(fn.fd, prog["pin"])
        names.append(prog["name"])
        fds.append(fn.fd)
    for name in request["maps"]:
        names.append(name)
        fds.append(bpf[name.encode()].map_fd)
    return names, fds


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(
            "usage: python -m nodeagent.datapath.bpfload SOCKET_FD < request.json", file=sys.stderr
        )
        return 2
    try:
        names, fds = load(json.load(sys.stdin))
    except Exception as exc:  # one line after bcc's own diagnostics, not a traceback
        print(f"bpfload: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if len(fds) > MAX_FDS:
        raise SystemExit(f"{len(fds)} descriptors to hand back; at most {MAX_FDS}")
    with socket.socket(fileno=int(argv[1])) as sock:
        socket.send_fds(sock, [json.dumps(names).encode()], fds)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
