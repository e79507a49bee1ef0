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
* `kube_api_server`, for every tier: a factory of `FakeKubeApiServer`, the
  in-memory API server of `nodeagent.sandbox.kubeapi` over HTTPS on loopback (a
  self-signed certificate for 127.0.0.1) with a token file: pods, namespaces and
  DaemonSets; GET, LIST, WATCH, PATCH, POST, DELETE; it checks the bearer token
  and records every request. Start it inside the async test:
  `async with kube_api_server() as api: ...`.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
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
from nodeagent.sandbox.kubeapi import HANG, KubeApiServer
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


# -- a Kubernetes API server fake (nodeagent.sandbox.kubeapi, over TLS) -----------

TOKEN = "test-sa-token"


@dataclass(eq=False)
class FakeKubeApiServer:
    """`KubeApiServer` with the test's self-signed certificate and token file."""

    HANG = HANG  # for tests, which take the server from a fixture

    directory: Path
    server: KubeApiServer = field(init=False)

    def __post_init__(self) -> None:
        self.cert_path, self.key_path = self_signed(self.directory)
        self.token_path = self.directory / "token"
        self.token_path.write_text(TOKEN + "\n")
        self.server = KubeApiServer(token=TOKEN, cert_path=self.cert_path, key_path=self.key_path)

    def __getattr__(self, name: str) -> Any:
        # add_pod, add_namespace, set_labels, delete_pod, annotations_of, answer,
        # calls, wait_until, compact, drop_watches, pods, requests, port, url, ...
        if name == "server":
            raise AttributeError(name)
        return getattr(self.server, name)

    @property
    def token(self) -> str:
        return self.server.token

    @token.setter
    def token(self, value: str) -> None:
        self.server.token = value

    def config(self, **changes: Any) -> Config:
        """An agent Config pointing at this server."""
        settings: dict[str, Any] = {
            "kube_api_address": self.server.url,
            "kube_token_path": str(self.token_path),
            "kube_root_ca": str(self.cert_path),
        }
        return Config(**{**settings, **changes})

    async def __aenter__(self) -> FakeKubeApiServer:
        await self.server.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.server.close()


@pytest.fixture
def kube_api_server(tmp_path: Path) -> Callable[..., FakeKubeApiServer]:
    """A factory: `async with kube_api_server() as api` inside an async test; each
    `name` gets its own directory, certificate and token."""

    def make(name: str = "kube-api") -> FakeKubeApiServer:
        directory = tmp_path / name
        directory.mkdir()
        return FakeKubeApiServer(directory)

    return make
