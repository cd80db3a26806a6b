"""Evaluation metrics for CLIP models: zero-shot classification and image<->text retrieval recall@k.

The metric functions take embeddings, so they are exact and testable on hand-built cases; the
``*_model`` helpers run an open_clip model to get those embeddings.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def _unit(a) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def zero_shot_accuracy(image_emb, class_emb, labels: Sequence[int], k: int = 1) -> float:
    """Top-``k`` accuracy of classifying each image by its most similar class embedding.
    ``image_emb (N, D)``, ``class_emb (C, D)`` (e.g. the mean of prompt-template embeddings)."""
    sims = _unit(image_emb) @ _unit(class_emb).T
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return float(np.mean([labels[i] in top[i] for i in range(len(labels))]))


def retrieval_recall(image_emb, text_emb, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k for image->text and text->image retrieval; pair i's image matches text i."""
    sims = _unit(image_emb) @ _unit(text_emb).T
    n = sims.shape[0]
    out = {}
    for name, s in (("image_to_text", sims), ("text_to_image", sims.T)):
        # rank of the true match: how many candidates score strictly higher (ties count in its favour)
        rank = (s > s[np.arange(n), np.arange(n)][:, None]).sum(1)
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
