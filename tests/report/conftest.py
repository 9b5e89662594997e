"""Fixtures of the report tests."""
from __future__ import annotations

import copy

import pytest
from report_fixtures import make_full_result


@pytest.fixture
def full_result() -> dict:
    """Every section present, a chosen candidate included."""
    r = make_full_result()
    r["chosen"] = copy.deepcopy(r["candidates"][1])
    return r
