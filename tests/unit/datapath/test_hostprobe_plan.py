"""The node's probe SNAT rule as data: rendered text, input checks, drift."""

from __future__ import annotations

import pytest

from nodeagent.datapath.hostprobe import (
    HostProbeFamilyState,
    InstalledHostProbe,
    build_host_family_plan,
    build_host_probe_plan,
    split_by_family,
)
from nodeagent.datapath.plan import PlanError, parse_iptables_save

IPV4 = """\
*nat
:ISTIO_POSTRT - [0:0]
-A POSTROUTING -j ISTIO_POSTRT
-A ISTIO_POSTRT -p tcp -m owner --socket-exists -m set --match-set istio-inpod-probes-v4 dst \
-j SNAT --to-source 169.254.7.127
COMMIT
"""
IPV6_RULE = (
    "-A ISTIO_POSTRT -p tcp -m owner --socket-exists -m set --match-set istio-inpod-probes-v6 "
    "dst -j SNAT --to-source fd16:9254:7127:1337:ffff:ffff:ffff:ffff"
)


def saved(rules: str, chains: str = ":ISTIO_POSTRT - [0:0]") -> str:
    """iptables-save text of a node's nat table holding `rules`."""
    return (
        "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
        f":POSTROUTING ACCEPT [0:0]\n{chains}\n{rules}\nCOMMIT\n"
    )


def state(text: str, set_type: str | None = "hash:ip", family: int = 4) -> HostProbeFamilyState:
    return HostProbeFamilyState(
        family=family,  # type: ignore[arg-type]
        nat=parse_iptables_save(text)["nat"],
        set_name="istio-inpod-probes-v4",
        set_type=set_type,
    )


def test_ipv4_plan_renders_as_iptables_save_prints_it() -> None:
    assert build_host_probe_plan().ipv4.render() == IPV4


def test_ipv6_plan_uses_the_v6_set_and_snat_address() -> None:
    plan = build_host_probe_plan()
    assert plan.ipv6 is not None
    assert IPV6_RULE in plan.ipv6.render().splitlines()
    assert build_host_probe_plan(ipv6=False).families == (plan.ipv4,)


def test_restore_text_inserts_the_jump_first_and_drops_old_jumps() -> None:
    text = build_host_probe_plan().ipv4.restore_text(["-A POSTROUTING -j ISTIO_POSTRT"])
    assert text.splitlines()[:4] == [
        "*nat",
        ":ISTIO_POSTRT - [0:0]",
        "-D POSTROUTING -j ISTIO_POSTRT",
        "-I POSTROUTING 1 -j ISTIO_POSTRT",
    ]
    assert text.endswith("COMMIT\n")


def test_custom_snat_address_and_set_name() -> None:
    plan = build_host_family_plan(4, snat_to="169.254.7.128", set_name="probes")
    assert "--match-set probes dst -j SNAT --to-source 169.254.7.128" in plan.render()


@pytest.mark.parametrize(
    ("family", "snat", "name"),
    [
        (4, "fd16::1", None),
        (6, "169.254.7.127", None),
        (4, "not-an-ip", None),
        (4, None, "x" * 32),
        (4, None, "two words"),
        (5, None, None),
    ],
)
def test_bad_plan_input_is_a_plan_error(family: int, snat: str | None, name: str | None) -> None:
    with pytest.raises(PlanError):
        build_host_family_plan(family, snat_to=snat, set_name=name)  # type: ignore[arg-type]


def test_split_by_family_canonicalises_and_unmaps() -> None:
    assert split_by_family(["10.0.0.1", "fd00:0:0::2", "::ffff:10.0.0.3", " 10.0.0.1 "]) == {
        4: frozenset({"10.0.0.1", "10.0.0.3"}),
        6: frozenset({"fd00::2"}),
    }
    with pytest.raises(PlanError, match=r"'10\.0\.0\.300'"):
        split_by_family(["10.0.0.300"])


def test_installed_rule_matches_the_plan() -> None:
    plan = build_host_probe_plan(ipv6=False)
    found = state(saved("\n".join(IPV4.splitlines()[2:4]) + "\n-A POSTROUTING -j MASQUERADE"))
    assert found.jump_first
    assert InstalledHostProbe(netns="n", families={4: found}).matches(plan)


def test_jump_behind_another_nat_rule_is_drift() -> None:
    plan = build_host_probe_plan(ipv6=False)
    rules = IPV4.splitlines()[2:4]
    found = state(saved(f"-A POSTROUTING -j MASQUERADE\n{rules[0]}\n{rules[1]}"))
    assert not found.jump_first
    assert found.drift(plan.ipv4).missing == (
        "-A POSTROUTING -j ISTIO_POSTRT (first in POSTROUTING)",
    )


def test_missing_set_doubled_jump_and_foreign_rule_are_drift() -> None:
    plan = build_host_probe_plan(ipv6=False)
    rules = IPV4.splitlines()[2:4]
    text = saved(f"{rules[0]}\n{rules[0]}\n{rules[1]}\n-A ISTIO_POSTRT -j MASQUERADE")
    diff = state(text, set_type=None).drift(plan.ipv4)
    assert diff.missing == ("ipset istio-inpod-probes-v4 (hash:ip)",)
    assert set(diff.unexpected) == {rules[0], "-A ISTIO_POSTRT -j MASQUERADE"}
    wrong_type = state(saved("\n".join(rules)), set_type="hash:net").drift(plan.ipv4)
    assert wrong_type.unexpected == ("ipset istio-inpod-probes-v4 of type hash:net",)


def test_nothing_installed_is_empty_and_all_missing() -> None:
    plan = build_host_probe_plan(ipv6=False)
    nothing = state(saved("", chains=""), set_type=None)
    installed = InstalledHostProbe(netns="n", families={4: nothing})
    assert installed.empty
    assert len(installed.drift(plan)[4].missing) == 4  # chain, rule, jump, set


def test_a_family_the_plan_leaves_out_must_be_empty() -> None:
    plan = build_host_probe_plan(ipv6=False)
    leftover = state(saved(IPV6_RULE), family=6)
    installed = InstalledHostProbe(netns="n", families={6: leftover})
    assert installed.drift(plan)[6].unexpected == ("host probe rule present",)
