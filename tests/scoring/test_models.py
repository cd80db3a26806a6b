"""§1: model loading and end-point extraction for each supported tower family, and its errors."""
import pytest
import torch

from chips_core.errors import CheckpointNotFoundError, EndpointNotFoundError, UnsupportedModelError
from chips_core.scoring.endpoint import EndpointModel, ModelSpec, build_custom_model, load_model, state_dict_checksum

from ..conftest import TINY_RESNET, TINY_VIT

TIMM_RESNET = {
    "embed_dim": 16,
    "vision_cfg": {"timm_model_name": "resnet18", "timm_model_pretrained": False, "timm_pool": "avg",
                   "timm_proj": "linear", "timm_proj_bias": True, "image_size": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def _check_endpoint(model, pairs):
    images, texts, _ = pairs
    ep = EndpointModel(model)
    hv, ht = ep.encode_pre(images[:8], texts[:8])
    W_v, W_t, t = ep.weights(torch.float64)
    with torch.no_grad():
        ev, et = model.encode_image(images[:8]), model.encode_text(texts[:8])
    torch.testing.assert_close(hv.double() @ W_v.t(), ev.double(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ht.double() @ W_t.t(), et.double(), rtol=1e-4, atol=1e-5)
    assert float(t) == pytest.approx(float(model.logit_scale.detach()))
    # the model is left exactly as it was found
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images[:8]), ev, rtol=0, atol=0)
    return ep


def test_vit_parameter_projections(tiny_vit, pairs):
    ep = _check_endpoint(tiny_vit, pairs)
    assert ep.vision_site.path == "visual.proj" and not ep.vision_site.has_bias
    assert ep.text_site.path == "model.text_projection"


def test_modified_resnet_and_linear_text_projection_with_bias(tiny_resnet, pairs):
    ep = _check_endpoint(tiny_resnet, pairs)
    assert ep.vision_site.path == "visual.attnpool.c_proj" and ep.vision_site.has_bias
    assert ep.text_site.has_bias
    hv, ht = ep.encode_pre(pairs[0][:2], pairs[1][:2])
    assert torch.all(hv[:, -1] == 1) and torch.all(ht[:, -1] == 1)  # bias handled by a constant 1


def test_timm_head_projection(pairs):
    torch.manual_seed(0)
    model = build_custom_model(TIMM_RESNET).eval()
    ep = _check_endpoint(model, pairs)
    assert ep.vision_site.path == "visual.head.proj"


def test_missing_projection_names_architecture_and_module(tiny_vit):
    import copy

    model = copy.deepcopy(tiny_vit)
    model.visual.proj = None
    with pytest.raises(EndpointNotFoundError, match=r"VisionTransformer.*visual\.proj"):
        EndpointModel(model)


def test_sigmoid_models_refused():
    model = build_custom_model({**TINY_VIT, "init_logit_bias": -10.0})
    with pytest.raises(UnsupportedModelError, match="logit_bias"):
        EndpointModel(model)


def test_missing_checkpoint_names_path(tmp_path):
    path = tmp_path / "nope" / "model.pt"
    with pytest.raises(CheckpointNotFoundError, match="nope/model.pt"):
        load_model(ModelSpec(config=TINY_VIT, checkpoint=str(path)))


def test_checkpoint_roundtrip_weights_only(tmp_path, tiny_vit):
    path = tmp_path / "tiny.pt"
    torch.save(tiny_vit.state_dict(), path)
    loaded = load_model(ModelSpec(config=TINY_VIT, checkpoint=str(path)))
    assert loaded.checksum == state_dict_checksum(tiny_vit)
    assert loaded.tokenizer(["a scan"]).shape == (1, 16)


@pytest.mark.parametrize("wrap", ["plain", "float16_module_prefix"])
def test_in_place_checkpoint_load_equals_open_clip(tmp_path, tiny_vit, pairs, wrap):
    """One copy of the weights at a time, and the same model as open_clip's own load: weights cast to the model's
    dtype (a float16 checkpoint), its conversions (a DataParallel ``module.`` prefix), non-persistent buffers
    (the text causal mask) and requires_grad kept."""
    import open_clip

    sd = tiny_vit.state_dict()
    if wrap != "plain":
        sd = {"state_dict": {"module." + k: v.half() if v.is_floating_point() else v for k, v in sd.items()}}
    path = tmp_path / "tiny.pt"
    torch.save(sd, path)
    ours = load_model(ModelSpec(config=TINY_VIT, checkpoint=str(path))).model
    theirs = build_custom_model(TINY_VIT)
    open_clip.load_checkpoint(theirs, str(path), weights_only=True)
    theirs.eval()
    assert state_dict_checksum(ours) == state_dict_checksum(theirs)
    assert {n: (p.dtype, p.requires_grad) for n, p in ours.named_parameters()} == \
        {n: (p.dtype, p.requires_grad) for n, p in theirs.named_parameters()}
    assert not any(t.is_meta for t in [*ours.parameters(), *ours.buffers()])
    torch.testing.assert_close(ours.attn_mask, theirs.attn_mask, rtol=0, atol=0)
    images, texts, _ = pairs
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_text(texts[:4]), theirs.encode_text(texts[:4]), rtol=0, atol=0)
        torch.testing.assert_close(ours.encode_image(images[:4]), theirs.encode_image(images[:4]), rtol=0, atol=0)


def test_checkpoint_missing_a_weight_is_refused(tmp_path, tiny_vit):
    sd = dict(tiny_vit.state_dict())
    sd.pop("visual.proj")
    torch.save(sd, tmp_path / "short.pt")
    with pytest.raises(RuntimeError, match="visual.proj"):
        load_model(ModelSpec(config=TINY_VIT, checkpoint=str(tmp_path / "short.pt")))


