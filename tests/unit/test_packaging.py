"""pyproject.toml: what `pip install .` reads (no deprecation banner on install)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).parents[2] / "pyproject.toml"


def test_license_is_an_spdx_string_and_the_backend_understands_it() -> None:
    data = tomllib.loads(PYPROJECT.read_text())
    # A `{text = ...}` table makes setuptools print a deprecation banner on every install.
    assert data["project"]["license"] == "Apache-2.0"
    assert not any(c.startswith("License ::") for c in data["project"].get("classifiers", []))
    # The SPDX string form needs setuptools >= 77.
    (req,) = [r for r in data["build-system"]["requires"] if r.startswith("setuptools")]
    match = re.fullmatch(r"setuptools>=(\d+)(\.\d+)*", req)
    assert match and int(match.group(1)) >= 77
