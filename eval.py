"""Benchmark evaluation of DiGSeg (Sec. 4), and the paper's studies as commands.

    python eval.py --checkpoint=out/ade20k/checkpoint --dataset=ade150 --data_root=data/ADEChallengeData2016
    torchrun --nproc_per_node=8 eval.py ...                  # confusion matrices summed over ranks
    python eval.py ... --open_vocab=1                        # classes proposed by CLIP (App. A.3)
    python eval.py ... --study=sweep                         # Table 6: E x S rows, mIoU and images/s
    python eval.py ... --study=steps                         # Fig. 8: steps 1..50, trailing vs leading (PNG)
    python eval.py --sd2=PATH --dataset=... --study=vae      # Table 7: the SD VAE on ground-truth masks

Interrupted runs resume: each rank saves its partial confusion matrix every --save_every images.

mIoU follows the open-vocabulary segmentation literature: one confusion matrix per benchmark,
accumulated over all images with ignored pixels dropped, IoU_c = TP / (TP + FP + FN). Two means
of it appear in papers (they differ when a class never occurs in the evaluated ground truth):
  miou_gt   detectron2 (current): mean over the classes with ground-truth pixels;
  miou_all  mmsegmentation / older detectron2: nanmean over the classes with TP + FP + FN > 0,
            so a class absent from the ground truth but predicted somewhere counts as IoU 0.
Both come from the same matrix; say which one a table reports.
"""
import argparse
import csv
import itertools
import json
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

import data
from digseg import DiGSeg, aggregate, binary_mask, image_to_mask, mask_to_image, tensor_to_pil
from model.weights import load_sd2
from plot import line_plot


def _as_numpy(x):
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def confusion_matrix(pred, gt, num_classes, ignore_index=255):
    """Pixel counts, int64 (C + 1, C + 1): rows = ground truth, columns = prediction.

    Index C is "none", a pixel of no class: a prediction outside [0, C) (aggregate's -1 background)
    and a ground truth of -1 (data.NONE, e.g. DeepGlobe background). So a pixel of class c predicted
    as background is a false negative of c, and background predicted as c a false positive.
    Pixels whose ground truth is ignore_index are dropped. Matrices of several images add up.
    pred, gt: integer arrays or tensors of one shape."""
    pred, gt = _as_numpy(pred).astype(np.int64), _as_numpy(gt).astype(np.int64)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in shape")
    C = num_classes
    keep = gt != ignore_index
    pred, gt = pred[keep], gt[keep]
    bad = (gt < -1) | (gt >= C)
    if bad.any():
        raise ValueError(f"ground truth holds {gt[bad][0]}, which is neither a class in [0, {C}), -1 (none) "
                         f"nor ignore_index={ignore_index}; pass the dataset's ignore_index")
    gt = np.where(gt < 0, C, gt)
    pred = np.where((pred < 0) | (pred >= C), C, pred)
    return np.bincount(gt * (C + 1) + pred, minlength=(C + 1) ** 2).reshape(C + 1, C + 1)


def miou(cm):
    """Scores from a confusion_matrix: {"miou_gt", "miou_all", "per_class" (C,) IoU with nan where
    TP + FP + FN = 0, "gt_pixels" (C,), "pixel_acc" (correct / scored pixels; "none" matching "none"
    counts as correct)}."""
    cm = _as_numpy(cm).astype(np.int64)
    C = cm.shape[0] - 1
    tp = np.diag(cm)[:C]
    gt_pixels = cm[:C].sum(axis=1)                  # includes those predicted as none: false negatives
    pred_pixels = cm[:, :C].sum(axis=0)             # includes those on none ground truth: false positives
    union = gt_pixels + pred_pixels - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = np.where(union > 0, tp / union, np.nan)
    seen = gt_pixels > 0
    total = cm.sum()
    return {
        "miou_gt": float(per_class[seen].mean()) if seen.any() else float("nan"),
        "miou_all": float(np.nanmean(per_class)) if (union > 0).any() else float("nan"),
        "per_class": per_class,
        "gt_pixels": gt_pixels,
        "pixel_acc": float(np.trace(cm) / total) if total else float("nan"),
    }


