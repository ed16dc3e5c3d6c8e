"""Benchmark evaluation of DiGSeg (Sec. 4), and the paper's studies as commands.

    python eval.py --checkpoint=out/ade20k/checkpoint --dataset=ade150 --data_root=datasets/ADEChallengeData2016
    torchrun --nproc_per_node=8 eval.py ...                  # confusion matrices summed over ranks
    python eval.py ... --proposals=0                         # every class of the dataset, no CLIP proposals
    python eval.py ... --study=sweep                         # Table 6: E x S rows, mIoU and images/s
    python eval.py ... --study=ensemble                      # Fig. 7: E = 1, 2, 4, 8 at --steps (PNG)
    python eval.py ... --study=steps                         # Fig. 8: steps 1..50, trailing vs leading (PNG)
    python eval.py ... --study=tau                           # Fig. 3: binary IoU vs tau per class (PNG)
    python eval.py --study=fractions --runs=out/f1,out/f0.5 ... # Fig. 6: mIoU vs --fraction of each run (PNG)
    python eval.py --sd2=PATH --dataset=... --study=vae      # Table 7: the SD VAE (--sd2) on ground-truth masks

Results go to --out, by default out/eval/<run>-<checkpoint digest>/<dataset>-<split>/: one folder
per checkpoint *contents* and dataset. Interrupted runs resume: each rank saves its partial
confusion matrix every --save_every images, keyed by everything that determines the result (the
sha256 of the checkpoint's files, the base weights, dataset, split, data root, class list, the
images evaluated and every inference setting); a run whose key differs starts fresh, never mixes.

The metrics (both mIoU conventions, binary IoU/Dice) are in metrics.py.
"""
import hashlib
import itertools
import json
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

import data
from data import tensor_to_pil
from digseg import DiGSeg, aggregate, binary_mask, image_to_mask, mask_to_image
from launch import (DTYPES, INFERENCE_CHOICES, INFERENCE_RANGES, POSITIVE, Inference, UsageError, all_reduce_sum,
                    parse_settings, run, start_processes, stop_processes)
from model.checkpoint import digest as checkpoint_digest
from metrics import (binary_counts, confusion_matrix, miou, pooled_iou_dice, pooled_precision_recall_f1,
                     write_per_class_csv)
from model.files import file_digest, torch_save_atomic, write_text_atomic
from model.weights import load_sd2
from plot import line_plot, overlay, side_by_side

TAUS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)     # --study=tau (Fig. 3)
ENSEMBLES = (1, 2, 4, 8)                                  # --study=ensemble (Fig. 7)
SWEEP = [(1, 1, "trailing"), (1, 2, "trailing"), (4, 2, "trailing"), (8, 2, "trailing"), (20, 50, "leading")]
KEYED = ("protocol", "ensemble", "steps", "spacing", "eta", "seed", "tau", "tau_bg", "proposals", "proposal_clip",
         "tau_global", "tau_patch", "dtype")


