"""train.py on CPU with tiny models: DDP (torchrun, gloo) = one process, resume = uninterrupted,
accumulation = a bigger batch, the NaN guard."""
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import train
from launch import UsageError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def args(tiny_paths, out, **kw):
    base = dict(sd2=tiny_paths[0], clip=tiny_paths[1], dataset="toy", size=32, resolution=32, batch_size=2,
                grad_accum=1, max_steps=3, lr=1e-3, dtype="fp32", num_workers=0, log_every=1, save_every=100,
                out_dir=str(out), seed=3)
    base.update(kw)
    return [f"--{k}={v}" for k, v in base.items()]


def weights(out):
    return load_file(os.path.join(out, "checkpoint", "digseg.safetensors"))


def assert_close(a, b, tol, mean_tol=None):
    """max |a - b| <= tol, and (mean_tol) the mean |a - b| over all weights <= mean_tol."""
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= tol, worst
    if mean_tol is not None:
        mean = sum((a[k] - b[k]).abs().sum().item() for k in a) / sum(a[k].numel() for k in a)
        assert mean <= mean_tol, mean
    return worst


# Adam turns a float-rounding difference in a near-zero gradient into an update of up to lr: with
# lr = 1e-4 and 2 steps a handful of weights can differ by a few 1e-5 (seen: 8e-6 to 4.5e-5,
# depending on the tiny models of the session). So the bound on the worst weight is Adam's own
# (lr x steps), and the real check is the mean difference over all weights, at rounding level
# (seen: 4e-10; bound 1e-8): a real mismatch (other samples, other noise, gradients not averaged)
# moves the weights by ~lr everywhere, a mean of ~5e-5.
SAME = dict(lr=1e-4, max_steps=2)
TOL = dict(tol=2e-4, mean_tol=1e-8)


def test_torchrun_two_processes_equal_one_process(tiny_paths, tmp_path):
    one = tmp_path / "one"
    train.train(train.parse_args(args(tiny_paths, one, batch_size=2, **SAME)))
    two = tmp_path / "two"
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
                        os.path.join(ROOT, "train.py"), *args(tiny_paths, two, batch_size=1, **SAME)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "total batch 2 = 1 per process x 2 processes x 1 accumulation steps" in r.stdout
    worst = assert_close(weights(one), weights(two), **TOL)
    print(f"DDP x2 vs one process: max abs weight difference {worst:.2e}")
    base = load_file(os.path.join(tiny_paths[0], "unet", "diffusion_pytorch_model.safetensors"))
    assert (weights(one)["unet.conv_out.weight"] - base["conv_out.weight"]).abs().max() > 1e-4   # it did train


def torchrun(flags, *launcher):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *launcher, os.path.join(ROOT, "train.py"),
                             *flags], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finished(*procs):
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out[-2000:] + err[-4000:]
    return outs


def test_ddp_trains_with_the_paper_text_scales_on_a_deeper_unet(tmp_path):
    """--trainable=all --text_scales=paper under torchrun x 2 on a U-Net with cross-attention at two
    levels: the skipped cross-attention gets no gradient, which must not stall DDP's reduction
    ("Expected to have finished reduction in the prior iteration" at step 2)."""
    from conftest import make_tiny_world
    paths = make_tiny_world(str(tmp_path / "w"), levels=3)
    flags = args(paths, tmp_path / "run", batch_size=1, max_steps=3, text_scales="paper", trainable="all")
    finished(torchrun(flags, "--nproc_per_node=2", "--master_port=29537"))
    assert torch.load(tmp_path / "run" / "checkpoint" / "train_state.pt", weights_only=True)["step"] == 3


def test_two_nodes_of_one_process_equal_one_node_of_two(tiny_paths, tmp_path):
    """Several machines: torchrun --nnodes=2 with a c10d rendezvous, here two "nodes" on localhost,
    one process each, trains what one node with two processes trains (same total batch, same data
    order). Rank 0 saves: the nodes share out_dir, as checkpoints and --resume need."""
    nodes = [torchrun(args(tiny_paths, tmp_path / "nodes", batch_size=1, **SAME),
                      "--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:29541",
                      "--rdzv_id=digseg-test") for _ in range(2)]
    one = torchrun(args(tiny_paths, tmp_path / "one", batch_size=1, **SAME),
                   "--nproc_per_node=2", "--master_port=29543")
    outs = finished(*nodes, one)
    assert any("1 per process x 2 processes" in out for out, _ in outs[:2])
    assert_close(weights(tmp_path / "nodes"), weights(tmp_path / "one"), **TOL)


def test_accumulation_equals_a_bigger_batch(tiny_paths, tmp_path):
    train.train(train.parse_args(args(tiny_paths, tmp_path / "big", batch_size=2, **SAME)))
    train.train(train.parse_args(args(tiny_paths, tmp_path / "acc", batch_size=1, grad_accum=2, **SAME)))
    assert_close(weights(tmp_path / "big"), weights(tmp_path / "acc"), **TOL)


