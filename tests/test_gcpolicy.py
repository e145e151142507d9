"""The serving process's collector settings (gateway/gcpolicy.py)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from gateway import gcpolicy


@pytest.fixture
def restore_gc() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


@pytest.mark.usefixtures("restore_gc")
def test_startup_objects_are_frozen_and_young_passes_spaced_out() -> None:
    survivor = [object()]  # alive across the call: start-up state of the process
    _, middle, old = gc.get_threshold()
    gcpolicy.settle_after_startup()
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold() == (gcpolicy.YOUNG_THRESHOLD, middle, old)
    assert not any(survivor is obj for obj in gc.get_objects())  # frozen: no pass walks it any more
