"""The state file: records round-trip, claims are exclusive, updates are atomic."""

from __future__ import annotations

from pathlib import Path

from nodeagent.sandbox.state import ProcessRecord, SandboxState, StateStore


def _state(name: str = "s") -> SandboxState:
    return SandboxState(name=name, nodes=2, pods_per_node=1, namespaces=("s-underlay", "s-node1"))


def _record(name: str, pid: int | None = None) -> ProcessRecord:
    return ProcessRecord(
        kind="demoapp", name=name, netns="s-node1-pod1", argv=("python", "-m", "x"), log="/l",
        pid=pid, start_time=None if pid is None else 42,
    )  # fmt: skip


def test_state_round_trips_through_dict() -> None:
    state = _state().with_process(_record("app", 10)).with_process(_record("agent"))
    assert SandboxState.from_dict(state.to_dict()) == state


def test_with_process_replaces_a_record_of_the_same_name() -> None:
    state = _state().with_process(_record("app")).with_process(_record("app", 7))
    assert [(p.name, p.pid) for p in state.processes] == [("app", 7)]
    assert state.without_process("app").processes == ()


def test_claim_is_exclusive_and_creates_the_log_dir(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "root")
    assert store.claim(_state())
    assert not store.claim(_state())
    assert (tmp_path / "root" / "s" / "logs").is_dir()
    assert store.load("s") == _state()
    assert store.names() == ["s"]


def test_update_saves_the_change_and_remove_deletes_everything(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.claim(_state())
    store.update("s", lambda st: st.with_process(_record("app", 5)))
    loaded = store.load("s")
    assert loaded is not None and loaded.process("app") == _record("app", 5)
    assert store.log_path("s", "app") == tmp_path / "s" / "logs" / "app.log"
    store.remove("s")
    assert not store.exists("s")
    assert store.load("s") is None
    assert store.update("s", lambda st: st) is None


def test_a_torn_state_file_loads_as_none(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.claim(_state())
    (tmp_path / "s" / "state.json").write_text('{"name": "s", "no')
    assert store.load("s") is None
    assert store.exists("s")  # `down` still knows there is something to remove
