"""The shipped control plane's gRPC edge: a delta-ADS server fed by a mesh file.

`ControlPlaneServer` loads the mesh file, serves its resources over
`DeltaAggregatedResources`, watches the file (inotify, with a slow poll as the
safety net) and pushes changes to every connected stream. An edit is applied
incrementally: only the entries it changed are parsed and validated again
(reader.py), only the resources they feed are built again and only those are
compared with what each client holds and pushed (resources.update_snapshot).
A bad edit is logged and refused; the last good mesh keeps being served. So is
an edit that would take every workload away from a node whose agent is connected
(a truncated file, typically), unless the file says so explicitly (see
mesh.check_reload). Other services (the CA) register on the same gRPC server
through `extra_servicers` and read the current mesh through `mesh_store`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import any_pb2, json_format

from nodeagent.controlplane.filewatch import Change, FileEvents
from nodeagent.controlplane.mesh import (
    MeshConfig,
    MeshError,
    check_reload,
    waypoint_fields,
)
from nodeagent.controlplane.reader import MeshFileReader
from nodeagent.controlplane.resources import (
    Changes,
    Snapshot,
    VersionedResource,
    build_snapshot,
    update_snapshot,
    versioned,
)
from nodeagent.controlplane.stream import DeltaStreamCore, StreamRequest, StreamResponse
from nodeagent.model.constants import CONTROLPLANE_XDS_PORT
from nodeagent.model.identity import Identity
from nodeagent.pb.envoy.service.discovery.v3 import ads_pb2_grpc
from nodeagent.pb.envoy.service.discovery.v3 import discovery_pb2 as discovery_pb
from nodeagent.state.mcp import resource_type_url

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.5
"""Seconds between polls of the file's stamp: the only watch where inotify is not
available, the safety net where it is (an edit is normally read on its close)."""
# A change seen by polling, or a write not yet closed, is read once the file's stamp
# has held still this long: a writer that truncates and then writes shows an empty
# file for an instant.
SETTLE_INTERVAL = 0.1
ServicerHook = Callable[[grpc.aio.Server], None]
"""Registers an extra servicer on the control plane's gRPC server."""


@dataclass(frozen=True, kw_only=True)
class ServerKeepalive:
    """The gRPC server's HTTP/2 keepalive: which client PINGs it accepts, and its own.

    gRPC's core server defaults accept a PING only every 5 minutes while it sends no
    data, and answer the third early one with GOAWAY too_many_pings: an agent PINGing
    every 30 s on a quiet xDS stream was cut off every few minutes and re-synced. These
    values are istiod's (istio pkg/grpc ServerOptions with pkg/keepalive defaults): it
    PINGs every 30 s and waits 10 s for the ACK, and it accepts client PINGs down to
    half that interval (enforcement MinTime 15 s), so what istiod accepts we accept.
    """

    time: float = 30.0
    """Seconds between the server's own PINGs (istiod Time)."""
    timeout: float = 10.0
    """Seconds to wait for a PING ACK before dropping the client (istiod Timeout)."""
    min_ping_interval: float = 15.0
    """Closest allowed spacing of client PINGs while the server sends nothing
    (istiod MinTime = Time / 2); closer ones are strikes."""
    max_ping_strikes: int = 2
    """Early PINGs tolerated before GOAWAY too_many_pings (gRPC's default)."""
    permit_without_calls: bool = True
    """Accept PINGs on a connection with no open stream (between an agent's
    reconnects); istiod's Go server refuses them, but they are harmless here."""

    def grpc_options(self) -> list[tuple[str, int]]:
        return [
            ("grpc.keepalive_time_ms", round(self.time * 1000)),
            ("grpc.keepalive_timeout_ms", round(self.timeout * 1000)),
            ("grpc.http2.min_ping_interval_without_data_ms", round(self.min_ping_interval * 1000)),
            ("grpc.http2.max_ping_strikes", self.max_ping_strikes),
            ("grpc.keepalive_permit_without_calls", int(self.permit_without_calls)),
        ]


