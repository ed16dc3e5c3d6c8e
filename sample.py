"""Segment your images with a trained DiGSeg (App. A.3).

    python sample.py photos/*.jpg --checkpoint=out/ade20k/checkpoint --classes="cat,dog,grass"
    python sample.py photos/ --checkpoint=... --vocab=ade150          # CLIP proposes the classes
    python sample.py img.png --checkpoint=... --classes_file=my_classes.txt --ensemble=8 --steps=2
    python sample.py --help                                           # every setting

For each image it writes, under --out (NAME = the image's path below the inputs' common folder,
without its extension unless two inputs would share a name: x.jpg and x.png):
  NAME_labels.png    palette PNG at the original size: value k = k-th class in NAME.json, 255 = background
  NAME_prob_CLASS.png  the per-class probability map M_c (0..255)
  NAME_overlay.png   the labels blended over the image, with a legend naming the classes
  NAME.json          classes found: pixel share, mean probability, CLIP scores (when proposed)
An unreadable image is reported and skipped; the others are still written and the exit code is 1.
"""
import collections
import glob
import json
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from data import CLASSES_DIR, IMAGE_SUFFIXES, DataError, class_names_of, load_rgb, read_class_file
from digseg import DiGSeg, aggregate, binary_mask
from launch import DTYPES, INFERENCE_CHOICES, INFERENCE_RANGES, Inference, UsageError, parse_settings, pick_device, run
from plot import label_png, overlay


def expand_inputs(inputs):
    """Files, folders (their images, sorted) and glob patterns -> a list of paths, each once."""
    paths = []
    for item in inputs:
        if os.path.isdir(item):
            paths += sorted(os.path.join(item, f) for f in os.listdir(item) if f.lower().endswith(IMAGE_SUFFIXES))
        elif any(ch in item for ch in "*?["):
            paths += sorted(glob.glob(item))
        else:
            paths.append(item)
    return list(dict.fromkeys(os.path.normpath(p) for p in paths))


def output_names(paths):
    """One output name per input, never shared: the path below the inputs' common folder without
    its extension (photos/a/x.jpg -> a/x); where two inputs would share a name (x.jpg and x.png),
    both keep their extension (x.jpg, x.png)."""
    absolute = [os.path.abspath(p) for p in paths]
    root = os.path.commonpath([os.path.dirname(a) for a in absolute])
    relative = [os.path.relpath(a, root) for a in absolute]
    stems = [os.path.splitext(r)[0] for r in relative]
    count = collections.Counter(stems)
    return [r if count[s] > 1 else s for r, s in zip(relative, stems)]


def read_classes(args):
    """-> (distinct class names, their synonym lines or None, whether CLIP proposes among them)."""
    if args.classes:
        names = [c.strip() for c in args.classes.split(",") if c.strip()]
        if len(set(names)) != len(names):
            raise UsageError(f"--classes={args.classes}: a class is named twice")
        return names, None, False
    if args.classes_file:
        lines = read_class_file(args.classes_file)
        return class_names_of(lines), lines, False
    if args.vocab:
        path = args.vocab if os.path.isfile(args.vocab) else CLASSES_DIR / f"{args.vocab}.txt"
        if not os.path.isfile(path):
            raise UsageError(f"--vocab={args.vocab}: neither a file nor a vocabulary in classes/ ({path})")
        lines = read_class_file(path)
        return class_names_of(lines), lines, True
    raise UsageError("give the classes: --classes=a,b,c or --classes_file=FILE or --vocab=NAME (CLIP proposes)")


@dataclass
class Settings(Inference):
    # segment() and the proposals: launch.Inference (checkpoint, ensemble, steps, tau_bg, ...)
    inputs: list = field(default_factory=list)   # image files, folders or glob patterns (the arguments)
    classes: str = ""                # comma-separated class names
    classes_file: str = ""           # a file with one class name per line
    vocab: str = ""                  # a vocabulary (classes/NAME.txt or a file); CLIP proposes candidates (App. A.3)
    out: str = "out/sample"          # where the PNGs and JSONs go


def main(argv=None):
    args = parse_settings(Settings, sys.argv[1:] if argv is None else argv, __doc__, INFERENCE_CHOICES,
                          INFERENCE_RANGES, positional="inputs")

    if not args.checkpoint:
        raise UsageError("--checkpoint is required: a DiGSeg checkpoint folder (digseg.json + digseg.safetensors)")
    names, synonyms, propose = read_classes(args)
    paths = expand_inputs(args.inputs)
    if not paths:
        raise UsageError(f"no images found in {args.inputs}")
    device = pick_device(args.device)
    model = DiGSeg.from_checkpoint(args.checkpoint, dtype=DTYPES[args.dtype], device=device, sd2=args.sd2 or None,
                                   clip=args.clip or None).eval()
    if args.proposal_clip:
        model.use_proposal_clip(args.proposal_clip, vocab=args.clip_vocab or None)
    failed = []
    for i, (path, name) in enumerate(zip(paths, output_names(paths))):
        t0 = time.time()
        try:
            image = load_rgb(path)
        except DataError as e:  # an unreadable file: report it and go on with the others
            failed.append(path)
            print(f"[{i + 1}/{len(paths)}] {e}; skipped", file=sys.stderr)
            continue
        scores = {}
        classes = names
        if propose:
            classes, scores = model.propose_classes(image, names, args.tau_global, args.tau_patch, synonyms=synonyms)
        stem = os.path.join(args.out, name)
        os.makedirs(os.path.dirname(stem), exist_ok=True)
        found = []
        if classes:
            probs = model.segment(image, classes, ensemble=args.ensemble, steps=args.steps, spacing=args.spacing,
                                  seed=args.seed, eta=args.eta, batch_size=args.batch_size).cpu()
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
    run(main)
