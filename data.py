"""The paper's datasets (Sec. 4.1), read from their official on-disk layouts.

One table, `DATASETS`, says for each benchmark where its images and label maps lie and what the
label values mean; two views read it:

  TrainSet  item = dict(image (3, S, S) in [-1, 1], mask (S, S) float {0, 1}, valid (S, S) float {0, 1},
            prompt str, class_index int): the binary mask of ONE class and its prompt, as Eq. 6 trains
            (Sec. 3.6); valid = 0 where the pixel is not annotated
  EvalSet   item = (image (3, H, W) in [-1, 1], labels (H, W) int64, image path), at the original size

Label maps, as EvalSet yields them, are int64 in class-index space:
  c in [0, C)      class c (the c-th class line of classes/<name>.txt)
  NONE = -1        a valid pixel of no class (DeepGlobe background, REFUGE outside the disc)
  ignore_index     not annotated, not scored: 255, or 65535 where 255 is a class (ADE-847, PC-459)
  SEVERAL + b      a pixel of several classes, those whose bits are set in b (Agriculture-Vision,
                   whose labels overlap; only in datasets of <= metrics.SET_CLASSES classes)

Class lists live in classes/<name>.txt: lines starting with '#' are comments (the first says where
the list comes from), then one class per line in label order; "a, b, c" lists synonyms and the
prompt uses the first ("building, edifice" -> "a photo of a building."). `class_names` holds these
names, made distinct (class_names_of): ADE-847 has nine first synonyms that several classes share
("bag" is three classes), which would give them one prompt and leave all but one unpredictable.
`synonyms` holds the whole lines, which the CLIP proposals average over (digseg.ClassProposer).
Any dataset accepts `classes=PATH`, a list of your own in the same format.
"""
import colorsys
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps

from metrics import SET_CLASSES, SEVERAL, class_sets

NONE = -1
INVALID = -2            # a raw label value that the dataset never uses (an error if found)
CLASSES_DIR = Path(__file__).resolve().parent / "classes"
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


# ---- the datasets ----------------------------------------------------------------------------
# A label table maps raw label-map values to labels; it is a function of the number of classes C
# and the ignore_index, so that a class list of your own (classes=PATH) still works.

def same_ids(C, ignore):
    """Raw value v < C is class v; the raw ignore value is the ignore_index."""
    return {**{v: v for v in range(C)}, ignore: ignore}


def ade150_ids(C, ignore):
    """ADEChallengeData2016 png: 0 = 'other' (not annotated) -> ignore, v -> class v - 1."""
    return {0: ignore, **{v: v - 1 for v in range(1, C + 1)}}


# COCO-Stuff stuffthingmaps values (= labels.txt id - 1) of the 11 thing classes without annotations:
# street sign, hat, shoe, eye glasses, plate, mirror, window, desk, door, blender, hair brush.
COCO_UNUSED = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)


def cocostuff_ids(C, ignore):
    """stuffthingmaps png value v = COCO-Stuff labels.txt id v + 1 (0..181), 255 unlabeled. The 171
    used values map to 0..170 in order; the 11 unused ones (never present) and 255 to ignore."""
    used = [v for v in range(182) if v not in COCO_UNUSED]
    return {**{v: i for i, v in enumerate(used)}, **{v: ignore for v in COCO_UNUSED}, 255: ignore}


def phenobench_ids(C, ignore):
    """PhenoBench semantics: 0 soil, 1 crop, 2 weed, 3 partial crop -> crop, 4 partial weed -> weed
    (the devkit's default, ignore_partial=False)."""
    return {0: 0, 1: 1, 2: 2, 3: 1, 4: 2}


def deepglobe_ids(C, ignore):
    """DeepGlobe road masks (read as grey levels): >= 128 road (class 0), below: background (NONE)."""
    return {v: 0 if v >= 128 else NONE for v in range(256)}


def loveda_ids(C, ignore):
    """LoveDA masks: 0 = no data (ignore), 1..7 = background, building, road, water, barren,
    forest, agriculture -> classes 0..6 (the 7 classes LoveDA's mIoU counts)."""
    return {0: ignore, **{v: v - 1 for v in range(1, 8)}}


def voc_ids(C, ignore):
    """PASCAL VOC SegmentationClass (palette PNG; read as indices): 0 = background (no class: the
    background threshold predicts it), 1..20 -> classes 0..19, 255 = void (object borders) -> ignore."""
    return {0: NONE, **{v: v - 1 for v in range(1, 21)}, 255: ignore}


