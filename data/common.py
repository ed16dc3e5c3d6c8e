"""What every dataset view shares: the label values, the error, reading images, label maps and
class lists, and the two seeded draws (a fixed subset, one class per sample)."""
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps

NONE = -1
INVALID = -2            # a raw label value that the dataset never uses (an error if found)
CLASSES_DIR = Path(__file__).resolve().parent.parent / "classes"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")


class DataError(ValueError):
    """A dataset that is missing, incomplete or inconsistent; the message names the file."""


# ---- reading files ---------------------------------------------------------------------------

def load_rgb(path):
    """Any image file -> RGB PIL image, EXIF orientation applied (as detectron2's read_image),
    through `to_rgb`."""
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            img.load()
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot read image {path}: {e}") from e
    return to_rgb(img)


def grey_levels(img):
    """The one policy for high-bit-depth grey images (PIL's convert("RGB") would clip them at
    255): a PIL image in mode I;16*, I or F -> its values as float64 (H, W) in [0, 1], scaled by
    65535 (16-bit modes, and I/F images with values above 255) or by 255. None for other modes."""
    if not img.mode.startswith(("I", "F")):
        return None
    a = np.asarray(img, dtype=np.float64)
    top = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
    return (a / top).clip(0, 1)


def to_rgb(img):
    """Any PIL image -> RGB: alpha dropped, palettes, grey and CMYK converted by PIL, high-bit-depth
    grey scaled by `grey_levels` and rounded to 8 bits."""
    grey = grey_levels(img)
    if grey is not None:
        return Image.fromarray((grey * 255).round().astype(np.uint8)).convert("RGB")
    return img.convert("RGB")


def pil_to_tensor(img):
    """Any PIL image -> (3, H, W) float32 in [-1, 1]; high-bit-depth grey keeps its precision."""
    grey = grey_levels(img)
    a = np.repeat(grey[..., None], 3, axis=2) if grey is not None else np.asarray(to_rgb(img), np.float64) / 255
    return torch.from_numpy(a * 2 - 1).float().permute(2, 0, 1).contiguous()    # (H, W, 3) -> (3, H, W)


def tensor_to_pil(x):
    """(3, H, W) in [-1, 1] -> RGB PIL image."""
    a = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(a)


def image_to_tensor(img):
    """RGB PIL image -> (3, H, W) float32 in [-1, 1]."""
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1)
    return x.permute(2, 0, 1).contiguous()                     # (H, W, 3) -> (3, H, W)


def read_raw_labels(path, mode="", size=None):
    """A label-map file -> its raw values (H, W), no EXIF (label maps carry none). `mode`: convert
    first (DeepGlobe and REFUGE masks are read as grey levels, "L"). An .xml file is a polygon
    annotation (MoNuSeg), drawn at `size` = the image's (width, height)."""
    if str(path).lower().endswith(".xml"):
        return read_polygon_mask(path, size)
    try:
        with Image.open(path) as img:
            img.load()
            if mode:
                img = img.convert(mode)
            raw = np.asarray(img)
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot read label map {path}: {e}") from e
    if raw.ndim != 2:
        raise DataError(f"label map {path} has mode {img.mode} with {raw.shape[2]} channels; expected "
                        "one channel of label values (a P, L or 16-bit png/tif)")
    return raw


def read_polygon_mask(path, size):
    """Aperio ImageScope XML as MoNuSeg ships it (Annotation/Regions/Region/Vertices/Vertex with X
    and Y in pixels), one region per nucleus outline -> raw (H, W) uint8: 1 inside any region, else 0."""
    try:
        regions = ET.parse(path).getroot().iter("Region")
        img = Image.new("L", size, 0)
        draw = ImageDraw.Draw(img)
        for region in regions:
            points = [(float(v.get("X")), float(v.get("Y"))) for v in region.iter("Vertex")]
            if len(points) >= 3:
                draw.polygon(points, fill=1)
    except (OSError, ET.ParseError, TypeError, ValueError) as e:
        raise DataError(f"cannot read polygon annotation {path}: {e}") from e
    return np.asarray(img)


