"""Sources ingested with ``images: reference``: the warehouse keeps where each image lives (a tar member, a
Parquet row, a file), its hash and size, not its bytes; featurize, materialize and CPT read the bytes from the
source and get exactly what a copying warehouse gives. A missing or changed source file is a named error, and
the warehouse is left so that restoring the file and rerunning resumes."""
from __future__ import annotations

import dataclasses
import io
import json
import os

import numpy as np
import open_clip
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image

from chips_core.platform.features import read_features
from chips_core.platform.images import SourceImageError
from chips_core.platform.readers import SourceSpec
from chips_core.platform.warehouse import Warehouse
from chips_core.scoring.endpoint import LoadedModel, ModelSpec, state_dict_checksum
from chips_core.scoring.featurize import BankConfig
from chips_core.scoring.sketch import SketchConfig
from chips_core.scoring.target import CurvatureConfig
from chips_core.stages import featurize_stage
from chips_core.stages.cpt import subset_data
from chips_core.stages.pipeline import run_pipeline
from chips_core.stages.runconfig import OutputConfig, RunConfig
from chips_core.train.synthetic import DEMO_MODEL_CONFIG, make_pairs

from ..platform.test_ingest import make_tar


def _png(data, i) -> bytes:
    arr = (np.clip(data.images[i].numpy() * 0.3 + 0.3, 0, 1) * 255).astype(np.uint8).transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_sources(d, n_each: int = 40) -> dict[str, tuple]:
    """The pool as a WebDataset tar, a Parquet file of image bytes and an open_clip CSV of image files; the
    target as a folder. Returns ``{name: (kind, path)}``."""
    data = make_pairs(3 * n_each, seed=21)
    d.mkdir(parents=True, exist_ok=True)
    make_tar(d / "pool.tar", [(f"s{i:04d}.{ext}", payload) for i in range(n_each)
                              for ext, payload in (("png", _png(data, i)), ("txt", data.captions[i].encode()))])
    rows = range(n_each, 2 * n_each)
    pq.write_table(pa.table({"image": [_png(data, i) for i in rows], "caption": [data.captions[i] for i in rows]}),
                   d / "pool.parquet", row_group_size=16)  # references span several row groups
    (d / "files").mkdir()
    lines = ["filepath,title"]
    for i in range(2 * n_each, 3 * n_each):
        (d / "files" / f"{i}.png").write_bytes(_png(data, i))
        lines.append(f"files/{i}.png,\"{data.captions[i]}\"")
    (d / "pool.csv").write_text("\n".join(lines) + "\n")
    target = make_pairs(16, seed=22, scan_fraction=1.0, noise_fraction=0.0)
    (d / "target").mkdir()
    for i in range(16):
        (d / "target" / f"{i}.png").write_bytes(_png(target, i))
        (d / "target" / f"{i}.txt").write_text(target.captions[i])
    return {"tar": ("webdataset", str(d / "pool.tar")), "pq": ("parquet", str(d / "pool.parquet")),
            "csv": ("csv", str(d / "pool.csv")), "target": ("folder", str(d / "target"))}


def config(d, sources, images: str) -> RunConfig:
    spec = {name: SourceSpec(name, kind, (path,), images=images) for name, (kind, path) in sources.items()}
    return RunConfig(warehouse=str(d / f"wh-{images}"), pool=(spec["tar"], spec["pq"], spec["csv"]),
                     target=(spec["target"],), model=ModelSpec(config=DEMO_MODEL_CONFIG), sketch=SketchConfig(k=32),
                     bank=BankConfig(size=24), curvature=CurvatureConfig(n_curv=40, hard_negatives=4),
                     shard_size=50, budgets=(0.2, 0.5), outputs=OutputConfig(dir=str(d / f"out-{images}")))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, demo_model):
    d = tmp_path_factory.mktemp("byref")
    sources = write_sources(d / "src")
    loaded = LoadedModel(demo_model, open_clip.tokenizer.SimpleTokenizer(context_length=16),
                         state_dict_checksum(demo_model), "demo")
    out = {}
    for images in ("copy", "reference"):
        cfg = config(d, sources, images)
        wh = cfg.open_warehouse()
        out[images] = (cfg, wh, run_pipeline(cfg, loaded, wh=wh))
    return d, sources, loaded, out


