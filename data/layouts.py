"""Where each benchmark's files lie on disk and what its label values mean: one table, DATASETS.
A label table maps raw label-map values to labels; it is a function of the number of classes C
and the ignore_index, so that a class list of your own (classes=PATH) still works."""
from dataclasses import dataclass, field
from typing import Callable

from data.common import IMAGE_SUFFIXES, NONE, DataError
from metrics import SET_CLASSES, SEVERAL


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
    by_masks: bool = False           # a split is the images that have a label map (the image folder holds more)
    also: object = None              # another layout of the same data, read when this one's image folder is missing


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
    # Or as CAT-Seg prepares it, validation only (it trains on COCO-Stuff): VOCdevkit/VOC2010/ with
    # JPEGImages/ (every VOC2010 image) and annotations_detectron2/pc59_val, pc459_val from its
    # datasets/prepare_pascal_context_59.py and _459.py; the same label values, so the same table.
    "pc59": Spec(
        layout="pascal_ctx_d2/images/{training,validation}/*.jpg and "
               "pascal_ctx_d2/annotations_ctx59/{training,validation}/*.png (0..58, 255 = ignore), "
               "made by ODISE's datasets/prepare_pascal_ctx_sem_seg.py",
        images="images/{split}", image_suffix=(".jpg",), masks="annotations_ctx59/{split}", mask_suffix=".png",
        splits={"train": "training", "val": "validation"}, classes="pc59", label_table=same_ids,
        also=Spec(layout="VOCdevkit/VOC2010/JPEGImages/*.jpg and VOCdevkit/VOC2010/annotations_detectron2/pc59_val/*.png "
                         "(0..58, 255 = ignore), made by CAT-Seg's datasets/prepare_pascal_context_59.py",
                  images="JPEGImages", image_suffix=(".jpg",), masks="annotations_detectron2/pc59_{split}",
                  mask_suffix=".png", splits={"val": "val"}, classes="pc59", label_table=same_ids, by_masks=True)),
    "pc459": Spec(
        layout="pascal_ctx_d2/images/{training,validation}/*.jpg and "
               "pascal_ctx_d2/annotations_ctx459/{training,validation}/*.tif (uint16 0..458, 65535 = ignore), "
               "made by ODISE's datasets/prepare_pascal_ctx_full_sem_seg.py",
        images="images/{split}", image_suffix=(".jpg",), masks="annotations_ctx459/{split}", mask_suffix=".tif",
        splits={"train": "training", "val": "validation"}, classes="pc459", label_table=same_ids,
        also=Spec(layout="VOCdevkit/VOC2010/JPEGImages/*.jpg and VOCdevkit/VOC2010/annotations_detectron2/pc459_val/*.tif "
                         "(uint16 0..458 = LabelMap - 1), made by CAT-Seg's datasets/prepare_pascal_context_459.py",
                  images="JPEGImages", image_suffix=(".jpg",), masks="annotations_detectron2/pc459_{split}",
                  mask_suffix=".tif", splits={"val": "val"}, classes="pc459", label_table=same_ids, by_masks=True)),
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
    """[(image path, label-map path)] of one split, sorted; every image needs a label map and back
    (with spec.by_masks: every label map an image). A spec with another layout (`also`) reads that
    one when its own image folder is missing and the other's is there."""
    if spec.also is not None and not (root / spec.images.format(split=spec.splits.get(split, ""), domain="")).exists() \
            and (root / spec.also.images.format(split=spec.also.splits.get(split, ""), domain="")).exists():
        return find_pairs(name, spec.also, root, split)
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
    if spec.by_masks:
        images = {k: v for k, v in images.items() if k in masks}        # masks without an image: an error below
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
