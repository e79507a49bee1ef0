"""bench.mesh: a mesh variant's ratios against a reference."""

from __future__ import annotations

from bench.mesh import ratios


def test_ratios_against_a_reference() -> None:
    med = {
        "no_mesh": {"gbps_1_stream": 15.0, "p50_us": 90.0},
        "stunnel": {"gbps_1_stream": 5.0, "p50_us": 120.0},
        "mesh": {"gbps_1_stream": 5.5, "p50_us": 150.0},
    }
    got = ratios(med, "stunnel")
    assert got["throughput_ratio"] == 1.1 and got["throughput_target_met"] is True
    assert got["added_p50_ratio"] == 2.0 and got["added_p50_target_met"] is False
