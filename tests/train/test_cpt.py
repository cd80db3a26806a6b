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

from chips_core.errors import ConfigError
from chips_core.scoring.endpoint import build_custom_model
from chips_core.train.cpt import (CheckpointMismatchError, CPTConfig, ReplayConfig, TensorPairs, clip_loss, lr_at,
                                  replay_batch, train_cpt)
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


class _Recording(TensorPairs):
    def __init__(self, base: TensorPairs):
        super().__init__(base.images, base.tokens, base.ids)
        self.calls: list[list[int]] = []

    def batch(self, idx):
        self.calls.append(list(idx))
        return super().batch(idx)


def _replay_stream(n=40, seed=8):
    import open_clip

    data = make_pairs(n, seed=seed, scan_fraction=0.0, noise_fraction=0.0)
    return TensorPairs(data.images, open_clip.tokenizer.SimpleTokenizer(context_length=16)(data.captions),
                       data.pair_ids)


def test_replay_takes_its_share_of_every_batch_and_cycles_through_the_stream(tmp_path):
    cfg = CPTConfig(**{**CFG, "epochs": 2, "replay": ReplayConfig(source="general", fraction=0.25)})
    assert cfg.replay_per_batch == 4
    model, data = _setup()
    main, replay = _Recording(data), _Recording(_replay_stream())
    out = train_cpt(model, main, cfg, tmp_path, replay=replay)
    assert [len(b) for b in main.calls] == [12] * 8 * 2  # 96 subset pairs in batches of 16 - 4
    assert len(replay.calls) == out["steps"] == 16 and all(len(b) == 4 for b in replay.calls)
    seen = [i for b in replay.calls for i in b]
    assert sorted(seen[:40]) == list(range(40)) and sorted(seen[40:64]) == sorted(set(seen[40:64]))  # passes
    assert [replay_batch(40, cfg, s) for s in range(16)] == replay.calls  # a function of the step alone


def test_replay_resumes_to_the_same_weights_and_is_part_of_the_run_identity(tmp_path):
    cfg = CPTConfig(**{**CFG, "replay": ReplayConfig(source="general", fraction=0.25)})

    def crash(step, epoch, lr, loss):
        if step == 10:
            raise KeyboardInterrupt  # stops between the checkpoints at 8 and 12

    model, data = _setup()
    with pytest.raises(KeyboardInterrupt):
        train_cpt(model, data, cfg, tmp_path / "a", log=crash, replay=_replay_stream())
    model, data = _setup()
    resumed = train_cpt(model, data, cfg, tmp_path / "a", replay=_replay_stream())
    ref_model, ref_data = _setup()
    ref = train_cpt(ref_model, ref_data, cfg, tmp_path / "b", replay=_replay_stream())
    assert resumed["resumed_from_step"] == 8 and ref["resumed_from_step"] == 0
    a, b = (torch.load(r["final"], weights_only=True)["state_dict"] for r in (resumed, ref))
    assert all(torch.equal(a[n], b[n]) for n in b)
    model, data = _setup()
    with pytest.raises(CheckpointMismatchError, match="replay"):
        train_cpt(model, data, cfg, tmp_path / "a", replay=_replay_stream(seed=9))
    with pytest.raises(ValueError, match="replay"):
        train_cpt(model, data, cfg, tmp_path / "c")  # replay configured, none given


def test_replay_config_names_the_bad_value():
    with pytest.raises(ConfigError, match=r"ReplayConfig.source=None"):
        ReplayConfig(fraction=0.2)
    with pytest.raises(ConfigError, match=r"replay.fraction=0.95"):
        CPTConfig(batch_size=16, replay=ReplayConfig(source="g", fraction=0.95))


def test_keep_checkpoints_false_leaves_only_final_and_log(tmp_path):
    """Resume points are kept by default; ``keep_checkpoints: false`` deletes them once final.pt is written,
    and the option is not part of the run identity (a run may be resumed with either value)."""
    model, data = _setup()
    out = train_cpt(model, data, CPTConfig(**{**CFG, "epochs": 1}), tmp_path / "kept")
    assert list((tmp_path / "kept" / "checkpoints").glob("step-*.pt"))
    model, data = _setup()
    lean = train_cpt(model, data, CPTConfig(**{**CFG, "epochs": 1, "keep_checkpoints": False}), tmp_path / "lean")
    assert sorted(p.name for p in (tmp_path / "lean").iterdir()) == ["final.pt", "log.jsonl"]
    a, b = (torch.load(o["final"], weights_only=True)["state_dict"] for o in (out, lean))
    assert all(torch.equal(a[k], b[k]) for k in a)
    model, data = _setup()  # resuming the kept run with the option off finds its checkpoints compatible
    again = train_cpt(model, data, CPTConfig(**{**CFG, "epochs": 1, "keep_checkpoints": False}), tmp_path / "kept")
    assert again["resumed_from_step"] == out["steps"] and not list((tmp_path / "kept").glob("checkpoints/*.pt"))
