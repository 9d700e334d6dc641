"""Test tiers: every test carries exactly one tier marker, taken from its folder unless the
module sets one itself (a test under ``unit/`` that runs ansible-playbook is a ``playbook``
test). ``pytest -m unit`` is the fast tier (``make test-fast``); ``slow`` marks the few
tests within a tier that take many seconds."""

from __future__ import annotations

from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

#: folder (or file) under tests/ -> tier marker
TIER_OF_PATH = {"unit": "unit", "runtime": "runtime", "playbooks": "playbook", "lab": "lab", "test_lint.py": "lint"}
TIERS = frozenset(TIER_OF_PATH.values())


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        own = {m.name for m in item.iter_markers()} & TIERS
        if len(own) > 1:
            raise pytest.UsageError(f"{item.nodeid} has several tier markers: {sorted(own)}")
        if own:
            continue
        top = Path(item.fspath).resolve().relative_to(TESTS).parts[0]
        tier = TIER_OF_PATH.get(top)
        if tier is None:
            raise pytest.UsageError(
                f"{item.nodeid}: no tier for tests/{top}; add it to TIER_OF_PATH in tests/conftest.py"
            )
        item.add_marker(tier)