def _dir_bytes(path) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def test_reference_keeps_location_hash_and_size_but_not_the_bytes(runs):
    _, _, _, out = runs
    (_, copy_wh, copy_run), (_, ref_wh, ref_run) = out["copy"], out["reference"]
    assert ref_run["ingest"]["kept"] == copy_run["ingest"]["kept"] == 136  # 120 pool + 16 target
    cols = ["pair_id", "image_uri", "image_sha256", "image_size", "image"]
    c = {r["pair_id"]: r for r in copy_wh.read("pairs", columns=cols).to_pylist()}
    r = {r["pair_id"]: r for r in ref_wh.read("pairs", columns=cols).to_pylist()}
    assert c.keys() == r.keys()
    assert all(row["image"] is None for row in r.values())
    for pid, row in r.items():
        assert row["image_sha256"] == c[pid]["image_sha256"] and row["image_size"] == len(c[pid]["image"])
    uris = sorted(row["image_uri"] for row in r.values())
    assert any(u.startswith("tar://s0000.png::") for u in uris)  # a tar member
    assert any(u.endswith("pool.parquet#row=39&column=image") for u in uris)  # a Parquet row
    assert any(u.endswith(os.path.join("files", "119.png")) for u in uris)  # a file
    # read back through the warehouse: the same bytes as the copy
    ids = sorted(c)
    got = ref_wh.read_pairs(ids, ["image"])
    assert [g["image"] for g in got] == [c[i]["image"] for i in ids]
    assert _dir_bytes(os.path.join(ref_wh.root, "pairs")) < _dir_bytes(os.path.join(copy_wh.root, "pairs")) / 3


def test_featurize_score_materialize_and_cpt_read_the_sources_and_equal_the_copy(runs):
    _, _, loaded, out = runs
    (copy_cfg, copy_wh, copy_run), (ref_cfg, ref_wh, ref_run) = out["copy"], out["reference"]
    fc, fr = (read_features(w, r["featurize"]["run_id"]) for w, r in ((copy_wh, copy_run), (ref_wh, ref_run)))
    assert fc.pair_id == fr.pair_id and len(fr.pair_id) == 120
    for name in ("x", "y", "g", "p_corr", "clipscore", "loss"):
        np.testing.assert_array_equal(getattr(fc, name), getattr(fr, name))
    sc, sr = (w.read("scores", filter=pc.field("run_id") == r["score"]["run_id"]).drop_columns(["run_id", "run"])
              for w, r in ((copy_wh, copy_run), (ref_wh, ref_run)))
    assert sc.column_names == sr.column_names
    for name in sc.column_names:  # (Table.equals is False on NaN, e.g. an undefined score)
        assert sc.column(name).to_pylist() == sr.column(name).to_pylist(), name
    # the exported images of the manifests: the same files, the same bytes
    ic, ir = (os.path.join(cfg.outputs.dir, r["materialize"]["run_id"], "images")
              for cfg, r in ((copy_cfg, copy_run), (ref_cfg, ref_run)))
    assert sorted(os.listdir(ic)) == sorted(os.listdir(ir)) and len(os.listdir(ir)) == 120
    for name in os.listdir(ic):
        assert open(os.path.join(ic, name), "rb").read() == open(os.path.join(ir, name), "rb").read()
    # CPT's training data from a subset: the same image bytes, read from the sources
    subset = f"{ref_run['score']['run_id']}:chips@0.2"
    a = subset_data(copy_wh, f"{copy_run['score']['run_id']}:chips@0.2", loaded)
    b = subset_data(ref_wh, subset, loaded)
    assert a.ids == b.ids and a.images == b.images and len(b) == 24
    assert ref_wh.images.reads > 0 and copy_wh.images.reads == 0


