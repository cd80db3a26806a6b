r"""Loading open_clip models and reading their end-point subspace (CHIPS_METHOD.md §1).

The end-point parameters are :math:`\theta = \{W_v, W_t, t\}`: the two projections from the
towers' pre-projection features :math:`h_v, h_t` to the joint space, and the log logit scale.
:class:`EndpointModel` runs the trunks forward only and returns :math:`h_v, h_t` (with a
constant 1 appended where the projection has a bias), and exposes :math:`W_v, W_t` as
``(D, d)`` matrices so that :math:`e = W h`.

How :math:`h` is read: for the duration of one forward pass the projection is taken out of the
tower — a projection *Parameter* (ViT ``visual.proj``, text ``text_projection``) is set to
``None``, which open_clip skips, and a projection *Linear* (ResNet ``attnpool.c_proj``, timm
``head.proj``, a Linear ``text_projection``, HF ``text.proj``) is replaced by an identity Linear
of the input width. This gives exactly the projection input even where open_clip uses the
projection's weights without calling the module (``AttentionPool2d`` hands ``c_proj.weight``
to ``F.multi_head_attention_forward``, so a forward hook on it would never fire).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import (CheckpointNotFoundError, ConfigError, EndpointNotFoundError, IncompatibleFeaturesError,
                      UnsupportedModelError, check)

OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ModelSpec:
    """Which model to load. Exactly one of ``name`` / ``config`` selects the architecture."""

    name: str | None = None  # open_clip architecture name, e.g. "ViT-B-32"
    # custom open_clip model config (embed_dim, vision_cfg, text_cfg[, custom_text]): a mapping, or the path of
    # an open_clip JSON config (open_clip's model_configs/*.json layout, or an open_clip_config.json's model_cfg)
    config: dict | str | None = field(default=None, hash=False)
    checkpoint: str | None = None  # local checkpoint file (.pt/.bin/.safetensors); loaded with weights_only=True
    pretrained: str | None = None  # open_clip pretrained tag (needs a network, or open_clip's cache)
    hf_dir: str | None = None  # local Hugging Face folder holding open_clip_config.json and weights

    def __post_init__(self):
        if isinstance(self.config, str):
            object.__setattr__(self, "config", read_model_config(self.config))
        chosen = [n for n in ("name", "config", "hf_dir") if getattr(self, n) is not None]
        if len(chosen) != 1:
            raise UnsupportedModelError(
                f"ModelSpec needs exactly one of name / config / hf_dir, got {chosen or 'none'}")


def read_model_config(path: str) -> dict:
    """An open_clip JSON model config from a file; errors name the file and what is wrong with it."""
    import json

    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"config={path!r}: no such file (give a mapping or the path of an open_clip JSON config)")
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"config={path!r}: not a readable JSON file: {e}") from e
    data = data.get("model_cfg", data) if isinstance(data, dict) else data
    if not isinstance(data, dict) or "embed_dim" not in data:
        raise ConfigError(f"config={path!r}: not an open_clip model config (no 'embed_dim' key)")
    return data


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    checksum: str  # sha256 over the state dict (names, dtypes, shapes, bytes)
    label: str  # architecture name or "custom"
    spec: ModelSpec | None = None  # what it was loaded from (None: built in memory)
    device: str = "cpu"

    def __reduce_ex__(self, protocol):
        """A model loaded from a spec pickles as that spec, not as its weights: a worker process
        (Dask) loads it once from the same files, and the checksum proves it got the same weights.
        Do not pickle a model changed in memory (CPT trains a fresh copy, never a shared one)."""
        if self.spec is None:
            return super().__reduce_ex__(protocol)
        return _load_expected, (self.spec, self.device, self.checksum)


def shared_model(spec: ModelSpec, device: str = "cpu") -> LoadedModel:
    """One loaded model per (spec, device, checkpoint file version) and process, shared by the threads that
    score shards; a checkpoint replaced on disk is loaded again."""
    ckpt = Path(spec.checkpoint) if spec.checkpoint else None
    stamp = (ckpt.stat().st_size, ckpt.stat().st_mtime_ns) if ckpt is not None and ckpt.is_file() else None
    return _cached_model(spec, device, stamp)


@functools.lru_cache(maxsize=4)
def _cached_model(spec: ModelSpec, device: str, stamp) -> LoadedModel:
    return load_model(spec, device)


def _load_expected(spec: ModelSpec, device: str, checksum: str) -> LoadedModel:
    loaded = shared_model(spec, device)
    if loaded.checksum != checksum:
        raise IncompatibleFeaturesError(f"model {spec.checkpoint or spec.name or spec.hf_dir!r} now has checksum "
                                        f"{loaded.checksum[:12]}, not {checksum[:12]} as when it was sent")
    return loaded


def image_preprocess(model: nn.Module):
    """open_clip's eval transform for the model's input size and normalisation (OpenAI's by default)."""
    from open_clip.transform import image_transform

    cfg = getattr(model.visual, "preprocess_cfg", None) or {}
    size = cfg.get("size") or model.visual.image_size
    return image_transform(size, is_train=False, mean=cfg.get("mean", OPENAI_MEAN), std=cfg.get("std", OPENAI_STD))


def build_custom_model(config: dict) -> nn.Module:
    """Instantiate an open_clip model from a config dict in open_clip's JSON layout."""
    from open_clip.model import CLIP, CustomTextCLIP

    cfg = dict(config)
    custom_text = cfg.pop("custom_text", False)
    cfg.pop("preprocess_cfg", None)
    cls = CustomTextCLIP if custom_text or "hf_model_name" in cfg.get("text_cfg", {}) else CLIP
    try:
        return cls(**cfg)
    except TypeError as e:
        raise UnsupportedModelError(f"could not build an open_clip model from config {config!r}: {e}") from e


class CachedTokenizer:
    """An open_clip tokenizer that remembers the token rows of the last ``maxsize`` distinct texts.

    open_clip's tokenizers clean every text (ftfy, regex) on every call, ~0.4 ms a caption here; CPT draws
    the same replay captions again and again and every evaluation tokenizes the same suites. Rows are
    those of the wrapped tokenizer (test); other attributes are the wrapped tokenizer's."""

    def __init__(self, tokenizer, maxsize: int = 1 << 16):
        self.tokenizer, self.maxsize = tokenizer, maxsize
        self._rows: dict[str, torch.Tensor] = {}  # insertion order = least recently used first
        self._lock = threading.Lock()

    def __call__(self, texts, context_length: int | None = None) -> torch.Tensor:
        if context_length is not None:  # not the default shape: not cached
            return self.tokenizer(texts, context_length=context_length)
        texts = [texts] if isinstance(texts, str) else list(texts)
        with self._lock:
            missing = [t for t in dict.fromkeys(texts) if t not in self._rows]
            if missing:
                for text, row in zip(missing, self.tokenizer(missing)):
                    self._rows[text] = row.clone()
            out = torch.stack([self._rows[t] for t in texts]) if texts else self.tokenizer(texts)
            for t in dict.fromkeys(texts):  # most recently used last
                self._rows[t] = self._rows.pop(t)
            while len(self._rows) > self.maxsize:
                del self._rows[next(iter(self._rows))]
        return out

    def __getattr__(self, name: str):
        if name.startswith("__") or "tokenizer" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["tokenizer"], name)

    def __getstate__(self):
        return {"tokenizer": self.tokenizer, "maxsize": self.maxsize}

    def __setstate__(self, state):
        self.__init__(state["tokenizer"], state["maxsize"])