def monuseg_ids(C, ignore):
    """MoNuSeg polygons drawn as 1 (nucleus, class 0) on 0 (no class)."""
    return {0: NONE, 1: 0}


def brats_ids(C, ignore):
    """BraTS 2021 labels on a slice: 0 background (no class), 2 edema -> whole tumour (0),
    1 necrotic core -> tumour core (1), 4 enhancing -> enhancing tumour (2). The regions BraTS
    scores nest (whole > core > enhancing): Spec.nested makes each region's mask the union."""
    return {0: NONE, 2: 0, 1: 1, 4: 2}


def agrivision_ids(C, ignore):
    """read_class_folders' bitmasks: 0 no pattern (background, NONE), one bit c -> class c, several
    bits b -> SEVERAL + b (scored by metrics.confusion_matrix's overlap rule), 2 ** C -> ignore."""
    if C > SET_CLASSES:
        raise DataError(f"Agriculture-Vision: {C} classes, more than the {SET_CLASSES} whose overlaps we encode")
    several = {b: SEVERAL + b for b in range(1, 2 ** C) if b & (b - 1)}
    return {0: NONE, **{2 ** c: c for c in range(C)}, **several, 2 ** C: ignore}


def refuge_ids(C, ignore):
    """REFUGE masks (grey levels): 255 background (NONE), 128 disc rim -> 0, 0 cup -> 1. Label 0
    ('optic disc') is only the rim in the label map; the class 'optic disc' = rim + cup comes from
    Spec.nested, so a disc mask is the whole disc, as REFUGE scores it."""
    return {255: NONE, 128: 0, 0: 1}


@dataclass(frozen=True)
class Spec:
    """Where one benchmark's files lie (under the root you give) and what its label values mean.
    An image and its label map pair up by their path below `images`/`masks` minus the suffix."""
    layout: str                      # the expected layout, shown in errors
    images: str                      # image folder; {split} = the dataset's name for the split
    image_suffix: tuple              # endings of image file names (matched in any case)
    masks: str                       # label-map folder
    mask_suffix: str
    splits: dict                     # our split name -> the dataset's
    classes: str                     # classes/<classes>.txt; "" = <root>/classes.txt
    label_table: Callable            # (C, ignore_index) -> {raw value: label}
    mask_mode: str = ""              # PIL mode to read label maps in ("L": grey levels)
    nested: dict = field(default_factory=dict)   # class -> classes whose pixels it also covers
    metric: str = "miou"             # "miou" (confusion matrix) or "binary" (IoU and Dice per class)
    domains: tuple = ()              # sub-collections that {domain} in images/masks runs over
    split_list: str = ""             # a file of the split's sample names ({split}); others are left out
    class_folders: bool = False      # labels: one binary PNG per class (read_class_folders), `masks` = validity