def read_class_folders(path, names):
    """Agriculture-Vision's labels of one sample: one binary PNG per class, overlapping, in
    <split>/labels/<class>/<id>.png (the class name with '_' for ' '), and two validity maps, the
    field boundary <split>/boundaries/<id>.png (= path) and <split>/masks/<id>.png: pixels outside
    either are not scored. -> raw (H, W) int64: the bitmask of the sample's classes (bit c = the
    c-th name), 2 ** len(names) where not valid. Class folders not named are not read (the 2021
    release's storm_damage, which its challenge does not score: its pixels count as background)."""
    path, split_dir = Path(path), Path(path).parent.parent
    folders = [n.replace(" ", "_") for n in names]
    boundary = read_raw_labels(path, "L") > 0

    def read(f):                                         # one more binary map of this sample
        if not f.is_file():
            raise DataError(f"{f} not found: every sample needs its validity mask and one PNG per class "
                            f"({', '.join(folders)})")
        a = read_raw_labels(f, "L") > 0
        if a.shape != boundary.shape:
            raise DataError(f"{f} is {a.shape[1]}x{a.shape[0]} but {path} is {boundary.shape[1]}x{boundary.shape[0]}")
        return a

    valid = boundary & read(split_dir / "masks" / path.name)
    raw = np.zeros(valid.shape, np.int64)
    for bit, folder in enumerate(folders):
        raw |= read(split_dir / "labels" / folder / path.name).astype(np.int64) << bit
    return np.where(valid, raw, 2 ** len(names))


def read_class_file(path):
    """classes/<name>.txt -> the class lines (synonym lists), '#' comments and blank lines skipped."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [ln.strip() for ln in f]
    except OSError as e:
        raise DataError(f"cannot read class list {path}: {e}") from e
    names = [ln for ln in lines if ln and not ln.startswith("#")]
    if not names:
        raise DataError(f"class list {path} has no class lines")
    return names


def synonyms_of(line):
    """'building, edifice' -> ['building', 'edifice']: a class line's synonyms."""
    return [w.strip() for w in line.split(",") if w.strip()]


def class_names_of(lines):
    """Synonym lines -> one distinct name per class: the first synonym, or, where other classes
    share it, the shortest run of the line's first synonyms that no other class has ("bag,
    handbag" beside "bag" and "bag, traveling bag" in ADE-847). Our reading: DiGSeg conditions on
    one prompt per class, so the references' answer to shared names, CAT-Seg's average of one CLIP
    embedding per synonym (cvlab-kaist/CAT-Seg, cat_seg/modeling/transformer/cat_seg_predictor.py,
    class_embeddings), serves the proposals (digseg.ClassProposer) but not the U-Net's prompt."""
    split = [synonyms_of(line) for line in lines]
    names = []
    for i, words in enumerate(split):
        others = [w for j, w in enumerate(split) if j != i]
        n = 1
        while n < len(words) and any(o[:n] == words[:n] for o in others):
            n += 1
        names.append(", ".join(words[:n]))
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DataError(f"the class list repeats {repeated}: classes need distinct names (prompts)")
    return names


# ---- the seeded draws -------------------------------------------------------------------------

def fixed_subset(n, fraction, seed):
    """Indices of a fixed random `fraction` of n samples (the data-efficiency study: 1, 1/2 ... 1/16).
    A prefix of one seeded permutation, so for one seed the smaller subsets nest in the larger."""
    if not 0 < fraction <= 1:
        raise DataError(f"fraction must be in (0, 1], got {fraction}")
    keep = max(1, round(n * fraction))
    return sorted(np.random.default_rng(seed).permutation(n)[:keep].tolist())


def draw_class(rng, present, num_classes, p_absent):
    """The class of one training sample (Eq. 6 trains one class at a time): uniform among the
    classes present; with probability p_absent (and always when none is present) uniform among
    the absent ones, whose mask is empty."""
    absent = sorted(set(range(num_classes)) - set(present))
    use_absent = bool(absent) and (not present or rng.random() < p_absent)
    pool = absent if use_absent else present
    return pool[rng.integers(len(pool))]
