"""Building the toy world, stage by stage: the pretrained pieces (toyworld/pretrain.py) saved as a
diffusers SD2 folder and an HF CLIP folder, then DiGSeg fine-tuned on top by running train.py with
its toy preset. Each stage records its settings in <its folder>/toy_stage.json and is skipped when
they match; a stage whose settings changed is rebuilt, and the stages after it."""
import json
import os
import subprocess
import sys

import torch

import data
from digseg import DiGSeg
from launch import cpu_has_native_bf16
from model.unet import UNet2DCondition
from model.files import file_digest, write_text_atomic
from model.weights import load_clip, load_sd2, save_clip_folder, save_sd2_folder
from plot import image_grid, line_plot
from toyworld.pretrain import (TOY_UNET, TOY_VAE, VAE_BATCH, log, pretrain_clip, pretrain_prior, pretrain_vae,
                               prior_samples)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))     # the repository: train.py, eval.py


def default_dtype():
    """Stage 3's precision: bf16 where train.py will run on a GPU (it picks CUDA when there is one)
    or on a CPU that computes bf16 natively; fp32 on other CPUs, which emulate bf16 slowly."""
    return "bf16" if torch.cuda.is_available() or cpu_has_native_bf16() else "fp32"

QUICK = dict(vae_steps=40, clip_steps=40, train_steps=40)     # the tests and notebooks under test


def stage_is_built(folder, settings):
    """Whether `folder` holds a stage built with exactly these settings (toy_stage.json)."""
    path = os.path.join(folder, "toy_stage.json")
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        built = json.load(f)
    if built != settings:
        log(f"{folder} was built with {built}; rebuilding it with {settings}")
    return built == settings


def mark_built(folder, settings):
    write_text_atomic(os.path.join(folder, "toy_stage.json"), json.dumps(settings))


def run_script(script, *flags):
    """Run train.py or eval.py as its own process (scripts do not import each other)."""
    cmd = [sys.executable, os.path.join(ROOT, script), *flags]
    code = subprocess.run(cmd).returncode
    if code != 0:
        raise SystemExit(f"toy: {' '.join(cmd)} failed with exit code {code} (its error is above)")


def build_world(out="out/toy", vae_steps=1500, clip_steps=600, train_steps=1600, prior_steps=0, seed=0, dtype=None):
    """Stages 1-3, each skipped when built with the same settings. prior_steps > 0: stage 2b, and
    DiGSeg fine-tunes the text-to-image U-Net instead of one from scratch. dtype: fp32 | bf16 of
    stage 3 (None: default_dtype()). Returns the DiGSeg checkpoint folder."""
    dtype = dtype or default_dtype()
    sd2_dir, clip_dir = build_bases(out, vae_steps, clip_steps)
    run_dir = os.path.join(out, "digseg")
    pretraining = pretraining_record(vae_steps, clip_steps, prior_steps)
    stage3 = {**pretraining, "train_steps": train_steps, "seed": seed, "dtype": dtype,
              "train.py": file_digest(os.path.join(ROOT, "train.py"))[:16]}   # its toy preset changes too
    base = build_prior(out, sd2_dir, clip_dir, pretraining) if prior_steps else sd2_dir
    if not stage_is_built(run_dir, stage3):
        log(f"stage 3/4: fine-tuning DiGSeg from {'the text-to-image U-Net' if prior_steps else 'scratch'}: "
            f"python train.py --preset=toy --dtype={dtype}")
        run_script("train.py", "--preset=toy", f"--max_steps={train_steps}", f"--sd2={base}", f"--clip={clip_dir}",
                   f"--out_dir={run_dir}", f"--seed={seed}", f"--dtype={dtype}", "--overwrite=1")
        mark_built(run_dir, stage3)
    return os.path.join(run_dir, "checkpoint")


def build_bases(out, vae_steps, clip_steps):
    """Stages 1 (the VAE) and 2 (CLIP), the pretrained pieces, in fp32: -> (SD2 folder, CLIP folder)."""
    sd2_dir, clip_dir = os.path.join(out, "sd2"), os.path.join(out, "clip")
    stage1, stage2 = {"vae_steps": vae_steps, "vae_batch": VAE_BATCH, **shapes()}, {"clip_steps": clip_steps}
    if not stage_is_built(sd2_dir, stage1):
        log("stage 1/4: pretraining the toy VAE on images and masks")
        vae, curve = pretrain_vae(vae_steps)
        unet = UNet2DCondition(TOY_UNET)          # from scratch; stage 2b (--prior=1) pretrains one
        save_sd2_folder(sd2_dir, unet, vae, prediction="v_prediction")
        line_plot(os.path.join(out, "vae_loss.png"), {"vae": (range(len(curve)), curve)}, title="toy VAE", logy=True)
        mark_built(sd2_dir, stage1)
    if not stage_is_built(clip_dir, stage2):
        log("stage 2/4: pretraining the toy CLIP (sigmoid image-text loss)")
        clip, vocab_dir, threshold = pretrain_clip(out, clip_steps)
        save_clip_folder(clip_dir, clip, vocab_dir)
        with open(os.path.join(clip_dir, "toy_threshold.txt"), "w") as f:   # for class proposals (App. A.3)
            f.write(f"{threshold}\n")
        mark_built(clip_dir, stage2)
    return sd2_dir, clip_dir


