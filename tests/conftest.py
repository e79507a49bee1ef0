"""Test harness shared by every tier.

* Tiers come from the directory: tests/unit -> `unit`, tests/netns -> `netns`,
  tests/e2e -> `e2e`, tests/kind -> `kind`, tests/bench -> `bench`.
* `netns` and `e2e` tests need root and the real kernel. Without root they skip,
  except with CI=true, where any skip outside the `kind` tier is a failure: CI
  runs as root, so a privileged test that skips there is a defect.
* `async def` tests run on a fresh event loop; a test that leaves asyncio tasks
  running fails, naming them.
* Sandbox fixtures for the root tiers: `sandbox_name` (a short unique name;
  `nodeagent sandbox down` runs at teardown whatever the test did),
  `sandbox_names` (a factory of such names), `nodeagent_cli` (the real CLI as a
  subprocess) and the module-scoped `sandbox_2x2` (its `status -o json` dict).
* `kube_api_server`, for every tier: a factory of `FakeKubeApiServer`, a real HTTPS
  server on loopback (a self-signed certificate for 127.0.0.1) that implements just
  the API server endpoints the agent calls (GET/PATCH a pod, GET a DaemonSet), checks
  the bearer token, and records every request. Start it inside the async test:
  `async with kube_api_server() as api: ...`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import ssl
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings as hypothesis_settings

from nodeagent.config import Config
from tests.builders import self_signed

TIERS = ("unit", "netns", "e2e", "kind", "bench")
PRIVILEGED = {"netns", "e2e"}
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# CI replays a fixed set of examples so a run is reproducible; locally Hypothesis
# explores new ones (and keeps failures in its database).
hypothesis_settings.register_profile("ci", derandomize=True, print_blob=True)
if IN_CI:
    hypothesis_settings.load_profile("ci")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    root = Path(str(config.rootpath)) / "tests"
    for item in items:
        try:
            tier = Path(str(item.path)).relative_to(root).parts[0]
        except ValueError:
            continue
        if tier in TIERS:
            item.add_marker(getattr(pytest.mark, tier))


def pytest_runtest_setup(item: pytest.Item) -> None:
    tiers = {m.name for m in item.iter_markers()} & PRIVILEGED
    if tiers and os.geteuid() != 0:
        pytest.skip(f"{'/'.join(sorted(tiers))} tests need root and the real kernel")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if not IN_CI or not report.skipped or item.get_closest_marker("kind"):
        return
    if hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = f"skipped under CI=true, which runs as root: {reason}"


def _describe(coro: Any) -> str:
    """A leaked coroutine's qualified name (Cython ones from grpc have no useful repr)."""
    name = getattr(coro, "__qualname__", None) or getattr(coro, "__name__", None)
    return f"{name} ({coro!r})" if name else repr(coro)


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """Run `async def` tests on their own loop and fail on leaked tasks."""
    func = pyfuncitem.obj
    if not inspect.iscoroutinefunction(func):
        return None
    argnames = pyfuncitem._fixtureinfo.argnames
    kwargs = {name: pyfuncitem.funcargs[name] for name in argnames}
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(func(**kwargs))
        # Let callbacks scheduled by the test's last statements run, and give tasks
        # that are already finishing (grpc ends a closed call's status task a few
        # milliseconds later) a short, bounded grace; what is left then has leaked.
        loop.run_until_complete(asyncio.sleep(0))
        pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
        if pending:
            loop.run_until_complete(asyncio.wait(pending, timeout=0.5))
        leaked = [t for t in asyncio.all_tasks(loop) if not t.done()]
        if leaked:
            names = ", ".join(sorted(f"{t.get_name()}:{_describe(t.get_coro())}" for t in leaked))
            for t in leaked:
                t.cancel()
            # Bounded: a task that ignores cancellation must not hang the run.
            loop.run_until_complete(asyncio.wait(leaked, timeout=2.0))
            pytest.fail(f"test leaked {len(leaked)} asyncio task(s): {names}")
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
    return True


# Sandboxes ------------------------------------------------------------------
NODEAGENT = str(Path(sys.executable).parent / "nodeagent")

