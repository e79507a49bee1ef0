"""The iptables capture backend: applies a CapturePlan inside a pod's namespace.

All work runs on a NetnsWorker thread inside the pod namespace:

* rules go in with python-iptables (libiptc, so the iptables-legacy backend
  only); each table is changed in one libiptc commit, which the kernel swaps
  in atomically, so a pod is never half-captured while its chains are
  refilled;
* what is installed is read back with `iptables-legacy-save` /
  `ip6tables-legacy-save` run from that thread (a child process inherits the
  thread's namespace). That text is the kernel's own canonical view, the same
  form the plan renders to, so drift is a text comparison;
* the policy rule and the local route of table 100 go in with pyroute2.

`apply` is idempotent and adopts what a previous agent left: a table whose
agent-owned content already matches the plan is not touched, so restarting
the agent never opens a window without capture. `remove` deletes the owned
chains, the jumps, the rule and the route. A failed apply removes everything
it may have half-applied and raises CaptureError naming the namespace and
the failing step or rule.
"""

from __future__ import annotations

import socket
import subprocess
from dataclasses import dataclass, field
from typing import Any

from nodeagent.datapath.netns import (
    NetnsError,
    NetnsHandle,
    NetnsVanishedError,
    NetnsWorker,
    resolve,
)
from nodeagent.datapath.plan import (
    JUMPS,
    OWNED_CHAINS,
    CapturePlan,
    Drift,
    Family,
    FamilyPlan,
    LocalRoute,
    OwnedTable,
    PolicyRule,
    Rule,
    SavedTable,
    TablePlan,
    drift,
    owned_view,
    parse_iptables_save,
)
from nodeagent.model.constants import CONNMARK, CONNMARK_MASK, ROUTE_TABLE, RULE_PRIORITY

SAVE_COMMANDS: dict[int, str] = {4: "iptables-legacy-save", 6: "ip6tables-legacy-save"}
RESTORE_COMMANDS: dict[int, str] = {4: "iptables-legacy-restore", 6: "ip6tables-legacy-restore"}
_AF: dict[int, socket.AddressFamily] = {4: socket.AF_INET, 6: socket.AF_INET6}
_RTN_LOCAL = 2


class CaptureError(RuntimeError):
    """Capture could not be applied, read or removed; names the namespace and what failed."""


@dataclass(frozen=True, slots=True, kw_only=True)
class FamilyState:
    """What is installed for one address family inside the namespace."""

    family: Family
    tables: dict[str, SavedTable]
    policy_rule: bool  # our fwmark rule is present
    local_route: bool  # our local route in table 100 is present

    @property
    def has_owned(self) -> bool:
        return bool(owned_view(self.tables)) or self.policy_rule or self.local_route


@dataclass(frozen=True, slots=True, kw_only=True)
class InstalledCapture:
    """Everything capture-related found in one namespace, per family."""

    netns: NetnsHandle
    families: dict[int, FamilyState] = field(default_factory=dict)

    def drift(self, plan: CapturePlan) -> dict[int, dict[str, Drift]]:
        """Per family and table, how the installed rules differ from `plan`
        (netlink drift shows up under the pseudo-table "netlink")."""
        result: dict[int, dict[str, Drift]] = {}
        wanted = {f.family: f for f in plan.families}
        for family in (4, 6):
            state = self.families.get(family)
            fplan = wanted.get(family)
            if fplan is None:
                if state is not None and state.has_owned:
                    result[family] = {"all": Drift((), ("owned capture present",))}
                continue
            tables = state.tables if state else {}
            diff = drift(fplan, tables)
            missing = []
            if not (state and state.policy_rule):
                missing.append(fplan.policy_rule.render(family))
            if not (state and state.local_route):
                missing.append(fplan.local_route.render(family))
            if missing:
                diff["netlink"] = Drift(tuple(missing), ())
            if diff:
                result[family] = diff
        return result

    def matches(self, plan: CapturePlan) -> bool:
        return not self.drift(plan)

    @property
    def empty(self) -> bool:
        """No trace of agent capture (chains, jumps, rule or route)."""
        return not any(state.has_owned for state in self.families.values())


