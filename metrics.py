"""Segmentation metrics (Sec. 4): the confusion matrix, both mIoU conventions, binary IoU/Dice.

mIoU follows the open-vocabulary segmentation literature: one confusion matrix per benchmark,
accumulated over all images with ignored pixels dropped, IoU_c = TP / (TP + FP + FN). Two means
of it appear in papers (they differ when a class never occurs in the evaluated ground truth):
  miou_gt   detectron2 (current): mean over the classes with ground-truth pixels;
  miou_all  mmsegmentation / older detectron2: nanmean over the classes with TP + FP + FN > 0,
            so a class absent from the ground truth but predicted somewhere counts as IoU 0.
Both come from the same matrix; say which one a table reports.

Pixels of several classes (Agriculture-Vision's labels overlap) carry SEVERAL + b in the ground
truth, b the bitmask of their classes (data/layouts.py decodes them); confusion_matrix scores them by the
challenge's rule (github.com/SHI-Labs/Agriculture-Vision, "Evaluation metric").
"""
import csv
import os

import numpy as np
import torch

SEVERAL = 256           # ground truth SEVERAL + b: a pixel of every class whose bit is set in b (>= 2 bits);
SET_CLASSES = 16        # only in datasets of at most this many classes (above, values >= SEVERAL are classes)


def _as_numpy(x):
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def class_sets(gt, num_classes):
    """Which ground-truth values are pixels of several classes -> (bool like gt, the class bitmasks b
    where so, else 0). Only datasets of <= SET_CLASSES classes have them."""
    gt = np.asarray(gt)
    C = num_classes
    several = (gt >= SEVERAL) & (gt < SEVERAL + 2 ** min(C, SET_CLASSES)) & (C <= SET_CLASSES)
    return several, np.where(several, gt - SEVERAL, 0)


def confusion_matrix(pred, gt, num_classes, ignore_index=255):
    """Pixel counts, int64 (C + 1, C + 1): rows = ground truth, columns = prediction.

    Index C is "none", a pixel of no class: a prediction outside [0, C) (aggregate's -1 background)
    and a ground truth of -1 (data.NONE, e.g. DeepGlobe background). So a pixel of class c predicted
    as background is a false negative of c, and background predicted as c a false positive.
    Pixels whose ground truth is ignore_index are dropped. Matrices of several images add up.
    A pixel of several classes (gt = SEVERAL + b) counts once per class y of its set Y, as the
    Agriculture-Vision challenge scores overlaps: a hit of y (row y, column y) for every y when
    the prediction is in Y, else a miss (row y, column prediction) for every y.
    pred, gt: integer arrays or tensors of one shape."""
    pred, gt = _as_numpy(pred).astype(np.int64), _as_numpy(gt).astype(np.int64)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in shape")
    C = num_classes
    keep = gt != ignore_index
    pred, gt = pred[keep], gt[keep]
    several, sets = class_sets(gt, C)
    if several.any():                                   # one (gt, pred) pair per class of each such pixel
        sets, p = sets[several], pred[several]
        hit = (p >= 0) & (p < C) & ((sets >> p.clip(0, C - 1)) & 1 == 1)
        ys = [(y, sets >> y & 1 == 1) for y in range(C)]
        pred = np.concatenate([pred[~several]] + [np.where(hit[has], y, p[has]) for y, has in ys])
        gt = np.concatenate([gt[~several]] + [np.full(int(has.sum()), y) for y, has in ys])
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


def binary_counts(pred, gt):
    """One class of one image -> [|P & G|, |P | G|, |P|, |G|]: add them over images to pool."""
    pred, gt = _as_numpy(pred).astype(bool), _as_numpy(gt).astype(bool)
    return np.array([(pred & gt).sum(), (pred | gt).sum(), pred.sum(), gt.sum()], dtype=np.int64)


def pooled_iou_dice(counts):
    """counts (C, 4) summed binary_counts -> per-class IoU and Dice (C,), nan where undefined."""
    inter, union, p, g = counts.T.astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / union, np.nan), np.where(p + g > 0, 2 * inter / (p + g), np.nan)


def pooled_precision_recall_f1(counts):
    """counts (C, 4) summed binary_counts -> per-class precision |P & G| / |P|, recall |P & G| / |G|
    and F1 = 2PR / (P + R) (C,), nan where undefined; Table 3's binary scores (F1 equals Dice)."""
    inter, _, p, g = counts.T.astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision, recall = np.where(p > 0, inter / p, np.nan), np.where(g > 0, inter / g, np.nan)
    return precision, recall, pooled_iou_dice(counts)[1]


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