class MeshStore:
    """The current good mesh and its snapshot; notifies listeners on change."""

    def __init__(self, mesh: MeshConfig) -> None:
        self._mesh = mesh
        self._base = build_snapshot(mesh)
        self._overrides: dict[str, dict[str, VersionedResource]] = {}
        self._snapshot: Snapshot = self._merge()
        self._listeners: set[Callable[[Snapshot, Changes | None], None]] = set()
        self._waypoint_fields: set[str] = set()
        self.report_waypoint_fields()

    def report_waypoint_fields(self) -> None:
        """Log, once per resource and field, what the node agents accept but do not apply."""
        for line in waypoint_fields(self._mesh):
            if line not in self._waypoint_fields:
                self._waypoint_fields.add(line)
                log.warning("%s needs a waypoint; the node agents do not apply it", line)

    @property
    def mesh(self) -> MeshConfig:
        return self._mesh

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    @property
    def base(self) -> tuple[MeshConfig, Snapshot]:
        """The mesh and its own snapshot (without injected resources), read together:
        what an edit is diffed against."""
        return self._mesh, self._base

    # The CA's node authorizer reads these against the current mesh.
    def node_for_token(self, token: str) -> str | None:
        return self._mesh.node_for_token(token)

    def identities_on_node(self, node: str) -> set[Identity]:
        return self._mesh.identities_on_node(node)

    def replace(
        self, mesh: MeshConfig, snapshot: Snapshot | None = None, changes: Changes | None = None
    ) -> None:
        """Serve a new mesh; `snapshot` is its build_snapshot() if already made, and
        `changes` the names in which it differs from the current one (None: unknown)."""
        if snapshot is None:
            snapshot, changes = build_snapshot(mesh), None
        self._mesh = mesh
        self._base = {t: dict(rs) for t, rs in snapshot.items()}
        self._publish(changes)

    def inject(self, type_url: str, resources: Mapping[str, bytes]) -> None:
        """Test hook: serve these serialized resources by name, over what the mesh
        says, in one push (e.g. a malformed Workload next to good ones)."""
        target = self._overrides.setdefault(type_url, {})
        for name, value in resources.items():
            target[name] = versioned(value)
        self._publish()

    def subscribe(self, listener: Callable[[Snapshot, Changes | None], None]) -> Callable[[], None]:
        """Call `listener(snapshot, changes)` on every change; `changes` names what may
        differ by type (a type absent is unchanged), or is None for anything."""
        self._listeners.add(listener)
        return lambda: self._listeners.discard(listener)

    def _merge(self) -> Snapshot:
        merged = {t: dict(rs) for t, rs in self._base.items()}
        for t, rs in self._overrides.items():
            merged.setdefault(t, {}).update(rs)
        return merged

    def _publish(self, changes: Changes | None = None) -> None:
        self._snapshot = self._merge()
        for listener in list(self._listeners):
            listener(self._snapshot, changes)


