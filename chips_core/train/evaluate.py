"""Evaluation metrics for CLIP models: zero-shot classification and image<->text retrieval recall@k.

The metric functions take embeddings, so they are exact and testable on hand-built cases; the
``*_model`` helpers run an open_clip model to get those embeddings.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import ConfigError, check
from ..scoring.premise import mean_pairwise_cosine
from ..util import open_rgb, read_pair_table, resolve_image_path


def _unit(a) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def zero_shot_accuracy(image_emb, class_emb, labels: Sequence[int], k: int = 1) -> float:
    """Top-``k`` accuracy of classifying each image by its most similar class embedding.
    ``image_emb (N, D)``, ``class_emb (C, D)`` (e.g. the mean of prompt-template embeddings)."""
    sims = _unit(image_emb) @ _unit(class_emb).T
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    labels = np.asarray(labels)
    return float(np.mean((top == labels[:, None]).any(1)))


def retrieval_recall(image_emb, text_emb, ks: Sequence[int] = (1, 5, 10), chunk: int = 2048) -> dict[str, float]:
    """Recall@k for image->text and text->image retrieval; pair i's image matches text i. The
    similarity matrix is formed ``chunk`` rows at a time, so a 10k-pair suite needs no 10k x 10k array."""
    x, y = _unit(image_emb), _unit(text_emb)
    n = len(x)
    diag = np.einsum("ij,ij->i", x, y)
    out = {}
    for name, a, b in (("image_to_text", x, y), ("text_to_image", y, x)):
        # rank of the true match: how many candidates score strictly higher (ties count in its favour)
        rank = np.concatenate([(a[i:i + chunk] @ b.T > diag[i:i + chunk, None]).sum(1) for i in range(0, n, chunk)])
        for k in ks:
            out[f"{name}_R@{k}"] = float(np.mean(rank < k))
    return out


@torch.no_grad()
def class_embeddings(model, tokenizer, classnames: Sequence[str], templates: Sequence[str]) -> np.ndarray:
    """Mean of the normalised text embeddings of every template filled with each class name."""
    out = []
    for name in classnames:
        e = model.encode_text(tokenizer([t.format(c=name) for t in templates]), normalize=True)
        out.append(e.mean(0).cpu().double().numpy())
    return _unit(np.stack(out))


# ---------------------------------------------------------------------------------------------
# Named evaluation suites

@dataclass(frozen=True)
class SuiteSpec:
    """A named evaluation suite stored as a Parquet or CSV table: an image column (``filepath`` or
    ``image`` bytes), a caption column (``title``), and optionally a class-name column (``label``)
    for zero-shot classification. Every suite gets retrieval recall@{1,5,10}."""

    name: str  # the suite's name in the evals table
    path: str  # its Parquet or CSV table
    templates: tuple[str, ...] = ("a photo of a {c}.",)  # zero-shot prompts; "{c}" is the class name
    classnames: tuple[str, ...] = ()  # default: the distinct labels, sorted
    caption_column: str = "title"  # the captions (retrieval)
    label_column: str = "label"  # the class names (zero-shot top-1; a suite without it gets retrieval only)
    allowed_roots: tuple[str, ...] = ()  # image paths must lie inside these (default: the suite file's folder)

    def __post_init__(self):
        check(bool(self.name), "SuiteSpec", "name", self.name, "must not be empty")
        bad = [t for t in self.templates if "{c}" not in t]
        check(not bad, f"SuiteSpec({self.name})", "templates", bad[:1], "each needs '{c}' for the class name")


@dataclass
class EvalSuite:
    """A suite in memory: preprocessed images, captions, and (optionally) class labels."""

    name: str
    images: torch.Tensor
    captions: list[str]
    labels: np.ndarray | None = None  # class index per image (-1: no class)
    classnames: tuple[str, ...] = ()
    templates: tuple[str, ...] = ("a photo of a {c}.",)


def load_eval_suite(spec: SuiteSpec, preprocess) -> EvalSuite:
    """Read a suite table; errors name the suite, the file and the missing column."""
    path = Path(spec.path)
    t = read_pair_table(spec.path, f"eval suite {spec.name!r}")
    img_col = "image" if "image" in t.column_names else "filepath"
    for col in (img_col, spec.caption_column):
        if col not in t.column_names:
            raise ConfigError(f"eval suite {spec.name!r}: {spec.path} has no column {col!r} (has {t.column_names})")
    rows = t.to_pylist()
    ims = []
    for r in rows:
        src = r[img_col]
        if isinstance(src, str):  # the sources' path rule (util.resolve_image_path)
            src = resolve_image_path(src, path.parent, spec.allowed_roots or None, f"eval suite {spec.name!r}")
        ims.append(preprocess(open_rgb(src)))
    labels, classnames = None, tuple(spec.classnames)
    if spec.label_column in t.column_names:
        names = [r[spec.label_column] for r in rows]
        classnames = classnames or tuple(sorted({str(n) for n in names if n not in (None, "")}))
        index = {c: i for i, c in enumerate(classnames)}
        labels = np.array([index.get(str(n), -1) if n not in (None, "") else -1 for n in names], dtype=np.int64)
    return EvalSuite(spec.name, torch.stack(ims), [r[spec.caption_column] for r in rows], labels, classnames,
                     tuple(spec.templates))


@torch.no_grad()
def embed(model, tokenizer, images: torch.Tensor, captions: Sequence[str], batch: int = 512,
          device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    model.eval()
    xs, ys = [], []
    for i in range(0, len(images), batch):
        xs.append(model.encode_image(images[i:i + batch].to(device), normalize=True).cpu().double().numpy())
        ys.append(model.encode_text(tokenizer(list(captions[i:i + batch])).to(device), normalize=True).cpu().double().numpy())
    return np.concatenate(xs), np.concatenate(ys)


def evaluate_suite(model, tokenizer, suite: EvalSuite, device: str = "cpu") -> dict[str, float]:
    """Zero-shot top-1/top-5 accuracy (over items with a class; top-5 only with more than 5 classes),
    retrieval recall@{1,5,10} both ways, and embedding collapse: the mean pairwise cosine of the image
    embeddings (``image_mean_cosine``; near 0 for a spread-out space, near 1 when every image maps to one
    direction, e.g. after CPT on a narrow domain without replay)."""
    x, y = embed(model, tokenizer, suite.images, suite.captions, device=device)
    out = {}
    if suite.labels is not None and len(suite.classnames) >= 2:
        has = suite.labels >= 0
        cls = class_embeddings(model.to(device), _on(tokenizer, device), suite.classnames, suite.templates)
        out["zero_shot_top1"] = zero_shot_accuracy(x[has], cls, suite.labels[has], k=1)
        if len(suite.classnames) > 5:
            out["zero_shot_top5"] = zero_shot_accuracy(x[has], cls, suite.labels[has], k=5)
    out.update(retrieval_recall(x, y, ks=(1, 5, 10)))
    if len(x) >= 2:
        out["image_mean_cosine"] = mean_pairwise_cosine(x)
    return out


def _on(tokenizer, device: str):
    if device == "cpu":
        return tokenizer
    return lambda texts: tokenizer(texts).to(device)