def test_named_architecture_random_init_and_unknown_name():
    loaded = load_model(ModelSpec(name="RN50"))
    assert EndpointModel(loaded.model).vision_site.path == "visual.attnpool.c_proj"
    with pytest.raises(UnsupportedModelError, match="ViT-Nope"):
        load_model(ModelSpec(name="ViT-Nope"))


def test_spec_needs_exactly_one_architecture_source():
    with pytest.raises(UnsupportedModelError, match="exactly one"):
        ModelSpec(name="RN50", config=TINY_RESNET)


def test_local_hugging_face_folder(tmp_path, tiny_vit):
    import json

    from safetensors.torch import save_file

    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_VIT}))
    save_file({k: v.contiguous() for k, v in tiny_vit.state_dict().items()}, str(tmp_path / "open_clip_model.safetensors"))
    loaded = load_model(ModelSpec(hf_dir=str(tmp_path)))
    assert loaded.checksum == state_dict_checksum(tiny_vit)
    with pytest.raises(CheckpointNotFoundError, match="missing-folder"):
        load_model(ModelSpec(hf_dir=str(tmp_path / "missing-folder")))


def test_pre_features_are_thread_safe(tiny_vit, pairs):
    """Reading h swaps the projection out of the shared model; concurrent readers must not see it."""
    from concurrent.futures import ThreadPoolExecutor

    ep = EndpointModel(tiny_vit)
    images, texts, _ = pairs
    ref = ep.encode_pre(images[:8], texts[:8])

    W = ep.weights()

    def one(_):
        other = EndpointModel(tiny_vit)  # resolving the sites races the swap in other threads
        assert all(torch.equal(a, b) for a, b in zip(other.weights(), W))
        return other.encode_pre(images[:8], texts[:8])

    with ThreadPoolExecutor(4) as pool:
        for hv, ht in pool.map(one, range(64)):
            assert torch.equal(hv, ref[0]) and torch.equal(ht, ref[1])


def test_model_config_from_an_open_clip_json_file(tmp_path):
    """``model: {config: path.json}`` reads open_clip's JSON layout (or an open_clip_config.json's model_cfg);
    a missing or malformed file is a one-line ConfigError naming it."""
    import json

    from chips_core.errors import ConfigError
    from chips_core.scoring.endpoint import ModelSpec, load_model
    from chips_core.stages.runconfig import load_run_config
    from chips_core.train.synthetic import DEMO_MODEL_CONFIG

    plain = tmp_path / "demo.json"
    plain.write_text(json.dumps(DEMO_MODEL_CONFIG))
    hf = tmp_path / "open_clip_config.json"
    hf.write_text(json.dumps({"model_cfg": DEMO_MODEL_CONFIG, "preprocess_cfg": {"mean": [0.5] * 3}}))
    assert ModelSpec(config=str(plain)).config == DEMO_MODEL_CONFIG == ModelSpec(config=str(hf)).config
    cfg = load_run_config({"warehouse": str(tmp_path / "wh"), "pool": [], "target": [], "model": {"config": str(plain)}})
    assert cfg.model.config == DEMO_MODEL_CONFIG
    assert load_model(cfg.model).label == "custom"
    with pytest.raises(ConfigError, match="nope.json'.*no such file"):
        ModelSpec(config=str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text('{"vision_cfg": {}}')
    with pytest.raises(ConfigError, match="bad.json'.*no 'embed_dim'"):
        load_run_config({"warehouse": str(tmp_path / "wh"), "pool": [], "target": [], "model": {"config": str(bad)}})
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_run_config({"warehouse": str(tmp_path / "wh"), "pool": [], "target": [], "model": {"config": 3}})


def test_cached_tokenizer_gives_the_wrapped_tokenizers_rows_and_stays_bounded():
    import pickle

    import open_clip

    from chips_core.scoring.endpoint import CachedTokenizer

    plain = open_clip.tokenizer.SimpleTokenizer(context_length=16)
    cached = CachedTokenizer(open_clip.tokenizer.SimpleTokenizer(context_length=16), maxsize=4)
    texts = ["a red dress", "Ünïcode café", "a red dress", "", "two  spaces", "a photo of a cat.", "x" * 200]
    for batch in (texts, texts[::-1], texts[2:5], ["a red dress"]):
        assert torch.equal(cached(batch), plain(batch))  # hits, misses and duplicates within a batch
    assert torch.equal(cached("one text"), plain("one text"))
    assert cached([]).shape == plain([]).shape
    assert torch.equal(cached(texts, context_length=8), plain(texts, context_length=8))
    assert len(cached._rows) == 4 and "one text" in cached._rows  # least recently used dropped first
    assert cached.context_length == 16  # the wrapped tokenizer's attributes
    again = pickle.loads(pickle.dumps(cached))
    assert torch.equal(again(texts), plain(texts)) and again.maxsize == 4


def test_load_model_shares_one_cached_tokenizer_per_architecture(tmp_path):
    import open_clip

    spec = ModelSpec(config=TINY_VIT)
    a, b = load_model(spec), load_model(spec)
    assert a.tokenizer is b.tokenizer  # its cache outlives one load_model call (CPT runs, evaluations)
    texts = ["a photo of a dog.", "a sketch"]
    assert torch.equal(a.tokenizer(texts),
                       open_clip.tokenizer.SimpleTokenizer(context_length=TINY_VIT["text_cfg"]["context_length"])(texts))
