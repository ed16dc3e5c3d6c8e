"""Where a toy checkpoint's mIoU goes on the way to the toy VAE's ceiling (python toy.py --study=ceiling).

The ceiling is the ground truth itself sent through the VAE as inference sees a mask (2y - 1
encoded, decoded, M_c the channel mean, aggregated at tau_bg = 0.5): no model can beat what the
decoder can draw. Between a checkpoint and it lie, as this file measures them on the validation
scenes, every class run (E = 1, S = 1, trailing, as command 1 scores):
  - the background threshold tau_bg (the mIoU at each; the paper fixes 0.5);
  - false alarms on classes absent from the scene (the mIoU with them removed: what a perfect
    class proposer would give back);
  - the pixels missed near a shape's edge: recall by a pixel's depth inside its shape (1 = on the
    edge); a thin shape (the ring, the bar) is nearly all edge, so per-class recall goes with it;
  - the working resolution: the scene segmented at its own side (64 px: a 16 x 16 latent) and at
    twice it (128 px, command 1's), the maps resized back, against the same for the ceiling.
"""
import os
import tempfile

import numpy as np
import torch
import torch.nn.functional as F

import data
from digseg import DiGSeg, aggregate, image_to_mask, mask_to_image
from metrics import confusion_matrix, miou
from model.weights import load_sd2
from plot import bar_plot, line_plot, side_by_side

DEPTHS = (1, 2, 3, 4)          # a pixel's depth inside its shape, 4-neighbour steps; the last bin is 4 and deeper
TAU_BGS = (0.3, 0.4, 0.5, 0.6, 0.7)


def edge_depth(mask):
    """mask (H, W) bool -> (H, W) int: 1 for a pixel of the mask with a 4-neighbour outside it, 2
    one step further in, and so on; 0 outside. The image's border is not an edge (a shape cut by
    it goes on beyond), so the border pixels are their own neighbours."""
    depth, inside, k = np.zeros(mask.shape, np.int64), mask.copy(), 0
    while inside.any():
        k += 1
        depth[inside] = k
        p = np.pad(inside, 1, mode="edge")
        inside = p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return depth


class Tally:
    """Pixel counts of one predictor over the validation scenes: the confusion matrix at each tau_bg,
    and the shapes' pixels found by depth bin (the last bin holds all deeper ones)."""

    def __init__(self, C, tau_bgs):
        self.C, self.cms = C, {t: 0 for t in tau_bgs}
        self.by_depth = np.zeros((2, len(DEPTHS)))             # (found, all) per depth bin

    def add(self, probs, gt):
        for t in self.cms:
            self.cms[t] = self.cms[t] + confusion_matrix(aggregate(probs, t), gt, self.C)
        pred, gt = aggregate(probs, 0.5).numpy(), gt.numpy()
        for c in np.unique(gt[gt >= 0]):
            depth = np.minimum(edge_depth(gt == c), DEPTHS[-1])
            for k, d in enumerate(DEPTHS):
                at = depth == d
                self.by_depth[:, k] += (pred[at] == c).sum(), at.sum()

    def recall_by_depth(self):
        return {f"{d}{'+' if d == DEPTHS[-1] else ''}": float(f / max(a, 1)) for d, (f, a) in zip(DEPTHS, self.by_depth.T)}


def _shares(cm, C):
    """Shape pixels found / missed as background / taken for another class, and per-class recall and
    precision, from a confusion matrix (tau_bg 0.5)."""
    cm, iou = cm.astype(float), miou(cm)["per_class"]
    shape_pixels = cm[:C].sum()
    return ({"found": float(np.trace(cm[:C, :C]) / shape_pixels),
             "missed_as_background": float(cm[:C, C].sum() / shape_pixels),
             "taken_for_another_class": float((cm[:C, :C].sum() - np.trace(cm[:C, :C])) / shape_pixels)},
            {name: {"iou": float(iou[c]), "precision": float(cm[c, c] / max(cm[:, c].sum(), 1)),
                    "recall": float(cm[c, c] / max(cm[c].sum(), 1))} for c, name in enumerate(data.TOY_CLASSES)})