# Evaluation protocols (--protocol; auto = by dataset): how an image meets the model. Scores are
# always computed at the label map's own size. Each one either reproduces a named reference or is ours:
#   long    ours, the paper's "inputs resized to 512 x 512" keeping the aspect ratio: the long side to
#           --resolution (the model's own default), padded to a multiple of 64
#   square  the paper's words read literally: every image resized to R x R, its aspect ratio lost,
#           and the masks resized back. Our guess at what the paper's own rows used (see below)
#   short   mmseg's ADE20K / COCO-Stuff test pipeline (open-mmlab/mmsegmentation,
#           configs/_base_/datasets/ade20k.py: img_scale (2048, 512), keep_ratio): the
#           short side to R = 512, the long side at most 4 R = 2048
#   san     SAN's (MendelXu/SAN, configs/Base-coco-stuff-164K-171.yaml: MIN_SIZE_TEST 640,
#           MAX_SIZE_TEST 2560), detectron2's ResizeShortestEdge: short side 640, long side at
#           most 2560, the whole image at once
#   catseg  CAT-Seg's (cvlab-kaist/CAT-Seg, eval.sh: TEST.SLIDING_WINDOW True;
#           cat_seg/cat_seg_model.py, inference_sliding_window): the image resized to 640 x 640
#           (aspect ratio lost), 384 px windows at stride 256, plus the whole image at 384; the
#           windows' mean and the whole image's output averaged
#   slide   ours, for the driving sets: full resolution in R x R windows at stride 2R/3, so that
#           1024 x 2048 frames are not shrunk to 256 x 512. mmseg tests Cityscapes at full
#           resolution too (configs/_base_/datasets/cityscapes.py: img_scale (2048, 1024),
#           keep_ratio), with each model's own window, cut to its 512 x 1024 training crops; no
#           reference uses square windows, which DiGSeg's square training crops ask for
# The paper compares with SAN, CAT-Seg and ODISE using their published numbers, each under its own
# protocol above (ODISE: short side 1024, not offered here); for its own rows it only says "resized
# to 512 x 512", the size SD2-base and its training crops have, so `square` is the most likely
# reading of what it ran, and `short` what the comparison's references would ask of it.
PROTOCOLS = {"ade150": "short", "ade847": "short", "pc59": "short", "pc459": "short", "cocostuff171": "short",
             "cityscapes19": "slide", "bdd100k": "slide"}
PROTOCOL_NAMES = ("long", "square", "short", "san", "catseg", "slide")


def window_starts(length, window, stride=None):
    """Start offsets of windows of `window` px covering `length` px, at `stride` (default 2/3 of a
    window); the last window ends at the edge."""
    if length <= window:
        return [0]
    stride = stride or max(1, round(window * 2 / 3))
    return sorted(set(range(0, length - window, stride)) | {length - window})


def resized(x, size):
    """(C, H, W) -> (C, h, w), bilinear, antialiased when shrinking."""
    shrink = size[0] < x.shape[1] or size[1] < x.shape[2]
    return F.interpolate(x[None].float(), size=size, mode="bilinear", align_corners=False, antialias=shrink)[0]


def sliding(model, image, names, kw, window, stride):
    """probs (K, H, W): the mean over window x window crops at `stride`, each segmented at its size."""
    (H, W), dev = image.shape[1:], model.device
    total, count = torch.zeros(len(names), H, W, device=dev), torch.zeros(H, W, device=dev)
    for top in window_starts(H, window, stride):
        for left in window_starts(W, window, stride):
            crop = image[:, top:top + window, left:left + window]
            total[:, top:top + window, left:left + window] += model.segment(crop, names, long_side=max(crop.shape[1:]), **kw)
            count[top:top + window, left:left + window] += 1
    return total / count


def segment_by_protocol(model, image, names, args):
    """probs (K, H, W) of one image (3, H, W) under args.protocol (see PROTOCOLS)."""
    kw = dict(ensemble=args.ensemble, steps=args.steps, spacing=args.spacing, seed=args.seed,
              batch_size=args.batch_size, eta=args.eta)
    R, (H, W) = model.cfg.resolution, image.shape[1:]
    if args.protocol == "long":
        return model.segment(image, names, **kw)
    if args.protocol == "square":
        return resized(model.segment(resized(image, (R, R)), names, long_side=R, **kw), (H, W)).clamp(0, 1)
    if args.protocol in ("short", "san"):
        short, cap = (R, 4 * R) if args.protocol == "short" else (640, 2560)
        scale = min(short / min(H, W), cap / max(H, W))
        return model.segment(image, names, long_side=round(max(H, W) * scale), **kw)
    if args.protocol == "catseg":
        square = resized(image, (640, 640))
        windows = sliding(model, square, names, kw, 384, 256)
        whole = resized(model.segment(resized(image, (384, 384)), names, long_side=384, **kw), (640, 640))
        return resized((windows + whole) / 2, (H, W)).clamp(0, 1)
    return sliding(model, image, names, kw, R, None)                    # "slide"


