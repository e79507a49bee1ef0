"""The harness: the captured stunnel reference's rules, the interleaved ping-pong and rounds,
the probe programs, and the reference pairs' certificates."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from cryptography import x509

from bench import harness
from nodeagent.datapath.plan import build_plan, render_iptables_save
from nodeagent.identity.csr import uri_sans


class Loopback(harness.Variant):
    def __init__(self, name: str, port: int) -> None:
        self.name, self.port = name, port

    def target(self, port: int) -> tuple[str, int]:
        return "127.0.0.1", self.port


def test_captured_rules_keep_the_plan_but_redirect_each_app_port_to_stunnel() -> None:
    rules = harness.CapturedStunnel.rules("10.10.2.11").splitlines()
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
        str(local) for local, _ in harness.STUNNEL_CAPTURED.values()
    }
    for line in redirects:
        assert "-d 10.10.2.11/32" in line and "! -d 127.0.0.1/32" not in line
        assert "! --mark 0x539/0xfff" in line  # the same exemption as the agent's rule


def test_latency_round_alternates_blocks_and_counts_every_round_trip(echo_port: int) -> None:
    first = harness.ping_block([], "127.0.0.1", echo_port, 7)
    assert len(first) == 7 and all(ns > 0 for ns in first)
    variants = [Loopback("no_mesh", echo_port), Loopback("other", echo_port)]
    result = harness.latency_round([(v, []) for v in variants], 40, 4)  # 4 blocks of 10
    assert set(result) == {"no_mesh", "other"}
    for figures in result.values():
        assert 0 < figures["p50_us"] <= figures["p99_us"]
        assert "cpu_us_per_rtt" not in figures  # no tunnel processes to charge


def test_a_ping_block_with_nothing_to_echo_fails_loudly() -> None:
    with pytest.raises(RuntimeError, match=r"ping-pong to 127\.0\.0\.1:1 failed"):
        harness.ping_block([], "127.0.0.1", 1, 5)  # nothing listens on port 1


def test_percentile_of_sorted_samples() -> None:
    samples = list(range(1, 101))
    assert harness.percentile(samples, 0.5) == 51.0
    assert harness.percentile(samples, 0.99) == 100.0
    assert harness.percentile([5], 0.99) == 5.0


def test_interleaved_rounds_report_every_round_and_the_median_of_each_figure() -> None:
    figures = iter([{"a": {"x": 1.0, "y": 5.0}}, {"a": {"x": 3.0}}, {"a": {"x": 2.0, "y": 7.0}}])
    rounds, median = harness.interleaved(3, lambda: next(figures))
    assert [r["a"]["x"] for r in rounds] == [1.0, 3.0, 2.0]
    # A figure missing from a round is the median of the rounds that have it.
    assert median == {"a": {"x": 2.0, "y": 6.0}}


def test_the_probe_waits_for_a_port_and_gives_up_at_its_timeout(echo_port: int) -> None:
    wait = harness.program("probe", "wait", "127.0.0.1", str(echo_port), "5")
    assert harness.sh(*wait, check=False).returncode == 0
    closed = harness.program("probe", "wait", "127.0.0.1", "1", "0.2")
    assert harness.sh(*closed, check=False).returncode == 1


def test_the_probe_holds_a_connection_until_its_input_closes(echo_port: int) -> None:
    hold = subprocess.Popen(
        harness.program("probe", "hold", "127.0.0.1", str(echo_port)),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=harness.ROOT,
    )
    assert hold.stdout is not None and hold.stdin is not None
    assert hold.stdout.readline().strip() == "ok"
    assert hold.poll() is None
    hold.stdin.close()
    assert hold.wait(timeout=10) == 0


def test_reference_certificates_are_workload_certificates_of_one_root(tmp_path: Path) -> None:
    certs = harness.workload_certs(tmp_path)
    root = x509.load_pem_x509_certificate(Path(certs["ca"]).read_bytes())
    for role, sa in (("client", "frontend"), ("server", "backend")):
        leaf = x509.load_pem_x509_certificate(Path(certs[f"{role}_cert"]).read_bytes())
        assert leaf.issuer == root.subject
        assert uri_sans(leaf) == [f"spiffe://cluster.local/ns/demo/sa/{sa}"]
        assert Path(certs[f"{role}_key"]).stat().st_mode & 0o077 == 0
