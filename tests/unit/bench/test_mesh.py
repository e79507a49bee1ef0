"""bench.mesh: a mesh variant's ratios against a reference."""

from __future__ import annotations

from bench.mesh import goals, ratios


def test_ratios_against_a_reference() -> None:
    med = {
        "no_mesh": {"gbps_1_stream": 15.0, "p50_us": 90.0},
        "stunnel": {"gbps_1_stream": 5.0, "p50_us": 120.0},
        "mesh": {"gbps_1_stream": 5.5, "p50_us": 150.0},
    }
    got = ratios(med, "stunnel")
    assert got["throughput_ratio"] == 1.1 and got["throughput_target_met"] is True
    assert got["added_p50_ratio"] == 2.0 and got["added_p50_target_met"] is False


def test_goals_of_issue_21_from_the_medians() -> None:
    med = {
        "no_mesh": {"gbps_1_stream": 15.0, "p50_us": 90.0},
        "stunnel": {"gbps_1_stream": 5.0, "p50_us": 120.0},
        "py_relay": {"gbps_1_stream": 6.0, "p50_us": 130.0},
        "mesh": {"gbps_1_stream": 5.4, "p50_us": 114.0, "tunnel_rss_mib": 160.0},
        "mesh_ebpf": {"gbps_1_stream": 5.4, "p50_us": 114.0, "tunnel_rss_mib": 200.0},
    }
    got = {g["figure"]: (g["value"], g["goal"], g["met"]) for g in goals(med)}
    assert got == {
        "single-stream throughput, mesh / py_relay": (0.9, ">= 0.95", False),
        "added p50 latency, mesh / stunnel": (0.8, "<= 1", True),
        "agent RSS, eBPF backend - iptables, per agent": (20.0, "<= 10 MiB", False),
    }


def test_goals_give_the_capture_cost_and_the_python_relay_latency_for_scale() -> None:
    med = {
        "no_mesh": {"gbps_1_stream": 15.0, "p50_us": 90.0},
        "stunnel": {"gbps_1_stream": 5.0, "p50_us": 120.0},
        "stunnel_captured": {"gbps_1_stream": 4.0, "p50_us": 121.0},
        "py_relay": {"gbps_1_stream": 6.0, "p50_us": 126.0},
        "mesh": {"gbps_1_stream": 5.4, "p50_us": 114.0},
    }
    got = {g["figure"]: g.get("context", "") for g in goals(med)}
    assert got == {
        "single-stream throughput, mesh / py_relay": "stunnel_captured / stunnel 0.80",
        "added p50 latency, mesh / stunnel": "py_relay / stunnel 1.20",
    }


def test_goals_need_their_variants() -> None:
    assert goals({"mesh": {"gbps_1_stream": 5.0, "p50_us": 100.0}}) == []
