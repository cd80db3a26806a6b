r"""Per-pair features against a fixed reference bank (CHIPS_METHOD.md §2–§4).

For pair :math:`i` and bank pairs :math:`b = 1..K` (embeddings :math:`x, y`, pre-projection norms
:math:`n_v = \|e_v\|, n_t = \|e_t\|`, logit scale :math:`s`):

.. math::
    \ell_i = \tfrac12\big[-\log P_0 - \log Q_0\big],\quad
    P = \mathrm{softmax}(s[c_{ii}, c_{i1}..c_{iK}]),\quad Q = \mathrm{softmax}(s[c_{ii}, c_{1i}..c_{Ki}])

and the per-sample gradient is the exact sum of rank-one pair Jacobians (§3). With the sketch
(§4) every term is :math:`(U a) \odot (V h)`, so the sketched gradient of a micro-batch of ``B``
pairs costs six ``(B, K) @ (K, k)`` products on top of the forward pass; no per-pair
``D x d`` gradient is ever formed.

Batch invariance: every pair is computed inside a padded micro-batch of exactly
``FeaturizeConfig.micro_batch`` rows, so its outputs are bit-identical whatever the caller's
batch size, order or shard layout (BLAS results depend on the matrix shapes, not on the other
rows' values).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import torch

from ..errors import IncompatibleFeaturesError, NonFiniteEmbeddingError, check
from .endpoint import PRECISIONS, EndpointModel
from .identity import FeatureIdentity, seeded_sample
from .sketch import RankOneSketch, SketchConfig


@dataclass(frozen=True)
class BankConfig:
    size: int = 1024  # K: number of reference pairs every pair is scored against (§2)
    seed: int = 0  # seed of the draw of bank pairs from the pool
    # (ours, optional §2) bank members that are not true negatives of a pair, masked like the pair itself:
    mask_same_caption: bool = False  # members whose caption is the pair's (equal text-tower features)
    mask_image_cosine: float | None = None  # members whose image embedding has cosine >= this with the pair's

    def __post_init__(self):
        check(isinstance(self.size, int) and self.size >= 1, "BankConfig", "size", self.size, "an int >= 1")
        check(self.mask_image_cosine is None or 0 < self.mask_image_cosine <= 1, "BankConfig", "mask_image_cosine",
              self.mask_image_cosine, "None or in (0, 1]")


@dataclass(frozen=True)
class FeaturizeConfig:
    micro_batch: int = 64  # every pair is computed in a padded chunk of exactly this many rows,
    #                        so its outputs are bit-identical whatever the caller's batch size
    eval_chunk: int = 4096  # rows of the eval-set logit matrix held at once (§2)
    # the trunks' precision (autocast): auto = bf16 on CUDA, fp32 on CPU; h, embeddings, bank logits, the
    # gradient and the sketch are float32 whatever it is. Recorded in the feature identity: never mixed.
    precision: str = "auto"
    # processes decoding and preprocessing images while the model runs (a DataLoader's workers; 0: in the
    # stage's own process); None: from the CPU count (stages.common.featurize_workers). Never changes a bit.
    num_workers: int | None = None

    def __post_init__(self):
        check(self.micro_batch >= 1, "FeaturizeConfig", "micro_batch", self.micro_batch, "must be >= 1")
        check(self.eval_chunk >= 1, "FeaturizeConfig", "eval_chunk", self.eval_chunk, "must be >= 1")
        check(self.num_workers is None or (type(self.num_workers) is int and self.num_workers >= 0),
              "FeaturizeConfig", "num_workers", self.num_workers, "must be an integer >= 0, or null for the default")
        check(self.precision in ("auto", *PRECISIONS), "FeaturizeConfig", "precision", self.precision,
              f"not one of {('auto', *PRECISIONS)}")


# ---------------------------------------------------------------------------------------------
# Micro-batching

def padded_chunks(n: int, size: int) -> Iterator[tuple[slice, int]]:
    """``(rows, n_real)`` for each chunk of ``size`` rows; the last is padded to ``size``."""
    for start in range(0, n, size):
        yield slice(start, min(start + size, n)), min(size, n - start)


def pad_rows(t: torch.Tensor, size: int) -> torch.Tensor:
    if t.shape[0] == size:
        return t
    return torch.cat([t, t[:1].expand(size - t.shape[0], *t.shape[1:])])


def forward_pre(endpoint: EndpointModel, images, texts, micro_batch: int):
    """Trunk forward in padded micro-batches: ``h_v (B, d_v), h_t (B, d_t)`` float32 on CPU-or-device."""
    chunks = ((images[rows], texts[rows]) for rows, _ in padded_chunks(images.shape[0], micro_batch))
    return forward_pre_batches(endpoint, chunks, micro_batch)


def forward_pre_batches(endpoint: EndpointModel, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                        micro_batch: int):
    """:func:`forward_pre` over ``(images, texts)`` batches as they arrive (an input pipeline's): each is one
    micro-batch, the rows ``[i * micro_batch, (i + 1) * micro_batch)`` of the whole, padded to ``micro_batch``
    rows as :func:`forward_pre` pads its chunks, so the outputs are the same bits."""
    hv, ht = [], []
    for images, texts in batches:
        n = images.shape[0]
        if not 0 < n <= micro_batch or texts.shape[0] != n:
            raise ValueError(f"a batch of {n} images and {texts.shape[0]} texts: want the same number, "
                             f"1 to micro_batch={micro_batch}")
        a, b = endpoint.encode_pre(pad_rows(images, micro_batch), pad_rows(texts, micro_batch))
        hv.append(a[:n])
        ht.append(b[:n])
    return torch.cat(hv), torch.cat(ht)


# ---------------------------------------------------------------------------------------------
# The reference bank

@dataclass
class ReferenceBank:
    """``K`` reference pairs' pre-projection features, from one forward pass of the model (§2)."""

    pair_ids: list[str]
    h_v: torch.Tensor  # (K, d_v[+1]) float32
    h_t: torch.Tensor  # (K, d_t[+1]) float32
    model_checksum: str
    seed: int
    mask_same_caption: bool = False  # see BankConfig: which members are not negatives of a pair
    mask_image_cosine: float | None = None
    precision: str = "fp32"  # the trunks' precision when the bank was forwarded

    @property
    def masking(self) -> dict:
        """The masking rules beyond the pair itself (empty: the paper's bank)."""
        rules = {"same_caption": self.mask_same_caption, "image_cosine": self.mask_image_cosine}
        return {k: v for k, v in rules.items() if v}

    @property
    def bank_id(self) -> str:
        """Hash of model, seed, members and masking rules: features under other rules never mix (§8)."""
        h = hashlib.sha256(f"{self.model_checksum}|{self.seed}|".encode())
        h.update("\x1f".join(self.pair_ids).encode())
        if self.masking:  # the paper's bank keeps the id it always had
            h.update(f"|mask={sorted(self.masking.items())}".encode())
        if self.precision != "fp32":  # so does a float32 bank
            h.update(f"|precision={self.precision}".encode())
        return h.hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.pair_ids)

    @staticmethod
    def draw_ids(pool_ids: Sequence[str], config: BankConfig) -> list[str]:
        """The bank's pair ids: the ``K`` pool pairs of smallest seeded key (order- and shard-free)."""
        return seeded_sample(pool_ids, min(config.size, len(pool_ids)), config.seed)

    @classmethod
    def from_pairs(cls, endpoint: EndpointModel, images, texts, pair_ids: Sequence[str], *,
                   model_checksum: str, seed: int, micro_batch: int = 64, mask_same_caption: bool = False,
                   mask_image_cosine: float | None = None) -> "ReferenceBank":
        if len(pair_ids) < 2:
            raise ValueError(f"a reference bank needs at least 2 pairs, got {len(pair_ids)}")
        hv, ht = forward_pre(endpoint, images, texts, micro_batch)
        return cls(list(pair_ids), hv.cpu(), ht.cpu(), model_checksum, seed, mask_same_caption, mask_image_cosine,
                   endpoint.precision)


