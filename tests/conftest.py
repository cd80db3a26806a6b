"""Shared fixtures: small *real* open_clip models (trained briefly or randomly initialised)."""
from __future__ import annotations

import pytest
import torch

from chips_core.scoring.endpoint import EndpointModel, build_custom_model, state_dict_checksum
from chips_core.scoring.featurize import ReferenceBank
from chips_core.scoring.identity import seeded_sample
from chips_core.train.synthetic import DEMO_MODEL_CONFIG, make_pairs, train_demo_clip

torch.set_num_threads(2)


def pytest_collection_modifyitems(config, items):
    """``gpu`` tests run where CUDA is; elsewhere they are skipped, saying why."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marker: gpu)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # the marker, not any keyword (a parameter id "gpu")
            item.add_marker(skip)

# A ViT small enough that dense float64 references (P = D*d_v + D*d_t + 1 = 1025) stay cheap.
TINY_VIT = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
# ModifiedResNet image tower (attnpool.c_proj, a Linear with bias) and a Linear text projection with bias.
TINY_RESNET = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1, "proj_bias": True},
}


@pytest.fixture(scope="session")
def tokenizer():
    import open_clip

    return open_clip.tokenizer.SimpleTokenizer(context_length=16)


@pytest.fixture(scope="session")
def demo_model():
    """The demo CLIP, trained briefly (seconds) so that its scores are not noise."""
    return train_demo_clip(steps=80, seed=0, n_pairs=1500)


@pytest.fixture(scope="session")
def tiny_vit():
    torch.manual_seed(1)
    return build_custom_model(TINY_VIT).eval()


@pytest.fixture(scope="session")
def tiny_resnet():
    torch.manual_seed(2)
    return build_custom_model(TINY_RESNET).eval()


@pytest.fixture(scope="session")
def pairs(tokenizer):
    data = make_pairs(96, seed=11)
    return data.images, tokenizer(data.captions), data.pair_ids


@pytest.fixture(scope="session")
def eval_pairs(tokenizer):
    data = make_pairs(24, seed=12, scan_fraction=1.0, noise_fraction=0.0)
    return data.images, tokenizer(data.captions), data.pair_ids


def make_bank(model, pairs, size=16, seed=0, micro_batch=64):
    images, texts, ids = pairs
    chosen = seeded_sample(ids, size, seed)
    idx = [ids.index(p) for p in chosen]
    return ReferenceBank.from_pairs(EndpointModel(model), images[idx], texts[idx], chosen,
                                    model_checksum=state_dict_checksum(model), seed=seed, micro_batch=micro_batch)


@pytest.fixture(scope="session")
def prefect_api():
    """One temporary Prefect API for the whole session (it takes ~15 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def tiny_pipeline_config(tmp, model, n_pool: int, n_target: int, seed: int, **overrides) -> dict:
    """Image folders of synthetic pairs, the model saved as a checkpoint, and a small run config."""
    from chips_core.train.synthetic import make_pairs
    from flows.demo import write_folder

    write_folder(tmp / "pool", make_pairs(n_pool, seed=seed), n_pool)
    write_folder(tmp / "target", make_pairs(n_target, seed=seed + 1, scan_fraction=1.0, noise_fraction=0.0), n_target)
    torch.save(model.state_dict(), tmp / "demo.pt")
    return {"warehouse": str(tmp / "wh"),
            "pool": [{"name": "pool", "kind": "folder", "paths": [str(tmp / "pool")]}],
            "target": [{"name": "target", "kind": "folder", "paths": [str(tmp / "target")]}],
            "model": {"config": DEMO_MODEL_CONFIG, "checkpoint": str(tmp / "demo.pt")},
            **overrides}