@functools.lru_cache(maxsize=8)
def _cached_tokenizer(name: str | None, ctx: int | None) -> CachedTokenizer:
    """One tokenizer per (name, context length) and process, so its cache outlives a ``load_model`` call."""
    import open_clip

    if name is not None and name.startswith("local-dir:"):
        return CachedTokenizer(open_clip.get_tokenizer(name))
    if name is not None:
        return CachedTokenizer(open_clip.get_tokenizer(name, context_length=ctx))
    return CachedTokenizer(open_clip.tokenizer.SimpleTokenizer(context_length=ctx))


def _tokenizer_for(model: nn.Module, name: str | None) -> CachedTokenizer:
    ctx = getattr(model, "context_length", None) or getattr(getattr(model, "text", None), "context_length", 77)
    return _cached_tokenizer(name, ctx)


def load_model(spec: ModelSpec, device: str | torch.device = "cpu") -> LoadedModel:
    """Load an open_clip model in eval mode; never downloads unless ``spec.pretrained`` asks to."""
    import open_clip

    if spec.checkpoint is not None and not Path(spec.checkpoint).is_file():
        raise CheckpointNotFoundError(f"checkpoint not found: {os.fspath(spec.checkpoint)!r}")
    if spec.hf_dir is not None:
        if not Path(spec.hf_dir).is_dir():
            raise CheckpointNotFoundError(f"Hugging Face model folder not found: {spec.hf_dir!r}")
        model = open_clip.create_model(f"local-dir:{spec.hf_dir}", device=device)
        label, tok = f"local-dir:{spec.hf_dir}", _cached_tokenizer(f"local-dir:{spec.hf_dir}", None)
    elif spec.config is not None:
        model, label = build_custom_model(spec.config), "custom"
        tok = _tokenizer_for(model, None)
    else:
        if spec.name not in open_clip.list_models():
            raise UnsupportedModelError(f"unknown open_clip architecture {spec.name!r}")
        model = open_clip.create_model(spec.name, pretrained=spec.pretrained, device=device,
                                       pretrained_text=False)
        label, tok = spec.name, _tokenizer_for(model, spec.name)
    if spec.checkpoint is not None:
        load_checkpoint_in_place(model, spec.checkpoint)
    model = model.to(device).eval()
    return LoadedModel(model=model, tokenizer=tok, checksum=state_dict_checksum(model), label=label, spec=spec,
                       device=str(device))


