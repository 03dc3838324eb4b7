"""Paths into the read-only ../shared material, for tests that need it.

Outside CI a missing path skips the test (a checkout without ../shared can still run the rest);
under CI (the CI environment variable set, as CI services do) it fails the test, so that a missing
fixture can never turn a parity check into a silent skip.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def shared_fixture(relpath: str) -> Path:
    """The path ../shared/<relpath>; skips (outside CI) or fails (under CI) when it does not exist.

    Call it from a test or a fixture, or at module level for a module that needs it throughout.
    """
    path = SHARED / relpath
    if path.exists():
        return path
    if under_ci():
        pytest.fail(f"shared fixture {path} is missing (CI is set, so this fails instead of skipping)")
    pytest.skip(f"shared fixture {path} is not present", allow_module_level=True)