# ---- one image -----------------------------------------------------------------------------------

def predict(model, image, names, args, synonyms=None):
    """One image (3, H, W) on the host -> (labels (H, W) int64 with -1 = background, probs (K, H, W),
    class indices). The proposals read it where it is; segment() copies its prepared tensor to the
    device once.
    --proposals=1 (the paper, App. A.3): only the classes CLIP proposes for this image are run;
    --proposals=0: every class of the dataset (closed vocabulary)."""
    classes = list(range(len(names)))
    if args.proposals:
        picked, _ = model.propose_classes(tensor_to_pil(image), names, args.tau_global, args.tau_patch,
                                          synonyms=synonyms)
        index = {c: k for k, c in enumerate(names)}                 # distinct (data.class_names_of)
        classes = [index[c] for c in picked]
    if not classes:
        return torch.full(image.shape[1:], -1, dtype=torch.long), None, classes
    probs = segment_by_protocol(model, image, [names[k] for k in classes], args).cpu()
    lut = torch.tensor(classes + [-1])
    return lut[aggregate(probs, args.tau_bg)], probs, classes   # local index -> dataset class, -1 stays


# ---- a dataset -----------------------------------------------------------------------------------

def result_key(args, cfg, digest, ds, n):
    """Everything a result depends on; partial results are reused only under an equal key."""
    classes = getattr(ds, "classes_file", None)
    return {"checkpoint": digest, "sd2": cfg.sd2, "clip": cfg.clip, "dataset": args.dataset, "split": args.split,
            "data_root": "" if args.dataset == "toy" else os.path.abspath(args.data_root),
            "classes": file_digest(classes) if classes else "", "images": n,
            **{k: getattr(args, k) for k in KEYED}}


