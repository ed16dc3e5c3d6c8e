"""The toy world: procedural scenes of coloured shapes, the dataset that command 1 (toy.py) trains
and evaluates on, with the same item format as the real datasets' views (data/sets.py)."""
import colorsys

import numpy as np
import torch
from PIL import Image, ImageDraw

from data.common import NONE, DataError, draw_class, fixed_subset

TOY_SIZE = 64                                  # the scenes' side in pixels
TOY_CLASSES = ("circle", "square", "triangle", "star", "ring", "bar")
TOY_HUES = (0.0, 0.6, 0.3, 0.15, 0.8, 0.45)  # each class paints in its own hue family (HSV hue in [0, 1))


def toy_scene(seed, index, size=64):
    """One procedural scene: (RGB uint8 (size, size, 3), labels int64 (size, size)).

    1-3 shapes of distinct classes with random sizes, positions and rotations, painted in order so
    that later shapes occlude earlier ones, on a two-colour gradient with a faint striped texture.
    labels int64: the class index (0..5) of the visible shape, NONE (-1) elsewhere.
    Deterministic: the same (seed, index, size) always gives the same scene.

    A class is told by its shape and by its hue family (TOY_HUES, jittered, with random saturation
    and brightness): with random colours the tiny from-scratch models that must learn this world
    in minutes recognise shapes too slowly (with random colours the toy CLIP stayed at chance:
    docs/results.md, "The toy world")."""
    rng = np.random.default_rng([seed, index])
    yy, xx = np.mgrid[0:size, 0:size] / size
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    a = rng.uniform(0, 2 * np.pi)
    ramp = np.cos(a) * xx + np.sin(a) * yy
    ramp = (ramp - ramp.min()) / (np.ptp(ramp) + 1e-9)
    img = c0 * (1 - ramp[..., None]) + c1 * ramp[..., None]
    img += 10 * np.sin(2 * np.pi * rng.uniform(3, 10) * (xx + rng.uniform(-1, 1) * yy) + rng.uniform(0, 6.3))[..., None]
    labels = np.full((size, size), NONE, np.int64)
    for c in rng.choice(len(TOY_CLASSES), size=rng.integers(1, 4), replace=False):
        r = rng.uniform(0.13, 0.25) * size
        cx, cy = rng.uniform(0.6 * r, size - 0.6 * r, 2)
        inside = _shape_mask(TOY_CLASSES[c], cx, cy, r, rng.uniform(0, 2 * np.pi), size)
        colour = _class_colour(c, rng)
        for _ in range(100):                                     # keep shapes visible on their background
            if np.abs(colour - img[inside].mean(0)).sum() >= 150:
                break
            colour = _class_colour(c, rng)
        img[inside] = colour
        labels[inside] = c
    return img.clip(0, 255).astype(np.uint8), labels


def _class_colour(c, rng):
    """An RGB colour (0..255) of class c's hue family: hue TOY_HUES[c] +- 0.04, saturation and
    value in [0.5, 1]."""
    hue = (TOY_HUES[c] + rng.uniform(-0.04, 0.04)) % 1.0
    return 255 * np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.5, 1), rng.uniform(0.5, 1)))


def _shape_mask(kind, cx, cy, r, angle, size):
    """Boolean (size, size) mask of one shape centred at (cx, cy) with radius ~r, rotated by angle."""
    def rotated(points):
        p = np.asarray(points, float)
        ca, sa = np.cos(angle), np.sin(angle)
        return [(cx + x * ca - y * sa, cy + x * sa + y * ca) for x, y in p]

    m = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(m)
    if kind == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
    elif kind == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
        d.ellipse([cx - 0.55 * r, cy - 0.55 * r, cx + 0.55 * r, cy + 0.55 * r], fill=0)
    elif kind == "square":
        d.polygon(rotated([(-0.85 * r, -0.85 * r), (0.85 * r, -0.85 * r), (0.85 * r, 0.85 * r), (-0.85 * r, 0.85 * r)]), fill=1)
    elif kind == "triangle":
        d.polygon(rotated([(r * np.cos(k * 2 * np.pi / 3), r * np.sin(k * 2 * np.pi / 3)) for k in range(3)]), fill=1)
    elif kind == "star":
        d.polygon(rotated([((r if k % 2 == 0 else 0.45 * r) * np.cos(k * np.pi / 5),
                            (r if k % 2 == 0 else 0.45 * r) * np.sin(k * np.pi / 5)) for k in range(10)]), fill=1)
    elif kind == "bar":
        d.polygon(rotated([(-1.2 * r, -0.3 * r), (1.2 * r, -0.3 * r), (1.2 * r, 0.3 * r), (-1.2 * r, 0.3 * r)]), fill=1)
    return np.asarray(m, bool)


