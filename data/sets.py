"""The dataset views the scripts read: EvalSet (whole images and their label maps), TrainSet (one
class's binary mask and prompt per sample), a merged TrainSet, and `build`, which picks one."""
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data.common import (CLASSES_DIR, INVALID, NONE, DataError, class_names_of, draw_class, fixed_subset, image_to_tensor,
                         load_rgb, read_class_file, read_class_folders, read_raw_labels)
from data.layouts import DATASETS, find_pairs
from data.toy import ToyScenes, ToyTrain
from metrics import class_sets


class LabelledImages(torch.utils.data.Dataset):
    """The files of one split of one dataset (DATASETS[name]) and their decoded label maps."""

    def __init__(self, name, root, split, classes=None, fraction=1.0, seed=0):
        if name not in DATASETS:
            raise DataError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
        self.name, self.split, self.spec = name, split, DATASETS[name]
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"{name}: dataset root {root} not found. Expected under it: {self.spec.layout}")
        self.classes_file = Path(classes) if classes else (
            CLASSES_DIR / f"{self.spec.classes}.txt" if self.spec.classes else root / "classes.txt")
        self.synonyms = read_class_file(self.classes_file)
        self.class_names = class_names_of(self.synonyms)
        C = len(self.class_names)
        self.ignore_index = 255 if C <= 255 else 65535
        table = self.spec.label_table(C, self.ignore_index)
        needed = max(v for v in table.values() if v not in (NONE, self.ignore_index) and not class_sets(v, C)[0]) + 1
        if needed > C:
            raise DataError(f"{name}: the class list {self.classes_file} has {C} classes, fewer than the "
                            f"dataset's labels need ({needed})")
        self.lut = np.full(max(table) + 1, INVALID, dtype=np.int64)     # raw value -> label
        self.lut[list(table)] = list(table.values())
        pairs = find_pairs(name, self.spec, root, split)
        self.pairs = [pairs[i] for i in fixed_subset(len(pairs), fraction, seed)]

    def __len__(self):
        return len(self.pairs)

    def load(self, index):
        """-> (RGB PIL image, labels (H, W) int64 as in the module docstring, image path)."""
        image_path, mask_path = self.pairs[index]
        image = load_rgb(image_path)
        raw = self.read_labels(mask_path, image.size)
        if raw.shape != (image.height, image.width):
            raise DataError(f"image {image_path} is {image.width}x{image.height} but its label map "
                            f"{mask_path} is {raw.shape[1]}x{raw.shape[0]}")
        return image, self.decode(raw, mask_path), str(image_path)

    def read_labels(self, mask_path, size):
        """A sample's raw label values (H, W); size = its image's (width, height)."""
        if self.spec.class_folders:
            return read_class_folders(mask_path, self.class_names)
        return read_raw_labels(mask_path, self.spec.mask_mode, size=size)

    def decode(self, raw, mask_path):
        raw = raw.astype(np.int64)
        outside = (raw < 0) | (raw >= len(self.lut))
        labels = self.lut[np.where(outside, 0, raw)]
        bad = outside | (labels == INVALID)
        if bad.any():
            raise DataError(f"label map {mask_path}: value {raw[bad][0]} is outside the class list of "
                            f"{self.name} ({len(self.class_names)} classes, {self.classes_file})")
        return labels

    def class_mask(self, labels, c):
        """The binary mask (bool, like labels) of class c: its own label plus any nested classes,
        and the pixels of several classes (SEVERAL + b) that include c."""
        mask = np.isin(labels, (c,) + tuple(self.spec.nested.get(c, ())))
        several, sets = class_sets(labels, len(self.class_names))
        if several.any():
            mask |= several & (sets >> c & 1 == 1)
        return mask

    def present_classes(self, labels):
        """Sorted classes with at least one pixel (ignore and NONE are no class)."""
        C, values = len(self.class_names), np.unique(labels)
        present = {int(v) for v in values if 0 <= v < C}
        several, sets = class_sets(values, C)
        present |= {c for b in sets[several] for c in range(C) if b >> c & 1}
        present |= {c for c, inner in self.spec.nested.items() if present & set(inner)}
        return sorted(present)


    def check(self):
        """Read every label map once, before training rather than hours into it: one channel, the
        size of its image (read from the image's header), every value in the class list.
        -> the problems, one line each ("" when all is well), with a progress line."""
        problems = []
        for i, (image_path, mask_path) in enumerate(self.pairs):
            try:
                w, h = image_size(image_path)
                raw = self.read_labels(mask_path, (w, h))
                if raw.shape != (h, w):
                    raise DataError(f"label map {mask_path} is {raw.shape[1]}x{raw.shape[0]} but its image "
                                    f"{image_path} is {w}x{h}")
                self.decode(raw, mask_path)
            except DataError as e:
                problems.append(str(e))
            progress(i + 1, len(self.pairs), f"checking {self.name} {self.split} label maps")
        return problems