def evaluate(model, ds, args, key, tag, rank=0, count=1):
    """This rank's images (rank, rank + count, ...) -> (confusion matrix (C+1, C+1), binary counts
    (len(taus), C, 4): intersection, union, |P|, |G| pooled over images, at each threshold tau of
    `taus` (TAUS for --study=tau, else --tau alone), images/s). The partial result is saved every
    --save_every images under a name that holds the key's digest, with the seconds spent on it, so
    that a resumed or reused result reports the speed it was computed at (not zero)."""
    C, taus = len(ds.class_names), study_taus(args)
    key_id = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    partial = os.path.join(args.out, f"partial_{tag}_{key_id}_rank{rank}of{count}.pt")
    cm, counts, done = np.zeros((C + 1, C + 1), np.int64), np.zeros((len(taus), C, 4), np.int64), []
    seconds = 0.0                                         # spent on `done` by earlier runs
    if os.path.isfile(partial):
        state = torch.load(partial, weights_only=True)    # tensors, lists, strings and numbers only
        if state["key"] == key:
            cm, counts, done = state["cm"].numpy(), state["counts"].numpy(), state["done"]
            seconds = state.get("seconds", float("nan"))   # partials of older versions did not say
            print(f"[rank {rank}] {tag}: resuming after {len(done)} images ({partial})", flush=True)
    todo = [i for i in range(rank, key["images"], count) if i not in set(done)]
    t0 = time.time()
    for j, i in enumerate(todo):
        image, gt, path = ds[i]
        pred, probs, classes = predict(model, image, ds.class_names, args, getattr(ds, "synonyms", None))
        cm += confusion_matrix(pred, gt, C, ds.ignore_index)
        add_binary_counts(counts, probs, classes, gt.numpy(), ds, taus)
        if j < args.overlays and rank == 0:
            both = side_by_side(*(overlay(tensor_to_pil(image), labels, ds.class_names) for labels in (pred, gt)))
            both.save(os.path.join(args.out, f"overlay_{tag}_{os.path.basename(path)}.png"))  # prediction | truth
        done.append(i)
        if (j + 1) % args.save_every == 0 or j + 1 == len(todo):
            torch_save_atomic({"cm": torch.from_numpy(cm), "counts": torch.from_numpy(counts), "done": done,
                               "key": key, "seconds": seconds + time.time() - t0}, partial)
        if rank == 0 and (sys.stdout.isatty() or (j + 1) % max(1, len(todo) // 10) == 0 or j + 1 == len(todo)):
            rate = (j + 1) / (time.time() - t0)      # a live line on a terminal, a line per tenth in a log file
            print(f"\r[{tag}] {j + 1}/{len(todo)} images | {rate:.2f} img/s | "
                  f"ETA {(len(todo) - j - 1) / max(rate, 1e-9) / 60:.1f} min", end="" if sys.stdout.isatty() else "\n",
                  flush=True)
    if rank == 0 and todo and sys.stdout.isatty():
        print()
    return cm, counts, len(done) / max(seconds + time.time() - t0, 1e-9)


def add_binary_counts(counts, probs, classes, gt, ds, taus):
    """Table 3's binary counts of one image, added to counts (len(taus), C, 4) at each tau: M_c > tau
    against class c's pixels, for every class that is in the ground truth or was run. A class in the
    ground truth that CLIP did not propose is an empty prediction, all of its pixels misses, as the
    confusion matrix counts it. probs (len(classes), H, W) of the classes run, or None (none run)."""
    valid = gt != ds.ignore_index
    run = {c: local for local, c in enumerate(classes)}
    for c in sorted(set(run) | set(ds.present_classes(gt))):
        truth = ds.class_mask(gt, c) & valid
        for k, tau in enumerate(taus):
            pred = binary_mask(probs[run[c]], tau).numpy() & valid if c in run else np.zeros_like(truth)
            counts[k, c] += binary_counts(pred, truth)


def study_taus(args):
    return TAUS if args.study == "tau" else (args.tau,)


def fig3(counts, names, out, dataset):
    """Fig. 3: binary IoU vs tau per class (the 8 classes with most ground-truth pixels, and the mean
    over classes present) -> fig3_tau.png and tau_curves.json."""
    ious = np.stack([pooled_iou_dice(c)[0] for c in counts])          # (taus, C)
    present = np.flatnonzero(counts[0, :, 3] > 0)
    top = present[np.argsort(-counts[0, present, 3])][:8]
    series = {names[c]: (list(TAUS), ious[:, c].tolist()) for c in top}
    series["mean over classes"] = (list(TAUS), np.nanmean(ious[:, present], axis=1).tolist())
    line_plot(os.path.join(out, "fig3_tau.png"), series, xlabel="tau", ylabel="binary IoU",
              title=f"Fig. 3: IoU vs the mask threshold tau ({dataset})")
    write_text_atomic(os.path.join(out, "tau_curves.json"), json.dumps(
        {"tau": list(TAUS), "iou": {names[c]: ious[:, c].tolist() for c in present}}, indent=2))


def report(cm, counts, names, out, tag, rate, key):
    """Scores of one row, written as metrics_<tag>.json (with the key it was computed under) and
    per_class_<tag>.csv."""
    scores = miou(cm)
    scores["binary_iou"], scores["binary_dice"] = pooled_iou_dice(counts)
    scores["binary_precision"], scores["binary_recall"], scores["binary_f1"] = pooled_precision_recall_f1(counts)
    scores["images_per_s"] = rate
    write_per_class_csv(os.path.join(out, f"per_class_{tag}.csv"), names, scores)
    summary = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in scores.items()}
    write_text_atomic(os.path.join(out, f"metrics_{tag}.json"), json.dumps({**summary, "key": key}, indent=2))
    return scores


# ---- Table 7: the SD VAE on ground-truth masks ----------------------------------------------

@torch.no_grad()
def vae_on_masks(vae, vae_scale, ds, n=1000, batch=8, device="cpu", seed=0):
    """Encode and decode n binary class masks (2y - 1 on 3 channels), as DiGSeg's latent pathway does:
    n of the dataset's (image, class present) masks drawn at random (seeded), as App. B samples its
    1,000. MAE between the decoded channel mean mapped to [0, 1] and the mask, its mean and its std
    over the masks (Table 7's MAE +- std); label accuracy: the decoded value's nearest palette entry
    (0 or 1) equals the mask. The channel spread (std and max - min of the decoded RGB per pixel) is
    in the MAE's unit, the [0, 1] of masks, not the decoder's [-1, 1]. Masks of one size are batched."""
    dtype = next(vae.parameters()).dtype
    maes, accs, stds, ranges, masks = [], [], [], [], _class_masks(ds, n, seed)
    while chunk := list(itertools.islice(masks, batch)):
        for shape in {tuple(m.shape) for m in chunk}:
            y = torch.stack([m for m in chunk if tuple(m.shape) == shape]).to(device)
            z = vae.encode(mask_to_image(y).to(dtype))[0] * vae_scale
            rgb = vae.decode(z / vae_scale).float()                               # (B, 3, H, W)
            decoded = image_to_mask(rgb)                                          # (B, H, W) in [0, 1]
            maes.append((decoded - y).abs().flatten(1).mean(1).cpu())
            accs.append(((decoded > 0.5) == (y > 0.5)).float().flatten(1).mean(1).cpu())
            in_01 = (rgb + 1) / 2                                                 # the masks' and the MAE's unit
            stds.append(in_01.std(dim=1).flatten(1).mean(1).cpu())                # the paper's channel spread
            ranges.append((in_01.amax(dim=1) - in_01.amin(dim=1)).flatten(1).mean(1).cpu())
    mae, acc = torch.cat(maes), torch.cat(accs)
    return {"masks": len(mae), "mae": mae.mean().item(), "mae_std": mae.std().item() if len(mae) > 1 else 0.0,
            "label_accuracy": acc.mean().item(), "seed": seed,
            "channel_std": torch.cat(stds).mean().item(), "channel_range": torch.cat(ranges).mean().item()}


@torch.no_grad()
def vae_on_label_maps(vae, vae_scale, ds, n=100, device="cpu"):
    """Table 7 for whole multi-class label maps: each map painted with a palette of C colours (ours:
    the paper names none; a seeded random palette, ignore pixels black), encoded and decoded; each
    decoded pixel takes the label of the nearest palette colour. -> label accuracy over valid
    pixels and the mIoU of the recovered maps against the originals."""
    C, dtype = len(ds.class_names), next(vae.parameters()).dtype
    palette = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (C, 3))).float() / 127.5 - 1   # (C, 3)
    cm, right, total = 0, 0, 0
    for i in range(min(n, len(ds))):
        _, gt, _ = ds[i]
        valid = (gt >= 0) & (gt < C)
        x = torch.where(valid[..., None], palette[gt.clamp(0, C - 1)], torch.full((3,), -1.0))  # (H, W, 3)
        x = x.permute(2, 0, 1)[None].to(device, dtype)
        h, w = x.shape[2:]
        f = 2 ** (len(vae.config.block_out_channels) - 1)       # the VAE's size factor (8 for SD2)
        ph, pw = -h % f, -w % f
        x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        rgb = vae.decode(vae.encode(x)[0]).float()[0, :, :h, :w].cpu()    # (3, H, W); the scale cancels
        recovered = torch.cdist(rgb.flatten(1).T, palette).argmin(1).reshape(h, w)
        right += int((recovered == gt)[valid].sum())
        total += int(valid.sum())
        cm = cm + confusion_matrix(recovered.masked_fill(~valid, -1), gt.masked_fill(~valid, ds.ignore_index), C,
                                   ds.ignore_index)
    return {"maps": min(n, len(ds)), "label_accuracy": right / max(total, 1), "miou": miou(cm)["miou_gt"]}


