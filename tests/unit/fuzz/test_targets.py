"""The fuzz targets without a fuzzer: the committed seeds and every past crash replay clean,
the seeds are what `fuzz.seeds` builds, and a target lets through exactly the exceptions
that are bugs (so replaying could fail)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fuzz import seeds as seeds_mod
from fuzz.run import CRASHES, SEEDS
from fuzz.targets import TARGETS, load

ALL = sorted(TARGETS)


def _inputs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []


@pytest.mark.parametrize("target", ALL)
def test_seed_corpus_is_what_the_generator_builds(target: str) -> None:
    assert load(target).seeds(), f"{target} has no seeds"
    assert seeds_mod.differences(target) == [], "run `python -m fuzz.seeds` and commit the result"


@pytest.mark.parametrize("target", ALL)
def test_every_seed_and_past_crash_replays_clean(target: str) -> None:
    fuzz_one = load(target).fuzz_one
    seeds = _inputs(SEEDS / target)
    assert seeds, f"no seed corpus in {SEEDS / target}"
    for path in [*seeds, *_inputs(CRASHES / target)]:
        fuzz_one(path.read_bytes())  # raises on a regression


def test_crash_inputs_are_filed_under_a_known_target() -> None:
    if CRASHES.is_dir():
        assert {p.name for p in CRASHES.iterdir() if p.is_dir()} <= set(TARGETS)


@pytest.mark.parametrize("target", ALL)
@pytest.mark.parametrize("data", [b"", b"\x00", b"\xff" * 64, bytes(range(256)) * 4])
def test_garbage_is_refused_the_documented_way(target: str, data: bytes) -> None:
    load(target).fuzz_one(data)


def test_hbone_target_lets_an_unexpected_exception_escape(monkeypatch: pytest.MonkeyPatch) -> None:
    from nodeagent.hbone import connection

    def broken(self: connection.TunnelConnection, data: object) -> list[object]:
        raise KeyError("a bug in the core")

    monkeypatch.setattr(connection.TunnelConnection, "receive_data", broken)
    seed = (SEEDS / "hbone_server" / "connect-data-end").read_bytes()
    with pytest.raises(KeyError, match="a bug in the core"):
        load("hbone_server").fuzz_one(seed)


def test_xds_target_lets_an_unexpected_exception_escape(monkeypatch: pytest.MonkeyPatch) -> None:
    from nodeagent.state import convert

    def broken(raw: bytes, field: str) -> object:
        raise TypeError("a bug in the converter")

    monkeypatch.setattr(convert, "_ip", broken)
    seed = (SEEDS / "xds_address" / "pod").read_bytes()
    with pytest.raises(TypeError, match="a bug in the converter"):
        load("xds_address").fuzz_one(seed)


def test_xds_target_checks_the_round_trip(monkeypatch: pytest.MonkeyPatch) -> None:
    from nodeagent.pb.istio.security import authorization_pb2 as auth_pb
    from nodeagent.state import encode

    # An encoder that forgets dry_run: convert(encode(x)) != x must be a crash.
    real = encode.authorization_to_pb

    def lossy(value: object) -> auth_pb.Authorization:
        msg = real(value)  # type: ignore[arg-type]
        msg.dry_run = False
        return msg

    monkeypatch.setattr("fuzz.targets.xds_authorization.authorization_to_pb", lossy)
    seed = (SEEDS / "xds_authorization" / "dry-run-namespace").read_bytes()
    with pytest.raises(AssertionError, match="encode -> convert changed the policy"):
        load("xds_authorization").fuzz_one(seed)


def test_mesh_target_lets_an_unexpected_exception_escape(monkeypatch: pytest.MonkeyPatch) -> None:
    from nodeagent.controlplane import mesh

    def broken(text: str, source: str = "") -> object:
        raise AttributeError("a bug in the validator")

    monkeypatch.setattr(mesh, "parse_mesh", broken)
    seed = (SEEDS / "mesh_file" / "base").read_bytes()
    with pytest.raises(AttributeError, match="a bug in the validator"):
        load("mesh_file").fuzz_one(seed)


def test_mesh_target_checks_that_agents_accept_what_is_served(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from nodeagent.state.convert import ConversionError

    def refuse(name: str, data: bytes) -> object:
        raise ConversionError(f"workload {name}: refused")

    monkeypatch.setattr("fuzz.targets.mesh_file.address_from_bytes", refuse)
    seed = (SEEDS / "mesh_file" / "everything").read_bytes()
    with pytest.raises(AssertionError, match="the control plane serves what agents refuse"):
        load("mesh_file").fuzz_one(seed)


def test_unknown_target_is_named() -> None:
    with pytest.raises(KeyError, match="no fuzz target 'nope'"):
        load("nope")