def test_a_changed_or_missing_source_file_is_a_named_error_and_a_rerun_resumes(runs):
    d, sources, loaded, out = runs
    cfg, _, _ = out["reference"]
    wh = cfg.open_warehouse()
    pairs_before = wh.read("pairs").num_rows
    victim = os.path.join(d, "src", "files", "100.png")
    pid = [r["pair_id"] for r in wh.read("pairs", columns=["pair_id", "image_uri"]).to_pylist()
           if r["image_uri"].endswith("files/100.png")][0]
    original = open(victim, "rb").read()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(victim)  # changed since ingest
    with pytest.raises(SourceImageError, match=rf"pair {pid}: image '.*files/100.png'.*source 'csv'.*changed since "
                                               "ingest"):
        featurize_stage(cfg, wh, loaded, run_id="f-changed")
    os.remove(victim)
    with pytest.raises(SourceImageError, match=rf"pair {pid}: image '.*files/100.png'.*is missing"):
        featurize_stage(cfg, wh, loaded, run_id="f-changed")
    runs_rows = {r["run_id"]: r for r in wh.read("runs").to_pylist()}
    assert runs_rows["f-changed"]["status"].startswith("failed")
    assert wh.read("pairs").num_rows == pairs_before  # nothing lost
    with open(victim, "wb") as f:
        f.write(original)
    done = featurize_stage(cfg, wh, loaded, run_id="f-changed")  # restored: the same command resumes
    assert done["pairs"] == 120
    # a Parquet source rewritten with other bytes in a row, and a tar missing a member
    t = pq.read_table(sources["pq"][1])
    images = t.column("image").to_pylist()
    images[3] = images[4]
    pq.write_table(t.set_column(0, "image", pa.array(images, pa.binary())), sources["pq"][1])
    with pytest.raises(SourceImageError, match=r"pool.parquet#row=3&column=image.*changed since ingest"):
        wh.read_pairs([r["pair_id"] for r in wh.read("pairs", columns=["pair_id", "image_uri"]).to_pylist()
                       if r["image_uri"].endswith("#row=3&column=image")], ["image"])


def test_images_mode_is_checked_and_old_parts_without_image_size_still_read(tmp_path):
    from chips_core.errors import ConfigError
    from chips_core.stages.runconfig import load_run_config

    with pytest.raises(ConfigError, match=r"images='link' is invalid: not one of \('copy', 'reference'\)"):
        load_run_config({"warehouse": str(tmp_path / "wh"), "model": {"config": DEMO_MODEL_CONFIG},
                         "pool": [{"name": "p", "kind": "folder", "paths": [str(tmp_path)], "images": "link"}],
                         "target": []})
    wh = Warehouse(str(tmp_path / "wh"))
    old = pa.table({"pair_id": ["a"], "source": ["s"], "source_key": ["k"], "caption": ["c"], "image_uri": ["u"],
                    "image_sha256": ["h"], "width": pa.array([1], pa.int32()), "height": pa.array([1], pa.int32()),
                    "image_format": ["PNG"], "image": [b"x"], "ingest_run_id": ["r"]})  # written before image_size
    os.makedirs(os.path.join(wh.table_dir("pairs"), "run=r"))
    pq.write_table(old, os.path.join(wh.table_dir("pairs"), "run=r", "old.parquet"))
    got = wh.read("pairs", columns=["pair_id", "image_size", "image"])
    assert got.to_pylist() == [{"pair_id": "a", "image_size": None, "image": b"x"}]


def test_storage_options_never_reach_the_runs_table(tmp_path):
    from chips_core.platform.provenance import config_json

    spec = SourceSpec("s3pool", "webdataset", ("s3://bucket/a.tar",), images="reference",
                      storage_options={"key": "AKIA-SECRET", "secret": "hunter2"})
    cfg = RunConfig(warehouse=str(tmp_path / "wh"), pool=(spec,), target=(), model=ModelSpec(config=DEMO_MODEL_CONFIG),
                    storage_options={"secret": "warehouse-secret"})
    text = config_json(cfg)
    assert "hunter2" not in text and "AKIA-SECRET" not in text and "warehouse-secret" not in text
    assert json.loads(text)["pool"][0]["storage_options"] == "<set>"
    assert dataclasses.replace(spec, storage_options=None) == spec  # options are not part of a source's identity


def test_tar_members_read_from_many_threads_at_once_are_intact(runs):
    """Featurize reads shards on two threads; fsspec shares one tar file object between them."""
    from concurrent.futures import ThreadPoolExecutor

    _, _, _, out = runs
    (_, copy_wh, _), (_, ref_wh, _) = out["copy"], out["reference"]
    rows = [r for r in ref_wh.read("pairs", columns=["pair_id", "image_uri"]).to_pylist()
            if r["image_uri"].startswith("tar://")]
    ids = [r["pair_id"] for r in rows]
    want = [r["image"] for r in copy_wh.read_pairs(ids, ["image"])]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda _: [r["image"] for r in ref_wh.read_pairs(ids, ["image"])], range(16)))
    assert len(ids) == 40 and all(g == want for g in got)