def _class_masks(ds, n, seed=0):
    """n (image, class present) pairs of ds drawn at random without replacement (all of them when
    there are fewer), seeded, as float masks (H, W), in image order. Reads every label map once to
    list the pairs, then the images drawn again."""
    present = [ds.present_classes(ds[i][1].numpy()) for i in range(len(ds))]
    pairs = [(i, c) for i, classes in enumerate(present) for c in classes]
    drawn = sorted(np.random.default_rng(seed).choice(len(pairs), size=min(n, len(pairs)), replace=False).tolist())
    by_image = {}
    for j in drawn:
        by_image.setdefault(pairs[j][0], []).append(pairs[j][1])
    for i, classes in by_image.items():
        gt = ds[i][1].numpy()
        for c in classes:
            yield torch.from_numpy(ds.class_mask(gt, c)).float()


# ---- the command line ------------------------------------------------------------------------

@dataclass
class Settings(Inference):
    # segment() and the proposals: launch.Inference (checkpoint, ensemble, steps, tau_bg, ...)
    dataset: str = "toy"             # toy, a benchmark of data.DATASETS, or folder (your own)
    data_root: str = "datasets"      # the dataset's folder
    split: str = "val"               # the split to score
    classes: str = ""                # a class-list file of your own (classes/*.txt's format)
    out: str = ""                    # default: out/eval/<run>-<checkpoint digest>/<dataset>-<split>
    study: str = ""                  # one of the studies in this file's docstring (empty: one evaluation)
    protocol: str = "auto"           # how an image meets the model: by dataset (PROTOCOLS), or long | square | short | san | catseg | slide
    proposals: bool = True           # CLIP proposes each image's classes (App. A.3, as the paper runs every benchmark); 0: every class
    limit: int = 0                   # evaluate the first N images only (0: all)
    max_steps: int = 50              # --study=steps: S = 1 .. max_steps
    runs: str = ""                   # --study=fractions: train.py out_dirs, comma-separated
    save_every: int = 20             # images between saves of the partial result
    overlays: int = 0                # overlay PNGs (prediction | ground truth) of the first N images
    vae_masks: int = 1000            # --study=vae: masks drawn at random (App. B: 1,000)


