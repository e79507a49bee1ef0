"""The fuzz targets, by name, and what each module provides.

A target module defines:

* `fuzz_one(data: bytes) -> None`: run one input; raise only on a bug;
* `seeds() -> dict[str, bytes]`: the seed corpus (file name -> content), valid inputs that
  reach deep states, written to fuzz/corpus/<name>/ by `python -m fuzz.corpus`;
* `INSTRUMENT`: the packages atheris instruments for coverage feedback;
* `MAX_LEN`: the largest input libFuzzer generates.

Modules are imported lazily (`load`), so the runner can import a target's code under
atheris's instrumentation.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType
from typing import Protocol, cast

# Name -> module. Both HBONE roles share one driver; each role is its own target so that
# its corpus and coverage are its own.
TARGETS: dict[str, str] = {
    "hbone_server": "fuzz.targets.hbone_server",
    "hbone_client": "fuzz.targets.hbone_client",
    "xds_address": "fuzz.targets.xds_address",
    "xds_authorization": "fuzz.targets.xds_authorization",
    "xds_routing": "fuzz.targets.xds_routing",
    "mesh_file": "fuzz.targets.mesh_file",
    "apply_file": "fuzz.targets.apply_file",
}


class Target(Protocol):
    INSTRUMENT: tuple[str, ...]
    MAX_LEN: int

    def fuzz_one(self, data: bytes) -> None: ...

    def seeds(self) -> dict[str, bytes]: ...


def load(name: str) -> Target:
    """Import target `name` (KeyError naming the known ones if there is no such target)."""
    try:
        module_name = TARGETS[name]
    except KeyError:
        raise KeyError(f"no fuzz target {name!r} (known: {', '.join(TARGETS)})") from None
    module: ModuleType = importlib.import_module(module_name)
    return cast(Target, module)


def entry(name: str) -> Callable[[bytes], None]:
    return load(name).fuzz_one