DATASETS = {
    # ADE20K SceneParsing release (sceneparsing.csail.mit.edu), unzipped as is.
    "ade150": Spec(
        layout="ADEChallengeData2016/images/{training,validation}/*.jpg and "
               "ADEChallengeData2016/annotations/{training,validation}/*.png (uint8, 0 = other, v = class v-1)",
        images="images/{split}", image_suffix=(".jpg",), masks="annotations/{split}", mask_suffix=".png",
        splits={"train": "training", "val": "validation"}, classes="ade150", label_table=ade150_ids),
    # ADE20K full (ADE20K_2021_17_01) as converted by prepare_ade20k_full.py of Mask2Former / CAT-Seg:
    # short side <= 512, uint16 tif of class indices 0..846, 65535 = unlabeled.
    "ade847": Spec(
        layout="ADE20K_2021_17_01/images_detectron2/{training,validation}/*.jpg and "
               "ADE20K_2021_17_01/annotations_detectron2/{training,validation}/*.tif (uint16, 65535 = ignore), "
               "made by prepare_ade20k_full.py of Mask2Former or CAT-Seg",
        images="images_detectron2/{split}", image_suffix=(".jpg",),
        masks="annotations_detectron2/{split}", mask_suffix=".tif",
        splits={"train": "training", "val": "validation"}, classes="ade847", label_table=same_ids),
    # PASCAL Context as ODISE prepares it (FC-CLIP and SAN use the same folders): pascal_ctx_d2/ from
    # prepare_pascal_ctx_sem_seg.py (59 classes, png, 255 = background/ignore) and
    # prepare_pascal_ctx_full_sem_seg.py (459 classes, uint16 tif = LabelMap - 1, 65535 = ignore).
    "pc59": Spec(
        layout="pascal_ctx_d2/images/{training,validation}/*.jpg and "
               "pascal_ctx_d2/annotations_ctx59/{training,validation}/*.png (0..58, 255 = ignore), "
               "made by ODISE's datasets/prepare_pascal_ctx_sem_seg.py",
        images="images/{split}", image_suffix=(".jpg",), masks="annotations_ctx59/{split}", mask_suffix=".png",
        splits={"train": "training", "val": "validation"}, classes="pc59", label_table=same_ids),
    "pc459": Spec(
        layout="pascal_ctx_d2/images/{training,validation}/*.jpg and "
               "pascal_ctx_d2/annotations_ctx459/{training,validation}/*.tif (uint16 0..458, 65535 = ignore), "
               "made by ODISE's datasets/prepare_pascal_ctx_full_sem_seg.py",
        images="images/{split}", image_suffix=(".jpg",), masks="annotations_ctx459/{split}", mask_suffix=".tif",
        splits={"train": "training", "val": "validation"}, classes="pc459", label_table=same_ids),
    # COCO-Stuff 164k (github.com/nightrome/cocostuff): COCO 2017 images + stuffthingmaps_trainval2017.zip.
    "cocostuff171": Spec(
        layout="images/{train2017,val2017}/*.jpg (COCO 2017) and annotations/{train2017,val2017}/*.png "
               "(stuffthingmaps_trainval2017.zip: values 0..181 = labels.txt id - 1, 255 = unlabeled)",
        images="images/{split}", image_suffix=(".jpg",), masks="annotations/{split}", mask_suffix=".png",
        splits={"train": "train2017", "val": "val2017"}, classes="cocostuff171", label_table=cocostuff_ids),
    # Cityscapes fine annotations; the *_labelTrainIds.png come from cityscapesscripts'
    # preparation/createTrainIdLabelImgs.py.
    "cityscapes19": Spec(
        layout="leftImg8bit/{train,val}/<city>/*_leftImg8bit.png and "
               "gtFine/{train,val}/<city>/*_gtFine_labelTrainIds.png (trainIds 0..18, 255 = ignore)",
        images="leftImg8bit/{split}", image_suffix=("_leftImg8bit.png",),
        masks="gtFine/{split}", mask_suffix="_gtFine_labelTrainIds.png",
        splits={"train": "train", "val": "val"}, classes="cityscapes19", label_table=same_ids),
    # DeepGlobe 2018 road extraction: only the release's train/ has masks (valid/ and test/ are the
    # unlabelled challenge sets), so hold out part of train/ as val/ yourself.
    "deepglobe": Spec(
        layout="{train,val}/<id>_sat.jpg next to <id>_mask.png (road white: >= 128 as grey levels); the "
               "release has masks only in train/: move a held-out part of it to val/",
        images="{split}", image_suffix=("_sat.jpg",), masks="{split}", mask_suffix="_mask.png",
        splits={"train": "train", "val": "val"}, classes="deepglobe", label_table=deepglobe_ids,
        mask_mode="L", metric="binary"),
    # REFUGE-2 as widely mirrored (e.g. kaggle victorlemosml/refuge2): split folders with images/ and mask/.
    "refuge": Spec(
        layout="{train,val,test}/images/*.jpg and {train,val,test}/mask/*.bmp "
               "(255 background, 128 optic disc rim, 0 optic cup)",
        images="{split}/images", image_suffix=(".jpg",), masks="{split}/mask", mask_suffix=".bmp",
        splits={"train": "train", "val": "val", "test": "test"}, classes="refuge", label_table=refuge_ids,
        mask_mode="L", nested={0: (1,)}, metric="binary"),
    # BDD100K semantic segmentation (bdd100k.com, "10K Images" + "Segmentation"): Cityscapes' 19 trainIds.
    "bdd100k": Spec(
        layout="images/10k/{train,val}/*.jpg and labels/sem_seg/masks/{train,val}/*.png "
               "(trainIds 0..18 as Cityscapes, 255 = ignore)",
        images="images/10k/{split}", image_suffix=(".jpg",), masks="labels/sem_seg/masks/{split}", mask_suffix=".png",
        splits={"train": "train", "val": "val"}, classes="cityscapes19", label_table=same_ids),
    # LoveDA (github.com/Junjue-Wang/LoveDA), Train.zip / Val.zip unzipped: urban and rural scenes.
    "loveda": Spec(
        layout="{Train,Val}/{Urban,Rural}/images_png/*.png and {Train,Val}/{Urban,Rural}/masks_png/*.png "
               "(0 no data = ignore, 1..7 background, building, road, water, barren, forest, agriculture)",
        images="{split}/{domain}/images_png", image_suffix=(".png",), masks="{split}/{domain}/masks_png",
        mask_suffix=".png", splits={"train": "Train", "val": "Val"}, classes="loveda", label_table=loveda_ids,
        domains=("Urban", "Rural")),
    # PASCAL VOC 2012 (VOCdevkit/VOC2012 as unpacked): the segmentation subset named by the split lists.
    "voc": Spec(
        layout="JPEGImages/*.jpg, SegmentationClass/*.png (palette indices: 0 background, 1..20 classes, "
               "255 void) and ImageSets/Segmentation/{train,val}.txt",
        images="JPEGImages", image_suffix=(".jpg",), masks="SegmentationClass", mask_suffix=".png",
        splits={"train": "train", "val": "val"}, classes="voc", label_table=voc_ids,
        split_list="ImageSets/Segmentation/{split}.txt"),
    # BraTS 2021 as 2-D slices (our layout; the release is 3-D NIfTI, see the README for the recipe):
    # one PNG per axial slice, the image a grey or RGB composite of the MRI sequences.
    "brats": Spec(
        layout="{train,val}/images/<case>_<slice>.png (8-bit slice) and {train,val}/masks/<case>_<slice>.png "
               "(BraTS labels 0 background, 1 necrotic core, 2 edema, 4 enhancing tumour)",
        images="{split}/images", image_suffix=(".png",), masks="{split}/masks", mask_suffix=".png",
        splits={"train": "train", "val": "val"}, classes="brats", label_table=brats_ids, mask_mode="L",
        nested={0: (1, 2), 1: (2,)}, metric="binary"),
    # MoNuSeg 2018 (monuseg.grand-challenge.org): H&E tiles with nucleus outlines as XML polygons.
    "monuseg": Spec(
        layout="{train,test}/Tissue Images/*.tif and {train,test}/Annotations/*.xml (the release's "
               "'MoNuSeg 2018 Training Data' as train/; sort MoNuSegTestData's .tif and .xml into test/ the same way)",
        images="{split}/Tissue Images", image_suffix=(".tif",), masks="{split}/Annotations", mask_suffix=".xml",
        splits={"train": "train", "val": "test", "test": "test"}, classes="monuseg", label_table=monuseg_ids,
        metric="binary"),
    # Agriculture-Vision 2021 (agriculture-vision.com; the "supervised" part of cvpr_challenge_2021):
    # 512 x 512 aerial tiles, RGB read (the NIR channel in images/nir/ is not: the VAE takes RGB),
    # the field patterns as overlapping binary masks. classes/agrivision2020.txt reads the 2020 release.
    "agrivision": Spec(
        layout="{train,val}/images/rgb/<id>.jpg, {train,val}/boundaries/<id>.png, {train,val}/masks/<id>.png "
               "and {train,val}/labels/<class>/<id>.png (255 = pattern), <class> as in classes/agrivision.txt "
               "with '_' for ' '",
        images="{split}/images/rgb", image_suffix=(".jpg",), masks="{split}/boundaries", mask_suffix=".png",
        splits={"train": "train", "val": "val"}, classes="agrivision", label_table=agrivision_ids,
        class_folders=True),
    # PhenoBench (phenobench.org), unzipped as is.
    "phenobench": Spec(
        layout="{train,val}/images/*.png and {train,val}/semantics/*.png "
               "(0 soil, 1 crop, 2 weed, 3 partial crop, 4 partial weed)",
        images="{split}/images", image_suffix=(".png",), masks="{split}/semantics", mask_suffix=".png",
        splits={"train": "train", "val": "val"}, classes="phenobench", label_table=phenobench_ids),
    # Your own data: label maps of class indices (0..C-1, 255 = ignore; 65535 if C > 255).
    "folder": Spec(
        layout="classes.txt, images/[<split>/]<name>.<jpg|png|...> and masks/[<split>/]<name>.png "
               "(class indices 0..C-1 in the order of classes.txt, 255 = ignore); without <split>/ "
               "sub-folders the one set serves every split",
        images="images/{split}", image_suffix=IMAGE_SUFFIXES, masks="masks/{split}", mask_suffix=".png",
        splits={}, classes="", label_table=same_ids),
}


