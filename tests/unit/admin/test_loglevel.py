"""Log level specs as ztunnel takes them."""

from __future__ import annotations

import logging

import pytest

from nodeagent.admin.loglevel import TRACE, StdlibLogLevelControl, parse_spec


def test_spec_with_targets_and_default() -> None:
    assert parse_spec("access=debug,info") == (logging.INFO, {"access": logging.DEBUG})
    assert parse_spec("trace") == (TRACE, {})


@pytest.mark.parametrize("spec", ["", "loud", "=debug", "info,,debug", "access=nope"])
def test_bad_specs_are_refused(spec: str) -> None:
    with pytest.raises(ValueError):
        parse_spec(spec)


def test_bad_spec_changes_nothing() -> None:
    root = logging.getLogger("test-loglevel-root")
    control = StdlibLogLevelControl("warn", root=root, own=logging.getLogger("test-loglevel-own"))
    with pytest.raises(ValueError):
        control.set_level("test-loglevel-target=debug,loud")
    assert control.current() == "warn"
    assert logging.getLogger("test-loglevel-target").level == logging.NOTSET


def test_set_and_reset() -> None:
    root = logging.getLogger("test-loglevel-root2")
    control = StdlibLogLevelControl("info", root=root, own=logging.getLogger("test-loglevel-own2"))
    assert control.set_level("test-loglevel-x=off,debug") == "debug,test-loglevel-x=off"
    assert not logging.getLogger("test-loglevel-x").isEnabledFor(logging.CRITICAL)
    assert control.reset() == "info"
    assert logging.getLogger("test-loglevel-x").level == logging.NOTSET


def test_debug_does_not_flood_with_third_party_loggers() -> None:
    # `nodeagent log --level debug` once printed only pyroute2.netlink.core lines.
    root = logging.getLogger("test-loglevel-root3")
    own = logging.getLogger("test-loglevel-own3")
    third_party = root.getChild("pyroute2.netlink.core")
    control = StdlibLogLevelControl("info", root=root, own=own)
    assert control.set_level("debug") == "debug"
    assert own.getChild("node").isEnabledFor(logging.DEBUG)
    assert not third_party.isEnabledFor(logging.DEBUG)
    assert third_party.isEnabledFor(logging.WARNING)
    control.set_level("error")
    assert not third_party.isEnabledFor(logging.WARNING)
    # Named explicitly, a third-party logger gets the level asked for.
    control.set_level(f"{third_party.name}=debug,debug")
    assert third_party.isEnabledFor(logging.DEBUG)
    assert control.reset() == "info"
    assert not third_party.isEnabledFor(logging.DEBUG)


def test_access_log_lines_pass_at_the_default_level_while_third_parties_stay_quiet() -> None:
    import logging

    from nodeagent.admin.accesslog import ACCESS_LOGGER
    from nodeagent.admin.loglevel import StdlibLogLevelControl

    root = logging.getLogger("test-root-for-access")
    control = StdlibLogLevelControl("info", root=root, own=logging.getLogger("test-own"))
    assert logging.getLogger(ACCESS_LOGGER).isEnabledFor(logging.INFO)
    control.set_level("debug")
    assert logging.getLogger(ACCESS_LOGGER).isEnabledFor(logging.DEBUG)
    assert root.level == logging.WARNING
    control.reset()
    assert not logging.getLogger(ACCESS_LOGGER).isEnabledFor(logging.DEBUG)
