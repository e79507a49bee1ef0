"""The agent's CNI event server and the plugin talking to it over a real Unix socket."""

from __future__ import annotations

import asyncio
import json
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from nodeagent.cni import plugin
from nodeagent.node.cni_server import CniAdd, CniDel, CniEventServer, CniReply

PREV = {"cniVersion": "1.0.0", "ips": [{"address": "10.22.0.5/24"}]}
NETCONF = {"cniVersion": "1.0.0", "name": "net", "type": "nodeagent-cni", "prevResult": PREV}


class Agent:
    """Stands in for the node manager: records events, answers as told."""

    def __init__(self, reply: CniReply | None = None) -> None:
        self.reply = reply or CniReply(200, "captured")
        self.adds: list[CniAdd] = []
        self.dels: list[CniDel] = []
        self.observed: list[tuple[str, float]] = []

    async def on_add(self, event: CniAdd) -> CniReply:
        self.adds.append(event)
        return self.reply

    async def on_del(self, event: CniDel) -> CniReply:
        self.dels.append(event)
        return CniReply(200, "removed")

    def observe(self, result: str, seconds: float) -> None:
        self.observed.append((result, seconds))


@asynccontextmanager
async def serving(path: Path, agent: Agent) -> AsyncIterator[CniEventServer]:
    server = CniEventServer(path, agent.on_add, agent.on_del, observe=agent.observe)
    async with server:
        yield server


def environ(command: str, sock: Path) -> dict[str, str]:
    return {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": "c0ffee",
        "CNI_NETNS": "/var/run/netns/p1",
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart-1;K8S_POD_UID=u-1",
    }


def stdin(sock: Path, **extra: object) -> bytes:
    return json.dumps({**NETCONF, "agent_socket": str(sock), **extra}).encode()


async def call(sock: Path, command: str, **extra: object) -> tuple[int, str]:
    # The plugin blocks on its socket: run it off the loop, as a separate process would.
    return await asyncio.to_thread(plugin.run, stdin(sock, **extra), environ(command, sock))


async def raw_request(path: Path, data: bytes) -> tuple[int, dict[str, str]]:
    reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(data)
    await writer.drain()
    reply = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


async def test_add_reaches_the_agent_and_prints_prev_result(tmp_path: Path) -> None:
    agent = Agent()
    sock = tmp_path / "run" / "cni.sock"
    async with serving(sock, agent) as server:
        code, out = await call(sock, "ADD")
        assert (code, json.loads(out)) == (0, PREV)
        assert agent.adds == [
            CniAdd(
                netns="/var/run/netns/p1",
                container_id="c0ffee",
                pod_name="cart-1",
                pod_namespace="shop",
                pod_uid="u-1",
                interface="eth0",
                ips=("10.22.0.5",),
            )
        ]
        assert server.stats.adds == {"captured": 1}
        assert len(server.stats.add_seconds) == 1
        assert [result for result, _ in agent.observed] == ["captured"]


async def test_socket_is_private_and_removed_at_stop_and_stale_one_replaced(
    tmp_path: Path,
) -> None:
    sock = tmp_path / "made" / "cni.sock"
    stale = CniEventServer(sock, Agent().on_add, Agent().on_del)
    await stale.start()
    stale._inode = None  # simulate a crash: the file stays behind
    await stale.stop()
    assert sock.exists()
    async with serving(sock, Agent()):
        mode = sock.stat().st_mode
        assert stat.S_ISSOCK(mode)
        assert stat.S_IMODE(mode) == 0o600
        assert sorted(p.name for p in sock.parent.iterdir()) == ["cni.sock"]
    assert not sock.exists()


async def test_a_regular_file_at_the_socket_path_is_not_replaced(tmp_path: Path) -> None:
    sock = tmp_path / "cni.sock"
    sock.write_text("precious")
    with pytest.raises(FileExistsError):
        await CniEventServer(sock, Agent().on_add, Agent().on_del).start()
    assert sock.read_text() == "precious"


async def test_del_is_best_effort_and_idempotent(tmp_path: Path) -> None:
    agent = Agent()
    sock = tmp_path / "cni.sock"
    async with serving(sock, agent):
        assert await call(sock, "DEL") == (0, "")
        assert await call(sock, "DEL") == (0, "")
    assert [d.container_id for d in agent.dels] == ["c0ffee", "c0ffee"]
    assert await call(sock, "DEL") == (0, "")  # no agent at all


async def test_check_succeeds_when_the_agent_holds_the_pod(tmp_path: Path) -> None:
    agent = Agent(CniReply(200, "not_enrolled"))
    sock = tmp_path / "cni.sock"
    async with serving(sock, agent) as server:
        assert await call(sock, "CHECK") == (0, "")
        assert server.stats.adds == {}  # a check is not an ADD


