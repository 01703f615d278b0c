"""Shared test setup: torch on one CPU thread for the whole session (see core.testing.single_thread)."""

import pytest

from core.testing import single_thread


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    with single_thread():
        yield
