"""`nodeagent-cni`: the chained CNI plugin (spec 1.0) that closes the new-pod race.

Without it a pod's first packets can leave before the agent's next namespace scan sees the
pod. The runtime runs this plugin last in the node's conflist, before the container starts:

* ADD posts the pod (netns, ids, addresses from prevResult) to the agent's Unix socket and
  waits, at most `add_timeout_seconds`, for 200 (captured, or not enrolled). If the agent
  is absent, slow or failing, the plugin fails closed: it installs the agent's capture
  rules itself (`hold`), so the pod's connections are refused until the agent adopts it,
  and still succeeds. Either way it prints prevResult unchanged. Only when neither the
  agent nor the hold works does ADD fail (code 11: the runtime retries the sandbox).
* DEL tells the agent, best effort, and always succeeds (the namespace may be gone).
* CHECK succeeds if the agent says the pod is captured or not enrolled, or if the pod's
  namespace holds the capture chains.
* VERSION lists the spec versions.

Imports are stdlib and, on the fail-closed path only, the pure plan module: this runs on
every pod start.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Mapping
from typing import Any

from nodeagent.cni.protocol import (
    ERR_NOT_CAPTURED,
    ERR_TRY_AGAIN_LATER,
    IMPLEMENTED_VERSION,
    MAX_REPLY_BYTES,
    AgentReply,
    CniEnv,
    CniError,
    NetConf,
    agent_request,
    chained_result,
    parse_agent_reply,
    parse_env,
    parse_netconf,
    pod_body,
    pod_ips,
    reply_complete,
    require_check_version,
    version_answer,
)

# Where the tools live when the runtime gives the plugin a bare PATH.
_SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_DEL_TIMEOUT_SECONDS = 5.0  # DEL must not hang pod teardown on a wedged agent
_TOOL_TIMEOUT_SECONDS = 10.0


class AgentUnavailable(Exception):
    """No usable answer from the agent (no socket, refused, timeout, garbage)."""


def call_agent(socket_path: str, path: str, body: Mapping[str, Any], timeout: float) -> AgentReply:
    """POST `body` to the agent and read its reply, all within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(socket_path)
        sock.sendall(agent_request(path, body))
        data = b""
        while not reply_complete(data):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no reply in time")
            sock.settimeout(remaining)
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
            if len(data) > MAX_REPLY_BYTES:
                raise AgentUnavailable("reply too large")
        return parse_agent_reply(data)
    except (OSError, ValueError) as exc:
        raise AgentUnavailable(f"{type(exc).__name__}: {exc}") from None
    finally:
        sock.close()


# -- fail closed -------------------------------------------------------------------------


def _tool_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{env.get('PATH', '')}:{_SYSTEM_PATH}".lstrip(":")
    return env