class IptablesBackend:
    """Applies, reads and removes in-pod capture with iptables-legacy + netlink."""

    def __init__(self, worker: NetnsWorker | None = None) -> None:
        self._own_worker = worker is None
        self._worker = worker or NetnsWorker("iptables")

    def close(self) -> None:
        if self._own_worker:
            self._worker.close()

    def __enter__(self) -> IptablesBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- public API ----------------------------------------------------------

    @staticmethod
    def _resolve(netns: NetnsHandle | str, action: str) -> NetnsHandle:
        try:
            return resolve(netns)
        except NetnsError as exc:
            raise CaptureError(f"{action}: {exc}") from exc

    def read_installed(self, netns: NetnsHandle | str) -> InstalledCapture:
        handle = self._resolve(netns, "read capture")
        try:
            return self._worker.call(handle, _read_all, handle)
        except NetnsError as exc:
            raise CaptureError(f"read capture in netns {handle}: {exc}") from exc

    def apply(self, netns: NetnsHandle | str, plan: CapturePlan) -> bool:
        """Make the namespace match `plan`; True if anything had to change.

        A table already matching is left alone (adoption after an agent
        restart). On failure everything owned is removed and CaptureError
        raised.
        """
        handle = self._resolve(netns, "apply capture")
        try:
            return self._worker.call(handle, _apply_all, handle, plan)
        except NetnsVanishedError as exc:
            raise CaptureError(f"apply capture in netns {handle}: {exc}") from exc
        except CaptureError:
            raise
        except Exception as exc:  # libiptc / netlink errors: name the namespace
            raise CaptureError(f"apply capture in netns {handle}: {exc}") from exc

    def remove(self, netns: NetnsHandle | str) -> None:
        """Delete all agent-owned capture from the namespace (missing parts are fine)."""
        handle = self._resolve(netns, "remove capture")
        try:
            self._worker.call(handle, _remove_all, handle)
        except CaptureError:
            raise
        except Exception as exc:
            raise CaptureError(f"remove capture in netns {handle}: {exc}") from exc


# -- worker-side functions (run inside the namespace) -------------------------


def save_tables(family: int) -> dict[str, SavedTable]:
    command = SAVE_COMMANDS[family]
    try:
        done = subprocess.run([command], capture_output=True, text=True, timeout=30, check=False)
    except OSError as exc:
        raise CaptureError(f"cannot run {command}: {exc.strerror}") from None
    if done.returncode != 0:
        raise CaptureError(f"{command} failed: {done.stderr.strip()}")
    return parse_iptables_save(done.stdout)


def _iproute() -> Any:
    from pyroute2 import IPRoute  # slow import (0.2 s): only when used

    return IPRoute()


def _is_our_rule(rule: Any, want: PolicyRule) -> bool:
    return bool(
        rule.get_attr("FRA_FWMARK") == want.fwmark
        and rule.get_attr("FRA_FWMASK") == want.fwmask
        and rule.get_attr("FRA_PRIORITY") == want.priority
        and (rule.get_attr("FRA_TABLE") or rule["table"]) == want.table
    )


def _our_routes(ipr: Any, family: int, table: int) -> list[Any]:
    routes = ipr.get_routes(family=_AF[family], table=table)
    return [
        r
        for r in routes
        if r["type"] == _RTN_LOCAL and r["dst_len"] == 0 and r.get_attr("RTA_TABLE") == table
    ]


_DEFAULT_RULE = PolicyRule(
    fwmark=CONNMARK, fwmask=CONNMARK_MASK, priority=RULE_PRIORITY, table=ROUTE_TABLE
)