def load_checkpoint_in_place(model: nn.Module, path) -> None:
    """``open_clip.load_checkpoint`` (its format conversions, strict keys) holding one copy of the weights, not two.

    Loading into the randomly initialised model copies every tensor, so the load's peak is twice the weights
    (a ViT-B-32: +580 MiB; a ViT-L twice that). Here the initial weights are dropped first (each parameter and
    persistent buffer becomes a ``meta`` tensor), the checkpoint's tensors are assigned in their place and cast
    back to the model's dtypes. A model whose modules share a tensor is loaded the plain way (assigning would
    untie it)."""
    import open_clip

    entries = [(mod, name, t, name in mod._parameters) for mod in model.modules()
               for name, t in [*mod._parameters.items(), *mod._buffers.items()]
               if t is not None and name not in mod._non_persistent_buffers_set]
    if len({id(t) for _, _, t, _ in entries}) != len(entries) or any(t.is_meta for _, _, t, _ in entries):
        open_clip.load_checkpoint(model, path, weights_only=True)
        return
    dtypes = {}
    for mod, name, t, is_param in entries:
        dtypes[(id(mod), name)] = t.dtype
        meta = t.detach().to("meta")
        if is_param:
            mod._parameters[name] = nn.Parameter(meta, requires_grad=t.requires_grad)
        else:
            mod._buffers[name] = meta
    del t, entries
    plain = model.load_state_dict
    model.load_state_dict = functools.partial(plain, assign=True)  # open_clip calls model.load_state_dict(sd, strict)
    try:
        open_clip.load_checkpoint(model, path, weights_only=True)
    finally:
        del model.load_state_dict
    for mod in model.modules():
        for table in (mod._parameters, mod._buffers):
            for name, t in table.items():
                want = dtypes.get((id(mod), name))
                if t is not None and t.is_meta:
                    raise RuntimeError(f"checkpoint {os.fspath(path)!r} left {name!r} of {type(mod).__name__} unloaded")
                if want is not None and t.dtype != want:
                    cast = t.detach().to(want)
                    table[name] = nn.Parameter(cast, requires_grad=t.requires_grad) if table is mod._parameters else cast


