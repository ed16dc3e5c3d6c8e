"""The toy studies (python toy.py --study=...): the paper's premise and the e2e objective at toy
scale, where command 1's mIoU goes on the way to the VAE's ceiling (toyworld/ceiling.py), and the
README's picture."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

import data
from digseg import DiGSeg
from model.diffusion import ddim_sample, ddim_timesteps
from model.files import write_text_atomic
from plot import image_grid, line_plot
from toyworld.cells import Cells
from toyworld.ceiling import ceiling_figure, error_budget, vae_ceiling
from toyworld.pretrain import log
from toyworld.world import ROOT, build_bases, build_prior, build_world, pretraining_record


STUDY_SCENES = (50, 200, 1000, 20000)            # labelled training scenes: the paper's Fig. 6 fractions in small


# The prior study's table (docs/results.md) was measured with half of the samples at t = T-1, in
# fp32, on whole 64 px scenes; pinned here, so that its cached runs and new ones agree whatever
# the preset and the CPU say.
STUDY_T_MAX_SHARE = 0.5
STUDY_DTYPE = "fp32"
STUDY_SIZE = 64
STUDY_RESOLUTION = 64                            # its scenes segmented at their own size


# How every study cell is scored: one member, one trailing step, as command 1 scores (a cell's
# settings record it, so a change here makes new cells).
STUDY_EVAL = ("--ensemble=1", "--steps=1", "--spacing=trailing")


def train_and_eval(run, train_flags, val_images, env=None):
    """One cell's work: train.py into `run`, then eval.py of its checkpoint on the first val_images
    toy validation scenes, with their output in <run>/log.txt -> (mIoU, training seconds)."""
    os.makedirs(run, exist_ok=True)
    with open(os.path.join(run, "log.txt"), "w") as f:
        start, seconds = time.time(), None
        for script, argv in (("train.py", ["--preset=toy", f"--out_dir={run}", "--overwrite=1", *train_flags]),
                             ("eval.py", [f"--checkpoint={run}/checkpoint", "--dataset=toy", "--proposals=0", *STUDY_EVAL,
                                          f"--limit={val_images}", f"--out={run}/eval"])):
            if subprocess.run([sys.executable, os.path.join(ROOT, script), *argv], env=env, stdout=f,
                              stderr=subprocess.STDOUT).returncode != 0:
                raise SystemExit(f"toy: {script} of {run} failed; its log: {run}/log.txt")
            seconds = seconds or time.time() - start
    with open(os.path.join(run, "eval", "metrics_main.json")) as f:
        return json.load(f)["miou_gt"], round(seconds, 1)


def study_prior(out, args):
    """The paper's premise at toy scale: DiGSeg fine-tuned from the text-to-image U-Net ("prior")
    vs from scratch, at equal steps, on 50 / 200 / 1000 / all labelled scenes, study_seeds seeds
    each; and App. A.2's --trainable=paper vs all on both. Each finished cell goes to the results
    file (toyworld/cells.py) and is not run again. Writes <out>/prior/results.json and mIoU.png."""
    sd2_dir, clip_dir = build_bases(out, args.vae_steps, args.clip_steps)   # command 1's world
    world = pretraining_record(args.vae_steps, args.clip_steps, args.prior_steps)
    bases = {"scratch": sd2_dir, "prior": build_prior(out, sd2_dir, clip_dir, world)}
    folder, cells = os.path.join(out, "prior"), Cells(args.study_cells, ROOT)

    def finetune(init, scenes_, seed, trainable="all"):
        cell = f"{init}-{scenes_}-{trainable}"
        settings = {"steps": args.study_steps, "scenes": scenes_, "val_images": args.val_images, "world": world,
                    "eval": " ".join(STUDY_EVAL),
                    "t_max_share": STUDY_T_MAX_SHARE, "dtype": STUDY_DTYPE, "size": STUDY_SIZE,
                    "resolution": STUDY_RESOLUTION}
        done = cells.get("prior", cell, seed, settings)
        if done is None:
            miou, seconds = train_and_eval(
                os.path.join(folder, f"{cell}-seed{seed}"),
                [f"--sd2={bases[init]}", f"--clip={clip_dir}", f"--max_steps={args.study_steps}",
                 f"--fraction={scenes_ / 20000}", f"--seed={seed}", f"--trainable={trainable}", "--log_every=1000",
                 f"--t_max_share={STUDY_T_MAX_SHARE}", f"--dtype={STUDY_DTYPE}", f"--size={STUDY_SIZE}",
                 f"--resolution={STUDY_RESOLUTION}"],
                args.val_images)
            done = cells.add("prior", cell, seed, settings, miou=miou, train_seconds=seconds)
            log(f"prior study: {cell} seed {seed}: mIoU {miou:.4f} (appended to {args.study_cells})")
        return done["miou"]

    seeds = range(args.study_seeds)
    results = {"scenes": list(STUDY_SCENES), "steps": args.study_steps, "val_images": args.val_images}
    for init in ("scratch", "prior"):
        results[init] = [[finetune(init, n, seed) for seed in seeds] for n in STUDY_SCENES]
        log(f"{init}: " + ", ".join(f"{n} scenes {np.mean(r):.3f}" for n, r in zip(STUDY_SCENES, results[init])))
    results["paper_set"] = {init: [finetune(init, STUDY_SCENES[-1], seed, "paper") for seed in seeds]
                            for init in ("scratch", "prior")}
    os.makedirs(folder, exist_ok=True)
    write_text_atomic(os.path.join(folder, "results.json"), json.dumps(results, indent=2))
    series = {}
    for init in ("scratch", "prior"):
        runs = np.array(results[init])                  # (scenes, seeds)
        for what, values in (("mean", runs.mean(1)), ("worst seed", runs.min(1)), ("best seed", runs.max(1))):
            series[f"{init}: {what}"] = (np.log10(STUDY_SCENES).tolist(), values.tolist())
    line_plot(os.path.join(folder, "mIoU.png"), series, ylabel="toy val mIoU",
              xlabel="log10 of the labelled scenes (" + ", ".join(map(str, STUDY_SCENES)) + ")",
              title=f"scratch vs text-to-image prior, {args.study_steps} steps, {len(seeds)} seeds")
    log(f"paper set (App. A.2) on all scenes: scratch {results['paper_set']['scratch']}, "
        f"prior {results['paper_set']['prior']}; results in {folder}/results.json and mIoU.png")
    return results


# ---- beyond the paper: the e2e objective at toy scale (--study=e2e) ---------------------------------

E2E_STEP_COST = 1.84        # an e2e step / a diffusion step at the toy preset (bench.py --only=e2e; docs/results.md)
E2E_SCENES = (20000, 200)   # labelled training scenes: all of them, and few
E2E_RESOLUTION = 128        # the working size its cells are scored at: command 1's (train.py's toy preset)
# The rows: (name, what it is, train.py flags, base, share of the step budget, budgets). Each row runs
# at the study's step budget N ("steps"); the e2e and ontop rows also at the e2e steps that cost what
# N diffusion steps cost ("time": equal wall time, E2E_STEP_COST). "ontop" fine-tunes the preset's run
# of half the budget ("preset-half") end to end for the other half, Garcia et al.'s "E2E FT on top".
# Pixel MSE runs on all scenes only. "c1" is command 1's budget (train_steps diffusion steps, or the
# e2e steps that cost as much: "c1time"), on all scenes: the goal of an e2e toy val mIoU >= 0.85.
E2E_ROWS = [
    ("paper", "the paper's objective,\nuniform t", ["--t_max_share=0"], "scratch", 1.0, ("steps",)),
    ("preset", "the toy preset,\n3/4 at t = T-1", [], "scratch", 1.0, ("steps", "c1")),
    ("e2e", "e2e from scratch", ["--objective=e2e"], "scratch", 1.0, ("steps", "time", "c1time")),
    ("e2e-mse", "e2e, pixel MSE", ["--objective=e2e", "--mask_loss=mse"], "scratch", 1.0, ("steps",)),
    ("prior-e2e", "e2e from the\ntext-to-image prior", ["--objective=e2e"], "prior", 1.0, ("steps",)),
    ("ontop", "e2e on top of\nthe preset (1/2 + 1/2)", ["--objective=e2e"], "preset-half", 0.5, ("steps", "time")),
]


def study_e2e(out, args):
    """Beyond the paper, at toy scale: the e2e objective (e2e.py) against the paper's, study_seeds
    seeds each, on all labelled scenes and on 200, at equal steps and at equal wall time; the error budget
    of the best of each kind (where the mIoU between them and the VAE's ceiling goes); overlays of
    each row's predictions. Runs study_jobs trainings at a time, one CPU thread each. Writes
    <out>/e2e/results.json, e2e.png, predictions.png and errors.json."""
    from concurrent.futures import ThreadPoolExecutor
    sd2_dir, clip_dir = build_bases(out, args.vae_steps, args.clip_steps)
    world = pretraining_record(args.vae_steps, args.clip_steps, args.prior_steps)
    bases = {"scratch": sd2_dir}                      # and "prior", built below if a cell to run needs it
    folder, N, cells = os.path.join(out, "e2e"), args.e2e_steps, Cells(args.study_cells, ROOT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if args.study_jobs > 1 else None

    def run_dir(row, scenes, seed, budget):
        return os.path.join(folder, f"{row}-{budget}-{scenes}-seed{seed}")

    def settings_of(job):
        row, flags, base, steps, scenes, seed, budget = job
        return {"steps": steps, "scenes": scenes, "flags": flags, "base": base, "val_images": args.val_images,
                "world": world, "dtype": "fp32", "eval": " ".join(STUDY_EVAL), "resolution": E2E_RESOLUTION, **({"first": N // 2} if base == "preset-half" else {})}

    def cell_of(job):                                 # the name a job's cell has in the results file
        row, _, _, _, scenes, _, budget = job
        return f"{row}-{budget}-{scenes}"

    def done(job):
        return cells.get("e2e", cell_of(job), job[5], settings_of(job))

    def finetune(job):
        row, flags, base, steps, scenes, seed, budget = job
        cell = cell_of(job)
        if done(job) is not None:
            return
        half = run_dir("preset-half", scenes, seed, "steps")
        if base == "preset-half" and not os.path.isdir(os.path.join(half, "checkpoint")):
            train_and_eval(half, [f"--sd2={bases['scratch']}", f"--clip={clip_dir}", f"--max_steps={N // 2}",
                                  f"--fraction={scenes / 20000}", f"--seed={seed}", "--dtype=fp32", f"--resolution={E2E_RESOLUTION}"],
                           args.val_images, env)
        init = [f"--init={half}/checkpoint"] if base == "preset-half" else [f"--sd2={bases[base]}"]
        miou, seconds = train_and_eval(run_dir(row, scenes, seed, budget),
                                       [*init, f"--clip={clip_dir}", f"--max_steps={steps}", f"--fraction={scenes / 20000}",
                                        f"--seed={seed}", "--log_every=200", "--dtype=fp32", f"--resolution={E2E_RESOLUTION}", *flags],
                                       args.val_images, env)
        cells.add("e2e", cell, seed, settings_of(job), miou=miou, train_seconds=seconds,
                  steps=steps + (N // 2 if base == "preset-half" else 0))
        log(f"e2e study: {cell} seed {seed}: mIoU {miou:.4f} (appended to {args.study_cells})")

    pairs = [(scenes, seed) for scenes in E2E_SCENES for seed in range(args.study_seeds)]
    wave1 = [("preset-half", [], "scratch", N // 2, scenes, seed, "steps") for scenes, seed in pairs]
    wave2, jobs_of = [], {}
    for row, _, flags, base, share, budgets in E2E_ROWS:
        for budget in budgets:
            steps = round((args.train_steps if budget.startswith("c1") else N) * share /
                          (E2E_STEP_COST if budget.endswith("time") else 1))
            jobs = [(row, flags, base, steps, scenes, seed, budget) for scenes, seed in pairs
                    if scenes == E2E_SCENES[0] or (row != "e2e-mse" and not budget.startswith("c1"))]
            jobs_of.update({(row, budget, j[4]): [k for k in jobs if k[4] == j[4]] for j in jobs})
            (wave2 if base == "preset-half" else wave1).extend(jobs)
    if args.study_rows:                               # a share of the study: the rest waits for a later run
        known = {f"{j[0]}-{j[6]}" for j in wave1 + wave2}
        rows = set(args.study_rows.split(","))
        if rows - known:
            raise SystemExit(f"--study_rows: unknown {', '.join(sorted(rows - known))}; valid: {', '.join(sorted(known))}")
        wave1, wave2 = ([j for j in w if f"{j[0]}-{j[6]}" in rows] for w in (wave1, wave2))
    todo = [j for j in wave1 + wave2 if done(j) is None]
    if any(j[2] == "prior" for j in todo):
        bases["prior"] = build_prior(out, sd2_dir, clip_dir, world)
    log(f"e2e study: {len(wave1) + len(wave2)} cells, {len(wave1) + len(wave2) - len(todo)} already in "
        f"{args.study_cells}; {len(todo)} to run, {args.study_jobs} at a time")
    for wave in (wave1, wave2):
        with ThreadPoolExecutor(args.study_jobs) as pool:
            list(pool.map(finetune, wave))

    def score(row, scenes, budget):
        jobs = jobs_of.get((row, budget, scenes))
        if not jobs:
            return None
        recs = [r for r in map(done, jobs) if r is not None]    # the seeds done so far
        if not recs:
            return None
        miou = [r["miou"] for r in recs]
        first = N // 2 if row == "ontop" else 0           # the preset's steps it started from
        return {"miou": miou, "mean": float(np.mean(miou)), "steps": recs[0]["steps"],
                "steps_on_top": recs[0]["steps"] - first if first else None,
                "train_seconds": [r["train_seconds"] for r in recs], "commits": sorted({r["commit"] for r in recs})}

    rows = {f"{row}-{budget}": {str(n): score(row, n, budget) for n in E2E_SCENES}
            for row, *_ in E2E_ROWS for budget in ("steps", "time", "c1", "c1time")}
    rows = {k: v for k, v in rows.items() if any(v.values())}
    seeds = max((len(c["miou"]) for v in rows.values() for c in v.values() if c), default=0)   # the most any row has
    results = {"steps": N, "e2e_step_cost": E2E_STEP_COST, "val_images": args.val_images, "seeds": seeds, "rows": rows}
    on_all = {k: v[str(E2E_SCENES[0])] for k, v in results["rows"].items() if v[str(E2E_SCENES[0])]}
    best = {kind: max((k for k in on_all if k.startswith(prefix)), key=lambda k: on_all[k]["mean"])
            for kind, prefix in (("diffusion", ("paper", "preset")), ("e2e", ("e2e", "prior", "ontop")))
            if any(k.startswith(prefix) for k in on_all)}
    results["errors"] = {}
    for kind, key in best.items():                    # seed 0 of the best row of each kind, on all scenes
        row, budget = key.rsplit("-", 1)
        ckpt = os.path.join(run_dir(row, E2E_SCENES[0], 0, budget), "checkpoint")
        if os.path.isdir(ckpt):                       # cells from another machine leave no checkpoint here
            results["errors"][kind] = error_budget(ckpt, args.val_images)
        else:
            log(f"e2e study: no error budget of {key}: its seed-0 checkpoint {ckpt} is not on this machine")
    results["errors"]["vae_ceiling"] = vae_ceiling(sd2_dir, args.val_images)
    os.makedirs(folder, exist_ok=True)
    write_text_atomic(os.path.join(folder, "results.json"), json.dumps(results, indent=2))
    e2e_figures(folder, results, run_dir)
    for key, row in results["rows"].items():
        log(f"{key:18s} " + "  ".join(f"{n} scenes: {row[str(n)]['mean']:.3f} ({', '.join(f'{m:.3f}' for m in row[str(n)]['miou'])}; "
                                      f"{row[str(n)]['steps']} steps)" for n in E2E_SCENES if row[str(n)]))
    log(f"results in {folder}/results.json, e2e.png, predictions.png")
    return results


def e2e_figures(folder, results, run_dir):
    """e2e.png: each row's mean mIoU (whiskers: worst and best seed) by labelled scenes; predictions.png:
    four validation scenes segmented by seed 0 of each row on all scenes, under the ground truth."""
    from plot import bar_plot, overlay
    keys = list(results["rows"])
    what = {row: text for row, text, *_ in E2E_ROWS}
    when = {"steps": "", "time": "\n(equal time)", "c1": "\n(command 1)", "c1time": "\n(command 1's time)"}
    labels = [what[k.rsplit("-", 1)[0]] + when[k.rsplit("-", 1)[1]] for k in keys]
    series = {}
    for n in E2E_SCENES:
        cells = [results["rows"][k][str(n)] for k in keys]
        series[f"{n} labelled scenes"] = [(c["mean"], min(c["miou"]), max(c["miou"])) if c else (float("nan"),) * 3
                                          for c in cells]
    bar_plot(os.path.join(folder, "e2e.png"), labels, series,
             title=f"toy val mIoU, E = 1, S = 1, {results['seeds']} seed{'s' * (results['seeds'] > 1)}; "
                   f"{results['steps']} steps, their time, or command 1's",
             ylabel="mIoU", size=(max(760, 110 * len(keys)), 440))
    val = data.build("toy", "", "val", evaluation=True)
    scenes = [val[i] for i in range(4)]
    tiles, names = [], list(data.TOY_CLASSES)
    here = lambda k: os.path.join(run_dir(k.rsplit("-", 1)[0], E2E_SCENES[0], 0, "steps"), "checkpoint")
    shown = [k for k in keys if k.endswith("-steps") and os.path.isdir(here(k))]   # checkpoints on this machine
    for k in ["truth"] + shown:
        if k == "truth":
            tiles += [np.asarray(overlay(data.tensor_to_pil(x), y, names).resize((192, 128))) for x, y, _ in scenes]
            continue
        model = DiGSeg.from_checkpoint(here(k)).eval()
        for x, _, _ in scenes:
            labels_ = aggregate_toy(model, x)
            tiles.append(np.asarray(overlay(data.tensor_to_pil(x), labels_, names).resize((192, 128))))
    image_grid(os.path.join(folder, "predictions.png"), tiles,
               [f"{k}" for k in ["ground truth"] + shown for _ in scenes], cols=len(scenes), cell=192)


def aggregate_toy(model, image, tau_bg=0.5):
    """The toy's labels of one scene, every class run (E = 1, S = 1)."""
    from digseg import aggregate
    return aggregate(model.segment(image, list(data.TOY_CLASSES), ensemble=1, steps=1), tau_bg)


# ---- where the rest of the way to the ceiling goes (--study=ceiling) ---------------------------------

def study_ceiling(out, args):
    """Command 1's checkpoint (built, as command 1 builds it, if missing) and, when the e2e study has
    run here, its e2e model at command 1's time (seed 0, all scenes), against the VAE's ceiling: the
    error budget of each (toyworld/ceiling.py) on val_images scenes. Writes <out>/ceiling/results.json
    and ceiling.png (recall by depth inside the shape, recall per class)."""
    ckpt = build_world(out, args.vae_steps, args.clip_steps, args.train_steps, 0, args.seed, args.dtype)
    models = {"diffusion": ckpt}
    e2e_ckpt = os.path.join(out, "e2e", f"e2e-c1time-{E2E_SCENES[0]}-seed0", "checkpoint")
    if os.path.isdir(e2e_ckpt):
        models["e2e"] = e2e_ckpt
    else:
        log(f"ceiling study: no e2e model at {e2e_ckpt} (python toy.py --study=e2e --study_rows=e2e-c1time trains it); "
            "command 1's checkpoint only")
    budgets = {}
    for name, path in models.items():
        log(f"ceiling study: the error budget of {path} on {args.val_images} scenes")
        budgets[name] = error_budget(path, args.val_images)
    side = DiGSeg.config_of(ckpt).resolution                      # command 1's working size first
    ceiling = vae_ceiling(os.path.join(out, "sd2"), args.val_images, scales=tuple(dict.fromkeys((side // data.TOY_SIZE, 1))))
    folder = os.path.join(out, "ceiling")
    os.makedirs(folder, exist_ok=True)
    write_text_atomic(os.path.join(folder, "results.json"), json.dumps({**budgets, "ceiling": ceiling}, indent=2))
    ceiling_figure(os.path.join(folder, "ceiling.png"), budgets, ceiling)
    for name, b in {**budgets, "ceiling": ceiling}.items():
        by_side = ", ".join(f"{k} px {v:.3f}" for k, v in b["miou_by_long_side"].items())
        log(f"{name:9s} mIoU by long side: {by_side}; recall by depth "
            + " ".join(f"{k}: {v:.3f}" for k, v in b["recall_by_depth"].items())
            + ("" if name == "ceiling" else f"; best tau_bg {max(b['miou_by_tau_bg'].values()):.3f}; "
               f"absent classes removed {b['miou_absent_classes_removed']:.3f}"))
    log(f"results in {folder}/results.json and ceiling.png")
    return budgets, ceiling


@torch.no_grad()
def readme_figure(ckpt, path, scenes=(7, 12)):
    """The README's picture (docs/toy.png): for validation scenes, the image, the ground truth, the
    starting noise z_T as the decoder sees it, the mask M_c after the one trailing DDIM step for one
    class of the scene, and the segmentation of every class (argmax, background below tau_bg)."""
    from digseg import prepare_image, size_multiple
    from plot import label_png
    model, val = DiGSeg.from_checkpoint(ckpt).eval(), data.build("toy", "", "val", evaluation=True)
    names, tiles, labels = list(data.TOY_CLASSES), [], []
    for i in scenes:
        image, gt, _ = val[i]
        c = int(gt[gt >= 0].mode().values)                                  # the scene's largest shape
        x = prepare_image(image, model.cfg.resolution, size_multiple(model.vae, model.unet))[0]
        z_x = model.encode_image(x)
        z_T = torch.randn(z_x.shape, generator=torch.Generator().manual_seed(0))
        ctx = model.context([model.cfg.prompt_template.format(names[c])])
        z0 = ddim_sample(model.predictor(z_x, ctx), z_T, ddim_timesteps(1), model.alphas_cumprod, model.cfg.target)
        pred = aggregate_toy(model, image)
        show = lambda labels_: np.asarray(label_png(labels_, len(names)).convert("RGB"))      # class colours, black
        tiles += [((image.permute(1, 2, 0) + 1) / 2).numpy(), show(gt), model.decode_mask(z_T)[0].numpy(),
                  model.decode_mask(z0)[0].numpy(), show(pred)]
        labels += ["image", "ground truth: " + ", ".join(names[k] for k in gt.unique().tolist() if k >= 0),
                   "z_T ~ N(0, I), decoded", f"M_{names[c]} after 1 step", "prediction, 6 classes"]
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    image_grid(path, tiles, labels, cols=5, cell=160)
    log(f"wrote {path}")