def binary_iou_dice(pred, gt):
    """IoU and Dice of a binary prediction against a binary ground truth (DeepGlobe roads, REFUGE
    disc and cup): {"iou": |P & G| / |P | G|, "dice": 2 |P & G| / (|P| + |G|)}. Pass one image for
    per-image scores (REFUGE averages them over images) or a stack for pooled ones. Both empty:
    nothing to find and nothing found, 1.0 for both."""
    pred, gt = _as_numpy(pred).astype(bool), _as_numpy(gt).astype(bool)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in shape")
    inter = int(np.logical_and(pred, gt).sum())
    union = int(np.logical_or(pred, gt).sum())
    size = int(pred.sum() + gt.sum())
    return {"iou": inter / union if union else 1.0, "dice": 2 * inter / size if size else 1.0}


def write_per_class_csv(path, class_names, scores):
    """One row per class: index, class, iou (nan where undefined), gt_pixels; scores = miou(cm)."""
    if len(class_names) != len(scores["per_class"]):
        raise ValueError(f"{len(class_names)} class names for {len(scores['per_class'])} classes")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "class", "iou", "gt_pixels"])
        for i, (name, iou, n) in enumerate(zip(class_names, scores["per_class"], scores["gt_pixels"])):
            w.writerow([i, name, f"{iou:.6f}", int(n)])


# ---- evaluation ---------------------------------------------------------------------------------

def predict(model, image, names, args):
    """One image -> (labels (H, W) int64 with -1 = background, probs (K, H, W), class indices).
    Closed vocabulary: every class is run; --open_vocab: only those CLIP proposes (App. A.3)."""
    classes = list(range(len(names)))
    if args.open_vocab:
        picked, _ = model.propose_classes(tensor_to_pil(image), names, args.tau_global, args.tau_patch)
        classes = [names.index(c) for c in picked]
    if not classes:
        return torch.full(image.shape[1:], -1, dtype=torch.long), None, classes
    probs = model.segment(image, [names[k] for k in classes], ensemble=args.ensemble, steps=args.steps,
                          spacing=args.spacing, seed=args.seed, batch_size=args.batch_size).cpu()
    lut = torch.tensor(classes + [-1])
    return lut[aggregate(probs, args.tau_bg)], probs, classes   # local index -> dataset class, -1 stays