async def test_agent_absent_or_failing_makes_add_fail_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    held: list[tuple[str, tuple[str, ...]]] = []

    def hold(netns: str, ips: tuple[str, ...]) -> str:
        held.append((netns, ips))
        return "held"

    monkeypatch.setattr(plugin, "hold_pod", hold)
    sock = tmp_path / "cni.sock"
    code, out = await call(sock, "ADD")  # no socket
    assert (code, json.loads(out)) == (0, PREV)
    agent = Agent(CniReply(503, "error", "not ready"))
    async with serving(sock, agent) as server:
        code, out = await call(sock, "ADD")
        assert (code, json.loads(out)) == (0, PREV)
        assert server.stats.adds == {"error": 1}
    assert held == [("/var/run/netns/p1", ("10.22.0.5",))] * 2


async def test_slow_agent_times_out_and_add_fails_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    held: list[str] = []

    def hold(netns: str, ips: tuple[str, ...]) -> str:
        held.append(netns)
        return "held"

    monkeypatch.setattr(plugin, "hold_pod", hold)
    release = asyncio.Event()

    async def slow(event: CniAdd) -> CniReply:
        await release.wait()
        return CniReply(200, "captured")

    sock = tmp_path / "cni.sock"
    async with CniEventServer(sock, slow, Agent().on_del):
        code, out = await call(sock, "ADD", add_timeout_seconds=0.2)
        assert (code, json.loads(out)) == (0, PREV)
        release.set()
    assert held == ["/var/run/netns/p1"]


async def test_check_fails_when_nobody_holds_the_pod(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(plugin, "pod_is_held", lambda netns: False)
    code, out = await call(tmp_path / "cni.sock", "CHECK")
    assert code == 1
    assert json.loads(out)["code"] == 999
    monkeypatch.setattr(plugin, "pod_is_held", lambda netns: True)
    assert await call(tmp_path / "cni.sock", "CHECK") == (0, "")


async def test_handler_exception_is_a_500_and_counted(tmp_path: Path) -> None:
    async def broken(event: CniAdd) -> CniReply:
        raise RuntimeError("boom")

    sock = tmp_path / "cni.sock"
    async with CniEventServer(sock, broken, Agent().on_del) as server:
        body = json.dumps({"container_id": "c", "netns": "/n", "ips": []}).encode()
        status, reply = await raw_request(
            sock,
            b"POST /cmdadd HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body),
        )
        assert status == 500
        assert "boom" in reply["message"]
        assert server.stats.adds == {"error": 1}


@pytest.mark.parametrize(
    ("request_bytes", "status", "words"),
    [
        (b"POST /cmdadd HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n{oops", 400, "not JSON"),
        (b"POST /cmdadd HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n[]", 400, "JSON object"),
        (
            b'POST /cmdadd HTTP/1.1\r\nHost: x\r\nContent-Length: 17\r\n\r\n{"netns": "/n"}  ',
            400,
            "container_id",
        ),
        (
            b"POST /cmdadd HTTP/1.1\r\nHost: x\r\nContent-Length: 22\r\n\r\n"
            b'{"container_id": "c"}\n',
            400,
            "netns",
        ),
        (
            b"POST /cmdadd HTTP/1.1\r\nHost: x\r\nContent-Length: 51\r\n\r\n"
            b'{"container_id": "c", "netns": "/n", "ips": ["x"]}\n',
            400,
            "'x' is not an IP",
        ),
        (
            b"POST /cmddel HTTP/1.1\r\nHost: x\r\nContent-Length: 36\r\n\r\n"
            b'{"container_id": "c", "pod_name": 1}',
            400,
            "pod_name",
        ),
        (b"GET /cmdadd HTTP/1.1\r\nHost: x\r\n\r\n", 405, "only POST"),
        (b"POST /other HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 404, "/other"),
        (b"NOT HTTP AT ALL\r\n\r\n", 400, "bad HTTP request"),
    ],
)
async def test_malformed_requests_get_an_error_naming_the_problem(
    tmp_path: Path, request_bytes: bytes, status: int, words: str
) -> None:
    agent = Agent()
    sock = tmp_path / "cni.sock"
    async with serving(sock, agent):
        got, reply = await raw_request(sock, request_bytes)
    assert got == status
    assert words in reply["message"]
    assert agent.adds == agent.dels == []


@pytest.mark.parametrize(
    ("ips", "disable_ipv6", "families"),
    [
        (("10.22.0.5",), "0\n", ["iptables", "ip6tables"]),
        (("10.22.0.5",), "1\n", ["iptables"]),
        (("10.22.0.5", "fd00::5"), "1\n", ["iptables", "ip6tables"]),
    ],
)
def test_hold_covers_ipv6_whenever_the_pod_namespace_has_it(
    monkeypatch: pytest.MonkeyPatch, ips: tuple[str, ...], disable_ipv6: str, families: list[str]
) -> None:
    restored: list[str] = []

    def in_netns(netns: str, argv: list[str], stdin: str = "") -> str:
        if argv[0] == "cat":
            return disable_ipv6
        if "restore" in argv[0]:
            restored.append(argv[0].split("-")[0])
            assert "ISTIO_OUTPUT" in stdin
        return ""  # an empty namespace

    monkeypatch.setattr(plugin, "_in_netns", in_netns)
    done = plugin.hold_pod("/var/run/netns/p1", ips)
    assert restored == families
    assert done.startswith("IPv4 held")