def _in_netns(netns: str, argv: list[str], stdin: str = "") -> str:
    import subprocess  # only on the fail-closed and CHECK paths (5 ms)

    try:
        done = subprocess.run(
            ["nsenter", f"--net={netns}", "--", *argv],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=_TOOL_TIMEOUT_SECONDS,
            env=_tool_env(),
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CniError(ERR_TRY_AGAIN_LATER, f"{argv[0]} in {netns}: {exc}") from None
    if done.returncode != 0:
        raise CniError(
            ERR_TRY_AGAIN_LATER, f"{argv[0]} in {netns} failed", done.stderr.strip()[-400:]
        )
    return done.stdout


def _ipv6_enabled(netns: str) -> bool:
    # /proc/sys/net is the reading process's namespace's: cat runs inside the pod's.
    try:
        return _in_netns(netns, ["cat", "/proc/sys/net/ipv6/conf/all/disable_ipv6"]).strip() == "0"
    except CniError:
        return False  # no IPv6 in this kernel


def hold_pod(netns: str, ips: tuple[str, ...]) -> str:
    """Install the capture rules in the pod's namespace unless it is held already; returns
    what was done, for the log. IPv6 too when the pod has an IPv6 address or IPv6 is
    enabled in its namespace at all, as the agent decides (capture.plan_from_namespace)."""
    from nodeagent.cni.hold import RESTORE, SAVE, hold_text  # the plan module: 10-25 ms

    done = []
    ipv6 = any(":" in ip for ip in ips) or _ipv6_enabled(netns)
    families: tuple[int, ...] = (4, 6) if ipv6 else (4,)
    for family in families:
        text = hold_text(4 if family == 4 else 6, _in_netns(netns, [SAVE[family]]))
        if text is None:
            done.append(f"IPv{family} already held")
            continue
        # --wait: the xtables lock is host-wide; kube-proxy or a CNI may hold it a moment.
        _in_netns(netns, [RESTORE[family], "--noflush", "--wait=5"], text)
        done.append(f"IPv{family} held")
    return ", ".join(done)


def pod_is_held(netns: str) -> bool:
    from nodeagent.cni.hold import SAVE, is_held

    return is_held(_in_netns(netns, [SAVE[4]]))


# -- commands ----------------------------------------------------------------------------


def ask_agent(conf: NetConf, path: str, body: Mapping[str, Any]) -> tuple[bool, str]:
    """Whether the agent has the pod (captured or not enrolled), and what it said."""
    try:
        reply = call_agent(conf.agent_socket, path, body, conf.add_timeout_seconds)
    except AgentUnavailable as exc:
        return False, f"agent unavailable ({exc})"
    if reply.ok:
        return True, f"agent: {reply.state}"
    return False, f"agent answered {reply.status} {reply.state}: {reply.message}"


def cmd_add(conf: NetConf, env: CniEnv) -> tuple[dict[str, Any], str]:
    result = chained_result(conf)
    ips = pod_ips(conf.prev_result)
    ok, why = ask_agent(conf, "/cmdadd", pod_body(env, ips))
    if ok:
        return result, why
    # Fail closed: the pod must not start with its traffic uncaptured.
    try:
        done = hold_pod(env.netns, ips)
    except CniError as exc:
        exc.msg = f"{why}; holding the pod failed: {exc.msg}"
        raise
    return result, f"{why}; fail closed: {done}"


def cmd_del(conf: NetConf, env: CniEnv) -> str:
    timeout = min(conf.add_timeout_seconds, _DEL_TIMEOUT_SECONDS)
    try:
        reply = call_agent(conf.agent_socket, "/cmddel", pod_body(env), timeout)
    except AgentUnavailable as exc:
        return f"agent unavailable ({exc}); nothing to do"
    return f"agent answered {reply.status} {reply.state}"


def cmd_check(conf: NetConf, env: CniEnv) -> str:
    require_check_version(conf)
    chained_result(conf)  # CHECK gets prevResult too; without it the chain is wrong
    ok, why = ask_agent(conf, "/cmdcheck", pod_body(env, pod_ips(conf.prev_result)))
    if ok:
        return why
    if pod_is_held(env.netns):
        return f"{why}; capture chains in place"
    raise CniError(ERR_NOT_CAPTURED, "pod is not captured", why)


# -- entry point -------------------------------------------------------------------------


def _log(conf: NetConf | None, env: CniEnv | None, outcome: str, started: float) -> None:
    if conf is None or not conf.log_file:
        return
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    who = "-"
    if env is not None:
        pod = f"{env.pod_namespace}/{env.pod_name}" if env.pod_name else "-"
        who = f"{env.command} container={env.container_id[:12]} pod={pod} netns={env.netns}"
    elapsed = (time.monotonic() - started) * 1000
    try:
        with open(conf.log_file, "a") as f:
            f.write(f"{stamp} {who} {outcome} ({elapsed:.1f} ms)\n")
    except OSError:
        pass  # logging never fails a pod start


def run(stdin: bytes, environ: Mapping[str, str]) -> tuple[int, str]:
    """One plugin call: (exit code, stdout text)."""
    started = time.monotonic()
    conf: NetConf | None = None
    env: CniEnv | None = None
    try:
        env = parse_env(environ)
        if env.command == "VERSION":
            return 0, json.dumps(version_answer())
        conf = parse_netconf(stdin)
        if env.command == "ADD":
            result, outcome = cmd_add(conf, env)
            _log(conf, env, outcome, started)
            return 0, json.dumps(result)
        outcome = cmd_del(conf, env) if env.command == "DEL" else cmd_check(conf, env)
        _log(conf, env, outcome, started)
        return 0, ""
    except CniError as exc:
        _log(conf, env, f"error {exc.code}: {exc.msg} {exc.details}".rstrip(), started)
        version = conf.cni_version if conf is not None else IMPLEMENTED_VERSION
        return 1, json.dumps(exc.result(version))


def main() -> int:
    code, out = run(sys.stdin.buffer.read(), os.environ)
    if out:
        sys.stdout.write(out + "\n")
        sys.stdout.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