def state_dict_checksum(model: nn.Module) -> str:
    """sha256 over the state dict: identifies the weights whatever file format they came in."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# End-point sites

@dataclass
class _Site:
    owner: nn.Module
    attr: str
    path: str  # dotted path, for messages

    @property
    def value(self):
        return getattr(self.owner, self.attr)

    def weight(self) -> torch.Tensor:
        """The projection as a (D, d[+1]) matrix, bias appended as the last column."""
        v = self.value
        if isinstance(v, nn.Linear):
            w = v.weight
            return torch.cat([w, v.bias[:, None]], dim=1) if v.bias is not None else w
        return v.t()  # open_clip stores Parameter projections as (d, D) and applies x @ P

    @property
    def has_bias(self) -> bool:
        v = self.value
        return isinstance(v, nn.Linear) and v.bias is not None

    @contextlib.contextmanager
    def removed(self):
        original = self.value
        if isinstance(original, nn.Linear):
            ident = nn.Linear(original.in_features, original.in_features, bias=False)
            with torch.no_grad():
                ident.weight.copy_(torch.eye(original.in_features))
            ident = ident.to(device=original.weight.device, dtype=original.weight.dtype)
            setattr(self.owner, self.attr, ident)
        else:
            setattr(self.owner, self.attr, None)
        try:
            yield
        finally:
            setattr(self.owner, self.attr, original)


def _find_site(root: nn.Module, root_name: str, candidates: list[str]) -> _Site | None:
    for dotted in candidates:
        *parents, attr = dotted.split(".")
        owner = root
        for p in parents:
            owner = getattr(owner, p, None)
            if owner is None:
                break
        if owner is None or not hasattr(owner, attr):
            continue
        v = getattr(owner, attr)
        if isinstance(v, (nn.Parameter, nn.Linear)) and (not isinstance(v, nn.Parameter) or v.ndim == 2):
            return _Site(owner, attr, f"{root_name}.{dotted}")
    return None


_VISION_CANDIDATES = ["proj", "attnpool.c_proj", "head.proj"]  # ViT, ModifiedResNet, timm
_TEXT_CANDIDATES = ["text_projection", "text.text_projection", "text.proj"]  # CLIP, CustomTextCLIP, HF


def resolve_sites(model: nn.Module) -> tuple[_Site, _Site]:
    if getattr(model, "logit_bias", None) is not None:
        raise UnsupportedModelError(
            f"{type(model).__name__} has a logit_bias (a SigLIP-style sigmoid model); CHIPS scores "
            "InfoNCE models only")
    visual = getattr(model, "visual", None)
    if visual is None:
        raise EndpointNotFoundError(f"{type(model).__name__} has no 'visual' tower")
    vsite = _find_site(visual, "visual", _VISION_CANDIDATES)
    if vsite is None:
        raise EndpointNotFoundError(
            f"no linear image projection found in vision tower {type(visual).__name__}: looked for "
            + ", ".join(f"visual.{c}" for c in _VISION_CANDIDATES)
            + " as an nn.Parameter (d, D) or nn.Linear")
    tsite = _find_site(model, "model", _TEXT_CANDIDATES)
    if tsite is None:
        text = getattr(model, "text", model)
        raise EndpointNotFoundError(
            f"no linear text projection found in {type(model).__name__} (text tower "
            f"{type(text).__name__}): looked for " + ", ".join(f"model.{c}" for c in _TEXT_CANDIDATES)
            + " as an nn.Parameter (d, D) or nn.Linear")
    return vsite, tsite


class EndpointModel:
    r"""A CLIP model seen through its end-point parameters :math:`\{W_v, W_t, t\}` (§1).

    :meth:`encode_pre` briefly takes the projections out of the shared model, under a per-model
    lock that construction and :meth:`weights` take too; concurrent use through EndpointModel is
    safe, but another thread calling the model's own ``encode_image`` directly at that moment
    would see the projection missing."""

    def __init__(self, model: nn.Module, precision: str = "fp32"):
        check(precision in PRECISIONS, "EndpointModel", "precision", precision, f"not one of {PRECISIONS}")
        self.model = model.eval()
        self.precision = precision  # the trunks run under autocast to this; end-point maths stays float32
        with _model_lock(model):  # another thread may have the projections out right now
            self.vision_site, self.text_site = resolve_sites(model)

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    def weights(self, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``W_v (D, d_v[+1]), W_t (D, d_t[+1]), t ()`` detached, in ``dtype``."""
        with torch.no_grad(), _model_lock(self.model):
            wv = self.vision_site.weight().detach().to(dtype)
            wt = self.text_site.weight().detach().to(dtype)
            t = self.model.logit_scale.detach().reshape(()).to(dtype)
        return wv, wt, t

    @torch.no_grad()
    def encode_pre(self, images: torch.Tensor | None, texts: torch.Tensor | None):
        """Pre-projection features ``h_v (B, d_v[+1])``, ``h_t (B, d_t[+1])`` (either may be None), float32
        (float64 for a float64 model). Inputs in pinned memory are copied to the device without blocking."""
        hv = ht = None
        with _model_lock(self.model), self.autocast():  # the swap is visible to every thread using this model
            if images is not None:
                with self.vision_site.removed():
                    hv = self.model.encode_image(images.to(self.device, non_blocking=True))
            if texts is not None:
                with self.text_site.removed():
                    ht = self.model.encode_text(texts.to(self.device, non_blocking=True))
        hv = None if hv is None else _append_one(_at_least_float32(hv), self.vision_site.has_bias)
        ht = None if ht is None else _append_one(_at_least_float32(ht), self.text_site.has_bias)
        return hv, ht


    def autocast(self):
        """The trunks' precision: nothing for fp32, else ``torch.autocast`` on the model's device type."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=AUTOCAST_DTYPES[self.precision])


PRECISIONS = ("fp32", "bf16", "fp16")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device) -> str:
    """``auto`` is bf16 on CUDA and fp32 elsewhere (docs/benchmarks/featurize_precision.md)."""
    if precision == "auto":
        return "bf16" if torch.device(device).type == "cuda" else "fp32"
    return precision


_LOCKS: "weakref.WeakKeyDictionary[nn.Module, threading.Lock]" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def _model_lock(model: nn.Module) -> threading.Lock:
    """One lock per model object: reading h swaps the projection out, which other threads would see."""
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(model, threading.Lock())


def _at_least_float32(h: torch.Tensor) -> torch.Tensor:
    return h if h.dtype == torch.float64 else h.float()  # fp16/bf16 trunks: accumulate in float32


def _append_one(h: torch.Tensor, bias: bool) -> torch.Tensor:
    if h.ndim != 2:
        raise EndpointNotFoundError(f"expected pooled features of shape (B, d), got {tuple(h.shape)}")
    return torch.cat([h, h.new_ones(h.shape[0], 1)], dim=1) if bias else h
