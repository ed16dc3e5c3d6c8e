"""Nothing a user does by mistake loses a run or prints a wrong number: each case a new user hit,
reproduced on tiny models (toy world, CPU)."""
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import eval as evaluation
import sample
import train
from digseg import DiGSeg
from launch import UsageError
from model.checkpoint import digest as checkpoint_digest
from model.weights import WeightsError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_args(tiny_paths, out, **kw):
    base = dict(sd2=tiny_paths[0], clip=tiny_paths[1], dataset="toy", size=32, resolution=32, batch_size=2,
                max_steps=2, lr=1e-3, dtype="fp32", num_workers=0, log_every=1, save_every=100, out_dir=str(out), seed=3)
    base.update(kw)
    return [f"--{k}={v}" for k, v in base.items()]


def run_script(*argv, cwd=ROOT):
    return subprocess.run([sys.executable, *argv], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": ROOT})


# ---- 1. eval.py never reports a stale number ----------------------------------------------------

@pytest.fixture()
def ckpt(tiny_model, tmp_path):
    folder = tmp_path / "run" / "checkpoint"
    tiny_model.save(folder)
    return folder


def toy_eval(ckpt, out, *extra):
    return evaluation.main([f"--checkpoint={ckpt}", "--dataset=toy", "--limit=4", "--save_every=1", "--proposals=0",
                            f"--out={out}", *extra])["main"]


def test_eval_after_more_training_is_not_the_old_result(ckpt, tmp_path, capsys):
    before = toy_eval(ckpt, tmp_path / "shared")
    tuned = load_file(ckpt / "digseg.safetensors")
    tuned = {k: v + 0.05 * torch.randn_like(v) for k, v in tuned.items()}    # "more training"
    save_file(tuned, ckpt / "digseg.safetensors")
    capsys.readouterr()
    again = toy_eval(ckpt, tmp_path / "shared")
    assert "resuming" not in capsys.readouterr().out
    fresh = toy_eval(ckpt, tmp_path / "fresh")
    assert again["miou_gt"] == fresh["miou_gt"] and again["pixel_acc"] == fresh["pixel_acc"]
    assert (again["miou_gt"], again["pixel_acc"]) != (before["miou_gt"], before["pixel_acc"])


@pytest.mark.parametrize("change", [["--split=train"], ["--limit=2"], ["--tau_bg=0.9"],
                                    ["--proposals=1", "--tau_global=-1"], ["--eta=0.5"]])
def test_eval_with_other_settings_starts_fresh(ckpt, tmp_path, capsys, change):
    toy_eval(ckpt, tmp_path / "shared", "--proposals=1", "--tau_global=0.99", "--tau_patch=0.99")
    capsys.readouterr()
    base = ["--proposals=1", "--tau_global=0.99", "--tau_patch=0.99"]
    changed = [a for a in base if a.split("=")[0] not in {c.split("=")[0] for c in change}] + change
    again = toy_eval(ckpt, tmp_path / "shared", *changed)
    assert "resuming" not in capsys.readouterr().out
    fresh = toy_eval(ckpt, tmp_path / "fresh", *changed)
    assert again["miou_gt"] == fresh["miou_gt"] or (np.isnan(again["miou_gt"]) and np.isnan(fresh["miou_gt"]))
    assert again["pixel_acc"] == fresh["pixel_acc"]


def test_eval_default_output_folder_is_per_checkpoint_and_dataset(ckpt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evaluation.main([f"--checkpoint={ckpt}", "--dataset=toy", "--limit=1", "--proposals=0"])
    digest = checkpoint_digest(ckpt)
    written = tmp_path / "out" / "eval" / f"run-{digest[:8]}" / "toy-val" / "metrics_main.json"
    assert json.load(open(written))["key"]["checkpoint"] == digest


# ---- 2. runs are not overwritten without a word ---------------------------------------------------

def test_fresh_run_refuses_an_out_dir_with_a_checkpoint(tiny_paths, tmp_path):
    out = tmp_path / "run"
    train.train(train.parse_args(train_args(tiny_paths, out)))
    before = load_file(out / "checkpoint" / "digseg.safetensors")
    with pytest.raises(UsageError, match="--out_dir=.* holds checkpoints .*--overwrite=1"):
        train.train(train.parse_args(train_args(tiny_paths, out, max_steps=1)))
    after = load_file(out / "checkpoint" / "digseg.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(UsageError, match="--dry_run=yes_please: expected a yes/no value"):
        train.parse_args(train_args(tiny_paths, out, dry_run="yes_please"))
    train.train(train.parse_args(train_args(tiny_paths, out, max_steps=1, overwrite=1)))
    assert json.load(open(out / "checkpoint" / "progress.json"))["step"] == 1


def test_resume_of_a_copy_writes_into_the_copy_and_keeps_the_last_n(tiny_paths, tmp_path):
    out = tmp_path / "run"
    train.train(train.parse_args(train_args(tiny_paths, out, max_steps=4, save_every=1, stop_after=2, keep=2)))
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    original = load_file(out / "checkpoint" / "digseg.safetensors")
    train.train(train.parse_args([f"--resume={copy}"]))
    assert all(torch.equal(original[k], v) for k, v in load_file(out / "checkpoint" / "digseg.safetensors").items())
    assert sorted(os.listdir(copy)) == ["checkpoint", "checkpoint-0000003", "loss.png"]
    assert json.load(open(copy / "checkpoint" / "progress.json"))["step"] == 4


def test_resume_from_an_older_checkpoint_does_not_silently_drop_newer_ones(tiny_paths, tmp_path):
    out = tmp_path / "run"
    train.train(train.parse_args(train_args(tiny_paths, out, max_steps=3, save_every=1, keep=3)))
    with pytest.raises(UsageError, match=r"\(checkpoint-0000002, checkpoint\) .*--overwrite=1"):
        train.train(train.parse_args([f"--resume={out / 'checkpoint-0000001'}", "--max_steps=4"]))
    assert os.path.isdir(out / "checkpoint-0000002")


# ---- 3. checkpoints load from any working directory --------------------------------------------------

def test_checkpoint_loads_from_anywhere_and_says_where_weights_went(tiny_paths, tmp_path, monkeypatch):
    weights = tmp_path / "weights"
    shutil.copytree(os.path.dirname(tiny_paths[0]), weights)
    monkeypatch.chdir(weights)
    model = DiGSeg.from_weights("sd2", "clip", resolution=32)              # relative paths, as a user types them
    model.save(tmp_path / "ckpt")
    monkeypatch.chdir(tmp_path / "ckpt")                                    # anywhere else
    DiGSeg.from_checkpoint(tmp_path / "ckpt")
    shutil.move(weights, tmp_path / "moved")
    with pytest.raises(WeightsError, match=r"digseg.json names sd2=.* which does not exist; .* pass --sd2=NEW_PATH"):
        DiGSeg.from_checkpoint(tmp_path / "ckpt")
    DiGSeg.from_checkpoint(tmp_path / "ckpt", sd2=tmp_path / "moved" / "sd2", clip=tmp_path / "moved" / "clip")


# ---- 4. sample.py outputs never collide ------------------------------------------------------------

def test_sample_outputs_of_same_named_images_do_not_collide(ckpt, tmp_path):
    rng = np.random.default_rng(0)
    for rel in ("x.jpg", "x.png", "a/y.png", "b/y.png"):
        os.makedirs(tmp_path / "in" / os.path.dirname(rel), exist_ok=True)
        Image.fromarray((rng.random((20, 30, 3)) * 255).astype(np.uint8)).save(tmp_path / "in" / rel)
    out = tmp_path / "out"
    inputs = [str(tmp_path / "in" / r) for r in ("x.jpg", "x.png", "a/y.png", "b/y.png")]
    assert sample.main(inputs + [f"--checkpoint={ckpt}", "--classes=circle", f"--out={out}", "--ensemble=1"]) == 0
    images = {json.load(open(out / f"{stem}.json"))["image"] for stem in ("x.jpg", "x.png", "a/y", "b/y")}
    assert images == {os.path.normpath(p) for p in inputs}


# ---- 5. the NaN stop names a checkpoint from before the divergence -----------------------------------

def test_nan_stop_names_a_checkpoint_from_before_the_divergence(tiny_paths, tmp_path, monkeypatch):
    real = DiGSeg.loss
    calls = {"n": 0}

    def diverges_at_step_3(self, *a, **k):        # the loss of step 3 (weights after 3 updates) is nan
        calls["n"] += 1
        out = real(self, *a, **k)
        return out * float("nan") if calls["n"] >= 4 else out

    monkeypatch.setattr(DiGSeg, "loss", diverges_at_step_3)
    out = tmp_path / "nan"
    with pytest.raises(SystemExit, match=r"since step 3\. the newest checkpoint from before the divergence is "
                                         r".*checkpoint-0000002 \(step 2\)"):
        train.train(train.parse_args(train_args(tiny_paths, out, max_steps=10, save_every=1, keep=5, max_bad_steps=2)))


# ---- 6. loose flags get one line naming the flag ------------------------------------------------------

@pytest.mark.parametrize("flag, message", [
    ("--decay=cosin", "--decay=cosin: expected one of constant, cosine, linear"),
    ("--device=gpu", "--device=gpu: expected one of auto, cpu, cuda"),
    ("--max_steps=4o", "--max_steps=4o: expected an integer"),
    ("--dtype=fp64", "--dtype=fp64: expected one of fp32, bf16, fp16"),
    ("--grad_checkpointing=maybe", "--grad_checkpointing=maybe: expected a yes/no value"),
    ("--max_steps=0", "--max_steps=0: expected an integer >= 1"),
])
def test_train_flags_are_checked(flag, message):
    with pytest.raises(UsageError, match=message.replace("+", r"\+")):
        train.parse_args([flag])


def test_on_off_flags_mean_what_they_say():
    assert train.parse_args(["--grad_checkpointing=on"]).grad_checkpointing is True
    assert train.parse_args(["--compile=off"]).compile is False


def test_toy_fine_tunes_in_bf16_where_train_py_will_run_on_a_gpu(monkeypatch):
    """Stage 3 runs train.py, which takes the GPU when there is one: its precision follows the GPU
    there, not the flags of the CPU that launches it."""
    from toyworld import world as toy
    monkeypatch.setattr(toy, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(toy.torch.cuda, "is_available", lambda: True)
    assert toy.default_dtype() == "bf16"


def test_command_line_errors_are_one_line_and_help_works(tmp_path):
    r = run_script("train.py", "--max_steps=4o")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "--max_steps=4o" in r.stderr, r.stderr
    r = run_script("train.py", "--max_steps=4o", "--debug=1")
    assert r.returncode != 0 and "Traceback" in r.stderr
    r = run_script("train.py", "--help")
    assert r.returncode == 0 and "--decay='constant' (str) [constant | cosine | linear]" in r.stdout
    assert "after warmup, down to min_lr" in r.stdout                  # the comment in Settings
    for script in ("eval.py", "sample.py", "toy.py"):
        assert run_script(script, "--help").returncode == 0
    r = run_script("eval.py", f"--checkpoint={tmp_path / 'nothing'}", "--dataset=toy")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "digseg.json" in r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_cpu_build_is_a_clear_error():
    with pytest.raises(UsageError, match="--device=cuda: this torch build or machine has no CUDA"):
        train.train(train.parse_args(["--device=cuda", "--dry_run=1"]))


def test_bad_inference_settings_and_configs(tiny_model, ckpt):
    with pytest.raises(ValueError, match="ensemble size E must be an integer >= 1, got 0"):
        tiny_model.segment(torch.zeros(3, 32, 32), ["circle"], ensemble=0)
    with pytest.raises(UsageError, match="--ensemble=0: expected an integer >= 1"):
        evaluation.parse(["--ensemble=0"])
    cfg = json.load(open(ckpt / "digseg.json"))
    json.dump({**cfg, "colour": "blue"}, open(ckpt / "digseg.json", "w"))
    with pytest.raises(WeightsError, match=r"digseg.json: unknown keys \['colour'\]"):
        DiGSeg.from_checkpoint(ckpt)


# ---- 7. a resume with another number of processes is refused --------------------------------------------

def test_resume_with_another_world_size_is_refused_unless_accepted(tiny_paths, tmp_path):
    out = tmp_path / "run"
    train.train(train.parse_args(train_args(tiny_paths, out, max_steps=4, stop_after=2)))
    state_path = out / "checkpoint" / "train_state.pt"
    state = torch.load(state_path, weights_only=True)
    torch.save({**state, "processes": 8}, state_path)              # as if it had run under torchrun x 8
    with pytest.raises(UsageError, match=r"trained with 8 processes \(total batch 2 x 8 x 1 = 16\).*--change_processes=1 "
                                         r"\(and, to keep the total batch, --grad_accum=8\)"):
        train.train(train.parse_args([f"--resume={out}"]))
    train.train(train.parse_args([f"--resume={out}", "--change_processes=1", "--grad_accum=8"]))
    assert json.load(open(out / "checkpoint" / "progress.json"))["step"] == 4


# ---- 8. bad label maps are found before step 1 --------------------------------------------------------------

def test_bad_label_maps_are_listed_before_training(tiny_paths, tmp_path):
    root = tmp_path / "folder"
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        os.makedirs(root / "images" / split)
        os.makedirs(root / "masks" / split)
    (root / "classes.txt").write_text("cat\ndog\n")
    for i in range(5):
        Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8)).save(root / "images" / "train" / f"{i}.png")
        mask = rng.integers(0, 2, (16, 16)).astype(np.uint8)
        if i == 1:
            mask = mask[:8]                                             # wrong size
        if i == 2:
            mask[0, 0] = 7                                              # not a class
        img = Image.fromarray(mask)
        if i == 3:
            img = img.convert("RGB")                                    # three channels
        img.save(root / "masks" / "train" / f"{i}.png")
    with pytest.raises(Exception, match=r"3 bad label maps") as e:
        train.train(train.parse_args(train_args(tiny_paths, tmp_path / "run", dataset="folder", data_root=root)))
    for name in ("1.png", "2.png", "3.png"):
        assert name in str(e.value)
    assert not os.path.isdir(tmp_path / "run" / "checkpoint")


# ---- 9. a checkpoint with missing tensors does not load -------------------------------------------------------

def test_missing_tensors_in_a_checkpoint_are_an_error(ckpt):
    tuned = load_file(ckpt / "digseg.safetensors")
    gone = sorted(tuned)[:3]
    save_file({k: v for k, v in tuned.items() if k not in gone}, ckpt / "digseg.safetensors")
    with pytest.raises(WeightsError, match=r"3 trained tensors missing \(trainable=all\)"):
        DiGSeg.from_checkpoint(ckpt)


# ---- 10. toy.py follows its step flags -------------------------------------------------------------------------

def test_toy_rebuilds_a_stage_whose_settings_changed(tmp_path, monkeypatch):
    """A new step count rebuilds its stage and the ones after it; so does a new U-Net shape, which
    stage 1 saves beside the VAE (an old world would otherwise fine-tune the old shape)."""
    import dataclasses
    from toyworld import world as toy
    out = str(tmp_path / "toy")
    vae_file = os.path.join(out, "sd2", "vae", "diffusion_pytorch_model.safetensors")
    ckpt = toy.build_world(out, vae_steps=2, clip_steps=2, train_steps=2)
    vae_before = os.path.getmtime(vae_file)
    assert json.load(open(os.path.join(ckpt, "progress.json")))["step"] == 2
    toy.build_world(out, vae_steps=2, clip_steps=2, train_steps=3)
    assert json.load(open(os.path.join(ckpt, "progress.json")))["step"] == 3
    assert os.path.getmtime(vae_file) == vae_before
    narrower = dataclasses.replace(toy.TOY_UNET, block_out_channels=(16, 32), norm_num_groups=8)
    monkeypatch.setattr(toy, "TOY_UNET", narrower)
    toy.build_world(out, vae_steps=2, clip_steps=2, train_steps=3)
    assert os.path.getmtime(vae_file) != vae_before
    assert json.load(open(os.path.join(out, "sd2", "unet", "config.json")))["block_out_channels"] == [16, 32]
    assert json.load(open(os.path.join(ckpt, "..", "toy_stage.json")))["unet"] == [16, 32]


def test_toy_precision_follows_the_cpu_and_is_part_of_the_stage_records(tmp_path, monkeypatch):
    """bf16 only where the CPU computes it natively (emulated it is far slower than fp32); the
    fine-tuning's precision is recorded, so a DiGSeg trained in fp32 is retrained when bf16 is
    asked for, on the same VAE (the pretraining stages are fp32 on every CPU)."""
    from toyworld import world as toy
    from launch import cpu_has_native_bf16
    native = cpu_has_native_bf16()
    monkeypatch.setattr(toy.torch.cuda, "is_available", lambda: False)
    assert toy.default_dtype() == ("bf16" if native else "fp32")
    monkeypatch.setattr(toy, "cpu_has_native_bf16", lambda: False)
    assert toy.default_dtype() == "fp32"
    out = str(tmp_path / "toy")
    vae_file = os.path.join(out, "sd2", "vae", "diffusion_pytorch_model.safetensors")
    ckpt = toy.build_world(out, vae_steps=2, clip_steps=2, train_steps=2)
    assert "dtype" not in json.load(open(os.path.join(out, "sd2", "toy_stage.json")))
    assert json.load(open(os.path.join(ckpt, "settings.json")))["dtype"] == "fp32"
    if not native:
        return                                   # bf16 emulated: too slow for the suite
    vae_before = os.path.getmtime(vae_file)
    monkeypatch.setattr(toy, "cpu_has_native_bf16", lambda: True)
    toy.build_world(out, vae_steps=2, clip_steps=2, train_steps=2)
    assert os.path.getmtime(vae_file) == vae_before
    assert json.load(open(os.path.join(ckpt, "settings.json")))["dtype"] == "bf16"
    assert json.load(open(os.path.join(ckpt, "..", "toy_stage.json")))["dtype"] == "bf16"


def test_every_setting_of_every_script_has_its_help_in_one_place():
    """One flag mechanism: each script's settings are a dataclass whose every field carries its
    help as a comment (in the script or in the base it extends: DiGSegConfig, launch.Inference)."""
    import bench
    import toy
    from launch import field_comments
    for script in (train, evaluation, sample, toy, bench):
        comments = field_comments(script.Settings)
        missing = [f.name for f in dataclasses.fields(script.Settings) if f.name not in comments]
        assert not missing, (script.__name__, missing)
    from digseg import DiGSegConfig
    assert {f.name for f in dataclasses.fields(DiGSegConfig)} <= {f.name for f in dataclasses.fields(train.Settings)}


def test_bench_skips_emulated_bf16_and_prints_each_row_when_measured(monkeypatch, capsys):
    from benchmarks import timing as bench
    monkeypatch.setattr(bench, "cpu_has_native_bf16", lambda: False)
    monkeypatch.delenv("BENCH_CPU_BF16", raising=False)
    assert list(bench.cpu_dtypes()) == ["fp32"] and "BENCH_CPU_BF16=1 runs them" in capsys.readouterr().out
    monkeypatch.setenv("BENCH_CPU_BF16", "1")
    assert list(bench.cpu_dtypes()) == ["fp32", "bf16"]
    bench.print_header("t")
    bench.compare("row one", lambda: torch.ones(2), lambda: torch.ones(2) * 1.5, "fp32")
    assert capsys.readouterr().out.splitlines()[-1].startswith("row one")          # printed before the next row
