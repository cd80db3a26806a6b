"""The seeded, order-free samples (bank, curvature sample, premise pool sample): a sample drawn batch by batch
(StreamSample) equals the one drawn over everything at once (seeded_sample), whatever the batch sizes; and the
partial ordering that picks a batch's candidates equals the full sort, ties included."""
from __future__ import annotations

import numpy as np
import pytest

from chips_core.scoring.identity import StreamSample, _key_order, _smallest, seeded_sample


@pytest.mark.parametrize("n", [1, 7, 50, 400])
def test_stream_sample_equals_the_sample_over_everything(n):
    rng = np.random.default_rng(n)
    ids = [f"pair-{rng.integers(1e12):012d}-{i}" for i in range(1000)]
    want = seeded_sample(ids, n, seed=3)
    for cuts in ([1000], [1, 999, 1000], sorted(rng.choice(np.arange(1, 1000), 20, replace=False).tolist()) + [1000]):
        s, a = StreamSample(n, 3, concat=lambda ps: np.concatenate(ps)), 0
        for b in cuts:
            s.offer(ids[a:b], np.arange(a, b))
            a = b
        assert s.ids == want
        assert [ids[i] for i in s.payload] == want  # the payload rows follow their ids


def test_batch_samples_bounded_by_the_merged_ones_worst_key_merge_to_the_same_sample():
    """The score stage samples each part on a worker thread, passing the merged sample's worst key so far as
    ``below`` (a part then keeps only the pairs that can still enter), and merges the parts' samples in order."""
    rng = np.random.default_rng(5)
    ids = [f"pair-{rng.integers(1e12):012d}-{i}" for i in range(3000)]
    want = seeded_sample(ids, 40, seed=3)
    merged, kept = StreamSample(40, 3, concat=lambda ps: np.concatenate(ps)), []
    assert merged.worst is None
    for a in range(0, 3000, 250):
        local = StreamSample(40, 3, concat=lambda ps: np.concatenate(ps))
        local.offer(ids[a:a + 250], np.arange(a, a + 250), below=merged.worst)
        kept.append(len(local.ids))
        if local.ids:
            merged.offer(local.ids, local.payload, local.keys)
    assert merged.ids == want and [ids[i] for i in merged.payload] == want
    assert merged.worst == max(merged.keys)
    assert sum(kept[4:]) < 40 * len(kept[4:]) / 2  # the later parts hand over far fewer than a full sample each


def test_smallest_equals_the_full_sort_with_ties_and_a_bound():
    rng = np.random.default_rng(0)
    ids = [f"p{i:04d}" for i in rng.permutation(500)]
    keys = rng.integers(0, 20, 500).astype(np.float64) / 20  # many ties: broken by pair id
    full = _key_order(ids, keys)
    for n in (1, 5, 33, 499, 500, 600):
        assert _smallest(ids, keys, n).tolist() == full[:n].tolist()
    bound = 0.3  # a held sample's worst key: only keys up to it can enter
    got = _smallest(ids, keys, 40, bound)
    assert got.tolist() == [i for i in full if keys[i] <= bound][:40]


def test_seeded_unit_is_its_documented_formula():
    """The key is the first 8 bytes of blake2b over "<seed>\\x1f<pair_id>" (little endian) over 2**64, whatever
    way the code computes it (the prefix is hashed once and copied per pair): stored subsets depend on these bits."""
    import hashlib

    import numpy as np

    from chips_core.scoring.identity import seeded_unit

    ids = ["", "a", "é", "0" * 32, "pair-with-a-long-id-" * 8]
    for seed in (0, 7, -3):
        want = [int.from_bytes(hashlib.blake2b(f"{seed}\x1f{p}".encode(), digest_size=8).digest(), "little") / 2.0**64
                for p in ids]
        assert np.array_equal(seeded_unit(ids, seed), np.array(want))