def shapes():
    """The toy VAE's and U-Net's widths: stage 1 saves both (the U-Net from scratch), so a new shape
    rebuilds the world, and the study cells (their settings hold the world's record) start anew."""
    return {"vae": list(TOY_VAE.block_out_channels), "unet": list(TOY_UNET.block_out_channels)}


def pretraining_record(vae_steps, clip_steps, prior_steps):
    """The settings of stages 1, 2 and 2b: stage 2b's record, and part of stage 3's, so that a
    stage is rebuilt when one it is built on changes."""
    return {"vae_steps": vae_steps, "vae_batch": VAE_BATCH, **shapes(), "clip_steps": clip_steps,
            "prior_steps": prior_steps}


def build_prior(out, sd2_dir, clip_dir, settings):
    """Stage 2b: the text-to-image U-Net beside the toy VAE in <out>/sd2-prior (a diffusers SD2
    folder, so DiGSeg loads it through the real loader and widens its conv_in), with a PNG grid of
    its samples and the toy CLIP's hit rate. Trained in fp32; rebuilt on a new VAE or CLIP (they
    are in `settings`). Returns the folder."""
    prior_dir = os.path.join(out, "sd2-prior")
    if stage_is_built(prior_dir, settings):
        return prior_dir
    log("stage 2b: pretraining the toy U-Net as a text-to-image generator (the generative prior)")
    sd, clip = load_sd2(sd2_dir), load_clip(clip_dir)
    unet, proj, curve = pretrain_prior(sd.vae, sd.vae_scale, clip, settings["prior_steps"])
    save_sd2_folder(prior_dir, unet, sd.vae, prediction="v_prediction")
    with open(os.path.join(clip_dir, "toy_threshold.txt")) as f:
        threshold = float(f.read())
    images, hit_rate = prior_samples(unet, proj, sd.vae, sd.vae_scale, clip, threshold)
    per_class = len(images) // len(data.TOY_CLASSES)
    image_grid(os.path.join(out, "prior_samples.png"), images,
               [f"a {c}." for c in data.TOY_CLASSES for _ in range(per_class)], cols=per_class, cell=96)
    line_plot(os.path.join(out, "prior_loss.png"), {"text-to-image": (range(len(curve)), curve)},
              title="toy U-Net as a text-to-image model", logy=True)
    log(f"text-to-image check: the toy CLIP finds the asked class in {hit_rate:.0%} of the generated scenes "
        f"(grid: {out}/prior_samples.png)")
    write_text_atomic(os.path.join(prior_dir, "prior_check.json"), json.dumps({"clip_hit_rate": hit_rate}))
    mark_built(prior_dir, settings)
    return prior_dir


def ensure():
    """For the notebooks: the toy world of DIGSEG_TOY_OUT (default out/toy), built if missing; with
    DIGSEG_TOY_QUICK=1 (the test suite) in a few seconds with few steps."""
    out = os.environ.get("DIGSEG_TOY_OUT", "out/toy")
    return build_world(out, **(QUICK if os.environ.get("DIGSEG_TOY_QUICK") == "1" else {}))


def notebook_world(real=None):
    """What a notebook works on -> dict(checkpoint, sd2, clip, dataset, data_root, out).

    real=None: the toy world (`ensure`). Your own: real=dict(checkpoint=a trained DiGSeg folder,
    dataset=a key of data.DATASETS or "folder", data_root=its folder); the SD2 and CLIP weights are
    the ones its digseg.json names. Figures go to <the run's folder>/../notebooks/."""
    if real is None:
        ckpt, dataset, root = ensure(), "toy", ""
    else:
        ckpt, dataset, root = real["checkpoint"], real.get("dataset", "folder"), real.get("data_root", "datasets")
    cfg = DiGSeg.config_of(ckpt)
    out = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(ckpt))), "notebooks")
    os.makedirs(out, exist_ok=True)
    return dict(checkpoint=ckpt, sd2=cfg.sd2, clip=cfg.clip, dataset=dataset, data_root=root, out=out)