# ---------------------------------------------------------------------------------------------
# Embeddings and their sketched coordinates

@dataclass
class Embedded:
    """A set of pairs in the end-point frame: embeddings, norms and sketched coordinates."""

    pair_ids: list
    h_v: torch.Tensor
    h_t: torch.Tensor
    x: torch.Tensor  # (B, D) normalised image embedding
    y: torch.Tensor  # (B, D) normalised text embedding
    nv: torch.Tensor  # (B,) ||e_v||
    nt: torch.Tensor  # (B,) ||e_t||
    uxv: torch.Tensor  # (B, k) U_v x
    uyv: torch.Tensor  # (B, k) U_v y
    uxt: torch.Tensor  # (B, k) U_t x
    uyt: torch.Tensor  # (B, k) U_t y
    vhv: torch.Tensor  # (B, k) V_v h_v
    vht: torch.Tensor  # (B, k) V_t h_t


def _row_keys(h: torch.Tensor) -> list[bytes]:
    """The bytes of each row: equal keys mean bit-equal features (micro-batching makes them so, §2)."""
    rows = h.detach().to("cpu").contiguous().numpy()
    return [r.tobytes() for r in rows]


def _invalid_rows(h_v, h_t, nv, nt) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row (on the rows' device, no synchronisation): non-finite features or norms, and a zero norm."""
    bad = ~(torch.isfinite(h_v).all(1) & torch.isfinite(h_t).all(1) & torch.isfinite(nv) & torch.isfinite(nt))
    return bad, (nv <= 0) | (nt <= 0)


def _check_finite(pair_ids, h_v, h_t, nv, nt) -> None:
    _raise_invalid(pair_ids, *_invalid_rows(h_v, h_t, nv, nt))


def _raise_invalid(pair_ids, bad: torch.Tensor, zero: torch.Tensor) -> None:
    if not bool((bad | zero).any()):  # the one synchronisation of a check
        return
    for mask, what in ((bad, "non-finite pre-projection features or embeddings"),
                       (zero, "a zero-norm projection (cannot normalise)")):
        # padding rows (id None) repeat a real row, which is reported under its own id
        idx = [i for i in torch.nonzero(mask).flatten().tolist() if pair_ids[i] is not None]
        if idx:
            named = ", ".join(repr(pair_ids[i]) for i in idx[:5])
            more = f" and {len(idx) - 5} more" if len(idx) > 5 else ""
            raise NonFiniteEmbeddingError(f"pair {named}{more}: {what}")


class ScoringContext:
    r"""Everything a micro-batch needs: :math:`W_v, W_t, s`, the sketch, and the embedded bank."""

    def __init__(self, endpoint: EndpointModel, bank: ReferenceBank, sketch: SketchConfig,
                 dtype: torch.dtype = torch.float32):
        self.endpoint, self.dtype = endpoint, dtype
        self.device = endpoint.device
        self.W_v, self.W_t, t = (w.to(self.device) for w in endpoint.weights(dtype))
        self.s = t.exp()
        D, d_v = self.W_v.shape
        self.sketch = RankOneSketch(D, d_v, self.W_t.shape[1], sketch.k, sketch.seed)
        self.mats = self.sketch.mats(dtype, self.device)
        self.k = sketch.k
        if bank.precision != endpoint.precision:
            raise IncompatibleFeaturesError(f"the reference bank was forwarded in {bank.precision} but this model "
                                            f"runs in {endpoint.precision}; refusing to mix them")
        self.identity = FeatureIdentity(bank.model_checksum, bank.bank_id, sketch.seed, sketch.k, endpoint.precision)
        self.bank = self.embed(bank.h_v, bank.h_t, bank.pair_ids)
        self.bank_rules = bank
        self.bank_caption_rows: dict[bytes, list[int]] = {}
        for j, key in enumerate(_row_keys(self.bank.h_t)):
            self.bank_caption_rows.setdefault(key, []).append(j)
        self.bank_index = {pid: j for j, pid in enumerate(bank.pair_ids)}
        self.bank_uxv_vhv = self.bank.uxv * self.bank.vhv  # (K, k)
        self.bank_uyt_vht = self.bank.uyt * self.bank.vht  # (K, k)
        # W @ (bank rows sketched) can also be (W @ bank rows) @ sketch^T: the same product,
        # reassociated. Take whichever costs fewer multiply-adds per pair: K*k, or K*d + d*k.
        U_v, V_v, U_t, V_t, _ = self.mats
        K, b = len(bank), self.bank
        self._bank_terms = {
            name: (dense, mat.t(), None) if K * mat.shape[1] + mat.shape[1] * self.k < K * self.k else (None, None, sk)
            for name, dense, mat, sk in (("uyv", b.y, U_v, b.uyv), ("vhv", b.h_v, V_v, b.vhv),
                                          ("uxt", b.x, U_t, b.uxt), ("vht", b.h_t, V_t, b.vht))}

    def bank_mm(self, W: torch.Tensor, name: str) -> torch.Tensor:
        """``W (B, K) @ bank.<name> (K, k)``, computed in the cheaper association."""
        dense, mat_t, sketched = self._bank_terms[name]
        return W @ sketched if sketched is not None else (W @ dense) @ mat_t

    def embed(self, h_v: torch.Tensor, h_t: torch.Tensor, pair_ids, check: bool = True) -> Embedded:
        """The end-point embeddings and their sketched factors. ``check=False`` leaves the finiteness check to the
        caller (:func:`_invalid_rows` on ``h_v, h_t, nv, nt``): the featurizer checks once per call, not once per
        micro-batch, so that the device is not synchronised with the host between micro-batches."""
        h_v = h_v.to(self.device, self.dtype)
        h_t = h_t.to(self.device, self.dtype)
        e_v, e_t = h_v @ self.W_v.t(), h_t @ self.W_t.t()
        nv, nt = e_v.norm(dim=1), e_t.norm(dim=1)
        if check:
            _check_finite(pair_ids, h_v, h_t, nv, nt)
        x, y = e_v / nv[:, None], e_t / nt[:, None]
        U_v, V_v, U_t, V_t, _ = self.mats
        return Embedded(list(pair_ids), h_v, h_t, x, y, nv, nt,
                        x @ U_v.t(), y @ U_v.t(), x @ U_t.t(), y @ U_t.t(), h_v @ V_v.t(), h_t @ V_t.t())

    def bank_mask(self, emb: Embedded) -> torch.Tensor:
        """(B, K) True where bank pair b is not a negative of pair i: pair i itself (it is masked out of its
        own negatives) and, if the bank says so, members with its caption or a near-duplicate image. Built on the
        device; the host sends indices only where a pair is a bank member or shares a member's caption (a pool pair
        usually is neither, so the common case copies nothing and does not synchronise)."""
        rows, cols = [], []
        for i, pid in enumerate(emb.pair_ids):
            j = self.bank_index.get(pid)
            if j is not None:
                rows.append(i)
                cols.append(j)
        if self.bank_rules.mask_same_caption:  # equal text-tower features, byte for byte: the same caption (§2)
            for i, key in enumerate(_row_keys(emb.h_t)):
                js = self.bank_caption_rows.get(key, [])
                rows += [i] * len(js)
                cols += js
        mask = torch.zeros(len(emb.pair_ids), len(self.bank_index), dtype=torch.bool, device=self.device)
        if rows:
            mask[torch.tensor(rows, device=self.device), torch.tensor(cols, device=self.device)] = True
        if self.bank_rules.mask_image_cosine is not None:
            mask |= (emb.x @ self.bank.x.t()) >= self.bank_rules.mask_image_cosine
        return mask

    def bank_logits(self, emb: Embedded):
        """Cosines against the bank, ``C_it[i,b] = x_i·y_b``, ``C_ti[i,b] = x_b·y_i``, and the mask."""
        C_it = emb.x @ self.bank.y.t()
        C_ti = emb.y @ self.bank.x.t()
        return C_it, C_ti, self.bank_mask(emb)


def sample_features(ctx: ScoringContext, emb: Embedded) -> dict[str, torch.Tensor]:
    r"""Sketched per-sample gradient and the per-pair statistics of §2–§6 for one micro-batch.

    Returns ``g (B, k)``, ``loss, p_corr, margin, clipscore (B,)``. ``g`` is :math:`S(g_i)` with

    .. math:: g_i = \tfrac12\sum_j (P_j-\delta_{j0}) J(i, j_{text}) + \tfrac12\sum_j (Q_j-\delta_{j0}) J(j_{image}, i)
    """
    s, bank = ctx.s, ctx.bank
    C_it, C_ti, mask = ctx.bank_logits(emb)
    c = (emb.x * emb.y).sum(1)  # (B,) c_ii
    neg_inf = torch.finfo(c.dtype).min
    L_it = torch.cat([c[:, None], C_it.masked_fill(mask, -math.inf)], 1) * s
    L_ti = torch.cat([c[:, None], C_ti.masked_fill(mask, -math.inf)], 1) * s
    logP, logQ = L_it.log_softmax(1), L_ti.log_softmax(1)
    P, Q = logP.exp(), logQ.exp()
    Pb, Qb = P[:, 1:], Q[:, 1:]  # (B, K); zero where masked
    d0 = (P[:, 0] - 1) + (Q[:, 0] - 1)  # (P_0 - 1) + (Q_0 - 1)
    sPC, sQC = (Pb * C_it).sum(1), (Qb * C_ti).sum(1)

    # W_v block: the pair's own image (self) plus the bank images of the text->image row (cross).
    a_self = (s / (2 * emb.nv))[:, None] * (d0[:, None] * emb.uyv + ctx.bank_mm(Pb, "uyv")
                                            - (d0 * c + sPC)[:, None] * emb.uxv)
    Wq = 0.5 * s * Qb / bank.nv[None, :]
    img = a_self * emb.vhv + emb.uyv * ctx.bank_mm(Wq, "vhv") - (Wq * C_ti) @ ctx.bank_uxv_vhv
    # W_t block: the pair's own text plus the bank texts of the image->text row.
    b_self = (s / (2 * emb.nt))[:, None] * (d0[:, None] * emb.uxt + ctx.bank_mm(Qb, "uxt")
                                            - (d0 * c + sQC)[:, None] * emb.uyt)
    Wp = 0.5 * s * Pb / bank.nt[None, :]
    txt = b_self * emb.vht + emb.uxt * ctx.bank_mm(Wp, "vht") - (Wp * C_it) @ ctx.bank_uyt_vht
    g_t = 0.5 * s * (d0 * c + sPC + sQC)
    g = (img + txt + g_t[:, None] * ctx.mats[4]) / math.sqrt(ctx.k)

    hardest = torch.maximum(C_it.masked_fill(mask, neg_inf).amax(1), C_ti.masked_fill(mask, neg_inf).amax(1))
    return {
        "g": g,
        "loss": -0.5 * (logP[:, 0] + logQ[:, 0]),
        "p_corr": 0.5 * (P[:, 0] + Q[:, 0]),
        "margin": c - hardest,
        "clipscore": c,
    }


# ---------------------------------------------------------------------------------------------
# Feature batches and their Arrow form

FEATURE_SCALARS = ("p_corr", "margin", "clipscore", "loss")


@dataclass
class FeatureBatch:
    """Per-pair features of one featurization run, as numpy arrays (float32 from the featurizer; vectors read
    back from storage may stay float16, see :meth:`from_arrow`)."""

    pair_id: list[str]
    x: np.ndarray  # (B, D)
    y: np.ndarray  # (B, D)
    g: np.ndarray  # (B, k) sketched per-sample gradient
    p_corr: np.ndarray
    margin: np.ndarray
    clipscore: np.ndarray
    loss: np.ndarray
    identity: FeatureIdentity
    # the stored pair_id column when read by from_arrow (take and concat drop it): see pair_id_array
    stored_ids: pa.Array | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.pair_id)

    def pair_id_array(self) -> pa.Array:
        """``pair_id`` as an Arrow string array; for a batch read from storage, the stored column itself (writing
        scores back does not convert a part's ids from Python strings again)."""
        return self.stored_ids if self.stored_ids is not None else pa.array(self.pair_id, pa.string())

    @classmethod
    def concat(cls, batches: Sequence["FeatureBatch"]) -> "FeatureBatch":
        if not batches:
            raise ValueError("FeatureBatch.concat needs at least one batch")
        first = batches[0].identity
        for b in batches[1:]:
            first.require_same(b.identity, "feature batches")
        return cls(
            pair_id=[p for b in batches for p in b.pair_id],
            **{f: np.concatenate([getattr(b, f) for b in batches]) for f in ("x", "y", "g", *FEATURE_SCALARS)},
            identity=first,
        )

    def take(self, idx) -> "FeatureBatch":
        """The rows ``idx`` (an index array), in that order."""
        idx = np.asarray(idx, dtype=np.int64)
        arrays = {f: getattr(self, f)[idx] for f in ("x", "y", "g", *FEATURE_SCALARS)}
        return FeatureBatch([self.pair_id[i] for i in idx], **arrays, identity=self.identity)

    VECTORS = ("x", "y", "g")

    def to_arrow(self, storage: str = "float16") -> pa.Table:
        """Arrow table; each vector is one fixed-size binary value holding its ``storage`` floats (little
        endian; ``chips.dtype`` and ``chips.dim`` in the field metadata), identity in the schema metadata. A
        fixed-size binary decodes from Parquet ~50x faster than a fixed-size list of float16 (no repetition
        levels per element), which is what lets a rescore stream stored features at pool scale."""
        np_store = {"float16": "<f2", "float32": "<f4"}[storage]

        def vec(name: str, a: np.ndarray) -> tuple[pa.Field, pa.Array]:
            raw = np.ascontiguousarray(a, dtype=np_store)
            width = raw.shape[1] * raw.itemsize
            arr = pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), len(raw), [None, pa.py_buffer(raw.tobytes())])
            return pa.field(name, pa.binary(width), metadata={"chips.dtype": storage, "chips.dim": str(raw.shape[1])}), arr

        fields, cols = [pa.field("pair_id", pa.string())], [pa.array(self.pair_id, pa.string())]
        for name in self.VECTORS:
            f, arr = vec(name, getattr(self, name))
            fields.append(f)
            cols.append(arr)
        for name in FEATURE_SCALARS:
            fields.append(pa.field(name, pa.float32()))
            cols.append(pa.array(getattr(self, name), pa.float32()))
        schema = pa.schema(fields, metadata={"chips.identity": self.identity.to_json()})
        return pa.Table.from_arrays(cols, schema=schema)

    @classmethod
    def from_arrow(cls, table: pa.Table, dtype=np.float32) -> "FeatureBatch":
        """The inverse of :meth:`to_arrow`; also reads vectors stored as fixed-size lists (older parts). With
        ``dtype=None`` the vectors stay in their stored precision (float16, a view of the Arrow buffer: no copy,
        no conversion; the scores are the same bits, :func:`~chips_core.scoring.score.row_dots` widens exactly)."""
        meta = table.schema.metadata or {}
        if b"chips.identity" not in meta:
            raise ValueError("Arrow table carries no 'chips.identity' metadata; is it a CHIPS feature table?")

        def mat(name: str) -> np.ndarray:
            chunked = table.column(name)  # one chunk (a part's row group) is used as it is: combining would copy it
            col = chunked.chunk(0) if chunked.num_chunks == 1 else chunked.combine_chunks()
            if pa.types.is_fixed_size_binary(col.type):
                fmeta = table.schema.field(name).metadata or {}
                stored = {b"float16": "<f2", b"float32": "<f4"}[fmeta.get(b"chips.dtype", b"float16")]
                raw = np.frombuffer(col.buffers()[1], dtype=np.uint8)[col.offset * col.type.byte_width:
                                                                      (col.offset + len(col)) * col.type.byte_width]
                v = raw.view(stored).reshape(len(col), -1)
            else:
                v = col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), -1)
            return v if dtype is None else v.astype(dtype)

        ids = table.column("pair_id")
        ids = ids.chunk(0) if ids.num_chunks == 1 else ids.combine_chunks()
        return cls(
            pair_id=ids.to_pylist(),
            x=mat("x"), y=mat("y"), g=mat("g"),
            **{f: table.column(f).to_numpy().astype(np.float32) for f in FEATURE_SCALARS},
            identity=FeatureIdentity.from_json(meta[b"chips.identity"]),
            stored_ids=ids if ids.type == pa.string() else None,
        )


