import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nodeagent.node.lifecycle import (
    _TABLE,
    NO_RECORD,
    AddressMismatch,
    Backoff,
    LifecycleError,
    Netns,
    NetnsFound,
    NetnsLost,
    PodLifecycle,
    PodState,
    Released,
    SetupDone,
    SetupFailed,
    StartSetup,
    StartTeardown,
    TeardownDone,
    TeardownFailed,
    Unenrolled,
    WorkloadGone,
    WorkloadPlaced,
)

NS1 = Netns(path="/var/run/netns/pod1", inode=101)
NS2 = Netns(path="/var/run/netns/pod1-new", inode=202)


def placed_and_found(lc: PodLifecycle, uid: str = "u1", ns: Netns = NS1) -> list:
    lc.handle(WorkloadPlaced(uid=uid, now=0))
    return lc.handle(NetnsFound(uid=uid, netns=ns, now=0))


def test_pod_goes_pending_capturing_ready():
    lc = PodLifecycle()
    assert lc.handle(WorkloadPlaced(uid="u1", now=0)) == []
    assert lc.pods["u1"].state is PodState.PENDING
    actions = lc.handle(NetnsFound(uid="u1", netns=NS1, now=1))
    assert actions == [StartSetup(uid="u1", netns=NS1, attempt=1)]
    assert lc.pods["u1"].state is PodState.CAPTURING
    assert lc.handle(SetupDone(uid="u1", now=2)) == []
    assert lc.pods["u1"].state is PodState.READY
    assert lc.all_settled()


def test_namespace_seen_before_workload_waits_for_the_workload():
    lc = PodLifecycle()
    assert lc.handle(NetnsFound(uid="u1", netns=NS1, now=0)) == []
    assert "u1" not in lc.pods


def test_failed_setup_is_retried_with_backoff():
    lc = PodLifecycle(backoff=Backoff(initial=1.0, factor=2.0, cap=5.0))
    placed_and_found(lc)
    lc.handle(SetupFailed(uid="u1", reason="port 15001 in use", now=10))
    rec = lc.pods["u1"]
    assert rec.state is PodState.FAILED
    assert rec.last_error == "port 15001 in use"
    assert rec.retry_at == 11.0
    assert lc.due_retries(10.5) == []
    assert lc.due_retries(11.0) == [StartSetup(uid="u1", netns=NS1, attempt=2)]
    lc.handle(SetupFailed(uid="u1", reason="again", now=12))
    assert lc.pods["u1"].retry_at == 14.0  # second attempt waits twice as long
    now = 100.0
    for _ in range(3, 8):
        assert lc.due_retries(now)
        lc.handle(SetupFailed(uid="u1", reason="again", now=now))
        now += 100
    assert lc.pods["u1"].retry_at == now - 100 + 5.0  # capped
    assert lc.all_settled()  # failed counts as reported


def test_workload_record_gone_while_ready_closes_listeners_keeps_capture_and_holds():
    lc = PodLifecycle()
    placed_and_found(lc)
    lc.handle(SetupDone(uid="u1", now=1))
    actions = lc.handle(WorkloadGone(uid="u1", now=2))
    assert actions == [StartTeardown(uid="u1", netns=NS1, remove_capture=False)]
    assert lc.pods["u1"].state is PodState.REMOVING
    lc.handle(TeardownDone(uid="u1", now=3))
    rec = lc.pods["u1"]
    assert rec.state is PodState.HELD and rec.netns == NS1
    assert rec.last_error == NO_RECORD
    assert lc.all_settled()


def test_held_pod_is_served_again_when_its_record_returns_and_matches():
    lc = PodLifecycle()
    placed_and_found(lc)
    lc.handle(SetupDone(uid="u1", now=1))
    lc.handle(WorkloadGone(uid="u1", now=2))
    lc.handle(TeardownDone(uid="u1", now=3))
    assert lc.handle(WorkloadPlaced(uid="u1", now=4)) == []
    assert lc.pods["u1"].state is PodState.HELD  # the scan decides, not the record alone
    assert lc.handle(NetnsFound(uid="u1", netns=NS1, now=5)) == [
        StartSetup(uid="u1", netns=NS1, attempt=1)
    ]
    lc.handle(SetupDone(uid="u1", now=6))
    assert lc.pods["u1"].state is PodState.READY and lc.pods["u1"].last_error == ""


def test_removed_during_setup_is_held_after_setup_finishes():
    lc = PodLifecycle()
    placed_and_found(lc)
    assert lc.handle(WorkloadGone(uid="u1", now=1)) == []
    assert lc.handle(SetupDone(uid="u1", now=2)) == [StartTeardown(uid="u1", netns=NS1)]
    lc.handle(TeardownDone(uid="u1", now=3))
    assert lc.pods["u1"].state is PodState.HELD


