"""eval.py metrics against a direct per-class count, and on hand-made cases."""
import csv
import math

import numpy as np
import pytest
import torch

from metrics import (binary_counts, binary_iou_dice, confusion_matrix, miou, pooled_iou_dice,
                     pooled_precision_recall_f1, write_per_class_csv)


def reference_scores(preds, gts, C, ignore):
    """The plain definition, class by class over boolean masks (no confusion matrix)."""
    pred, gt = np.concatenate([p.ravel() for p in preds]), np.concatenate([g.ravel() for g in gts])
    valid = gt != ignore
    iou = np.full(C, np.nan)
    for c in range(C):
        tp = np.sum((pred == c) & (gt == c) & valid)
        fp = np.sum((pred == c) & (gt != c) & valid)
        fn = np.sum((pred != c) & (gt == c) & valid)
        if tp + fp + fn:
            iou[c] = tp / (tp + fp + fn)
    in_gt = [c for c in range(C) if np.sum((gt == c) & valid)]
    return {"per_class": iou, "miou_gt": np.mean(iou[in_gt]), "miou_all": np.nanmean(iou),
            "pixel_acc": np.sum((pred == gt) & valid) / valid.sum()}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_miou_matches_the_per_class_definition(seed):
    """Random maps over several images with: ignore pixels, classes 5-6 never in the ground truth
    (6 is predicted, 5 is not), class 4 in the ground truth but never predicted, and -1 predictions."""
    rng = np.random.default_rng(seed)
    C, ignore = 7, 255
    preds, gts, cm = [], [], 0
    for _ in range(3):
        gt = rng.integers(0, 5, size=(13, 17))
        gt[rng.random(gt.shape) < 0.15] = ignore
        pred = np.where(rng.random(gt.shape) < 0.5, gt, rng.choice([-1, 0, 1, 2, 3, 6], size=gt.shape))
        pred[gt == 4] = rng.choice([-1, 0, 6], size=int((gt == 4).sum()))
        preds.append(pred)
        gts.append(gt)
        cm = cm + confusion_matrix(pred, gt, C, ignore_index=ignore)
    got, want = miou(cm), reference_scores(preds, gts, C, ignore)
    assert cm.dtype == np.int64 and cm.shape == (C + 1, C + 1)
    assert cm.sum() == sum(int((g != ignore).sum()) for g in gts)
    np.testing.assert_allclose(got["per_class"], want["per_class"], rtol=0, atol=1e-12)
    for key in ("miou_gt", "miou_all", "pixel_acc"):
        assert abs(got[key] - want[key]) < 1e-12, key
    assert got["per_class"][4] == 0 and np.isnan(got["per_class"][5]) and got["per_class"][6] == 0
    assert got["miou_all"] < got["miou_gt"]          # class 6: predicted, absent from gt -> only miou_all
    np.testing.assert_array_equal(got["gt_pixels"], [sum(int((g == c).sum()) for g in gts) for c in range(C)])


