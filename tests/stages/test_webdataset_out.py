"""WebDataset out (issue 30.6): `outputs.formats: [webdataset]` writes each subset as tar shards of
{png|jpg, txt, json} with a size limit per shard; read back with `webdataset` the way open_clip's training data
loader reads them, the pair ids, ranks, captions and image bytes match the subset byte for byte."""
from __future__ import annotations

import json
from pathlib import Path

import webdataset as wds

from chips_core.platform.query import connect, query
from chips_core.platform.warehouse import Warehouse
from chips_core.stages import run_pipeline
from chips_core.stages.runconfig import load_run_config

from ..conftest import tiny_pipeline_config


def test_subsets_as_webdataset_shards_read_back_byte_exact(tmp_path, demo_model):
    cfg = tiny_pipeline_config(tmp_path, demo_model, 80, 12, seed=61, sketch={"k": 16}, bank={"size": 12},
                               curvature={"n_curv": 20, "hard_negatives": 4}, budgets=[0.25], shard_size=40,
                               methods=["random", "chips_plus"],
                               outputs={"dir": str(tmp_path / "out"), "formats": ["webdataset", "csv"],
                                        "shard_max_bytes": 4000})
    out = run_pipeline(load_run_config(cfg))
    wh = Warehouse(cfg["warehouse"])
    files = out["materialize"]["files"]
    sid = f"{out['score']['run_id']}:chips_plus@0.25"
    tars = sorted(Path(f) for f in files if "/webdataset/chips_plus_at_0.25/" in f)
    assert len(tars) >= 2 and all(t.suffix == ".tar" for t in tars)  # the size limit split it
    assert sum(t.stat().st_size for t in tars) > 0

    subset = query(connect(wh), "select pair_id, rank from stg_subsets where subset_id = $s order by rank",
                   {"s": sid}).to_pylist()
    # raw members, in tar order
    samples = list(wds.WebDataset([str(t) for t in tars], shardshuffle=False))
    meta = [json.loads(s["json"]) for s in samples]
    assert [(m["pair_id"], m["rank"]) for m in meta] == [(r["pair_id"], r["rank"]) for r in subset]
    assert {m["subset_id"] for m in meta} == {sid}
    stored = {r["pair_id"]: r for r in wh.read_pairs([m["pair_id"] for m in meta])}
    for s, m in zip(samples, meta):
        image = next(v for k, v in s.items() if k in ("png", "jpg", "jpeg", "webp"))
        assert image == stored[m["pair_id"]]["image"]  # the image's bytes, as ingested
        assert s["txt"].decode("utf-8") == stored[m["pair_id"]]["caption"]
    # as open_clip's loader reads them: decoded to RGB images and text
    pipeline = (wds.WebDataset([str(t) for t in tars], shardshuffle=False).decode("pilrgb")
                .rename(image="jpg;png;jpeg;webp", text="txt").to_tuple("image", "text"))
    pairs = list(pipeline)
    assert len(pairs) == len(subset) and all(img.mode == "RGB" and isinstance(txt, str) for img, txt in pairs)

    # a rerun of the same subsets writes the same bytes
    before = {t.name: t.read_bytes() for t in tars}
    from chips_core.stages.materialize import write_manifests
    write_manifests(wh, out["materialize"]["run_id"], [sid], tars[0].parents[2], ["webdataset"],
                    shard_max_bytes=4000)
    assert {t.name: t.read_bytes() for t in sorted(tars[0].parent.glob("*.tar"))} == before
