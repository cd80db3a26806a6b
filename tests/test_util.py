"""Small shared helpers (chips_core/util.py) whose behaviour the stages rely on."""
from __future__ import annotations

import gc

from chips_core.util import gc_frozen


def test_gc_frozen_sets_the_objects_alive_on_entry_aside_and_hands_them_back():
    assert gc.get_freeze_count() == 0
    before = object()  # noqa: F841 - alive on entry
    with gc_frozen():
        frozen = gc.get_freeze_count()
        assert frozen > 0
        cycle = []
        cycle.append(cycle)
        del cycle
        assert gc.collect() >= 1  # what is created inside is still collected
        with gc_frozen():  # nested: does nothing, so its exit does not unfreeze the outer's objects
            assert gc.get_freeze_count() == frozen
        assert gc.get_freeze_count() == frozen
    assert gc.get_freeze_count() == 0
