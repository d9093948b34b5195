"""Fixtures shared across the suite: the one local Ray head (tests/ray_head.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.ray_head import RayHead, start_head


@pytest.fixture(scope="session")
def ray_head() -> Iterator[RayHead]:
    """A local Ray head shared by every test of this pytest run that asks for it."""
    head = start_head()
    try:
        yield head
    finally:
        head.stop()