STUDIES = ("", "sweep", "ensemble", "steps", "tau", "vae", "fractions")
CHOICES = {**INFERENCE_CHOICES, "study": STUDIES, "protocol": ("auto", *PROTOCOL_NAMES),
           "dataset": ("toy", *data.DATASETS)}
RANGES = {**INFERENCE_RANGES, "max_steps": POSITIVE, "save_every": POSITIVE, "vae_masks": POSITIVE}


def parse(argv):
    return parse_settings(Settings, argv, __doc__, CHOICES, RANGES)


def default_out(checkpoint, digest, dataset, split):
    folder = os.path.abspath(checkpoint)
    run_name = os.path.basename(os.path.dirname(folder) if os.path.basename(folder) == "checkpoint" else folder)
    return os.path.join("out", "eval", f"{run_name}-{digest[:8]}", f"{dataset}-{split}")


def study_rows(args):
    """[(tag, E, S, spacing)]: one row, Table 6's sweep, or Fig. 8's steps for both spacings."""
    if args.study == "sweep":
        return [(f"E{e}xS{s}-{sp}", e, s, sp) for e, s, sp in SWEEP]
    if args.study == "ensemble":
        return [(f"E{e}xS{args.steps}-{args.spacing}", e, args.steps, args.spacing) for e in ENSEMBLES]
    if args.study == "steps":
        steps = sorted({1, 2, 3, 4, 5, 10, 20, 50} & set(range(1, args.max_steps + 1)) | {args.max_steps})
        return [(f"S{s}-{sp}", args.ensemble, s, sp) for sp in ("trailing", "leading") for s in steps]
    if args.study == "tau":
        return [("tau", args.ensemble, args.steps, args.spacing)]
    return [("main", args.ensemble, args.steps, args.spacing)]


