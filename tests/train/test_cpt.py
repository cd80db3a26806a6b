"""Continual pre-training: a run killed with SIGKILL and resumed ends with the same weights as one
that never stopped; the schedule, the loss and the resume guard behave as documented."""
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from chips_core.scoring.endpoint import build_custom_model
from chips_core.train.cpt import CheckpointMismatchError, CPTConfig, TensorPairs, clip_loss, lr_at, train_cpt
from chips_core.train.evaluate import retrieval_recall
from chips_core.train.synthetic import DEMO_MODEL_CONFIG, make_pairs

pytestmark = pytest.mark.slow  # real Prefect runs / training: deselect with -m 'not slow'

# 96 pairs in batches of 16: 6 steps per epoch, 18 in all; checkpoints at steps 4, 6, 8, 12, 16, 18
CFG = dict(epochs=3, batch_size=16, lr=1e-3, warmup_steps=3, checkpoint_every=4, seed=5)

SCRIPT = textwrap.dedent("""
    import os, signal, sys, torch
    torch.set_num_threads(2)
    from chips_core.train.cpt import CPTConfig, TensorPairs, train_cpt
    from chips_core.train.synthetic import DEMO_MODEL_CONFIG, make_pairs
    from chips_core.scoring.endpoint import build_custom_model
    import open_clip
    cfg, out, kill_at = CPTConfig(**eval(sys.argv[1])), sys.argv[2], int(sys.argv[3])
    torch.manual_seed(0)
    model = build_custom_model(DEMO_MODEL_CONFIG)
    data = make_pairs(96, seed=3)
    tok = open_clip.tokenizer.SimpleTokenizer(context_length=16)
    pairs = TensorPairs(data.images, tok(data.captions), data.pair_ids)
    def log(step, epoch, lr, loss):
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # a hard kill: no cleanup, no final checkpoint
    train_cpt(model, pairs, cfg, out, log=log)
""")


def _setup():
    import open_clip

    torch.manual_seed(0)
    model = build_custom_model(DEMO_MODEL_CONFIG)
    data = make_pairs(96, seed=3)
    tok = open_clip.tokenizer.SimpleTokenizer(context_length=16)
    return model, TensorPairs(data.images, tok(data.captions), data.pair_ids)


def test_kill_and_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    # the killed run happens in another process (as a real crash would); it dies after step 10,
    # between the checkpoints at 8 and 12
    proc = subprocess.run([sys.executable, "-c", SCRIPT, repr(CFG), str(tmp_path / "killed"), "10"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not (tmp_path / "killed" / "final.pt").exists()
    assert sorted(p.name for p in (tmp_path / "killed" / "checkpoints").glob("step-*.pt")) == \
        ["step-00000006.pt", "step-00000008.pt"]  # the last two are kept

    model, data = _setup()
    resumed = train_cpt(model, data, CPTConfig(**CFG), tmp_path / "killed")
    assert resumed["resumed_from_step"] == 8 and resumed["steps"] == 18

    ref_model, ref_data = _setup()
    ref = train_cpt(ref_model, ref_data, CPTConfig(**CFG), tmp_path / "straight")
    assert ref["resumed_from_step"] == 0
    a = torch.load(resumed["final"], weights_only=True)["state_dict"]
    b = torch.load(ref["final"], weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # the log holds every step exactly once, the resumed steps included
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in
             (tmp_path / "killed" / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 19))
    # and a third call finds the finished run: nothing left to train, the same weights
    model2, data2 = _setup()
    again = train_cpt(model2, data2, CPTConfig(**CFG), tmp_path / "killed")
    assert again["resumed_from_step"] == 18
    assert all(torch.equal(model2.state_dict()[n], b[n]) for n in b)


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path):
    model, data = _setup()
    train_cpt(model, data, CPTConfig(**{**CFG, "epochs": 1}), tmp_path)
    model, data = _setup()
    with pytest.raises(CheckpointMismatchError, match="config"):
        train_cpt(model, data, CPTConfig(**{**CFG, "epochs": 1, "lr": 2e-3}), tmp_path)
    model, data = _setup()
    half = TensorPairs(data.images[:48], data.tokens[:48], data.ids[:48])
    with pytest.raises(CheckpointMismatchError, match="data"):
        train_cpt(model, half, CPTConfig(**{**CFG, "epochs": 1}), tmp_path)


def test_schedule_warms_up_then_decays_to_zero():
    cfg = CPTConfig(lr=1.0, warmup_steps=10)
    lrs = [lr_at(s, 200, cfg) for s in range(200)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # monotone decay after warm-up
    assert lrs[-1] < 1e-3
    with pytest.raises(ValueError, match="batch_size"):
        CPTConfig(batch_size=1)


def test_cpt_lowers_the_loss_and_improves_retrieval_on_what_it_trained(tmp_path):
    model, data = _setup()
    model.eval()
    with torch.no_grad():
        before = float(clip_loss(model, data.images, data.tokens))
        r0 = retrieval_recall(model.encode_image(data.images).numpy(), model.encode_text(data.tokens).numpy())
    out = train_cpt(model, data, CPTConfig(**{**CFG, "epochs": 8}), tmp_path)
    with torch.no_grad():
        after = float(clip_loss(model, data.images, data.tokens))
        r1 = retrieval_recall(model.encode_image(data.images).numpy(), model.encode_text(data.tokens).numpy())
    assert after < before - 0.5, (before, after)
    assert r1["image_to_text_R@5"] > r0["image_to_text_R@5"]
    assert np.isfinite(out["final_loss"])
