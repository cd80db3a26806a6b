"""What a piece of derived data depends on, and the refusal to mix incompatible pieces (§8)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import numpy as np

from ..errors import IncompatibleFeaturesError


@dataclass(frozen=True)
class FeatureIdentity:
    """Features, banks and curvature are valid only for one (model, bank, sketch seed, k, trunk precision)."""

    model_checksum: str
    bank_id: str
    sketch_seed: int
    k: int
    precision: str = "fp32"  # the trunks' autocast precision (identities stored before it existed: fp32)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, s: str | bytes) -> "FeatureIdentity":
        return cls(**json.loads(s))

    def require_same(self, other: "FeatureIdentity", what: str, fields: tuple[str, ...] | None = None) -> None:
        """Raise :class:`IncompatibleFeaturesError` naming every field where ``other`` differs."""
        names = fields or ("model_checksum", "bank_id", "sketch_seed", "k", "precision")
        diffs = [f"{n}: {getattr(other, n)!r} != {getattr(self, n)!r}"
                 for n in names if getattr(self, n) != getattr(other, n)]
        if diffs:
            raise IncompatibleFeaturesError(
                f"{what} were produced under a different configuration than the scorer's ("
                + "; ".join(diffs) + "); refusing to mix them")


def seeded_unit(pair_ids, seed: int) -> np.ndarray:
    """A uniform [0, 1) key per pair, a function of (pair_id, seed) only: order- and shard-free (the first 8
    bytes of blake2b over ``"<seed>\x1f<pair_id>"``, little endian, over 2**64)."""
    base = hashlib.blake2b(f"{seed}\x1f".encode(), digest_size=8)  # the prefix hashed once, copied per pair
    digests = b"".join([_digest(base.copy(), pid.encode()) for pid in pair_ids])
    return np.frombuffer(digests, dtype="<u8").astype(np.float64) / 2.0**64


def _digest(h, data: bytes) -> bytes:
    h.update(data)
    return h.digest()


def seeded_sample(pair_ids, n: int, seed: int) -> list[str]:
    """The ``n`` pairs of smallest seeded key, in key order (canonical, whatever the input order)."""
    ids = list(pair_ids)
    if len(set(ids)) != len(ids):
        raise ValueError("seeded_sample needs distinct pair ids")
    return [ids[i] for i in _key_order(ids, seeded_unit(ids, seed))[:n]]


class StreamSample:
    """:func:`seeded_sample` over a stream of batches, holding only the candidates. Offer each batch's ids,
    and with ``concat`` (e.g. ``FeatureBatch.concat``) a payload whose ``take(idx)`` gives its rows;
    :attr:`ids` and :attr:`payload` then equal ``seeded_sample`` over everything offered, in key order."""

    def __init__(self, n: int, seed: int, concat=None):
        self.n, self.seed, self.concat = n, seed, concat
        self.ids: list[str] = []
        self.keys = np.empty(0, dtype=np.float64)
        self.payload = None

    @property
    def worst(self) -> float | None:
        """The largest key held once the sample is full (no pair with a larger key can enter), else None."""
        keys = self.keys  # one read: a thread may ask while another offers
        return float(keys[-1]) if len(keys) >= self.n > 0 else None

    def offer(self, pair_ids, payload=None, keys: np.ndarray | None = None, below: float | None = None) -> None:
        """``keys``: ``seeded_unit(pair_ids, seed)`` when the caller has it already (it is not recomputed).
        ``below``: pairs with a larger key are not taken; a batch's own sample that will be offered to a larger
        one passes that one's :attr:`worst` (those pairs could never enter it, so the result is the same)."""
        ids = list(pair_ids)
        if not ids or self.n <= 0:
            return
        keys = seeded_unit(ids, self.seed) if keys is None else np.asarray(keys, dtype=np.float64)
        if len(keys) != len(ids):
            raise ValueError(f"{len(keys)} keys offered for {len(ids)} pair ids")
        bound = min((b for b in (self.worst, below) if b is not None), default=None)
        local = _smallest(ids, keys, self.n, bound)
        ids, keys = self.ids + [ids[i] for i in local], np.concatenate([self.keys, keys[local]])
        keep = _key_order(ids, keys)[:self.n]
        if len(set(ids[i] for i in keep)) != len(keep):
            raise ValueError("seeded_sample needs distinct pair ids")
        self.ids, self.keys = [ids[i] for i in keep], keys[keep]
        if self.concat is not None:
            rows = payload.take(local)
            self.payload = (rows if self.payload is None else self.concat([self.payload, rows])).take(keep)


def _smallest(ids: list[str], keys: np.ndarray, n: int, bound: float | None = None) -> np.ndarray:
    """``_key_order(ids, keys)[:n]`` without sorting every id: only keys up to the ``n``-th smallest (and up to
    ``bound``, the worst key already held) can be among the first ``n``, so only those are ordered."""
    cand = np.arange(len(keys))
    if len(keys) > n:
        cand = np.flatnonzero(keys <= np.partition(keys, n - 1)[n - 1])
    if bound is not None:
        cand = cand[keys[cand] <= bound]
    return cand[_key_order([ids[i] for i in cand], keys[cand])[:n]]


def _key_order(ids: list[str], keys: np.ndarray) -> np.ndarray:
    return np.lexsort((np.array(ids, dtype=object).astype(str), keys))


def content_pair_id(image_bytes: bytes, caption: str) -> str:
    """A pair's id: sha256 over its image bytes and caption (re-ingesting the same pair is a no-op)."""
    h = hashlib.sha256()
    h.update(len(image_bytes).to_bytes(8, "little"))
    h.update(image_bytes)
    h.update(caption.encode("utf-8"))
    return h.hexdigest()[:32]
