"""bench.connections: issue 21's goals from the medians, and the client that holds many
connections open."""

from __future__ import annotations

import os
import socket

from bench import connections, harness

MED = {
    "mesh": {
        "conn_per_s": 2000.0,
        "conn_per_s_8": 3000.0,
        "per_conn_client_kib": 5.5,
        "per_conn_server_kib": 7.0,
    },
    "stunnel": {"conn_per_s": 400.0, "conn_per_s_8": 1000.0},
    "node_h2": {"conn_per_s": 2500.0, "conn_per_s_8": 2000.0},
    "py_h2": {"conn_per_s": 3000.0, "conn_per_s_8": 4000.0},
    "mesh_ratios": {
        "conn_per_s_vs_stunnel": 5.0,
        "conn_per_s_vs_node_h2": 0.8,
        "conn_per_s_vs_py_h2": 0.667,
        "conn_per_s_8_vs_stunnel": 3.0,
        "conn_per_s_8_vs_node_h2": 1.5,
        "conn_per_s_8_vs_py_h2": 0.75,
    },
    "mesh_memory": {
        "idle_rss_mib": 38.0,
        "imports_rss_mib": 30.5,
        "burst_client_after_ratio": 1.05,
        "burst_server_after_ratio": 1.4,
    },
}


def test_goals_compare_the_mesh_with_both_references_and_its_memory_with_the_bounds() -> None:
    got = {g["figure"]: (g["value"], g["goal"], g["met"]) for g in connections.goals(MED)}
    assert got == {
        "new connections/s (sequential), mesh / stunnel": (5.0, ">= 4", True),
        "new connections/s (sequential), mesh / node_h2": (0.8, ">= 1", False),
        "new connections/s (8 at once), mesh / stunnel": (3.0, ">= 4", False),
        "new connections/s (8 at once), mesh / node_h2": (1.5, ">= 1", True),
        "agent RSS idle just after start (larger agent)": (38.0, "<= 40 MiB", True),
        "memory per idle connection, client-side agent": (5.5, "<= 6 KiB", True),
        "memory per idle connection, server-side agent": (7.0, "<= 6 KiB", False),
        "client-side agent RSS after a burst closed / before": (1.05, "<= 1.1", True),
        "server-side agent RSS after a burst closed / before": (1.4, "<= 1.1", False),
    }


def test_goals_say_for_scale_what_node_makes_of_stunnel_and_what_the_imports_cost() -> None:
    got = {g["figure"]: g.get("context", "") for g in connections.goals(MED)}
    assert got["new connections/s (sequential), mesh / stunnel"] == "node_h2 / stunnel 6.25"
    assert got["new connections/s (8 at once), mesh / stunnel"] == "node_h2 / stunnel 2.00"
    # Against Node: where the bare Python pair stands, the floor under a Python tunnel.
    assert got["new connections/s (sequential), mesh / node_h2"] == "py_h2 / node_h2 1.20"
    assert got["new connections/s (8 at once), mesh / node_h2"] == "py_h2 / node_h2 2.00"
    assert got["agent RSS idle just after start (larger agent)"] == "its imports alone 30.5 MiB"


def test_the_imports_floor_is_a_real_interpreter_reading() -> None:
    floor = connections.imports_rss_mib()
    assert 10 < floor < 500  # an interpreter with the agent's modules, measured, in MiB


def test_rate_ratios_are_the_mesh_over_each_reference_that_ran() -> None:
    assert connections.rate_ratios(MED) == MED["mesh_ratios"]
    one = {"mesh": {"conn_per_s": 300.0}, "stunnel": {"conn_per_s": 0.0}, "node_h2": {}}
    assert connections.rate_ratios(one) == {}
    without_floor = {k: v for k, v in MED.items() if k != "py_h2"}
    assert "conn_per_s_vs_py_h2" not in connections.rate_ratios(without_floor)
    # The floor is a ratio in the report, never a goal.
    assert not any("py_h2" in g["figure"] for g in connections.goals(MED))


def test_goals_leave_out_what_did_not_run() -> None:
    assert connections.goals({"mesh": {"conn_per_s": 10.0}}) == []


def test_a_batch_of_connections_is_open_and_each_has_echoed(echo_port: int) -> None:
    socks = connections.open_batch("127.0.0.1", echo_port, 50)
    try:
        assert len(socks) == 50
        for s in socks:  # still open: each echoes again
            s.setblocking(True)
            s.sendall(b"again")
            assert s.recv(5) == b"again"
    finally:
        for s in socks:
            s.close()


def test_a_refused_batch_fails_loudly() -> None:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    try:
        connections.open_batch("127.0.0.1", port, 3, timeout=5)
    except OSError as e:
        assert "connect to 127.0.0.1" in str(e)
    else:
        raise AssertionError("connections to a closed port were reported open")


def test_memory_of_this_process_is_split_into_anonymous_and_file() -> None:
    mem = harness.memory_kib([os.getpid()])
    assert mem["VmRSS"] > 0 and mem["RssAnon"] > 0 and mem["RssFile"] > 0
    assert mem["VmRSS"] == mem["RssAnon"] + mem["RssFile"] + mem["RssShmem"]
    assert harness.rss_kib([os.getpid(), 2**22 + 1]) > 0  # a gone process counts nothing