def _read_family(family: Family, ipr: Any) -> FamilyState:
    rules = ipr.get_rules(family=_AF[family])
    return FamilyState(
        family=family,
        tables=save_tables(family),
        policy_rule=any(_is_our_rule(r, _DEFAULT_RULE) for r in rules),
        local_route=bool(_our_routes(ipr, family, ROUTE_TABLE)),
    )


def _read_all(handle: NetnsHandle) -> InstalledCapture:
    with _iproute() as ipr:
        return InstalledCapture(netns=handle, families={f: _read_family(f, ipr) for f in (4, 6)})


_patched = False


def _iptc() -> Any:
    """python-iptables, with one fix: deciding whether a target name is a user
    chain, it asks *every* cached table (`Rule.tables`), creating and opening
    those not cached yet (in whatever namespace the thread is in) and
    crashing (segfault) on cached ones whose handle was closed. We close
    handles after each use so none pins a pod namespace, so the lookup must
    only ask the tables open right now (the one being changed)."""
    global _patched
    import iptc

    if not _patched:
        iptc.Rule.tables = property(
            lambda self: [t for t in list(iptc.Table._cache.values()) if t._handle]
        )
        iptc.Rule6.tables = property(
            lambda self: [t for t in list(iptc.Table6._cache.values()) if t._handle]
        )
        _patched = True
    return iptc


def _iptc_rule(family: int, rule: Rule) -> Any:
    iptc = _iptc()

    r = iptc.Rule6() if family == 6 else iptc.Rule()
    try:
        if rule.source is not None:
            r.src = rule.source
        if rule.destination is not None:
            r.dst = rule.destination
        if rule.in_interface is not None:
            r.in_interface = rule.in_interface
        if rule.out_interface is not None:
            r.out_interface = rule.out_interface
        if rule.protocol is not None:
            r.protocol = rule.protocol
        for m in rule.matches:
            match = r.create_match(m.name)
            for key, value in m.params:
                setattr(match, key, value)
        target = r.create_target(rule.target)
        for key, value in rule.target_params:
            setattr(target, key, value)
    except Exception as exc:
        raise CaptureError(f"rule {rule.render()!r}: {exc}") from exc
    return r


def _table(family: int, name: str) -> Any:
    iptc = _iptc()

    # Table objects are process-wide singletons holding a libiptc handle
    # bound to the namespace current at refresh(): refresh on entry, close
    # on exit so no handle (and its socket) pins a pod's namespace.
    table = (
        iptc.Table6(name, autocommit=False) if family == 6 else iptc.Table(name, autocommit=False)
    )
    table.refresh()
    return table


def _delete_jumps(table: Any, builtin: str, owned: str) -> None:
    iptc = _iptc()

    chain = iptc.Chain(table, builtin)
    for rule in list(chain.rules):
        if rule.target is not None and rule.target.name == owned:
            chain.delete_rule(rule)


class _Unexpressible(Exception):
    """python-iptables cannot build a rule in this process (see _apply_table)."""


def _build_rules(family: int, rules: tuple[Rule, ...]) -> list[Any]:
    built = []
    for rule in rules:
        try:
            built.append(_iptc_rule(family, rule))
        except CaptureError as exc:
            if "can't find" in str(exc.__cause__):
                raise _Unexpressible(str(exc)) from exc
            raise
    return built


def _apply_table(family: int, plan: TablePlan, installed: SavedTable | None) -> None:
    """Flush and refill the owned chains of one table, with exactly one jump each.

    Fallback: libxt_REDIRECT registers its IPv4 and IPv6 targets from one
    library constructor, which runs once per process, so python-iptables can
    build REDIRECT rules for whichever family asked first and then reports
    "can't find target REDIRECT" for the other. For a table it cannot express
    we use `ip[6]tables-legacy-restore --noflush` with the rendered plan (run
    inside the namespace; also one atomic commit per table).
    """
    try:
        _apply_table_iptc(family, plan)
    except _Unexpressible:
        # Nothing was committed: the libiptc handle was dropped unchanged.
        restore_tables(family, _restore_text(plan, installed))


