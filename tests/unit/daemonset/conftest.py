"""Fixtures for the install artefacts: the manifest validator and rendered overlays."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[3]
KUSTOMIZE = REPO / "daemonset" / "kustomize"


def _load_validator() -> ModuleType:
    path = REPO / "scripts" / "validate_manifests.py"
    spec = importlib.util.spec_from_file_location("validate_manifests", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules while the class is built.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def validator() -> ModuleType:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl (with kustomize) is needed to render the manifests")
    return _load_validator()


@pytest.fixture(scope="session")
def rendered(validator: ModuleType) -> dict[str, list[dict[str, Any]]]:
    """Every default target of the validator, rendered once: name -> objects."""
    return {t.name: validator.render(t) for t in validator.default_targets()}


@pytest.fixture
def kustomize_copy(tmp_path: Path) -> Path:
    """A private copy of daemonset/kustomize to break on purpose."""
    dest = tmp_path / "kustomize"
    shutil.copytree(KUSTOMIZE, dest)
    return dest