def test_address_mismatch_holds_a_ready_pod_with_the_reason():
    lc = PodLifecycle()
    placed_and_found(lc)
    lc.handle(SetupDone(uid="u1", now=1))
    why = "address 10.9.9.9 is not in the namespace (it has 10.1.0.5)"
    assert lc.handle(AddressMismatch(uid="u1", reason=why, now=2)) == [
        StartTeardown(uid="u1", netns=NS1)
    ]
    lc.handle(TeardownDone(uid="u1", now=3))
    assert lc.pods["u1"].state is PodState.HELD and lc.pods["u1"].last_error == why


def test_failed_pod_whose_record_goes_is_held_at_once():
    lc = PodLifecycle()
    placed_and_found(lc)
    lc.handle(SetupFailed(uid="u1", reason="port 15001 in use", now=1))
    assert lc.handle(WorkloadGone(uid="u1", now=2)) == []
    assert lc.pods["u1"].state is PodState.HELD
    assert lc.due_retries(1000) == []


def test_held_pod_whose_namespace_is_gone_is_forgotten():
    lc = PodLifecycle()
    placed_and_found(lc)
    lc.handle(SetupFailed(uid="u1", reason="x", now=1))
    lc.handle(WorkloadGone(uid="u1", now=2))
    assert lc.handle(NetnsLost(uid="u1", now=3)) == []
    assert lc.pods == {}


def test_release_is_the_only_way_capture_is_removed():
    lc = PodLifecycle()
    placed_and_found(lc)
    assert lc.handle(Released(uid="u1", now=1)) == []  # only held pods are released
    lc.handle(SetupDone(uid="u1", now=1))
    assert lc.handle(Released(uid="u1", now=1)) == []
    lc.handle(WorkloadGone(uid="u1", now=2))
    lc.handle(TeardownDone(uid="u1", now=3))
    assert lc.handle(Released(uid="u1", now=4)) == [
        StartTeardown(uid="u1", netns=NS1, remove_capture=True)
    ]
    lc.handle(TeardownDone(uid="u1", now=5))
    assert lc.pods == {}


def test_namespace_left_for_another_stays_held_under_its_own_key():
    lc = PodLifecycle()
    placed_and_found(lc)
    lc.handle(SetupDone(uid="u1", now=1))
    assert lc.handle(NetnsFound(uid="u1", netns=NS2, now=2)) == [StartTeardown(uid="u1", netns=NS1)]
    assert lc.handle(TeardownDone(uid="u1", now=3)) == [StartSetup(uid="u1", netns=NS2, attempt=1)]
    detached = lc.pods["u1@101"]
    assert detached.state is PodState.HELD and detached.netns == NS1
    assert lc.handle(NetnsLost(uid="u1@101", now=4)) == []
    assert "u1@101" not in lc.pods and lc.pods["u1"].netns == NS2


def test_namespace_reused_by_new_pod_moves_the_listeners():
    lc = PodLifecycle()
    placed_and_found(lc)
    lc.handle(SetupDone(uid="u1", now=1))
    assert lc.handle(NetnsFound(uid="u1", netns=NS2, now=2)) == [StartTeardown(uid="u1", netns=NS1)]
    assert lc.handle(TeardownDone(uid="u1", now=3)) == [StartSetup(uid="u1", netns=NS2, attempt=1)]
    lc.handle(SetupDone(uid="u1", now=4))
    assert lc.pods["u1"].netns == NS2 and lc.pods["u1"].state is PodState.READY


def test_namespace_lost_while_failed_goes_back_to_pending():
    lc = PodLifecycle()
    placed_and_found(lc)
    lc.handle(SetupFailed(uid="u1", reason="vanished", now=1))
    lc.handle(NetnsLost(uid="u1", now=2))
    assert lc.pods["u1"].state is PodState.PENDING
    assert lc.due_retries(100) == []


def test_teardown_failure_is_recorded_and_pod_forgotten():
    lc = PodLifecycle()
    placed_and_found(lc)
    lc.handle(SetupDone(uid="u1", now=1))
    assert lc.handle(NetnsLost(uid="u1", now=2)) == [StartTeardown(uid="u1", netns=NS1)]
    lc.handle(TeardownFailed(uid="u1", reason="netns gone", now=3))
    assert "u1" not in lc.pods


def test_unexpected_event_is_an_error_not_ignored():
    lc = PodLifecycle()
    placed_and_found(lc)
    lc.handle(SetupDone(uid="u1", now=1))
    with pytest.raises(LifecycleError, match="no transition from ready on SetupDone"):
        lc.handle(SetupDone(uid="u1", now=2))


def test_events_for_unknown_pods_that_mean_removal_are_idempotent():
    lc = PodLifecycle()
    assert lc.handle(WorkloadGone(uid="x", now=0)) == []
    with pytest.raises(LifecycleError):
        lc.handle(SetupDone(uid="x", now=0))


def test_counts_by_state():
    lc = PodLifecycle()
    placed_and_found(lc, "a")
    lc.handle(WorkloadPlaced(uid="b", now=0))
    assert lc.counts()["capturing"] == 1 and lc.counts()["pending"] == 1
    assert not lc.all_settled()


