"""CLI tests reuse the admin tests' fake providers (one set of fake agent data)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "admin_fake_providers", Path(__file__).parents[1] / "admin" / "conftest.py"
)
assert _spec is not None and _spec.loader is not None
_fakes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_fakes)

# Re-exported so pytest sees them as fixtures here.
providers = _fakes.providers
drain = _fakes.drain