def test_miou_by_hand():
    gt = np.array([[0, 0, 1, 1], [2, 2, 255, 0]])
    pred = np.array([[0, 1, 1, 1], [-1, 2, 0, 3]])
    # class 0: TP 1 (gt 0 at (0,0)), FN 2 ((0,1)->1, (1,3)->3), FP 0 ((1,2) is ignored) -> 1/3
    # class 1: TP 2, FP 1 -> 2/3; class 2: TP 1, FN 1 (-1 = background) -> 1/2; class 3: FP 1 -> 0
    s = miou(confusion_matrix(pred, gt, 4))
    np.testing.assert_allclose(s["per_class"], [1 / 3, 2 / 3, 1 / 2, 0])
    assert math.isclose(s["miou_gt"], (1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert math.isclose(s["miou_all"], (1 / 3 + 2 / 3 + 1 / 2 + 0) / 4)
    assert math.isclose(s["pixel_acc"], 4 / 7)


def test_torch_and_numpy_inputs_agree_and_sizes_over_255():
    g = torch.Generator().manual_seed(0)
    gt = torch.randint(0, 847, (20, 30), generator=g)
    gt[:3] = 65535
    pred = torch.randint(-1, 847, (20, 30), generator=g)
    a = confusion_matrix(pred, gt, 847, ignore_index=65535)
    b = confusion_matrix(pred.numpy(), gt.numpy(), 847, ignore_index=65535)
    np.testing.assert_array_equal(a, b)
    assert a.sum() == 17 * 30


def test_bad_ground_truth_and_shapes_are_named():
    with pytest.raises(ValueError, match=r"ground truth holds 65535.*ignore_index=255"):
        confusion_matrix(np.zeros((2, 2)), np.full((2, 2), 65535), 847)
    with pytest.raises(ValueError, match=r"differ in shape"):
        confusion_matrix(np.zeros((2, 2)), np.zeros((2, 3)), 3)
    with pytest.raises(ValueError, match=r"differ in shape"):
        binary_iou_dice(np.zeros((2, 2)), np.zeros((3, 2)))


def test_binary_iou_dice_by_hand():
    a = np.zeros((4, 4), bool)
    a[0, :] = True                       # 4 pixels
    b = np.zeros((4, 4), bool)
    b[0, 2:] = b[1, 2:] = True           # 4 pixels, 2 shared with a
    assert binary_iou_dice(a, b) == {"iou": 2 / 6, "dice": 4 / 8}
    assert binary_iou_dice(a, a) == {"iou": 1.0, "dice": 1.0}
    assert binary_iou_dice(a, ~a) == {"iou": 0.0, "dice": 0.0}
    assert binary_iou_dice(np.zeros((3, 3)), np.zeros((3, 3))) == {"iou": 1.0, "dice": 1.0}
    assert binary_iou_dice(np.zeros((3, 3)), np.ones((3, 3))) == {"iou": 0.0, "dice": 0.0}
    # dice = 2 iou / (1 + iou) for any pair
    rng = np.random.default_rng(0)
    p, g = rng.random((50, 50)) < 0.3, rng.random((50, 50)) < 0.4
    s = binary_iou_dice(torch.from_numpy(p), torch.from_numpy(g))
    assert math.isclose(s["dice"], 2 * s["iou"] / (1 + s["iou"]))


def test_one_class_with_none_ground_truth_equals_binary_iou():
    """DeepGlobe-style: gt -1 = background (no class); the matrix's road IoU is the binary IoU."""
    rng = np.random.default_rng(3)
    road_gt, road_pred = rng.random((32, 32)) < 0.3, rng.random((32, 32)) < 0.35
    gt, pred = np.where(road_gt, 0, -1), np.where(road_pred, 0, -1)
    s = miou(confusion_matrix(pred, gt, 1))
    assert math.isclose(s["per_class"][0], binary_iou_dice(road_pred, road_gt)["iou"])
    assert math.isclose(s["pixel_acc"], float((road_pred == road_gt).mean()))


def test_per_class_csv(tmp_path):
    s = miou(confusion_matrix(np.array([0, 0, 2]), np.array([0, 1, 1]), 4))
    path = tmp_path / "sub" / "per_class.csv"
    write_per_class_csv(str(path), ["a", "b", "c", "d"], s)
    rows = list(csv.DictReader(open(path)))
    assert [r["class"] for r in rows] == ["a", "b", "c", "d"]
    assert [r["gt_pixels"] for r in rows] == ["1", "2", "0", "0"]
    assert float(rows[0]["iou"]) == pytest.approx(0.5) and float(rows[1]["iou"]) == 0
    assert rows[3]["iou"] == "nan"                 # never in gt nor predicted: undefined
    with pytest.raises(ValueError, match="3 class names for 4 classes"):
        write_per_class_csv(str(path), ["a", "b", "c"], s)


def test_pooled_precision_recall_f1_by_hand():
    p = np.zeros((4, 4), bool); p[:2] = True                  # 8 predicted
    g = np.zeros((4, 4), bool); g[1:] = True                  # 12 true, 4 of them predicted
    counts = np.stack([binary_counts(p, g), binary_counts(np.zeros((2, 2)), np.zeros((2, 2)))])
    precision, recall, f1 = pooled_precision_recall_f1(counts)
    assert (precision[0], recall[0]) == (4 / 8, 4 / 12) and f1[0] == pytest.approx(2 * 0.5 * (1 / 3) / (0.5 + 1 / 3))
    assert f1[0] == pytest.approx(pooled_iou_dice(counts)[1][0])          # F1 is Dice
    assert np.isnan(precision[1]) and np.isnan(recall[1]) and np.isnan(f1[1])


def test_values_above_several_are_classes_in_large_datasets():
    """SEVERAL + b marks a pixel of several classes only in datasets of <= SET_CLASSES classes; in
    ADE-847 the value 300 is class 300, and in a 3-class dataset it is an error."""
    from metrics import SEVERAL
    cm = confusion_matrix(np.array([300, 2]), np.array([300, SEVERAL + 3]), 847, ignore_index=65535)
    assert cm[300, 300] == 1 and cm[SEVERAL + 3, 2] == 1 and cm.sum() == 2
    with pytest.raises(ValueError, match="ground truth holds 300"):
        confusion_matrix(np.array([0]), np.array([300]), 3)
