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


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that uses the shared head is a Ray test (`make test-fast` leaves it out),
    whether or not its module says so."""
    for item in items:
        if "ray_head" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)