class ToyScenes(torch.utils.data.Dataset):
    """The toy world, evaluation view: items as EvalSet's, (image (3, S, S) in [-1, 1], labels
    (S, S) int64, name). Pixels of no shape are NONE: a valid, scored pixel of no class
    (predicting a class there is a false positive).

    Scenes are generated on the fly from (seed, index): the train split uses scene seeds
    1000 + seed, the val split 2000 + seed, so the two never share a scene."""

    def __init__(self, split, size=64, n=None, fraction=1.0, seed=0):
        if split not in ("train", "val"):
            raise DataError(f"toy: unknown split {split!r}; valid: train, val")
        self.scene_seed = (1000 if split == "train" else 2000) + seed
        self.indices = fixed_subset(n or (20000 if split == "train" else 500), fraction, seed)
        self.size, self.seed = size, seed
        self.class_names, self.synonyms = list(TOY_CLASSES), list(TOY_CLASSES)
        self.ignore_index = 255

    def __len__(self):
        return len(self.indices)

    def load(self, index):
        """-> (image (3, S, S) in [-1, 1], labels (S, S) int64 numpy, name)."""
        image, labels = toy_scene(self.scene_seed, self.indices[index], self.size)
        x = torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1     # (S, S, 3) -> (3, S, S)
        return x, labels, f"toy-{self.scene_seed}-{self.indices[index]}"

    def __getitem__(self, index):
        x, labels, name = self.load(index)
        return x, torch.from_numpy(labels), name

    def class_mask(self, labels, c):
        return labels == c

    def present_classes(self, labels):
        return sorted(int(c) for c in np.unique(labels) if c >= 0)


class ToyTrain(ToyScenes):
    """The toy world, training view: items as TrainSet's (one class per sample, `draw_class`,
    seeded by (seed, epoch, index)). Augmentation: a random size x size crop of the 64 px scene
    (size=64: the whole scene), then a random horizontal flip. The class is drawn among those
    visible in the crop, as TrainSet draws it after its crop.

    Crops are how the paper trains too (512 px crops of larger images, inference on whole ones);
    for the toy they are a matter of time: the toy preset trains on 48 px crops, a bit over half a
    scene's pixels, and segments whole 64 px scenes as well as when trained on them (docs/results.md)."""

    def __init__(self, split, size=64, n=None, template="a photo of a {}.", p_absent=0.0, fraction=1.0, seed=0):
        super().__init__(split, size=TOY_SIZE, n=n, fraction=fraction, seed=seed)
        if not 8 <= size <= TOY_SIZE or size % 8:
            raise DataError(f"toy: training crop size={size}; expected a multiple of 8 in [8, {TOY_SIZE}]")
        self.crop, self.template, self.p_absent, self.epoch = size, template, p_absent, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __getitem__(self, index):
        x, labels, _ = self.load(index)
        rng = np.random.default_rng([self.seed, self.epoch, index])
        if self.crop < self.size:                                   # a random crop x crop window
            top, left = rng.integers(0, self.size - self.crop + 1, 2)
            x, labels = x[:, top:top + self.crop, left:left + self.crop], labels[top:top + self.crop, left:left + self.crop]
        c = draw_class(rng, self.present_classes(labels), len(TOY_CLASSES), self.p_absent)
        mask = torch.from_numpy(self.class_mask(labels, c).astype(np.float32))
        if rng.random() < 0.5:
            x, mask = x.flip(-1), mask.flip(-1)
        return dict(image=x, mask=mask, valid=torch.ones_like(mask), prompt=self.template.format(TOY_CLASSES[c]),
                    class_index=c)