def image_size(path):
    """(width, height) of an image file as load_rgb returns it (EXIF rotation applied), from its header."""
    try:
        with Image.open(path) as img:
            w, h = img.size
            rotated = img.getexif().get(0x0112, 1) in (5, 6, 7, 8)   # EXIF orientation: a quarter turn
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot read image {path}: {e}") from e
    return (h, w) if rotated else (w, h)


def progress(done, total, what):
    """A live progress line on a terminal; a line per tenth of the work in a log file."""
    if sys.stdout.isatty():
        print(f"\r{what}: {done}/{total}", end="\n" if done == total else "", flush=True)
    elif done == total or done % max(1, total // 10) == 0:
        print(f"{what}: {done}/{total}", flush=True)


class EvalSet(LabelledImages):
    """Evaluation view: (image (3, H, W) in [-1, 1], labels (H, W) int64, image path) at the original
    size; predictions are scored at the label map's size. `ignore_index` is the unscored value,
    `spec.metric` says whether the benchmark reports mIoU or per-class binary IoU/Dice."""

    def __getitem__(self, index):
        image, labels, path = self.load(index)
        return image_to_tensor(image), torch.from_numpy(labels), path


class TrainSet(LabelledImages):
    """Training view: one class per sample, as Eq. 6 trains.

    Everything random is drawn from numpy's Generator seeded by (seed, epoch, index), so an item is
    the same whatever the process, worker or batch it lands in (DDP, resume). Per item:
      1. augment (`augment`): resize the short side to size * U(scale), random crop/pad to size x size,
         horizontal flip with p = 0.5;
      2. the class: uniform among the classes present in the augmented crop; with probability
         p_absent (and always when none is present) uniform among the absent ones, with an empty mask;
      3. mask = that class's pixels (nested classes included). Ignored pixels are 0, like background:
         the loss (Eq. 6) compares VAE latents of the whole mask, where a pixel-wise ignore cannot act;
         `valid` marks them for a loss in pixel space (the e2e objective, digseg.mask_loss).
      4. prompt = template.format(the class's name: its first synonym, made distinct by class_names_of).
    """

    def __init__(self, name, root, split="train", size=512, template="a photo of a {}.", p_absent=0.0,
                 scale=(0.8, 1.2), classes=None, fraction=1.0, seed=0):
        super().__init__(name, root, split, classes=classes, fraction=fraction, seed=seed)
        if not 0 <= p_absent <= 1:
            raise DataError(f"p_absent must be in [0, 1], got {p_absent}")
        self.size, self.template, self.p_absent, self.scale, self.seed = size, template, p_absent, scale, seed
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __getitem__(self, index):
        rng = np.random.default_rng([self.seed, self.epoch, index])
        image, labels, _ = self.load(index)
        x, labels = augment(image, labels, self.size, rng, self.scale, self.ignore_index)
        c = draw_class(rng, self.present_classes(labels), len(self.class_names), self.p_absent)
        mask = torch.from_numpy(self.class_mask(labels, c).astype(np.float32))
        valid = torch.from_numpy((labels != self.ignore_index).astype(np.float32))
        return dict(image=x, mask=mask, valid=valid, prompt=self.template.format(self.class_names[c]), class_index=c)


def augment(image, labels, size, rng, scale=(0.8, 1.2), ignore_index=255):
    """The paper's training augmentation on an image and its label map together.

    Resize so the short side is size * s, s ~ U(scale) (bicubic for the image, nearest for labels),
    take a size x size window at a random offset (where the window leaves the image: image 0 = mid
    grey in [-1, 1], labels ignore_index), flip both left-right with p = 0.5.
    -> (image (3, size, size) float32 in [-1, 1], labels (size, size) int64)."""
    s = rng.uniform(*scale)
    r = size * s / min(image.width, image.height)
    w, h = max(1, round(image.width * r)), max(1, round(image.height * r))
    image = image.resize((w, h), Image.BICUBIC)
    labels = np.asarray(Image.fromarray(labels.astype(np.int32)).resize((w, h), Image.NEAREST), dtype=np.int64)
    top = int(rng.integers(min(0, h - size), max(0, h - size) + 1))
    left = int(rng.integers(min(0, w - size), max(0, w - size) + 1))
    x = window(np.asarray(image, dtype=np.float32) / 127.5 - 1, top, left, size, 0.0)
    labels = window(labels, top, left, size, ignore_index)
    if rng.random() < 0.5:
        x, labels = x[:, ::-1], labels[:, ::-1]
    x = torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1).contiguous()    # (S, S, 3) -> (3, S, S)
    return x, np.ascontiguousarray(labels)


