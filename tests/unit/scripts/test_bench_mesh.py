"""bench_mesh: the captured stunnel reference's rules, the ratios, and the interleaved ping-pong."""

from __future__ import annotations

import pytest

from nodeagent.datapath.plan import build_plan, render_iptables_save


@pytest.fixture(scope="module")
def bench(scripts):  # type: ignore[no-untyped-def]
    return scripts("bench_mesh")


def test_captured_rules_keep_the_plan_but_redirect_each_app_port_to_stunnel(bench) -> None:  # type: ignore[no-untyped-def]
    rules = bench.CapturedStunnel.rules("10.10.2.11").splitlines()
    plan = render_iptables_save(build_plan(ipv6=False)).splitlines()
    to_outbound = [line for line in plan if line.endswith("--to-ports 15001")]
    assert len(to_outbound) == 1
    # Everything else of the agent's plan (mangle marks, exemptions, inbound) is unchanged.
    assert [line for line in plan if line not in to_outbound] == [
        line
        for line in rules
        if "--dport 5201" not in line and "--dport 9000" not in line and "--dport 8080" not in line
    ]
    redirects = [line for line in rules if "REDIRECT" in line and "ISTIO_OUTPUT" in line]
    assert {line.split()[-1] for line in redirects} == {
        str(local) for local, _ in bench.STUNNEL_CAPTURED.values()
    }
    for line in redirects:
        assert "-d 10.10.2.11/32" in line and "! -d 127.0.0.1/32" not in line
        assert "! --mark 0x539/0xfff" in line  # the same exemption as the agent's rule


def test_ratios_against_a_reference(bench) -> None:  # type: ignore[no-untyped-def]
    med = {
        "no_mesh": {"gbps_1_stream": 15.0, "p50_us": 90.0},
        "stunnel": {"gbps_1_stream": 5.0, "p50_us": 120.0},
        "mesh": {"gbps_1_stream": 5.5, "p50_us": 150.0},
    }
    got = bench.ratios(med, "stunnel")
    assert got["throughput_ratio"] == 1.1 and got["throughput_target_met"] is True
    assert got["added_p50_ratio"] == 2.0 and got["added_p50_target_met"] is False


def test_latency_round_alternates_blocks_and_counts_every_round_trip(bench, echo_port) -> None:  # type: ignore[no-untyped-def]
    port = echo_port
    direct = bench.Direct("127.0.0.1")
    other = bench.Direct("127.0.0.1")
    other.name = "other"
    other.target = lambda _port: ("127.0.0.1", port)
    direct.target = lambda _port: ("127.0.0.1", port)
    first = bench.ping_block([], "127.0.0.1", port, 7)
    assert len(first) == 7 and all(ns > 0 for ns in first)
    result = bench.latency_round([(direct, []), (other, [])], 40, 4)  # 4 blocks of 10
    assert set(result) == {"no_mesh", "other"}
    for figures in result.values():
        assert 0 < figures["p50_us"] <= figures["p99_us"]
        assert "cpu_us_per_rtt" not in figures  # no tunnel processes to charge


def test_a_ping_block_with_nothing_to_echo_fails_loudly(bench) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(RuntimeError, match=r"ping-pong to 127\.0\.0\.1:1 failed"):
        bench.ping_block([], "127.0.0.1", 1, 5)  # nothing listens on port 1


def test_percentile_of_sorted_samples(bench) -> None:  # type: ignore[no-untyped-def]
    samples = list(range(1, 101))
    assert bench.percentile(samples, 0.5) == 51.0
    assert bench.percentile(samples, 0.99) == 100.0
    assert bench.percentile([5], 0.99) == 5.0