def find_files(folder, suffixes):
    """{key: path} of the files below `folder` whose names end in one of `suffixes` (any case);
    key = the path relative to `folder` without that ending, shared by an image and its mask."""
    found = {}
    for path in sorted(folder.rglob("*")):
        if path.name.startswith(".") or not path.is_file():
            continue
        suffix = next((s for s in suffixes if path.name.lower().endswith(s.lower())), None)
        if suffix is None:
            continue
        key = path.relative_to(folder).as_posix()[:-len(suffix)]
        if key in found:
            raise DataError(f"two files for one sample: {found[key]} and {path}")
        found[key] = path
    return found


def find_pairs(name, spec, root, split):
    """[(image path, label-map path)] of one split, sorted; every image needs a label map and back."""
    if spec.splits:
        if split not in spec.splits:
            raise DataError(f"{name} has no split {split!r}; it has {', '.join(spec.splits)}")
        folder_split = spec.splits[split]
    else:                          # the plain folder: images/<split>/ if there is one, else images/ itself
        base = root / spec.images.format(split="")
        folder_split = split if (base / split).is_dir() else ""
        others = sorted(d.name for d in base.iterdir() if d.is_dir()) if base.is_dir() and not folder_split else []
        if others:
            raise DataError(f"{name}: no folder {base / split} (there are {', '.join(others)}). "
                            f"Expected under {root}: {spec.layout}")
    found = {}
    for domain in spec.domains or ("",):
        pairs = _pairs_in(name, spec, root, split, root / spec.images.format(split=folder_split, domain=domain),
                          root / spec.masks.format(split=folder_split, domain=domain),
                          root / spec.split_list.format(split=folder_split) if spec.split_list else None)
        found.update({f"{domain}/{k}" if domain else k: pair for k, pair in pairs.items()})
    return [found[k] for k in sorted(found)]


