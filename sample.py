"""Segment your images with a trained DiGSeg (App. A.3).

    python sample.py photos/*.jpg --checkpoint=out/ade20k/checkpoint --classes="cat,dog,grass"
    python sample.py photos/ --checkpoint=... --vocab=ade150          # CLIP proposes the classes
    python sample.py img.png --checkpoint=... --classes_file=my_classes.txt --ensemble=8 --steps=2

For each image it writes, under --out:
  NAME_labels.png    palette PNG at the original size: value k = k-th class in NAME.json, 255 = background
  NAME_prob_CLASS.png  the per-class probability map M_c (0..255)
  NAME_overlay.png   the labels blended over the image, with a legend naming the classes
  NAME.json          classes found: pixel share, mean probability, CLIP scores (when proposed)
An unreadable image is reported and skipped; the others are still written and the exit code is 1.
"""
import argparse
import glob
import json
import os
import sys
import time

import numpy as np
import torch
from PIL import Image, ImageDraw

from data import load_rgb
from digseg import DiGSeg, aggregate, binary_mask

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")
PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
           (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180),
           (0, 0, 128), (128, 128, 128)]


def colour(k):
    return PALETTE[k % len(PALETTE)]


def expand_inputs(inputs):
    """Files, folders (their images, sorted) and glob patterns -> a list of paths."""
    paths = []
    for item in inputs:
        if os.path.isdir(item):
            paths += sorted(os.path.join(item, f) for f in os.listdir(item) if f.lower().endswith(IMAGE_EXTS))
        elif any(ch in item for ch in "*?["):
            paths += sorted(glob.glob(item))
        else:
            paths.append(item)
    return paths