# ---------------------------------------------------------------------------------------------
# The featurizer

class Featurizer:
    """Turns batches of (image, tokenized caption, pair id) into :class:`FeatureBatch` rows."""

    def __init__(self, endpoint: EndpointModel, bank: ReferenceBank, sketch: SketchConfig = SketchConfig(),
                 config: FeaturizeConfig = FeaturizeConfig(), dtype: torch.dtype = torch.float32):
        self.endpoint, self.config = endpoint, config
        self.ctx = ScoringContext(endpoint, bank, sketch, dtype)

    @property
    def identity(self) -> FeatureIdentity:
        return self.ctx.identity

    def featurize(self, images: torch.Tensor, texts: torch.Tensor, pair_ids: Sequence[str]) -> FeatureBatch:
        """Run the trunks (forward only) and compute every pair's features."""
        if not (len(images) == len(texts) == len(pair_ids)):
            raise ValueError(f"images ({len(images)}), texts ({len(texts)}) and pair_ids ({len(pair_ids)}) differ in length")
        mb, out = self.config.micro_batch, []
        for rows, n in padded_chunks(len(pair_ids), mb):
            hv, ht = self.endpoint.encode_pre(pad_rows(images[rows], mb), pad_rows(texts[rows], mb))
            out.append(self._features(hv, ht, list(pair_ids[rows]), n))
        return self._collect(out, pair_ids)

    def featurize_pre(self, h_v: torch.Tensor, h_t: torch.Tensor, pair_ids: Sequence[str]) -> FeatureBatch:
        """Features from pre-projection features already computed (same micro-batching)."""
        mb, out = self.config.micro_batch, []
        for rows, n in padded_chunks(len(pair_ids), mb):
            out.append(self._features(pad_rows(h_v[rows], mb), pad_rows(h_t[rows], mb), list(pair_ids[rows]), n))
        return self._collect(out, pair_ids)

    def _features(self, hv, ht, ids: list, n: int) -> dict[str, torch.Tensor]:
        """One micro-batch's features and validity flags, its ``n`` real rows, left on the device."""
        ids_padded = ids + [None] * (hv.shape[0] - n)
        emb = self.ctx.embed(hv, ht, ids_padded, check=False)
        bad, zero = _invalid_rows(emb.h_v, emb.h_t, emb.nv, emb.nt)
        f = sample_features(self.ctx, emb)
        return {k: t[:n].detach() for k, t in (("x", emb.x), ("y", emb.y), *f.items(), ("_bad", bad), ("_zero", zero))}

    def _collect(self, parts: list[dict[str, torch.Tensor]], pair_ids: Sequence[str]) -> FeatureBatch:
        """The micro-batches joined on the device, checked once and copied to the host once per feature: between
        micro-batches the host never waits for the device (issue 31: the per-micro-batch checks and copies cost
        bf16 featurize several percent of the forward pass on a GPU). The bits are the per-micro-batch ones."""
        ids = list(pair_ids)
        whole = {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts else {}
        if not whole:
            raise ValueError("featurize needs at least one pair")
        _raise_invalid(ids, whole.pop("_bad"), whole.pop("_zero"))
        as_np = lambda t: t.to("cpu", torch.float32).numpy()  # noqa: E731
        return FeatureBatch(pair_id=ids, **{k: as_np(v) for k, v in whole.items()}, identity=self.identity)