def resize_pair(image, labels, long_side=512, multiple=8):
    """An image (3, H, W) and its labels (H, W), resized together (bilinear and nearest) so that the
    long side is at most `long_side` and both sides divide by `multiple` (the VAE's factor)."""
    H, W = labels.shape
    s = min(1.0, long_side / max(H, W))
    h, w = (max(multiple, round(n * s) // multiple * multiple) for n in (H, W))
    image = torch.nn.functional.interpolate(image[None].float(), size=(h, w), mode="bilinear", antialias=True)[0]
    labels = torch.nn.functional.interpolate(labels[None, None].float(), size=(h, w), mode="nearest")[0, 0]
    return image, labels.long()


def window(a, top, left, size, fill):
    """The size x size window of a (H, W, ...) at (top, left); where it leaves `a`, `fill`."""
    out = np.full((size, size) + a.shape[2:], fill, dtype=a.dtype)
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + size, a.shape[0]), min(left + size, a.shape[1])
    out[y0 - top:y1 - top, x0 - left:x1 - left] = a[y0:y1, x0:x1]
    return out


class MergedTrainSet(torch.utils.data.Dataset):
    """Several training sets as one (Table 5: COCO-Stuff + ADE20K -> Cityscapes / BDD100K), the label
    spaces merged by name: a class whose first name appears in two datasets is one class with one
    prompt. Samples are the parts' samples, in order; class_index refers to the merged list."""

    def __init__(self, parts):
        self.parts = parts
        self.name = "+".join(getattr(p, "name", "toy") for p in parts)
        self.class_names = list(dict.fromkeys(n for p in parts for n in p.class_names))
        self.offsets = np.cumsum([0] + [len(p) for p in parts])

    def __len__(self):
        return int(self.offsets[-1])

    def set_epoch(self, epoch):
        for p in self.parts:
            p.set_epoch(epoch)

    def check(self):
        return [problem for p in self.parts for problem in p.check()]

    def __getitem__(self, index):
        k = int(np.searchsorted(self.offsets, index, side="right")) - 1
        item = self.parts[k][index - int(self.offsets[k])]
        return {**item, "class_index": self.class_names.index(self.parts[k].class_names[item["class_index"]])}


def collate(items):
    """TrainSet items -> dict(image (B, 3, S, S), mask (B, S, S), valid (B, S, S), prompt [B], class_index (B,))."""
    return dict(image=torch.stack([it["image"] for it in items]),
                mask=torch.stack([it["mask"] for it in items]),
                valid=torch.stack([it["valid"] for it in items]),
                prompt=[it["prompt"] for it in items],
                class_index=torch.tensor([it["class_index"] for it in items]))


def build(name, root, split, *, evaluation=False, classes=None, fraction=1.0, seed=0, **train_options):
    """The training view of one split or, with evaluation=True, the evaluation view (which takes no
    train_options). name: a key of DATASETS or "toy" (the procedural toy world; root is not used).
    train_options, as TrainSet takes them: size=512, template="a photo of a {}.", p_absent=0.0,
    scale=(0.8, 1.2) (the toy world: size = the crop, <= 64, template, p_absent). `classes`: a class-list file of
    your own in place of the shipped one."""
    if "+" in name:
        if evaluation or name.count("+") != str(root).count(","):
            raise DataError(f"{name}: a merged set trains on several datasets (Table 5), with one root each: "
                            f"--data_root=ROOT1,ROOT2 in the same order; evaluate on one dataset at a time")
        return MergedTrainSet([build(n, r, split, classes=None, fraction=fraction, seed=seed, **train_options)
                               for n, r in zip(name.split("+"), str(root).split(","))])
    if name == "toy":
        if evaluation:
            return ToyScenes(split, fraction=fraction, seed=seed)
        options = {k: v for k, v in train_options.items() if k in ("size", "template", "p_absent")}
        return ToyTrain(split, fraction=fraction, seed=seed, **options)
    if evaluation:
        return EvalSet(name, root, split, classes=classes, fraction=fraction, seed=seed)
    return TrainSet(name, root, split, classes=classes, fraction=fraction, seed=seed, **train_options)