def _apply_table_iptc(family: int, plan: TablePlan) -> None:
    iptc = _iptc()
    table = _table(family, plan.name)
    step = f"{plan.name} table"
    try:
        for chain in plan.chains:
            if table.is_chain(chain):
                table.flush_entries(chain)
            else:
                table.create_chain(chain)
        rules = _build_rules(family, plan.rules)
        jumps = _build_rules(family, plan.jumps)
        for rule, built in zip(plan.rules, rules, strict=True):
            step = f"rule {rule.render()!r} in {plan.name}"
            iptc.Chain(table, rule.chain).append_rule(built)
        for jump, built in zip(plan.jumps, jumps, strict=True):
            step = f"jump {jump.render()!r} in {plan.name}"
            # Exactly one jump: drop any (duplicates from an older agent), add ours.
            _delete_jumps(table, jump.chain, jump.target)
            iptc.Chain(table, jump.chain).append_rule(built)
        step = f"commit of the {plan.name} table ({len(plan.rules)} rules)"
        table.commit()
    except (CaptureError, _Unexpressible):
        raise
    except Exception as exc:
        if "can't find" in str(exc):  # e.g. reading a foreign rule's extension
            raise _Unexpressible(str(exc)) from exc
        raise CaptureError(f"ip{'6' if family == 6 else ''}tables {step}: {exc}") from exc
    finally:
        if table._handle:
            table.close()


def _restore_text(plan: TablePlan, installed: SavedTable | None) -> str:
    # Declaring a user chain in a --noflush restore flushes it if it exists.
    lines = [f"*{plan.name}"] + [f":{c} - [0:0]" for c in sorted(plan.chains)]
    if installed is not None:
        for rule in owned_view({plan.name: installed}).get(plan.name, _NO_OWNED).jumps:
            lines.append("-D" + rule[2:])
    lines += [j.render() for j in plan.jumps] + [r.render() for r in plan.rules]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def restore_tables(family: int, text: str) -> None:
    command = RESTORE_COMMANDS[family]
    try:
        done = subprocess.run(
            [command, "--noflush"], input=text, capture_output=True, text=True, timeout=30
        )
    except OSError as exc:
        raise CaptureError(f"cannot run {command}: {exc.strerror}") from None
    if done.returncode != 0:
        failed = done.stderr.strip()
        lines = text.splitlines()
        for word in failed.replace(":", " ").split():
            if word.isdigit() and 0 < int(word) <= len(lines) and "line" in failed:
                failed += f" (rule {lines[int(word) - 1]!r})"
                break
        raise CaptureError(f"{command} --noflush failed: {failed}")


_NO_OWNED = OwnedTable((), (), ())


def _remove_table(family: int, name: str, installed: SavedTable) -> None:
    """Delete the jumps to and the owned chains of one table, in one commit."""
    owned = owned_view({name: installed}).get(name, _NO_OWNED)
    if not (owned.chains or owned.rules or owned.jumps):
        return
    table = _table(family, name)
    try:
        for builtin, chain in JUMPS:
            if table.is_chain(chain):
                _delete_jumps(table, builtin, chain)
        for chain in OWNED_CHAINS:
            if table.is_chain(chain):
                table.flush_entries(chain)
                table.delete_chain(chain)
        table.commit()
        return
    except Exception as exc:
        if "can't find" not in str(exc):
            raise CaptureError(f"remove owned chains from {name} (IPv{family}): {exc}") from exc
    finally:
        if table._handle:
            table.close()
    # Same fallback as _apply_table, for rules python-iptables cannot parse here.
    remove_owned(family, name, owned)


def remove_owned(family: int, table: str, owned: OwnedTable) -> None:
    """Delete the owned jumps, then flush and delete the owned chains, in one restore."""
    lines = [f"*{table}"] + ["-D" + rule[2:] for rule in owned.jumps]
    lines += [f"-F {chain}" for chain in owned.chains] + [f"-X {chain}" for chain in owned.chains]
    restore_tables(family, "\n".join([*lines, "COMMIT"]) + "\n")


