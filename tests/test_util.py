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
        # The count only falls while frozen objects die by reference count (a library's background thread may drop
        # some at any time), so it is compared with bounds, not equality. Nested: the inner block freezes nothing
        # (the count does not grow past the outer's, although the inner generator's own objects were created since),
        # and its exit does not unfreeze the outer's objects (the count does not drop to 0).
        with gc_frozen():
            assert 0 < gc.get_freeze_count() <= frozen
        assert 0 < gc.get_freeze_count() <= frozen
    assert gc.get_freeze_count() == 0


def test_torch_threads_restores_the_setting_when_the_last_block_ends_even_interleaved():
    import threading

    import torch

    from chips_core.stages.score import torch_threads

    before = torch.get_num_threads()
    a, b = torch_threads(1), torch_threads(1)
    a.__enter__()
    b.__enter__()  # a second stage (another thread) enters while the first runs
    assert torch.get_num_threads() == 1
    a.__exit__(None, None, None)  # the first leaves first: the second still runs single-threaded
    assert torch.get_num_threads() == 1
    b.__exit__(None, None, None)
    assert torch.get_num_threads() == before
    seen = []
    with torch_threads(1):  # what the score stage relies on: its pool's threads, started inside, run single-threaded
        t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        t.start()
        t.join()
    assert seen == [1] and torch.get_num_threads() == before


def test_bounded_map_closed_early_does_not_run_the_items_not_started():
    import time

    from chips_core.stages.score import bounded_map

    ran = []

    def fn(i):
        time.sleep(0.01)
        ran.append(i)
        return i

    it = bounded_map(fn, list(range(50)), 2)
    assert next(it) == 0
    it.close()
    assert len(ran) <= 5  # at most 2 * threads were submitted, and those not started were cancelled