EVENTS = st.sampled_from(
    [
        lambda now: WorkloadPlaced(uid="u", now=now),
        lambda now: WorkloadGone(uid="u", now=now),
        lambda now: NetnsFound(uid="u", netns=NS1, now=now),
        lambda now: NetnsFound(uid="u", netns=NS2, now=now),
        lambda now: NetnsLost(uid="u", now=now),
        lambda now: AddressMismatch(uid="u", reason="elsewhere", now=now),
        lambda now: Released(uid="u", now=now),
        lambda now: Unenrolled(uid="u", now=now),
    ]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(EVENTS, max_size=25), st.data())
def test_random_external_events_never_leave_an_operation_unanswered(events, data):
    """Drive the machine like the manager does: each started operation completes
    (success or failure) before later events; the machine never raises, never
    has two operations in flight for one pod, and never removes capture unless
    the pod was released or unenrolled (fail closed)."""
    lc = PodLifecycle()
    in_flight: list = []
    now = 0.0
    let_go = False  # an operator released it or the user unenrolled it
    for make in events:
        now += 1
        ev = make(now)
        let_go = let_go or isinstance(ev, Released | Unenrolled)
        in_flight.extend(lc.handle(ev))
        while in_flight:
            for action in in_flight:
                if isinstance(action, StartTeardown) and action.remove_capture:
                    assert let_go
            assert len(in_flight) == 1
            action = in_flight.pop()
            ok = data.draw(st.booleans())
            if isinstance(action, StartSetup):
                done = (
                    SetupDone(uid="u", now=now) if ok else SetupFailed(uid="u", reason="x", now=now)
                )
            else:
                done = (
                    TeardownDone(uid="u", now=now)
                    if ok
                    else TeardownFailed(uid="u", reason="x", now=now)
                )
            in_flight.extend(lc.handle(done))
        in_flight.extend(lc.due_retries(now))
        while in_flight:
            action = in_flight.pop()
            in_flight.extend(
                lc.handle(SetupDone(uid="u", now=now))
                if isinstance(action, StartSetup)
                else lc.handle(TeardownDone(uid="u", now=now))
            )
    if "u" in lc.pods:
        assert lc.pods["u"].state in (
            PodState.PENDING,
            PodState.READY,
            PodState.FAILED,
            PodState.HELD,
        )
    for key, rec in lc.pods.items():
        if key != "u":  # a namespace the pod left: held until released or gone
            assert rec.state in (PodState.HELD, PodState.REMOVING)


def test_table_covers_every_state():
    states = {s for s, _ in _TABLE}
    assert states == set(PodState)


def test_an_unenrolled_ready_pod_has_its_capture_removed_and_is_forgotten():
    lc = PodLifecycle()
    placed_and_found(lc)
    lc.handle(SetupDone(uid="u1", now=1))
    assert lc.handle(Unenrolled(uid="u1", now=2)) == [
        StartTeardown(uid="u1", netns=NS1, remove_capture=True)
    ]
    assert lc.handle(TeardownDone(uid="u1", now=3)) == []
    assert "u1" not in lc.pods


def test_unenrolled_during_setup_removes_capture_once_setup_ends():
    lc = PodLifecycle()
    placed_and_found(lc)
    assert lc.handle(Unenrolled(uid="u1", now=1)) == []
    assert lc.handle(SetupDone(uid="u1", now=2)) == [
        StartTeardown(uid="u1", netns=NS1, remove_capture=True)
    ]
    lc.handle(TeardownDone(uid="u1", now=3))
    assert "u1" not in lc.pods


def test_unenrolled_while_a_hold_runs_removes_capture_after_it():
    lc = PodLifecycle()
    placed_and_found(lc)
    lc.handle(SetupDone(uid="u1", now=1))
    [hold] = lc.handle(WorkloadGone(uid="u1", now=2))
    assert isinstance(hold, StartTeardown) and not hold.remove_capture
    assert lc.handle(Unenrolled(uid="u1", now=3)) == []
    assert lc.handle(TeardownDone(uid="u1", now=4)) == [
        StartTeardown(uid="u1", netns=NS1, remove_capture=True)
    ]
    lc.handle(TeardownDone(uid="u1", now=5))
    assert "u1" not in lc.pods


def test_an_unenrolled_held_or_pending_pod():
    lc = PodLifecycle()
    lc.handle(WorkloadPlaced(uid="p", now=0))
    assert lc.handle(Unenrolled(uid="p", now=1)) == [] and "p" not in lc.pods
    placed_and_found(lc)
    lc.handle(SetupDone(uid="u1", now=1))
    lc.handle(WorkloadGone(uid="u1", now=2))
    lc.handle(TeardownDone(uid="u1", now=3))
    assert lc.pods["u1"].state is PodState.HELD
    assert lc.handle(Unenrolled(uid="u1", now=4)) == [
        StartTeardown(uid="u1", netns=NS1, remove_capture=True)
    ]