def _ensure_netlink(ipr: Any, plan: FamilyPlan) -> bool:
    family = plan.family
    want: PolicyRule = plan.policy_rule
    route: LocalRoute = plan.local_route
    changed = False
    step = want.render(family)
    try:
        if not any(_is_our_rule(r, want) for r in ipr.get_rules(family=_AF[family])):
            ipr.rule(
                "add",
                family=_AF[family],
                fwmark=want.fwmark,
                fwmask=want.fwmask,
                priority=want.priority,
                table=want.table,
            )
            changed = True
        step = route.render(family)
        if not _our_routes(ipr, family, route.table):
            lo = ipr.link_lookup(ifname=route.device)
            if not lo:
                raise CaptureError(f"{step}: no {route.device} interface")
            # scope host: iproute2 infers it for local routes, pyroute2 does not.
            ipr.route(
                "add",
                family=_AF[family],
                type="local",
                dst=route.destination,
                oif=lo[0],
                table=route.table,
                scope="host",
            )
            changed = True
    except CaptureError:
        raise
    except Exception as exc:
        raise CaptureError(f"{step}: {exc}") from exc
    return changed


def _remove_netlink(ipr: Any, family: int) -> None:
    for rule in ipr.get_rules(family=_AF[family]):
        if _is_our_rule(rule, _DEFAULT_RULE):
            ipr.rule(
                "del",
                family=_AF[family],
                fwmark=CONNMARK,
                fwmask=CONNMARK_MASK,
                priority=RULE_PRIORITY,
                table=ROUTE_TABLE,
            )
    for route in _our_routes(ipr, family, ROUTE_TABLE):
        ipr.route(
            "del",
            family=_AF[family],
            type="local",
            dst="::/0" if family == 6 else "0.0.0.0/0",
            oif=route.get_attr("RTA_OIF"),
            table=ROUTE_TABLE,
            scope="host",
        )


def _apply_all(handle: NetnsHandle, plan: CapturePlan) -> bool:
    changed = False
    try:
        with _iproute() as ipr:
            wanted = {f.family: f for f in plan.families}
            for family in (4, 6):
                installed = save_tables(family)
                fplan = wanted.get(family)
                if fplan is None:  # the pod has no IPv6: leave no IPv6 capture behind
                    if owned_view(installed):
                        for name in owned_view(installed):
                            _remove_table(family, name, installed[name])
                        changed = True
                    _remove_netlink(ipr, family)
                    continue
                diff = drift(fplan, installed)
                for name in sorted(diff):
                    table_plan = fplan.table(name)
                    if table_plan is None:  # e.g. raw left from DNS capture
                        _remove_table(family, name, installed[name])
                    else:
                        _apply_table(family, table_plan, installed.get(name))
                    changed = True
                changed |= _ensure_netlink(ipr, fplan)
    except BaseException as exc:
        # Nothing half-applied: take every owned piece out again.
        try:
            _remove_all(handle)
        except Exception as cleanup:  # report the first failure, mention the second
            raise CaptureError(
                f"apply capture in netns {handle}: {exc}; cleanup also failed: {cleanup}"
            ) from exc
        if isinstance(exc, CaptureError):
            raise CaptureError(f"apply capture in netns {handle}: {exc}") from exc
        raise
    return changed


def _remove_all(handle: NetnsHandle) -> None:
    errors: list[str] = []
    with _iproute() as ipr:
        for family in (4, 6):
            try:
                installed = save_tables(family)
                for name in owned_view(installed):
                    _remove_table(family, name, installed[name])
            except Exception as exc:
                errors.append(str(exc))
            try:
                _remove_netlink(ipr, family)
            except Exception as exc:
                errors.append(f"ip rule/route (IPv{family}): {exc}")
    if errors:
        raise CaptureError(f"remove capture in netns {handle}: {'; '.join(errors)}")