def evaluate(model, ds, args, rank=0, world=1, tag="main"):
    """This rank's images (rank, rank + world, ...) -> (confusion matrix (C+1, C+1), binary counts
    (C, 4): intersection, union, |P|, |G| pooled over images, images/s). The partial result is saved
    every --save_every images and picked up again by a rerun with the same settings."""
    C = len(ds.class_names)
    key = {k: getattr(args, k) for k in ("checkpoint", "dataset", "ensemble", "steps", "spacing", "seed",
                                         "tau", "tau_bg", "open_vocab")}
    partial = os.path.join(args.out, f"partial_{tag}_rank{rank}of{world}.pt")
    cm, counts, done = np.zeros((C + 1, C + 1), np.int64), np.zeros((C, 4), np.int64), []
    if os.path.isfile(partial):
        state = torch.load(partial, weights_only=True)    # tensors, lists, strings and numbers only
        if state["key"] == key:
            cm, counts, done = state["cm"].numpy(), state["counts"].numpy(), state["done"]
            print(f"[rank {rank}] {tag}: resuming after {len(done)} images", flush=True)
    n = min(len(ds), args.limit or len(ds))
    todo = [i for i in range(rank, n, world) if i not in set(done)]
    t0 = time.time()
    for j, i in enumerate(todo):
        image, gt, path = ds[i]
        pred, probs, classes = predict(model, image.to(model.device), ds.class_names, args)
        cm += confusion_matrix(pred, gt, C, ds.ignore_index)
        if probs is not None:
            valid = (gt != ds.ignore_index).numpy()
            for local, c in enumerate(classes):       # binary IoU/Dice per class at tau (Eq. 8's M_c > tau)
                p = binary_mask(probs[local], args.tau).numpy() & valid
                g = ds.class_mask(gt.numpy(), c) & valid if hasattr(ds, "class_mask") else (gt.numpy() == c)
                counts[c] += [(p & g).sum(), (p | g).sum(), p.sum(), g.sum()]
        if j < args.overlays and rank == 0:
            from sample import overlay
            left, right = (overlay(tensor_to_pil(image), labels, ds.class_names) for labels in (pred, gt))
            both = Image.new("RGB", (left.width + right.width, max(left.height, right.height)), "white")
            both.paste(left, (0, 0))
            both.paste(right, (left.width, 0))                # prediction | ground truth
            both.save(os.path.join(args.out, f"overlay_{tag}_{os.path.basename(path)}.png"))
        done.append(i)
        if (j + 1) % args.save_every == 0 or j + 1 == len(todo):
            atomic_save({"cm": torch.from_numpy(cm), "counts": torch.from_numpy(counts), "done": done, "key": key}, partial)
        if rank == 0 and (sys.stdout.isatty() or (j + 1) % max(1, len(todo) // 10) == 0 or j + 1 == len(todo)):
            rate = (j + 1) / (time.time() - t0)      # a live line on a terminal, every 10 % in a log file
            print(f"\r[{tag}] {j + 1}/{len(todo)} images | {rate:.2f} img/s | "
                  f"ETA {(len(todo) - j - 1) / max(rate, 1e-9) / 60:.1f} min", end="" if sys.stdout.isatty() else "\n",
                  flush=True)
    if rank == 0 and todo and sys.stdout.isatty():
        print()
    return cm, counts, len(todo) / max(time.time() - t0, 1e-9)


def atomic_save(obj, path):
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def all_reduce(*arrays):
    """Sum numpy arrays over the ranks (no-op in one process)."""
    if not dist.is_initialized():
        return arrays
    out = []
    for a in arrays:
        t = torch.from_numpy(np.ascontiguousarray(a))
        dist.all_reduce(t)
        out.append(t.numpy())
    return out


def report(cm, counts, names, out, tag, rate):
    scores = miou(cm)
    inter, union, p, g = counts.T.astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        scores["binary_iou"] = np.where(union > 0, inter / union, np.nan)
        scores["binary_dice"] = np.where(p + g > 0, 2 * inter / (p + g), np.nan)
    scores["images_per_s"] = rate
    write_per_class_csv(os.path.join(out, f"per_class_{tag}.csv"), names, scores)
    summary = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in scores.items()}
    with open(os.path.join(out, f"metrics_{tag}.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return scores


# ---- Table 7: the SD VAE on ground-truth masks ----------------------------------------------

@torch.no_grad()
def vae_on_masks(vae, vae_scale, ds, n=1000, batch=8, device="cpu"):
    """Encode and decode n binary class masks (2y - 1 on 3 channels), as DiGSeg's latent pathway does.
    MAE between the decoded channel mean mapped to [0, 1] and the mask; label accuracy: the decoded
    value's nearest palette entry (0 or 1) equals the mask."""
    dtype = next(vae.parameters()).dtype
    masks = itertools.islice(_class_masks(ds), n)
    maes, accs = [], []
    while chunk := list(itertools.islice(masks, batch)):
        for shape in {tuple(m.shape) for m in chunk}:     # masks of one size at a time
            y = torch.stack([m for m in chunk if tuple(m.shape) == shape]).to(device)
            z = vae.encode(mask_to_image(y).to(dtype))[0] * vae_scale
            m = image_to_mask(vae.decode(z / vae_scale))                     # (B, H, W) in [0, 1]
            maes.append((m - y).abs().flatten(1).mean(1).cpu())
            accs.append(((m > 0.5) == (y > 0.5)).float().flatten(1).mean(1).cpu())
    mae, acc = torch.cat(maes), torch.cat(accs)
    return {"masks": len(mae), "mae": mae.mean().item(), "label_accuracy": acc.mean().item()}


def _class_masks(ds):
    """Every (image, class present) of ds in order, as a float mask (H, W)."""
    for i in range(len(ds)):
        _, gt, _ = ds[i]
        for c in sorted(int(v) for v in gt.unique() if 0 <= v < len(ds.class_names)):
            yield (gt == c).float()


# ---- the command line ------------------------------------------------------------------------

SWEEP = [(1, 1, "trailing"), (1, 2, "trailing"), (4, 2, "trailing"), (8, 2, "trailing"), (20, 50, "leading")]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="", help="a DiGSeg checkpoint folder")
    p.add_argument("--sd2", default="", help="SD2 weights, for --study=vae")
    p.add_argument("--dataset", default="toy")
    p.add_argument("--data_root", default="data")
    p.add_argument("--split", default="val")
    p.add_argument("--classes", default="", help="a class-list file of your own")
    p.add_argument("--out", default="out/eval")
    p.add_argument("--study", default="", choices=["", "sweep", "steps", "vae"])
    p.add_argument("--ensemble", type=int, default=1)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--spacing", default="trailing", choices=["trailing", "leading", "linspace"])
    p.add_argument("--max_steps", type=int, default=50, help="--study=steps: 1..max_steps")
    p.add_argument("--tau", type=float, default=0.7)
    p.add_argument("--tau_bg", type=float, default=0.5)
    p.add_argument("--open_vocab", type=int, default=0)
    p.add_argument("--tau_global", type=float, default=0.25)
    p.add_argument("--tau_patch", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=0, help="evaluate the first N images only")
    p.add_argument("--batch_size", type=int, default=8, help="denoising batch (classes x members)")
    p.add_argument("--save_every", type=int, default=20)
    p.add_argument("--overlays", type=int, default=0, help="write overlay PNGs (prediction | ground truth) of the first N images")
    p.add_argument("--vae_masks", type=int, default=1000)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    ds = data.build(args.dataset, args.data_root, args.split, evaluation=True, classes=args.classes or None)

    if args.study == "vae":
        sd = load_sd2(args.sd2 or DiGSeg.config_of(args.checkpoint).sd2, dtype=dtype, device=args.device)
        r = vae_on_masks(sd.vae, sd.vae_scale, ds, args.vae_masks, device=args.device)
        print(f"Table 7 (VAE on {r['masks']} ground-truth masks of {args.dataset}): MAE {r['mae']:.4f}, "
              f"label accuracy {r['label_accuracy']:.4f}")
        with open(os.path.join(args.out, "vae_on_masks.json"), "w") as f:
            json.dump(r, f, indent=2)
        return r

    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank, world = 0, 1
    if ddp:
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if args.device.startswith("cuda"):
            args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    if not args.checkpoint:
        raise SystemExit("--checkpoint is required (a folder with digseg.json and digseg.safetensors)")
    model = DiGSeg.from_checkpoint(args.checkpoint, dtype=dtype, device=args.device).eval()

    if args.study == "":
        rows = [("main", args.ensemble, args.steps, args.spacing)]
    elif args.study == "sweep":                      # Table 6
        rows = [(f"E{e}xS{s}-{sp}", e, s, sp) for e, s, sp in SWEEP]
    else:                                            # Fig. 8
        steps = sorted({1, 2, 3, 4, 5, 10, 20, 50} & set(range(1, args.max_steps + 1)) | {args.max_steps})
        rows = [(f"S{s}-{sp}", args.ensemble, s, sp) for sp in ("trailing", "leading") for s in steps]
    results = {}
    for tag, e, s, sp in rows:
        args.ensemble, args.steps, args.spacing = e, s, sp
        cm, counts, rate = evaluate(model, ds, args, rank, world, tag)
        cm, counts = all_reduce(cm, counts)
        if rank == 0:
            results[tag] = report(cm, counts, ds.class_names, args.out, tag, rate)
            r = results[tag]
            print(f"{args.dataset} {tag}: mIoU {r['miou_gt']:.4f} (classes in GT; {r['miou_all']:.4f} "
                  f"mmseg-style), pixel acc {r['pixel_acc']:.4f}, {rate:.2f} images/s per process", flush=True)
    if rank == 0 and args.study == "steps":
        curves = {}
        for sp in ("trailing", "leading"):
            xs = [int(t.split("-")[0][1:]) for t in results if t.endswith(sp)]
            curves[sp] = (xs, [results[f"S{x}-{sp}"]["miou_gt"] for x in xs])
        line_plot(os.path.join(args.out, "fig8_steps.png"), curves, title=f"Fig. 8: mIoU vs DDIM steps ({args.dataset})",
                  xlabel="steps", ylabel="mIoU")
    if ddp:
        dist.barrier()                  # every rank done (rank 0 writes last) before tearing down
        dist.destroy_process_group()
    return results["main"] if args.study == "" and rank == 0 else results


if __name__ == "__main__":
    main()
