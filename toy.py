"""The toy world: the whole of DiGSeg trained and evaluated on a CPU in minutes.

    python toy.py                  # pretrain a tiny VAE and CLIP, fine-tune DiGSeg, segment, evaluate
    python toy.py --help

Stable Diffusion's VAE and CLIP were pretrained on web images before anyone segmented with
them. Here the same model classes, in tiny configurations, are pretrained on a procedural
world of coloured shapes (data/toy.py) and saved in the formats the real loaders read (a
diffusers SD2 folder, an HF CLIP folder with a BPE vocabulary trained by `tokenizers`): toyworld/.
Then DiGSeg is fine-tuned on top by running train.py with its `toy` preset -- the same digseg.py
and train.py as on A100s -- and evaluated by running eval.py on the toy validation split.

Each stage records its settings in <its folder>/toy_stage.json and is skipped when they match
(delete out/toy to start over); a stage whose settings changed is rebuilt, and the stages after it.
DIGSEG_TOY_QUICK=1 (the tests, and notebooks under test) builds a quick world with few steps.
--study=prior|e2e runs a study (toyworld/studies.py); its finished cells are appended to
docs/study_cells.jsonl, and a rerun, by anyone, carries on where that file ends. --study=ceiling
measures where command 1's mIoU goes on the way to the toy VAE's ceiling (toyworld/ceiling.py).

Precision: DiGSeg's fine-tuning, the longest stage, trains under bf16 autocast over fp32 weights,
as the paper's presets do, where bf16 is computed natively: on a GPU, or on a CPU with AVX512-BF16
or AMX (launch.cpu_has_native_bf16); there it is the faster choice. Elsewhere torch emulates bf16
far slower than fp32, so it trains in fp32. --dtype=fp32 or bf16 overrides the choice; it is part
of stage 3's record. The pretraining stages train in fp32 everywhere (docs/results.md).
"""
import json
import os
import sys
import time
from dataclasses import dataclass

from digseg import DiGSeg
from launch import POSITIVE, parse_settings, run
from toyworld.studies import readme_figure, study_ceiling, study_e2e, study_prior
from toyworld.world import build_world, default_dtype, log, run_script


@dataclass
class Settings:
    out: str = "out/toy"             # the world's folder: its stages, DiGSeg, the evaluation
    vae_steps: int = 1500            # stage 1: the toy VAE's steps
    clip_steps: int = 600            # stage 2: the toy CLIP's steps
    train_steps: int = 1600          # stage 3: DiGSeg's fine-tuning steps (train.py --preset=toy)
    prior: bool = False              # fine-tune the U-Net pretrained as a text-to-image model (stage 2b), not one from scratch
    prior_steps: int = 600           # stage 2b's steps (batch 32)
    val_images: int = 100            # validation scenes scored
    seed: int = 0                    # the fine-tuning seed (data order, classes, t and noise)
    dtype: str = "auto"              # of the fine-tuning; auto: bf16 on a GPU or on a CPU that computes it natively, else fp32
    study: str = ""                  # prior: scratch vs the text-to-image prior; e2e: the e2e objective; ceiling: command 1 vs the VAE's ceiling
    study_steps: int = 600           # --study=prior: fine-tuning steps per run
    study_seeds: int = 3             # fine-tuning seeds per study cell
    figure: str = ""                 # write the README's picture of the toy world (docs/toy.png) from its checkpoint
    e2e_steps: int = 600             # --study=e2e: each row's step budget (equal steps; its e2e rows also at equal time)
    study_jobs: int = 1              # --study=e2e: fine-tunings at a time (more than one: one CPU thread each)
    study_cells: str = "docs/study_cells.jsonl"   # the studies' finished cells, appended; a rerun skips them
    study_rows: str = ""             # --study=e2e: only these rows (row-budget, comma-separated, e.g. e2e-c1time); the rest later
    debug: bool = False              # show the traceback of an error


CHOICES = {"dtype": ("auto", "fp32", "bf16"), "study": ("", "prior", "e2e", "ceiling")}
RANGES = {k: POSITIVE for k in ("vae_steps", "clip_steps", "train_steps", "prior_steps", "val_images", "study_steps",
                                "study_seeds", "e2e_steps", "study_jobs")}


def main(argv=None):
    args = parse_settings(Settings, sys.argv[1:] if argv is None else argv, __doc__, CHOICES, RANGES)
    args.dtype = default_dtype() if args.dtype == "auto" else args.dtype
    t_start = time.time()
    if args.study:
        {"prior": study_prior, "e2e": study_e2e, "ceiling": study_ceiling}[args.study](args.out, args)
        log(f"study done in {(time.time() - t_start) / 60:.1f} min")
        return 0
    ckpt = build_world(args.out, args.vae_steps, args.clip_steps, args.train_steps, args.prior_steps * args.prior,
                       args.seed, args.dtype)
    side = DiGSeg.config_of(ckpt).resolution                # the working size: train.py's toy preset
    log(f"stage 4/4: segmenting and evaluating the validation split (E = 1, S = 1, trailing, at {side} px): python eval.py")
    run_script("eval.py", f"--checkpoint={ckpt}", "--dataset=toy", f"--limit={args.val_images}", "--proposals=0", "--ensemble=1",
               "--steps=1", "--spacing=trailing", f"--out={args.out}/eval", "--overlays=8")
    with open(os.path.join(args.out, "eval", "metrics_main.json")) as f:
        scores = json.load(f)
    log(f"toy val mIoU {scores['miou_gt']:.4f} (E=1, S=1 trailing, {side} px, {args.val_images} images) in "
        f"{(time.time() - t_start) / 60:.1f} min; overlays in {args.out}/eval/")
    if args.figure:
        readme_figure(ckpt, args.figure)
    log(f"next: python sample.py YOUR_IMAGES --checkpoint={ckpt} --classes=circle,square,triangle,star,ring,bar")
    return 0


if __name__ == "__main__":
    run(main)