def read_classes(args):
    if args.classes:
        return [c.strip() for c in args.classes.split(",") if c.strip()], False
    if args.classes_file:
        with open(args.classes_file) as f:
            return [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")], False
    if args.vocab:
        path = args.vocab if os.path.isfile(args.vocab) else os.path.join(os.path.dirname(__file__), "classes", f"{args.vocab}.txt")
        if not os.path.isfile(path):
            raise SystemExit(f"--vocab={args.vocab}: neither a file nor a vocabulary in classes/ ({path})")
        with open(path) as f:
            return [ln.strip().split(",")[0].strip() for ln in f if ln.strip() and not ln.startswith("#")], True
    raise SystemExit("give the classes: --classes=a,b,c or --classes_file=FILE or --vocab=NAME (CLIP proposes)")


def label_png(labels, n_classes):
    """labels (H, W) with -1 = background -> palette PNG (P mode), 255 = background."""
    a = labels.numpy().astype(np.int64)
    img = Image.fromarray(np.where(a < 0, 255, a).astype(np.uint8), mode="P")
    pal = [v for k in range(256) for v in (colour(k) if k < n_classes else (0, 0, 0))]
    img.putpalette(pal)
    return img


def overlay(image, labels, names, alpha=0.5, min_side=256):
    """The labels blended over the image, with a legend strip on the right naming the classes.
    Images smaller than min_side (the toy world's 64 px) are enlarged by a whole factor, nearest."""
    a = labels.numpy()
    zoom = -(-min_side // max(a.shape))              # ceil: 64 px -> x4
    if zoom > 1:
        image = image.resize((image.width * zoom, image.height * zoom), Image.NEAREST)
        a = a.repeat(zoom, axis=0).repeat(zoom, axis=1)
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    col = np.zeros_like(rgb)
    for k in range(len(names)):
        col[a == k] = colour(k)
    fg = ((a >= 0) & (a < len(names)))[..., None]   # no class (-1) and ignored pixels stay as they are
    out = np.where(fg, (1 - alpha) * rgb + alpha * col, rgb).astype(np.uint8)
    H, W = a.shape
    shown = [k for k in range(len(names)) if (a == k).any()]
    legend_w = 12 + 7 * max([len(names[k]) for k in shown] + [10])
    canvas = Image.new("RGB", (W + legend_w, max(H, 16 * len(shown) + 8)), "white")
    canvas.paste(Image.fromarray(out), (0, 0))
    d = ImageDraw.Draw(canvas)
    for row, k in enumerate(shown):
        d.rectangle([W + 4, 4 + 16 * row, W + 14, 14 + 16 * row], fill=colour(k))
        d.text((W + 18, 3 + 16 * row), names[k], fill="black")
    return canvas


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help="image files, folders or glob patterns")
    p.add_argument("--checkpoint", required=True, help="a DiGSeg checkpoint folder (digseg.json + digseg.safetensors)")
    p.add_argument("--classes", default="", help="comma-separated class names")
    p.add_argument("--classes_file", default="", help="a file with one class name per line")
    p.add_argument("--vocab", default="", help="a vocabulary (classes/NAME.txt or a file); CLIP proposes candidates (App. A.3)")
    p.add_argument("--out", default="out/sample")
    p.add_argument("--ensemble", type=int, default=8, help="E, noise seeds averaged in latent space")
    p.add_argument("--steps", type=int, default=1, help="S, DDIM steps")
    p.add_argument("--spacing", default="trailing", choices=["trailing", "leading", "linspace"])
    p.add_argument("--tau", type=float, default=0.7, help="threshold of one class's binary mask")
    p.add_argument("--tau_bg", type=float, default=0.5, help="background where the best class is below this")
    p.add_argument("--tau_global", type=float, default=0.25, help="CLIP image-text cosine to propose a class")
    p.add_argument("--tau_patch", type=float, default=0.3, help="CLIP best-patch cosine to propose a class")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    args = p.parse_args(argv)

    names, propose = read_classes(args)
    paths = expand_inputs(args.inputs)
    if not paths:
        raise SystemExit(f"no images found in {args.inputs}")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    model = DiGSeg.from_checkpoint(args.checkpoint, dtype=dtype, device=args.device).eval()
    os.makedirs(args.out, exist_ok=True)
    failed = []
    for i, path in enumerate(paths):
        t0 = time.time()
        try:
            image = load_rgb(path)
        except Exception as e:  # any unreadable file: report it and go on with the others
            failed.append(path)
            print(f"[{i + 1}/{len(paths)}] {path}: cannot read image ({e}); skipped", file=sys.stderr)
            continue
        scores = {}
        classes = names
        if propose:
            classes, scores = model.propose_classes(image, names, args.tau_global, args.tau_patch)
        stem = os.path.join(args.out, os.path.splitext(os.path.basename(path))[0])
        found = []
        if classes:
            probs = model.segment(image, classes, ensemble=args.ensemble, steps=args.steps,
                                  spacing=args.spacing, seed=args.seed).cpu()
            labels = aggregate(probs, args.tau_bg)
            for k, c in enumerate(classes):
                Image.fromarray((probs[k].numpy() * 255).round().astype(np.uint8)).save(
                    f"{stem}_prob_{c.replace(' ', '_').replace('/', '_')}.png")
                found.append({"class": c, "label": k, "area": float((labels == k).float().mean()),
                              "mask_area_at_tau": float(binary_mask(probs[k], args.tau).float().mean()),
                              "mean_prob": float(probs[k].mean()), "clip": scores.get(c)})
        else:
            labels = torch.full((image.height, image.width), -1)
        label_png(labels, len(classes)).save(f"{stem}_labels.png")
        overlay(image, labels, classes).save(f"{stem}_overlay.png")
        with open(f"{stem}.json", "w") as f:
            json.dump({"image": path, "size": [image.width, image.height], "classes": found,
                       "settings": {k: v for k, v in vars(args).items() if k not in ("inputs",)}}, f, indent=2)
        print(f"[{i + 1}/{len(paths)}] {path}: {', '.join(c['class'] for c in found if c['area'] > 0) or 'nothing'}"
              f" ({time.time() - t0:.1f} s)", flush=True)
    if failed:
        print(f"{len(failed)} of {len(paths)} images could not be read: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
