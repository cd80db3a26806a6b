"""Metrics on hand-built cases whose answers are known."""
import numpy as np
import pytest

from chips_core.train.evaluate import class_embeddings, retrieval_recall, zero_shot_accuracy


def test_zero_shot_accuracy_known_answer():
    classes = np.eye(3)
    images = np.array([[1, .1, 0], [0, 1, .2], [0, .9, .8], [.2, 0, 1]])  # nearest: 0, 1, 1, 2
    labels = [0, 1, 2, 2]
    assert zero_shot_accuracy(images, classes, labels) == 0.75
    assert zero_shot_accuracy(images, classes, labels, k=2) == 1.0


def test_retrieval_recall_known_answer():
    img = np.eye(4)
    txt = np.array([[1, 0, 0, 0], [0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1]], dtype=float)
    # image 1's text is at position of image 2 and vice versa: 2 of 4 retrieved at rank 1
    r = retrieval_recall(img, txt + 0.01, ks=(1, 2, 5))
    assert r["image_to_text_R@1"] == 0.5 and r["text_to_image_R@1"] == 0.5
    assert r["image_to_text_R@5"] == 1.0
    perfect = retrieval_recall(img, img, ks=(1,))
    assert perfect == {"image_to_text_R@1": 1.0, "text_to_image_R@1": 1.0}


def test_class_embeddings_from_a_real_model(tiny_vit, tokenizer):
    emb = class_embeddings(tiny_vit, tokenizer, ["circle", "square"], ["a {c}", "a photo of a {c}"])
    assert emb.shape == (2, 16) and np.allclose(np.linalg.norm(emb, axis=1), 1.0)
    with pytest.raises(KeyError):
        class_embeddings(tiny_vit, tokenizer, ["x"], ["a {label}"])


def test_suite_reports_embedding_collapse(tiny_vit, tokenizer):
    """``image_mean_cosine`` is the mean off-diagonal cosine of the suite's image embeddings: 1 when every
    image is the same, and what premise.mean_pairwise_cosine gives on the embeddings otherwise."""
    import torch

    from chips_core.scoring.premise import mean_pairwise_cosine
    from chips_core.train.evaluate import EvalSuite, embed, evaluate_suite

    torch.manual_seed(0)
    images = torch.randn(6, 3, 32, 32)
    caps = ["a red circle", "a blue square", "a big star", "a small moon", "a grey cloud", "a green leaf"]
    suite = EvalSuite("s", images, caps, None, (), ())
    m = evaluate_suite(tiny_vit, tokenizer, suite)
    x, _ = embed(tiny_vit, tokenizer, images, caps)
    assert m["image_mean_cosine"] == pytest.approx(mean_pairwise_cosine(x))
    same = EvalSuite("same", images[:1].repeat(4, 1, 1, 1), caps[:4], None, (), ())
    assert evaluate_suite(tiny_vit, tokenizer, same)["image_mean_cosine"] == pytest.approx(1.0)