def _pairs_in(name, spec, root, split, image_dir, mask_dir, split_list):
    """{key: (image, label map)} of one image folder and its label-map folder; with a split list,
    only the samples it names (each must have both files)."""
    for d in (image_dir, mask_dir) + ((split_list,) if split_list else ()):
        if not d.exists():
            raise DataError(f"{name}: {'file' if d == split_list else 'folder'} {d} not found. "
                            f"Expected under {root}: {spec.layout}")
    images = find_files(image_dir, spec.image_suffix)
    masks = find_files(mask_dir, (spec.mask_suffix,))
    if split_list:
        names = [ln.strip() for ln in split_list.read_text().splitlines() if ln.strip()]
        for have, where, ending in ((images, image_dir, spec.image_suffix[0]), (masks, mask_dir, spec.mask_suffix)):
            missing = [k for k in names if k not in have]
            if missing:
                raise DataError(f"{name} {split}: {split_list} names {missing[0]} but {where / (missing[0] + ending)} "
                                f"is missing" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        images, masks = {k: images[k] for k in names}, {k: masks[k] for k in names}
    if not images:
        raise DataError(f"{name} {split}: no images ({' '.join(spec.image_suffix)}) in {image_dir}. "
                        f"Expected under {root}: {spec.layout}")
    for have, lack, what, where, ending in ((images, masks, "image", mask_dir, spec.mask_suffix),
                                            (masks, images, "label map", image_dir, spec.image_suffix[0])):
        missing = [k for k in have if k not in lack]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise DataError(f"{name} {split}: {what} {have[missing[0]]} has no partner: expected "
                            f"{where / (missing[0] + ending)}{more}")
    return {k: (images[k], masks[k]) for k in images}


def fixed_subset(n, fraction, seed):
    """Indices of a fixed random `fraction` of n samples (the data-efficiency study: 1, 1/2 ... 1/16).
    A prefix of one seeded permutation, so for one seed the smaller subsets nest in the larger."""
    if not 0 < fraction <= 1:
        raise DataError(f"fraction must be in (0, 1], got {fraction}")
    keep = max(1, round(n * fraction))
    return sorted(np.random.default_rng(seed).permutation(n)[:keep].tolist())


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


def draw_class(rng, present, num_classes, p_absent):
    """The class of one training sample (Eq. 6 trains one class at a time): uniform among the
    classes present; with probability p_absent (and always when none is present) uniform among
    the absent ones, whose mask is empty."""
    absent = sorted(set(range(num_classes)) - set(present))
    use_absent = bool(absent) and (not present or rng.random() < p_absent)
    pool = absent if use_absent else present
    return pool[rng.integers(len(pool))]


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


# ---- The toy world (toy.py trains on it) ------------------------------------------------------

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