def freeze_long_lived() -> None:
    """Take what is alive now out of the cyclic GC's full collections (gc.freeze).

    A 10,000-workload mesh keeps about a million objects alive (its composed tree, kept
    to re-read edits, the model and the snapshot); each full collection walked them all,
    0.5-1 s with the loop stopped, every few edits. None of them is in a reference
    cycle, so when a full read replaces them reference counting still frees them. What
    was frozen before is unfrozen first, so that the collection can free cycles among it
    (a frozen cycle is never collected: each full read would leak the ones it froze), and
    the collection leaves no garbage to freeze. For the control plane's own process
    (`nodeagent controlplane`), not for one shared with other components.
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()


Loaded = tuple[MeshConfig, MeshConfig, Snapshot, Changes]
"""A validated edit: the new mesh, the mesh it was diffed against, its snapshot and changes."""


class MeshFileWatcher:
    """Watches a mesh file (inotify, and a poll of its mtime and size); reloads it into a
    MeshStore, incrementally.

    `connected_nodes` names the nodes whose agents have a stream open now: an
    edit may not leave one of them without workloads unless it says so.
    """

    def __init__(
        self,
        path: Path,
        store: MeshStore,
        interval: float = POLL_INTERVAL,
        connected_nodes: Callable[[], Collection[str]] = frozenset,
        settle: float = SETTLE_INTERVAL,
        *,
        reader: MeshFileReader | None = None,
        events: bool = True,
        freeze_gc: bool = False,
    ) -> None:
        self._path = path
        self._store = store
        self._interval = interval
        self._settle = settle
        self._connected_nodes = connected_nodes
        self._events = events
        self._freeze_gc = freeze_gc
        self.reader = reader or MeshFileReader(path)
        """Parses the file; it holds the last text it composed, to re-read only an edit."""
        self._stamp = self._stat()
        self._read: bytes | None = None
        """The bytes last read whose outcome cannot change on its own (applied, or
        refused as invalid): read again unchanged, they are not applied again."""
        self._change = Change.NONE
        self._wake = asyncio.Event()
        self.last_error: str | None = None
        self.reloads = 0
        self.last_spliced = False
        """The last reload parsed only the edited entry (see reader.py)."""
        self.watching_events = False

    def _stat(self) -> tuple[int, int] | None:
        try:
            st = self._path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def _changed(self) -> bool:
        stamp = self._stat()
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        return True

    def _refuse(self, error: MeshError) -> None:
        self.last_error = str(error)
        log.error("mesh file refused, still serving the last good one: %s", error)

    def _load(self) -> Loaded | None:
        """Read and validate the file and build what changed (off the loop); None when
        it is unchanged or refused."""
        try:
            raw = self.reader.read_bytes()
            if raw == self._read:
                return None
            self._read = raw
            mesh = self.reader.load(raw)
            if self._freeze_gc and not self.reader.last.spliced:
                freeze_long_lived()
            old, base = self._store.base
            snapshot, changes = update_snapshot(old, base, mesh)
            return mesh, old, snapshot, changes
        except MeshError as e:
            self._refuse(e)
        except Exception as e:
            # A validator bug must not end the watcher: later edits still get read.
            log.exception("mesh file %s not loaded; still serving the last good one", self._path)
            self.last_error = f"{self._path}: internal error: {e!r}"
            self._read = None
        return None

    def _apply(self, loaded: Loaded | None) -> bool:
        if loaded is None:
            return False
        mesh, old, snapshot, changes = loaded
        # On the loop, right before the swap: the connected nodes are current.
        try:
            notes = check_reload(self._store.mesh, mesh, self._connected_nodes())
        except MeshError as e:
            self._refuse(e)
            # Refused for the agents connected now: the same bytes may pass later.
            self._read = None
            return False
        if self._store.mesh is not old:
            # The store changed while this edit was read (a test's replace()): diff again.
            snapshot, changes = update_snapshot(*self._store.base, mesh)
        self.last_error = None
        self.reloads += 1
        self.last_spliced = self.reader.last.spliced
        self._store.replace(mesh, snapshot, changes)
        self._store.report_waypoint_fields()
        for note in (*mesh.notes, *notes):
            log.warning("mesh file accepted as written: %s", note)
        log.info("mesh file %s reloaded", self._path)
        return True

    def check(self) -> bool:
        """Reload now if the file changed; True if a new mesh was applied."""
        return self._changed() and self._apply(self._load())

    async def _settled(self) -> None:
        """Return once the stamp has not moved for one settle interval."""
        moving = True
        while moving:  # polling a file: there is no event to wait on
            await asyncio.sleep(self._settle)
            moving = self._changed()

    def _on_event(self, change: Change) -> None:
        self._change = max(self._change, change)
        self._wake.set()

    async def _next_change(self) -> bool:
        """Wait for an event or the next poll; True when the file should be read now."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._interval):
                await self._wake.wait()
        change, self._change = self._change, Change.NONE
        self._wake.clear()
        if change is Change.FINISHED:
            self._changed()  # the poll need not see this write again
            return True
        if change is Change.WRITING:
            self._changed()  # its stamp taken: the poll need not see this write again
        elif not self._changed():
            return False
        await self._settled()
        return True

    async def run(self) -> None:
        events = FileEvents(self._path) if self._events else None
        if events is not None:
            try:
                events.start(self._on_event)
                self.watching_events = True
            except OSError as exc:
                log.warning("mesh file %s: no inotify (%s); polling it", self._path, exc)
                events = None
        try:
            while True:
                if not await self._next_change():
                    continue
                # Off the loop: a full read of a large file takes seconds (an edit
                # of one entry, milliseconds), and streams keep being served meanwhile.
                loaded = await asyncio.to_thread(self._load)
                self._apply(loaded)
        finally:
            if events is not None:
                events.close()


def _to_request(req: discovery_pb.DeltaDiscoveryRequest) -> StreamRequest:
    return StreamRequest(
        type_url=req.type_url,
        response_nonce=req.response_nonce,
        error_message=req.error_detail.message if req.HasField("error_detail") else None,
        initial_resource_versions=dict(req.initial_resource_versions),
        subscribe=list(req.resource_names_subscribe),
        unsubscribe=list(req.resource_names_unsubscribe),
    )