def test_resume_is_bit_identical(tiny_paths, tmp_path):
    train.train(train.parse_args(args(tiny_paths, tmp_path / "full", max_steps=4)))
    train.train(train.parse_args(args(tiny_paths, tmp_path / "cut", max_steps=4, stop_after=2)))
    state = torch.load(tmp_path / "cut" / "checkpoint" / "train_state.pt", weights_only=True)
    assert state["step"] == 2
    train.train(train.parse_args([f"--resume={tmp_path / 'cut'}"]))
    a, b = weights(tmp_path / "full"), weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert os.path.isfile(tmp_path / "cut" / "loss.png")


def test_nan_guard_skips_and_stops(tiny_paths, tmp_path, monkeypatch, capsys):
    from digseg import DiGSeg
    real = DiGSeg.loss
    calls = {"n": 0}

    def sometimes_nan(self, *a, **k):
        calls["n"] += 1
        out = real(self, *a, **k)
        return out * float("nan") if calls["n"] == 2 else out

    monkeypatch.setattr(DiGSeg, "loss", sometimes_nan)
    train.train(train.parse_args(args(tiny_paths, tmp_path / "nan", max_steps=3)))
    log = capsys.readouterr().out
    assert "non-finite loss" in log and "step skipped (1 in a row, 1 in all)" in log
    assert torch.load(tmp_path / "nan" / "checkpoint" / "train_state.pt", weights_only=True)["bad_total"] == 1

    monkeypatch.setattr(DiGSeg, "loss", lambda self, *a, **k: real(self, *a, **k) * float("inf"))
    with pytest.raises(SystemExit, match="3 non-finite losses in a row"):
        train.train(train.parse_args(args(tiny_paths, tmp_path / "inf", max_bad_steps=3)))


def test_settings_flags():
    s = train.parse_args(["--preset=ade20k", "--batch_size=4", "--compile=1", "--lr=2e-4"])
    assert (s.dataset, s.batch_size, s.compile, s.lr, s.size) == ("ade150", 4, True, 2e-4, 512)
    with pytest.raises(UsageError, match="unknown setting --bogus"):
        train.parse_args(["--bogus=1"])
    with pytest.raises(UsageError, match="unknown preset"):
        train.parse_args(["--preset=imagenet"])
    for name in ("ade20k", "coco-stuff"):       # the App. A.2 presets differ only in what trains
        a, b = vars(train.parse_args([f"--preset={name}"])), vars(train.parse_args([f"--preset={name}-paper"]))
        assert {k for k in a if a[k] != b[k]} == {"trainable", "out_dir"} and b["trainable"] == "paper"
    assert train.parse_args(["--tau_bg=0.3"]).tau_bg == 0.3
    with pytest.raises(UsageError, match=r"--noise_strength=1.5: expected a number in \[0, 1\]"):
        train.parse_args(["--noise_strength=1.5"])
    from digseg import DiGSegConfig
    with pytest.raises(ValueError, match="noise_strength -0.1: expected a number in"):
        DiGSegConfig(noise_strength=-0.1).check()


def test_dry_run_reports_counts_and_memory(tiny_paths, tmp_path, capsys):
    train.train(train.parse_args(args(tiny_paths, tmp_path / "dry", dry_run=1)))
    out = capsys.readouterr().out
    assert "dry run: loss" in out and "peak process memory" in out and "trainable" in out


def test_e2e_objective_trains_resumes_and_fine_tunes_on_top_of_a_diffusion_run(tiny_paths, tmp_path):
    """train.py --objective=e2e: a run that resumes bit-identically; --init starts from a trained
    checkpoint's weights (Garcia et al.'s "E2E FT on top"), with its model settings and a fresh optimizer."""
    train.train(train.parse_args(args(tiny_paths, tmp_path / "full", objective="e2e", max_steps=4)))
    train.train(train.parse_args(args(tiny_paths, tmp_path / "cut", objective="e2e", max_steps=4, stop_after=2)))
    train.train(train.parse_args([f"--resume={tmp_path / 'cut'}"]))
    a, b = weights(tmp_path / "full"), weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)
    import json
    assert json.load(open(tmp_path / "full" / "checkpoint" / "digseg.json"))["objective"] == "e2e"
    train.train(train.parse_args(args(tiny_paths, tmp_path / "diff", max_steps=2, target="v_prediction")))
    init = args(tiny_paths, tmp_path / "ontop", objective="e2e", max_steps=1, lr=1e-12, init=tmp_path / "diff" / "checkpoint")
    train.train(train.parse_args(init))
    before, after = weights(tmp_path / "diff"), weights(tmp_path / "ontop")
    assert max((before[k] - after[k]).abs().max().item() for k in before) < 1e-6      # it started there
    saved = json.load(open(tmp_path / "ontop" / "checkpoint" / "settings.json"))
    assert (saved["objective"], saved["target"]) == ("e2e", "v_prediction")