@torch.no_grad()
def error_budget(ckpt, n, tau_bgs=TAU_BGS, long_sides=None):
    """Where a checkpoint's mIoU goes, on the first n validation scenes, every class run (E = 1,
    S = 1): the mIoU at each background threshold; with the classes absent from the ground truth
    removed; per class IoU, precision and recall; the shapes' pixels split into found, missed
    (background) and taken for another class; recall by depth inside the shape; background pixels
    taken for a class; and the mIoU at each working long side (tau_bg 0.5). long_sides: the first is
    where the rest is measured; default: the checkpoint's own (command 1's), then the scenes' side."""
    model, val = DiGSeg.from_checkpoint(ckpt).eval(), data.build("toy", "", "val", evaluation=True)
    long_sides = long_sides or tuple(dict.fromkeys((model.cfg.resolution, data.TOY_SIZE)))
    C, names = len(data.TOY_CLASSES), list(data.TOY_CLASSES)
    tally, oracle, sides = Tally(C, tau_bgs), 0, {s: 0 for s in long_sides[1:]}
    for i in range(min(n, len(val))):
        image, gt, _ = val[i]
        probs = model.segment(image, names, ensemble=1, steps=1, long_side=long_sides[0])     # (C, H, W)
        tally.add(probs, gt)
        present = torch.zeros(C, 1, 1)
        present[[c for c in gt.unique().tolist() if c >= 0]] = 1
        oracle = oracle + confusion_matrix(aggregate(probs * present, 0.5), gt, C)
        for s in sides:
            sides[s] = sides[s] + confusion_matrix(aggregate(model.segment(image, names, ensemble=1, steps=1, long_side=s)),
                                                   gt, C)
    cm = tally.cms[0.5]
    shape_pixels, per_class = _shares(cm, C)
    return {"checkpoint": ckpt, "scenes": min(n, len(val)),
            "miou_by_tau_bg": {str(t): miou(tally.cms[t])["miou_gt"] for t in tau_bgs},
            "miou_absent_classes_removed": miou(oracle)["miou_gt"],
            "miou_by_long_side": {str(long_sides[0]): miou(cm)["miou_gt"], **{str(s): miou(m)["miou_gt"] for s, m in sides.items()}},
            "per_class": per_class, "shape_pixels": shape_pixels, "recall_by_depth": tally.recall_by_depth(),
            "background_taken_for_a_class": float(cm[C, :C].sum() / max(cm[C].sum(), 1))}


@torch.no_grad()
def vae_ceiling(sd2_dir, n, scales=(1, 2)):
    """The mIoU of the ground truth itself through the toy VAE, as inference sees masks: every class's
    mask (2y - 1) encoded and decoded, M_c its channel mean, aggregated at tau_bg = 0.5; at each
    scale, the masks enlarged that much (nearest) before the VAE and the maps resized back (bilinear,
    as segment() does): the ceiling of a working size that many times the scenes' side. Its recall by
    depth, per class and the shares of the shape pixels are those of the first scale."""
    sd, val, C = load_sd2(sd2_dir), data.build("toy", "", "val", evaluation=True), len(data.TOY_CLASSES)
    tallies = {s: Tally(C, (0.5,)) for s in scales}
    for i in range(min(n, len(val))):
        _, gt, _ = val[i]
        masks = torch.stack([(gt == c).float() for c in range(C)])                       # (C, H, W)
        for s, tally in tallies.items():
            big = F.interpolate(masks[None], scale_factor=s, mode="nearest")[0]           # (C, sH, sW)
            probs = image_to_mask(sd.vae.decode(sd.vae.encode(mask_to_image(big))[0]))
            tally.add(F.interpolate(probs[None], size=gt.shape, mode="bilinear", align_corners=False)[0], gt)
    first = tallies[scales[0]]
    shape_pixels, per_class = _shares(first.cms[0.5], C)
    return {"scenes": min(n, len(val)), "miou": miou(first.cms[0.5])["miou_gt"],
            "miou_by_long_side": {str(data.TOY_SIZE * s): miou(t.cms[0.5])["miou_gt"] for s, t in tallies.items()},
            "per_class": per_class, "shape_pixels": shape_pixels, "recall_by_depth": first.recall_by_depth()}


def ceiling_figure(path, budgets, ceiling):
    """One PNG, two panels: recall by depth inside the shape, and recall per class, of each checkpoint
    (budgets: {label: error_budget(...)}) and of the ceiling."""
    every = {**budgets, "VAE ceiling (ground truth)": ceiling}
    with tempfile.TemporaryDirectory() as tmp:
        left = line_plot(os.path.join(tmp, "a.png"), {k: (list(DEPTHS), list(v["recall_by_depth"].values()))
                                                     for k, v in every.items()},
                         title="recall by a pixel's depth inside its shape", xlabel="depth, px (1 = on the edge; 4 = 4 and deeper)",
                         ylabel="recall", size=(520, 420))
        right = bar_plot(os.path.join(tmp, "b.png"), list(data.TOY_CLASSES),
                         {k: [(v["per_class"][c]["recall"],) * 3 for c in data.TOY_CLASSES] for k, v in every.items()},
                         title="recall per class (tau_bg 0.5)", ylabel="recall", size=(760, 420))
    side_by_side(left, right).save(path)