def main(argv=None):
    """-> {row tag: scores} on rank 0 ({} on the other ranks); --study=vae: {"vae": result}."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args.protocol == "auto":
        args.protocol = PROTOCOLS.get(args.dataset, "long")
    ds = data.build(args.dataset, args.data_root, args.split, evaluation=True, classes=args.classes or None)
    if args.study == "vae":
        return {"vae": table7(args, ds)}
    if args.study == "fractions":
        return {"fractions": fig6(args, argv)}
    if not args.checkpoint:
        raise UsageError("--checkpoint is required (a folder with digseg.json and digseg.safetensors)")
    procs = start_processes(args.device)
    cfg = DiGSeg.config_of(args.checkpoint, args.sd2 or None, args.clip or None)
    digest = checkpoint_digest(args.checkpoint)
    args.out = args.out or default_out(args.checkpoint, digest, args.dataset, args.split)
    os.makedirs(args.out, exist_ok=True)
    model = DiGSeg.from_checkpoint(args.checkpoint, dtype=DTYPES[args.dtype], device=procs.device,
                                   sd2=args.sd2 or None, clip=args.clip or None).eval()
    if args.proposal_clip:
        model.use_proposal_clip(args.proposal_clip, vocab=args.clip_vocab or None)
    if args.proposals and model.proposer is None:
        raise UsageError("--proposals=1 (the default, App. A.3) needs a CLIP with a vision tower, and this checkpoint "
                         "has none: pass --proposal_clip=PATH, or --proposals=0 to run every class")
    n = min(len(ds), args.limit or len(ds))
    results, rows = {}, study_rows(args)
    for tag, E, S, spacing in rows:
        args.ensemble, args.steps, args.spacing = E, S, spacing
        key = result_key(args, cfg, digest, ds, n)
        cm, counts, rate = evaluate(model, ds, args, key, tag, procs.rank, procs.count)
        cm, counts = all_reduce_sum(cm, counts)
        if procs.master:
            taus = study_taus(args)                       # the row's binary scores: at the tau nearest --tau
            at_tau = counts[int(np.argmin([abs(t - args.tau) for t in taus]))]
            results[tag] = r = report(cm, at_tau, ds.class_names, args.out, tag, rate, key)
            if args.study == "tau":
                fig3(counts, ds.class_names, args.out, args.dataset)
            print(f"{args.dataset} {args.split} {tag}: mIoU {r['miou_gt']:.4f} (classes in GT; {r['miou_all']:.4f} "
                  f"mmseg-style), pixel acc {r['pixel_acc']:.4f}, {rate:.2f} images/s per process", flush=True)
            if args.dataset in data.DATASETS and data.DATASETS[args.dataset].metric == "binary":   # Table 3
                for c, name in enumerate(ds.class_names):
                    print(f"  {name}: IoU {r['binary_iou'][c]:.4f}, Dice {r['binary_dice'][c]:.4f}, precision "
                          f"{r['binary_precision'][c]:.4f}, recall {r['binary_recall'][c]:.4f}, F1 {r['binary_f1'][c]:.4f}")
    if procs.master:
        print(f"results in {args.out}/")
        if args.study == "ensemble":
            line_plot(os.path.join(args.out, "fig7_ensemble.png"),
                      {f"S = {args.steps} {args.spacing}": (list(ENSEMBLES), [results[t]["miou_gt"] for t, *_ in rows])},
                      xlabel="ensemble size E", ylabel="mIoU", title=f"Fig. 7: mIoU vs ensemble size ({args.dataset})")
        if args.study == "steps":
            curves = {sp: ([S for _, _, S, s in rows if s == sp], [results[t]["miou_gt"] for t, _, _, s in rows if s == sp])
                      for sp in ("trailing", "leading")}
            line_plot(os.path.join(args.out, "fig8_steps.png"), curves, xlabel="steps", ylabel="mIoU",
                      title=f"Fig. 8: mIoU vs DDIM steps ({args.dataset})")
    stop_processes(procs)
    return results


def fig6(args, argv):
    """Fig. 6: mIoU vs the fraction of training data. Evaluates the newest checkpoint of each run in
    --runs (trained with train.py --fraction=...; the fraction is read from its settings.json) with
    the other flags of this command -> fig6_fractions.png and fractions.json."""
    if not args.runs:
        raise UsageError("--study=fractions needs --runs=DIR,DIR,... (train.py out_dirs trained with --fraction)")
    out = args.out or os.path.join("out", "eval", "fractions", f"{args.dataset}-{args.split}")
    rest = [a for a in argv if not a.startswith(("--study", "--runs", "--checkpoint", "--out"))]
    points = []
    for run_dir in args.runs.split(","):
        ckpt = os.path.join(run_dir, "checkpoint")
        settings = os.path.join(ckpt, "settings.json")
        if not os.path.isfile(settings):
            raise UsageError(f"--runs: {settings} not found (expected a train.py out_dir with a checkpoint)")
        with open(settings) as f:
            fraction = json.load(f).get("fraction", 1.0)
        scores = main(rest + [f"--checkpoint={ckpt}", f"--out={os.path.join(out, os.path.basename(run_dir.rstrip('/')))}"])
        points.append((fraction, run_dir, scores["main"]["miou_gt"]))
    points.sort()
    line_plot(os.path.join(out, "fig6_fractions.png"), {args.dataset: ([p[0] for p in points], [p[2] for p in points])},
              xlabel="fraction of the training data", ylabel="mIoU", title="Fig. 6: mIoU vs training data")
    result = [{"fraction": f, "run": r, "miou": m} for f, r, m in points]
    write_text_atomic(os.path.join(out, "fractions.json"), json.dumps(result, indent=2))
    print(f"Fig. 6: " + ", ".join(f"{f:g}: {m:.4f}" for f, _, m in points) + f"; in {out}/fig6_fractions.png")
    return result


def table7(args, ds):
    """Table 7: the SD VAE on ground-truth masks of the dataset."""
    sd2 = args.sd2 or (DiGSeg.config_of(args.checkpoint).sd2 if args.checkpoint else "")
    if not sd2:
        raise UsageError("--study=vae needs --sd2=PATH (or a --checkpoint that names its SD2 weights)")
    out = args.out or os.path.join("out", "eval", "vae", f"{args.dataset}-{args.split}")
    os.makedirs(out, exist_ok=True)
    device = start_processes(args.device).device
    sd = load_sd2(sd2, dtype=DTYPES[args.dtype], device=device)
    r = vae_on_masks(sd.vae, sd.vae_scale, ds, args.vae_masks, device=device, seed=args.seed)
    r["label_maps"] = vae_on_label_maps(sd.vae, sd.vae_scale, ds, min(args.vae_masks, 200), device=device)
    print(f"Table 7 (VAE on {r['masks']} ground-truth masks of {args.dataset}, drawn at random with seed "
          f"{args.seed}): MAE {r['mae']:.4f} +- {r['mae_std']:.4f}, "
          f"label accuracy {r['label_accuracy']:.4f}, decoded channel std {r['channel_std']:.4f}, "
          f"channel max-min {r['channel_range']:.4f}; {r['label_maps']['maps']} whole label maps through a "
          f"palette: pixel accuracy {r['label_maps']['label_accuracy']:.4f}, mIoU {r['label_maps']['miou']:.4f}")
    write_text_atomic(os.path.join(out, "vae_on_masks.json"), json.dumps({**r, "sd2": sd2}, indent=2))
    return r


if __name__ == "__main__":
    run(main)