def _to_response(resp: StreamResponse) -> discovery_pb.DeltaDiscoveryResponse:
    out = discovery_pb.DeltaDiscoveryResponse(
        type_url=resp.type_url, nonce=resp.nonce, removed_resources=resp.removed
    )
    # Config kinds travel in istiod's envelope, whose Any type differs from the response's.
    any_type = resource_type_url(resp.type_url)
    for name, version, value in resp.resources:
        out.resources.append(
            discovery_pb.Resource(
                name=name,
                version=version,
                resource=any_pb2.Any(type_url=any_type, value=value),
            )
        )
    return out


@dataclass
class StreamInfo:
    """What a client presented when it opened its stream (for logs and tests)."""

    peer: str
    token_node: str | None
    metadata: dict[str, str]
    node_id: str = ""
    node_metadata: dict[str, object] = field(default_factory=dict)
    initial_resource_versions: dict[str, dict[str, str]] = field(default_factory=dict)
    nacks: list[str] = field(default_factory=list)

    @property
    def node(self) -> str | None:
        """The node this client runs on: its token's, else the NODE_NAME it sent."""
        claimed = self.node_metadata.get("NODE_NAME")
        return self.token_node or (claimed if isinstance(claimed, str) and claimed else None)


class AdsServicer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    """DeltaAggregatedResources over a MeshStore; one DeltaStreamCore per stream."""

    def __init__(self, store: MeshStore, *, require_token: bool = False) -> None:
        self._store = store
        self._require_token = require_token
        self.active_streams = 0
        self.streams: list[StreamInfo] = []
        """Every stream opened, oldest first (bounded)."""
        self.open_streams: list[StreamInfo] = []
        """The streams open now."""
        self.stream_tasks: set[asyncio.Task[Any]] = set()
        """gRPC's task for each open stream; stop() waits for them to finish."""

    def connected_nodes(self) -> set[str]:
        """Nodes with an agent's stream open now (what a reload may not empty)."""
        return {node for info in self.open_streams if (node := info.node) is not None}

    async def DeltaAggregatedResources(
        self,
        request_iterator: AsyncIterator[discovery_pb.DeltaDiscoveryRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[discovery_pb.DeltaDiscoveryResponse]:
        task = asyncio.current_task()
        if task is not None:
            self.stream_tasks.add(task)
            task.add_done_callback(self.stream_tasks.discard)
        md = {k: v for k, v in (context.invocation_metadata() or ())}
        token = str(md.get("authorization", "")).removeprefix("Bearer ").strip()
        node = self._store.node_for_token(token)
        if self._require_token and node is None:
            # End the call with a status instead of abort(): an abort racing the
            # client's first writes can reach the client as a bare INTERNAL error,
            # hiding the reason from the operator.
            log.warning("xds stream from %s refused: unknown bearer token", context.peer())
            # Take the client's initial requests (one per type, written back to
            # back) before ending the call, so the refusal does not race its writes.
            requests = aiter(request_iterator)
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await anext(requests)
                while True:
                    async with asyncio.timeout(0.1):
                        await anext(requests)
            context.set_code(grpc.StatusCode.UNAUTHENTICATED)
            context.set_details("unknown bearer token")
            return
        peer = context.peer()
        info = StreamInfo(peer=peer, token_node=node, metadata={k: str(v) for k, v in md.items()})
        self.streams = [*self.streams[-99:], info]
        core = DeltaStreamCore(self._store.snapshot)
        outbox: asyncio.Queue[StreamResponse | None] = asyncio.Queue()

        def on_snapshot(snapshot: Snapshot, changes: Changes | None) -> None:
            for r in core.on_snapshot(snapshot, changes):
                outbox.put_nowait(r)

        async def read() -> None:
            try:
                async for req in request_iterator:
                    if req.HasField("node") and not info.node_id:
                        info.node_id = req.node.id
                        info.node_metadata = json_format.MessageToDict(req.node.metadata)
                        log.info(
                            "xds stream from %s: node %s (token node %s)", peer, req.node.id, node
                        )
                    if not req.response_nonce:
                        info.initial_resource_versions[req.type_url] = dict(
                            req.initial_resource_versions
                        )
                    for r in core.on_request(_to_request(req)):
                        outbox.put_nowait(r)
                    for ack in core.acks:
                        if ack.error_message is not None:
                            info.nacks = [*info.nacks[-19:], ack.error_message]
                            log.warning(
                                "xds NACK from %s (%s) for %s nonce %s: %s",
                                peer,
                                node,
                                ack.type_url,
                                ack.nonce,
                                ack.error_message,
                            )
                    core.acks.clear()
            finally:
                outbox.put_nowait(None)

        unsubscribe = self._store.subscribe(on_snapshot)
        reader = asyncio.create_task(read(), name=f"ads-read-{peer}")
        self.active_streams += 1
        self.open_streams.append(info)
        try:
            while (item := await outbox.get()) is not None:
                yield _to_response(item)
            # Surface a reader failure (other than the stream ending) to gRPC.
            await reader
        finally:
            self.active_streams -= 1
            self.open_streams = [i for i in self.open_streams if i is not info]
            unsubscribe()
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader


class ControlPlaneServer:
    """The delta-xDS server plus any extra servicers, on one gRPC port."""

    def __init__(
        self,
        mesh_path: str | Path,
        listen: str = f"127.0.0.1:{CONTROLPLANE_XDS_PORT}",
        *,
        extra_servicers: Sequence[ServicerHook] = (),
        server_credentials: grpc.ServerCredentials | None = None,
        poll_interval: float = POLL_INTERVAL,
        require_token: bool = False,
        options: Mapping[str, int] | None = None,
        keepalive: ServerKeepalive | None = ServerKeepalive(),
        freeze_gc: bool = False,
    ) -> None:
        """`freeze_gc`: after each full read of the mesh file, freeze what is alive
        (see freeze_long_lived); for a process that is only the control plane."""
        self._mesh_path = Path(mesh_path)
        self._listen = listen
        self._extra = list(extra_servicers)
        self._creds = server_credentials
        self._options = dict(options or {})
        # None leaves gRPC's own keepalive defaults (tests use it to show why they fail).
        self._keepalive = keepalive
        # A bad file at start is an error for the caller (nothing good to serve).
        reader = MeshFileReader(self._mesh_path)
        self.mesh_store = MeshStore(reader.load())
        if freeze_gc:
            freeze_long_lived()
        for note in self.mesh_store.mesh.notes:
            log.warning("mesh file accepted as written: %s", note)
        self.servicer = AdsServicer(self.mesh_store, require_token=require_token)
        self.watcher = MeshFileWatcher(
            self._mesh_path,
            self.mesh_store,
            poll_interval,
            self.servicer.connected_nodes,
            reader=reader,
            freeze_gc=freeze_gc,
        )
        self._server: grpc.aio.Server | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self.port = 0

    def add_servicer(self, hook: ServicerHook) -> None:
        """Register another service (the CA) on this server; call before start()."""
        if self._server is not None:
            raise RuntimeError("add_servicer after start()")
        self._extra.append(hook)

    @property
    def address(self) -> str:
        host = self._listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    async def start(self) -> None:
        options = [
            ("grpc.max_send_message_length", 200 * 1024 * 1024),
            ("grpc.max_receive_message_length", 200 * 1024 * 1024),
            ("grpc.so_reuseport", 0),
            *(self._keepalive.grpc_options() if self._keepalive is not None else ()),
            *self._options.items(),
        ]
        server = grpc.aio.server(options=options)
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(self.servicer, server)
        for hook in self._extra:
            hook(server)
        if self._creds is not None:
            self.port = server.add_secure_port(self._listen, self._creds)
        else:
            self.port = server.add_insecure_port(self._listen)
        if self.port == 0:
            raise OSError(f"cannot listen on {self._listen}")
        await server.start()
        self._server = server
        self._watch_task = asyncio.create_task(self.watcher.run(), name="mesh-file-watcher")
        # No "serving ... on ADDR" log here: the entry point prints that one line
        # (scripts read it for the port), and the sandbox's log would show it twice.

    async def stop(self, grace: float | None = 0.5) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch_task
            self._watch_task = None
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
            # grpc's stop() can return while a stream's task is still unwinding;
            # wait for them so nothing of ours outlives the server.
            pending = set(self.servicer.stream_tasks)
            if pending:
                await asyncio.wait(pending, timeout=2.0)

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    async def __aenter__(self) -> ControlPlaneServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
