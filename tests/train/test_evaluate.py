"""Metrics on hand-built cases whose answers are known."""
import numpy as np
import torch
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


def test_suites_and_manifests_follow_the_sources_path_rule(tmp_path, tiny_vit, tokenizer):
    """An eval suite's or a manifest's image paths resolve against its folder and must lie inside its
    allowed roots (default: that folder), as a pool source's do; a path outside is one error naming it."""
    from PIL import Image

    from chips_core.errors import ConfigError
    from chips_core.scoring.endpoint import LoadedModel
    from chips_core.stages.cpt import manifest_data
    from chips_core.train.evaluate import SuiteSpec, load_eval_suite

    (tmp_path / "suite" / "imgs").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    for p in (tmp_path / "suite" / "imgs" / "a.png", tmp_path / "elsewhere" / "b.png"):
        Image.new("RGB", (8, 8), (200, 10, 10)).save(p)
    inside = "filepath,title\nimgs/a.png,a red square\n"
    outside = f"filepath,title\nimgs/a.png,a red square\n{tmp_path / 'elsewhere' / 'b.png'},a red square\n"
    (tmp_path / "suite" / "in.csv").write_text(inside)
    (tmp_path / "suite" / "out.csv").write_text(outside)
    pre = lambda im: torch.zeros(3, 32, 32)  # noqa: E731 - the path rule is under test, not preprocessing
    assert len(load_eval_suite(SuiteSpec("s", str(tmp_path / "suite" / "in.csv")), pre).captions) == 1
    with pytest.raises(ConfigError, match=r"eval suite 's': image path '.*elsewhere/b.png' resolves to .* outside the "
                                          r"allowed roots .*list its folder in allowed_roots"):
        load_eval_suite(SuiteSpec("s", str(tmp_path / "suite" / "out.csv")), pre)
    ok = SuiteSpec("s", str(tmp_path / "suite" / "out.csv"), allowed_roots=(str(tmp_path),))
    assert len(load_eval_suite(ok, pre).captions) == 2

    loaded = LoadedModel(tiny_vit, tokenizer, "x", "tiny")
    assert len(manifest_data(tmp_path / "suite" / "in.csv", loaded)) == 1
    with pytest.raises(ConfigError, match=r"manifest '.*out.csv': image path '.*elsewhere/b.png'"):
        manifest_data(tmp_path / "suite" / "out.csv", loaded)
    assert len(manifest_data(tmp_path / "suite" / "out.csv", loaded, [str(tmp_path)])) == 2