CliRunner = Callable[..., subprocess.CompletedProcess[str]]


def run_nodeagent(
    *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [NODEAGENT, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        check=False,
    )


def new_sandbox_name() -> str:
    # Short (namespace names carry it) and unique across concurrent test runs.
    return f"t{uuid.uuid4().hex[:7]}"


def _down(name: str) -> None:
    result = run_nodeagent("sandbox", "down", name)
    if result.returncode != 0:
        print(f"sandbox down {name} failed: {result.stderr.strip()}", file=sys.stderr)


@pytest.fixture
def nodeagent_cli() -> CliRunner:
    return run_nodeagent


@pytest.fixture
def sandbox_name() -> Iterator[str]:
    name = new_sandbox_name()
    try:
        yield name
    finally:
        _down(name)


@pytest.fixture
def sandbox_names() -> Iterator[Callable[[], str]]:
    """A factory of unique names (for tests that need several sandboxes)."""
    made: list[str] = []

    def make() -> str:
        made.append(new_sandbox_name())
        return made[-1]

    try:
        yield make
    finally:
        for name in made:
            _down(name)


@pytest.fixture(scope="module")
def sandbox_2x2() -> Iterator[dict[str, Any]]:
    if os.geteuid() != 0:
        pytest.skip("netns tests need root and the real kernel")
    name = new_sandbox_name()
    try:
        up = run_nodeagent("sandbox", "up", "--name", name, "--nodes", "2", "--pods-per-node", "2")
        assert up.returncode == 0, up.stderr
        status = run_nodeagent("sandbox", "status", name, "-o", "json")
        assert status.returncode == 0, status.stderr
        yield json.loads(status.stdout)
    finally:
        _down(name)


# -- a Kubernetes API server fake (the agent's few calls) ---------------------------

TOKEN = "test-sa-token"
HANG = -1  # an override status that never answers (the client must time out)


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: Any  # decoded JSON, or None


def merge_patch(target: dict[str, Any], patch: dict[str, Any]) -> None:
    """RFC 7386, in place."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict):
            child = target.get(key)
            if not isinstance(child, dict):
                child = target[key] = {}
            merge_patch(child, value)
        else:
            target[key] = value


def status_body(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "status": "Failure",
        "code": code,
        "reason": reason,
        "message": message,
    }


@dataclass(eq=False)
class FakeKubeApiServer:
    HANG = HANG  # for tests, which cannot import this module

    directory: Path
    pods: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    daemonsets: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)
    # (METHOD, path) -> statuses to answer with before behaving normally again.
    overrides: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    token: str = TOKEN
    port: int = 0
    _server: asyncio.Server | None = None
    _handlers: set[asyncio.Task[Any]] = field(default_factory=set)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _version: int = 100

    def __post_init__(self) -> None:
        self.cert_path, self.key_path = self_signed(self.directory)
        self.token_path = self.directory / "token"
        self.token_path.write_text(self.token + "\n")

    # -- set-up --------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def config(self, **changes: Any) -> Config:
        """An agent Config pointing at this server."""
        settings: dict[str, Any] = {
            "kube_api_address": self.url,
            "kube_token_path": str(self.token_path),
            "kube_root_ca": str(self.cert_path),
        }
        return Config(**{**settings, **changes})

    def add_pod(
        self, namespace: str, name: str, *, node: str, annotations: dict[str, str] | None = None
    ) -> None:
        self.pods[(namespace, name)] = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "resourceVersion": self._next_version(),
                "annotations": dict(annotations or {}),
            },
            "spec": {"nodeName": node},
        }

    def annotations_of(self, namespace: str, name: str) -> dict[str, str]:
        return dict(self.pods[(namespace, name)]["metadata"].get("annotations") or {})

    def add_daemonset(self, namespace: str, name: str, *, deleting: bool = False) -> None:
        meta: dict[str, Any] = {"name": name, "namespace": namespace}
        if deleting:
            meta["deletionTimestamp"] = "2025-01-01T00:00:00Z"
        self.daemonsets[(namespace, name)] = {"kind": "DaemonSet", "metadata": meta}

    def answer(self, method: str, path: str, *statuses: int) -> None:
        """Answer the next requests to METHOD path with these statuses (HANG: never)."""
        self.overrides.setdefault((method, path), []).extend(statuses)

    def calls(self, method: str | None = None) -> list[Recorded]:
        return [r for r in self.requests if method is None or r.method == method]

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Until `predicate()` holds, re-checked after every request."""
        while not predicate():
            self._changed.clear()
            await self._changed.wait()

    async def __aenter__(self) -> FakeKubeApiServer:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert_path, self.key_path)
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=context)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()

    # -- serving -------------------------------------------------------------------

    def _next_version(self) -> str:
        self._version += 1
        return str(self._version)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
                await self._one(reader, writer)
        finally:
            self._handlers.discard(task)
            writer.transport.abort()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        method, path, _ = head[0].split(" ", 2)
        headers = {}
        for line in head[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        raw = await reader.readexactly(int(headers.get("content-length", "0")))
        body = json.loads(raw) if raw else None
        self.requests.append(Recorded(method, path, headers, body))
        self._changed.set()
        queued = self.overrides.get((method, path))
        if queued:
            code = queued.pop(0)
            if code == HANG:
                await asyncio.Event().wait()  # until the test ends and cancels us
            status, reply = code, status_body(code, "Forced", f"forced {code} for {path}")
        else:
            status, reply = self._route(method, path, headers, body)
        payload = json.dumps(reply).encode()
        # Pod reads come chunked, as the real API server sends larger objects.
        chunked = method == "GET" and "/pods/" in path
        lines = [f"HTTP/1.1 {status} X", "Content-Type: application/json", "Connection: close"]
        if chunked:
            half = len(payload) // 2
            framed = b"".join(
                b"%x\r\n%s\r\n" % (len(part), part) for part in (payload[:half], payload[half:])
            )
            data = framed + b"0\r\n\r\n"
            lines.append("Transfer-Encoding: chunked")
        else:
            data = payload
            lines.append(f"Content-Length: {len(payload)}")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + data)
        await writer.drain()

    def _route(
        self, method: str, path: str, headers: dict[str, str], body: Any
    ) -> tuple[int, dict[str, Any]]:
        if headers.get("authorization") != f"Bearer {self.token}":
            return 401, status_body(401, "Unauthorized", "Unauthorized")
        parts = path.strip("/").split("/")
        if parts[:3] == ["api", "v1", "namespaces"] and len(parts) == 6 and parts[4] == "pods":
            key, kind, store = (parts[3], parts[5]), "pods", self.pods
        elif parts[:4] == ["apis", "apps", "v1", "namespaces"] and len(parts) == 7:
            key, kind, store = (parts[4], parts[6]), "daemonsets", self.daemonsets
        else:
            return 404, status_body(404, "NotFound", f"no route {path}")
        obj = store.get(key)
        if obj is None:
            return 404, status_body(404, "NotFound", f'{kind} "{key[1]}" not found')
        if method == "GET":
            return 200, obj
        if method == "PATCH" and kind == "pods":
            if headers.get("content-type") != "application/merge-patch+json":
                return 415, status_body(415, "UnsupportedMediaType", "bad content type")
            wanted = (body.get("metadata") or {}).get("resourceVersion")
            if wanted and wanted != obj["metadata"]["resourceVersion"]:
                return 409, status_body(409, "Conflict", "the object has been modified")
            merge_patch(obj, body)
            obj["metadata"]["resourceVersion"] = self._next_version()
            return 200, obj
        return 405, status_body(405, "MethodNotAllowed", method)


@pytest.fixture
def kube_api_server(tmp_path: Path) -> Callable[..., FakeKubeApiServer]:
    """A factory: `async with kube_api_server() as api` inside an async test; each
    `name` gets its own directory, certificate and token."""

    def make(name: str = "kube-api") -> FakeKubeApiServer:
        directory = tmp_path / name
        directory.mkdir()
        return FakeKubeApiServer(directory)

    return make
