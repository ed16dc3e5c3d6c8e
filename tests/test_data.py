"""data/ on tiny fake datasets written in each benchmark's real on-disk layout (40 x 56 images)."""
import numpy as np
import pytest
import torch
from PIL import Image

import data
from data import DataError, EvalSet, TrainSet, augment, build, collate, load_rgb

H, W = 40, 56
PALETTE = np.array([(230, 30, 30), (30, 220, 40), (40, 50, 230), (240, 230, 20), (20, 230, 230),
                    (230, 40, 220), (250, 250, 250)], dtype=np.uint8)


def stripes(values, h=H, w=W):
    """(h, w) label map of vertical stripes, one per value."""
    a = np.zeros((h, w), np.int64)
    for i, v in enumerate(values):
        a[:, i * w // len(values):(i + 1) * w // len(values)] = v
    return a


def write_image(path, labels=None, h=H, w=W):
    """An RGB image whose colour encodes `labels` (stripe index if None)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    idx = stripes(range(4), h, w) if labels is None else labels
    Image.fromarray(PALETTE[np.asarray(idx) % len(PALETTE)]).save(path)


def write_mask(path, raw, dtype=np.uint8, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(np.asarray(raw).astype(dtype))
    if mode == "P":                      # a palette PNG (VOC): the values are the palette indices
        img.putpalette(np.random.default_rng(0).integers(0, 256, 768, dtype=np.uint8).tobytes())
        assert img.mode == "P"
    elif mode:
        img = img.convert(mode)
    img.save(path)


# name -> (image path, mask path) in the dataset's own layout, for the "val" split; {s} = sample name
LAYOUTS = {
    "ade150": ("images/validation/{s}.jpg", "annotations/validation/{s}.png"),
    "ade847": ("images_detectron2/validation/{s}.jpg", "annotations_detectron2/validation/{s}.tif"),
    "pc59": ("images/validation/{s}.jpg", "annotations_ctx59/validation/{s}.png"),
    "pc459": ("images/validation/{s}.jpg", "annotations_ctx459/validation/{s}.tif"),
    "cocostuff171": ("images/val2017/{s}.jpg", "annotations/val2017/{s}.png"),
    "cityscapes19": ("leftImg8bit/val/frankfurt/{s}_leftImg8bit.png",
                     "gtFine/val/frankfurt/{s}_gtFine_labelTrainIds.png"),
    "deepglobe": ("val/{s}_sat.jpg", "val/{s}_mask.png"),
    "refuge": ("val/images/{s}.jpg", "val/mask/{s}.bmp"),
    "phenobench": ("val/images/{s}.png", "val/semantics/{s}.png"),
    "folder": ("images/{s}.png", "masks/{s}.png"),
    "bdd100k": ("images/10k/val/{s}.jpg", "labels/sem_seg/masks/val/{s}.png"),
    "loveda": ("Val/Rural/images_png/{s}.png", "Val/Rural/masks_png/{s}.png"),
    "voc": ("JPEGImages/{s}.jpg", "SegmentationClass/{s}.png"),
    "brats": ("val/images/{s}.png", "val/masks/{s}.png"),
}


def make(root, name, samples, dtype=np.uint8, mode=None, image_size=None):
    """samples: {sample name: raw label map}; writes images and masks in LAYOUTS[name]."""
    image_pattern, mask_pattern = LAYOUTS[name]
    for s, raw in samples.items():
        write_image(root / image_pattern.format(s=s), *(image_size or (None,)))
        write_mask(root / mask_pattern.format(s=s), raw, dtype, mode)
    if name == "loveda":                 # both domains must be there; this one holds an extra scene
        write_image(root / "Val/Urban/images_png/1.png")
        write_mask(root / "Val/Urban/masks_png/1.png", stripes([1, 2, 3, 4]))
    if name == "voc":                    # the split list names the segmentation subset; an image without
        write_image(root / "JPEGImages/2007_999999.jpg")             # a label map outside it is left out
        (root / "ImageSets/Segmentation").mkdir(parents=True, exist_ok=True)
        (root / "ImageSets/Segmentation/val.txt").write_text("".join(f"{s}\n" for s in samples))
    return root


def grey_rgb(levels):
    """An RGB mask whose three channels carry the given grey levels."""
    return np.repeat(np.asarray(levels)[..., None], 3, axis=2)


# (name, {sample: raw}, raw dtype, PIL mode to save in, {sample: expected labels}, ignore_index, {class: name})
CASES = [
    ("ade150", {"ADE_val_1": stripes([0, 1, 5, 150])}, np.uint8, None,
     {"ADE_val_1": stripes([255, 0, 4, 149])}, 255, {0: "wall", 1: "building", 149: "flag"}),
    ("ade847", {"ADE_frame_1": stripes([0, 846, 65535, 300])}, np.uint16, None,
     {"ADE_frame_1": stripes([0, 846, 65535, 300])}, 65535, {0: "wall", 1: "building"}),
    ("pc59", {"2008_000002": stripes([0, 58, 255, 30])}, np.uint8, None,
     {"2008_000002": stripes([0, 58, 255, 30])}, 255, {0: "aeroplane", 58: "wood"}),
    ("pc459", {"2008_000002": stripes([0, 458, 65535, 300])}, np.uint16, None,
     {"2008_000002": stripes([0, 458, 65535, 300])}, 65535, {2: "air conditioner", 458: "wool"}),
    ("cocostuff171", {"000000000139": stripes([0, 12, 181, 255]), "000000000285": stripes([11, 90, 91, 182 - 1])},
     np.uint8, None, {"000000000139": stripes([0, 11, 170, 255]), "000000000285": stripes([255, 255, 80, 170])},
     255, {0: "person", 11: "stop sign", 80: "banner", 170: "wood"}),
    ("cityscapes19", {"frankfurt_000000_000294": stripes([0, 18, 255, 7])}, np.uint8, None,
     {"frankfurt_000000_000294": stripes([0, 18, 255, 7])}, 255, {0: "road", 7: "traffic sign"}),
    ("deepglobe", {"104": grey_rgb(stripes([0, 127, 128, 255]))}, np.uint8, "RGB",
     {"104": stripes([-1, -1, 0, 0])}, 255, {0: "road"}),
    ("refuge", {"V0001": stripes([255, 128, 0, 128])}, np.uint8, "L",
     {"V0001": stripes([-1, 0, 1, 0])}, 255, {0: "optic disc", 1: "optic cup"}),
    ("phenobench", {"05-15_00028_P0030852": stripes([0, 1, 2, 3, 4])}, np.uint8, None,
     {"05-15_00028_P0030852": stripes([0, 1, 2, 1, 2])}, 255, {0: "soil", 1: "crop", 2: "weed"}),
    ("bdd100k", {"7d2f7975-e0c1c5a7": stripes([0, 18, 255, 13])}, np.uint8, None,
     {"7d2f7975-e0c1c5a7": stripes([0, 18, 255, 13])}, 255, {0: "road", 13: "car"}),
    ("voc", {"2007_000033": stripes([0, 1, 20, 255])}, np.uint8, "P",
     {"2007_000033": stripes([-1, 0, 19, 255])}, 255, {0: "aeroplane", 19: "tv monitor"}),
    ("brats", {"BraTS2021_00000_077": stripes([0, 2, 1, 4])}, np.uint8, "L",
     {"BraTS2021_00000_077": stripes([-1, 0, 1, 2])}, 255, {0: "whole tumor", 2: "enhancing tumor"}),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_each_dataset_reads_its_real_layout(tmp_path, case):
    name, samples, dtype, mode, expected, ignore, names = case
    root = make(tmp_path / name, name, samples, dtype, mode)
    ev = build(name, root, "val", evaluation=True)
    assert len(ev) == len(samples) and ev.ignore_index == ignore
    for c, n in names.items():
        assert ev.class_names[c] == n
    for i, s in enumerate(sorted(samples)):
        image, labels, path = ev[i]
        assert image.shape == (3, H, W) and image.dtype == torch.float32 and -1 <= image.min() <= image.max() <= 1
        assert labels.dtype == torch.int64
        np.testing.assert_array_equal(labels.numpy(), expected[s])
        assert path.endswith(LAYOUTS[name][0].format(s=s))

    train = build(name, root, "val", size=32, template="a photo of a {}.")
    present = set(np.unique(np.concatenate([e.ravel() for e in expected.values()]))) & set(range(len(ev.class_names)))
    present |= {c for c, inner in ev.spec.nested.items() if present & set(inner)}
    for i in range(len(train)):
        item = train[i]
        assert item["image"].shape == (3, 32, 32) and item["mask"].shape == (32, 32)
        assert item["mask"].dtype == torch.float32 and set(item["mask"].unique().tolist()) <= {0.0, 1.0}
        assert item["class_index"] in present and item["mask"].sum() > 0
        assert item["prompt"] == f"a photo of a {train.class_names[item['class_index']]}."


def test_ade847_reads_16_bit_tiff_as_pillow_gives_it(tmp_path):
    path = tmp_path / "a.tif"
    write_mask(path, stripes([0, 846, 65535, 300]), np.uint16)
    assert Image.open(path).mode == "I;16"
    assert data.read_raw_labels(path).dtype == np.uint16


def test_refuge_optic_disc_is_rim_plus_cup(tmp_path):
    root = make(tmp_path, "refuge", {"g0001": stripes([255, 128, 0, 128])}, mode="L")
    ev = build("refuge", root, "val", evaluation=True)
    _, labels, _ = ev[0]
    np.testing.assert_array_equal(ev.class_mask(labels.numpy(), 0), stripes([0, 1, 1, 1]).astype(bool))
    np.testing.assert_array_equal(ev.class_mask(labels.numpy(), 1), stripes([0, 0, 1, 0]).astype(bool))
    assert ev.present_classes(np.array([[-1, 1]])) == [0, 1]      # a cup alone still makes a disc
    assert ev.spec.metric == "binary"


def test_folder_classes_comments_synonyms_and_splits(tmp_path):
    (tmp_path / "classes.txt").write_text("# source: made up\n\ncat\ndog, puppy\nsky\n")
    for split in ("train", "val"):
        write_image(tmp_path / f"images/{split}/a.png")
        write_mask(tmp_path / f"masks/{split}/a.png", stripes([0, 1, 2, 255]))
    ev = build("folder", tmp_path, "val", evaluation=True)
    assert ev.class_names == ["cat", "dog", "sky"] and ev.synonyms[1] == "dog, puppy"
    assert ev[0][2].endswith("images/val/a.png")
    with pytest.raises(DataError, match=r"no folder .*images/test \(there are train, val\)"):
        build("folder", tmp_path, "test", evaluation=True)


def test_user_class_list_replaces_the_shipped_one(tmp_path):
    root = make(tmp_path / "d", "pc59", {"x": stripes([0, 1, 2, 3])})
    mine = tmp_path / "mine.txt"
    mine.write_text("\n".join(f"thing {i}, synonym" for i in range(59)))
    ev = build("pc59", root, "val", evaluation=True, classes=mine)
    assert ev.class_names[3] == "thing 3"
    short = tmp_path / "short.txt"
    short.write_text("a\nb\n")
    with pytest.raises(DataError, match=r"short.txt has 2 classes, fewer than the dataset's labels need \(171\)"):
        build("cocostuff171", make(tmp_path / "c", "cocostuff171", {"x": stripes([0])}), "val", classes=short)


@pytest.mark.parametrize("name, mask, dtype, raw", [("pc59", "pc59_val/{s}.png", np.uint8, [0, 58, 255, 30]),
                                                    ("pc459", "pc459_val/{s}.tif", np.uint16, [0, 458, 300, 2])])
def test_pascal_context_reads_catseg_layout_too(tmp_path, name, mask, dtype, raw):
    """CAT-Seg's PASCAL Context (VOCdevkit/VOC2010): JPEGImages holds every VOC2010 image, so the split
    is the images with a label map; the values are ODISE's, so the labels are the same."""
    for s in ("2008_000002", "2008_000003"):
        write_image(tmp_path / f"JPEGImages/{s}.jpg")
    write_image(tmp_path / "JPEGImages/2007_000032.jpg")               # a VOC image outside PASCAL Context's val
    for s in ("2008_000002", "2008_000003"):
        write_mask(tmp_path / "annotations_detectron2" / mask.format(s=s), stripes(raw), dtype)
    ev = build(name, tmp_path, "val", evaluation=True)
    assert len(ev) == 2 and ev[0][2].endswith("2008_000002.jpg")
    np.testing.assert_array_equal(ev[1][1].numpy(), stripes(raw))
    write_mask(tmp_path / "annotations_detectron2" / mask.format(s="2008_000004"), stripes(raw), dtype)
    with pytest.raises(DataError, match="2008_000004.* has no partner: expected .*JPEGImages/2008_000004.jpg"):
        build(name, tmp_path, "val", evaluation=True)


def test_shipped_class_lists():
    counts = {"ade150": 150, "ade847": 847, "pc59": 59, "pc459": 459, "cocostuff171": 171, "cityscapes19": 19,
              "phenobench": 3, "deepglobe": 1, "refuge": 2}
    for name, n in counts.items():
        path = data.CLASSES_DIR / f"{name}.txt"
        assert open(path).readline().startswith("# source: "), path
        assert len(data.read_class_file(path)) == n, name
    assert data.read_class_file(data.CLASSES_DIR / "ade847.txt")[11].startswith("person, individual")


# The references' names, as they stand in their code: mmseg's PascalContextDataset59 and LoveDADataset
# (open-mmlab/mmsegmentation, mmseg/datasets/pascal_context.py and loveda.py).
MMSEG_PC59 = ("aeroplane bag bed bedclothes bench bicycle bird boat book bottle building bus cabinet car cat ceiling "
              "chair cloth computer cow cup curtain dog door fence floor flower food grass ground horse keyboard light "
              "motorbike mountain mouse person plate platform pottedplant road rock sheep shelves sidewalk sign sky snow "
              "sofa table track train tree truck tvmonitor wall water window wood").split()
LOVEDA = ("background", "building", "road", "water", "barren", "forest", "agricultural")


@pytest.mark.parametrize("name, reference", [("pc59", MMSEG_PC59), ("loveda", LOVEDA)])
def test_prompt_names_follow_the_reference_and_list_every_difference(name, reference):
    """Each difference from the named reference is written in the class file's '# differences:' line,
    by class index and by both names; nothing else differs."""
    path = data.CLASSES_DIR / f"{name}.txt"
    names = data.class_names_of(data.read_class_file(path))
    differences = [ln for ln in open(path) if ln.startswith("# differences:")]
    assert len(names) == len(reference) and len(differences) == 1
    for k, (ours, theirs) in enumerate(zip(names, reference)):
        if ours != theirs:
            assert f"class {k}" in differences[0] and f"'{ours}'" in differences[0] and f"'{theirs}'" in differences[0]


# ---- augmentation ----------------------------------------------------------------------------

def nearest_colour(x):
    """(3, S, S) in [-1, 1] -> (S, S) index of the nearest PALETTE colour."""
    rgb = (x.permute(1, 2, 0).numpy() + 1) * 127.5
    return np.linalg.norm(rgb[:, :, None] - PALETTE[None, None].astype(np.float32), axis=-1).argmin(-1)


def interior(labels):
    """Pixels whose 4 neighbours carry the same label (away from edges blended by the resize)."""
    a = np.pad(labels, 1, mode="edge")
    return ((a[1:-1, 1:-1] == a[:-2, 1:-1]) & (a[1:-1, 1:-1] == a[2:, 1:-1])
            & (a[1:-1, 1:-1] == a[1:-1, :-2]) & (a[1:-1, 1:-1] == a[1:-1, 2:]))


def test_augmentation_keeps_image_and_labels_aligned():
    rng0 = np.random.default_rng(0)
    labels = np.kron(rng0.integers(0, 5, size=(4, 4)), np.ones((10, 14), np.int64))   # (40, 56) blocks
    image = Image.fromarray(PALETTE[labels])
    pads = 0
    for seed in range(16):
        x, out = augment(image, labels, 48, np.random.default_rng(seed), ignore_index=255)
        assert x.shape == (3, 48, 48) and out.shape == (48, 48) and out.dtype == np.int64
        pad = out == 255
        pads += pad.any()
        assert (x[:, torch.from_numpy(pad)] == 0).all()               # padding: image 0, labels ignore
        colour, inside = nearest_colour(x), interior(out) & ~pad
        assert (colour[inside] == out[inside]).all()
        assert (colour[inside] != out[:, ::-1][inside]).any()          # the check would see a misalignment
    assert pads > 0                                                    # scales < 1 were drawn
    # at scale 1 on a square image only the flip is random: both outcomes occur, image and labels together
    square = Image.fromarray(PALETTE[labels[:, :40]])
    outcomes = set()
    for seed in range(16):
        x, out = augment(square, labels[:, :40], 40, np.random.default_rng(seed), scale=(1, 1))
        flipped = np.array_equal(out, labels[:, :40][:, ::-1])
        assert flipped or np.array_equal(out, labels[:, :40])
        assert np.array_equal(nearest_colour(x), out)
        outcomes.add(flipped)
    assert outcomes == {True, False}


def test_training_masks_match_the_image_colour_and_are_deterministic(tmp_path):
    rng0 = np.random.default_rng(1)
    (tmp_path / "classes.txt").write_text("red\ngreen\nblue\nyellow\ncyan\n")
    for i in range(3):
        labels = np.kron(rng0.integers(0, 5, size=(4, 4)), np.ones((10, 14), np.int64))
        write_image(tmp_path / f"images/{i}.png", labels)
        write_mask(tmp_path / f"masks/{i}.png", labels)
    a, b = TrainSet("folder", tmp_path, size=40, seed=7), TrainSet("folder", tmp_path, size=40, seed=7)
    for i in range(3):
        item = a[i]
        colour = nearest_colour(item["image"])
        inside = interior(item["mask"].numpy()) & (item["image"] != 0).any(0).numpy()
        assert ((colour == item["class_index"]) == (item["mask"].numpy() > 0))[inside].all()
        other = b[i]
        assert torch.equal(item["image"], other["image"]) and torch.equal(item["mask"], other["mask"])
        assert item["class_index"] == other["class_index"] and item["prompt"] == other["prompt"]
    b.set_epoch(1)
    assert any(not torch.equal(a[i]["image"], b[i]["image"]) for i in range(3))
    c = TrainSet("folder", tmp_path, size=40, seed=8)
    assert any(not torch.equal(a[i]["image"], c[i]["image"]) for i in range(3))
    batch = collate([a[0], a[1]])
    assert batch["image"].shape == (2, 3, 40, 40) and batch["mask"].shape == (2, 40, 40)
    assert batch["prompt"] == [a[0]["prompt"], a[1]["prompt"]] and batch["class_index"].dtype == torch.int64


def test_absent_classes_give_empty_masks(tmp_path):
    (tmp_path / "classes.txt").write_text("one\ntwo\nthree\nfour\n")
    write_image(tmp_path / "images/a.png")
    write_mask(tmp_path / "masks/a.png", np.zeros((H, W)))          # only class 0
    write_image(tmp_path / "images/b.png")
    write_mask(tmp_path / "masks/b.png", np.full((H, W), 255))      # nothing annotated
    always = TrainSet("folder", tmp_path, size=32, p_absent=1.0)
    never = TrainSet("folder", tmp_path, size=32, p_absent=0.0)
    for epoch in range(4):
        always.set_epoch(epoch)
        never.set_epoch(epoch)
        assert always[0]["class_index"] in (1, 2, 3) and always[0]["mask"].sum() == 0
        assert never[0]["class_index"] == 0 and never[0]["mask"].sum() > 0
        assert never[1]["mask"].sum() == 0                             # no class present: an absent one


def test_fraction_subsets_are_fixed_and_nested(tmp_path):
    (tmp_path / "classes.txt").write_text("a\n")
    for i in range(16):
        write_image(tmp_path / f"images/{i:02d}.png", h=8, w=8)
        write_mask(tmp_path / f"masks/{i:02d}.png", np.zeros((8, 8)))
    def files(f, seed=0):
        return [p for p, _ in EvalSet("folder", tmp_path, "val", fraction=f, seed=seed).pairs]
    half, quarter, sixteenth = files(1 / 2), files(1 / 4), files(1 / 16)
    assert (len(half), len(quarter), len(sixteenth), len(files(1))) == (8, 4, 1, 16)
    assert files(1 / 2) == half and set(sixteenth) <= set(quarter) <= set(half)
    assert files(1 / 2, seed=1) != half
    with pytest.raises(DataError, match=r"fraction must be in \(0, 1\]"):
        files(0)


# ---- reading images ------------------------------------------------------------------------------

def test_load_rgb_converts_every_mode(tmp_path):
    cases = {
        "rgb.png": (Image.new("RGB", (3, 2), (10, 20, 30)), (10, 20, 30)),
        "rgba.png": (Image.new("RGBA", (3, 2), (10, 20, 30, 0)), (10, 20, 30)),
        "l.png": (Image.new("L", (3, 2), 100), (100, 100, 100)),
        "cmyk.tif": (Image.new("CMYK", (3, 2), (0, 0, 0, 0)), (255, 255, 255)),
        "i16.png": (Image.fromarray(np.full((2, 3), 257 * 100, np.uint16)), (100, 100, 100)),
    }
    p = Image.new("P", (3, 2), 1)
    p.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    cases["p.png"] = (p, (200, 100, 50))
    for name, (img, rgb) in cases.items():
        img.save(tmp_path / name)
        out = load_rgb(tmp_path / name)
        assert out.mode == "RGB" and out.size == (3, 2), name
        assert out.getpixel((1, 1)) == rgb, name
    assert Image.open(tmp_path / "i16.png").mode == "I;16"


def test_load_rgb_applies_exif_orientation(tmp_path):
    a = np.zeros((H, W, 3), np.uint8)
    a[:, : W // 2] = (255, 0, 0)                   # left half red, right half blue
    a[:, W // 2:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6                               # "rotate 90 degrees clockwise to display"
    Image.fromarray(a).save(tmp_path / "r.jpg", exif=exif, quality=95)
    out = load_rgb(tmp_path / "r.jpg")
    assert out.size == (H, W)                      # width and height swapped
    top, bottom = out.getpixel((H // 2, 5)), out.getpixel((H // 2, W - 5))
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60


# ---- named errors ----------------------------------------------------------------------------

def test_errors_name_the_problem(tmp_path):
    ade = tmp_path / "ade"
    (ade / "images/validation").mkdir(parents=True)
    with pytest.raises(DataError, match=r"folder .*annotations/validation not found.*ADEChallengeData2016"):
        build("ade150", ade, "val")
    (ade / "annotations/validation").mkdir(parents=True)
    with pytest.raises(DataError, match=r"no images \(\.jpg\) in .*images/validation"):
        build("ade150", ade, "val")
    with pytest.raises(DataError, match=r"dataset root .*nowhere not found"):
        build("ade150", tmp_path / "nowhere", "val")
    with pytest.raises(DataError, match=r"unknown dataset 'ade20k'; known: ade150"):
        build("ade20k", ade, "val")
    with pytest.raises(DataError, match=r"ade150 has no split 'test'; it has train, val"):
        build("ade150", ade, "test")

    write_image(ade / "images/validation/a.jpg")
    write_mask(ade / "annotations/validation/a.png", stripes([1, 2]))
    write_image(ade / "images/validation/b.jpg")
    with pytest.raises(DataError, match=r"image .*b\.jpg has no partner: expected .*annotations/validation/b\.png"):
        build("ade150", ade, "val")
    (ade / "images/validation/b.jpg").unlink()
    write_mask(ade / "annotations/validation/c.png", stripes([1]))
    with pytest.raises(DataError, match=r"label map .*c\.png has no partner: expected .*images/validation/c\.jpg"):
        build("ade150", ade, "val")
    (ade / "annotations/validation/c.png").unlink()

    write_mask(ade / "annotations/validation/a.png", np.ones((20, 30)))
    with pytest.raises(DataError, match=r"image .*a\.jpg is 56x40 but its label map .*a\.png is 30x20"):
        build("ade150", ade, "val", evaluation=True)[0]
    write_mask(ade / "annotations/validation/a.png", stripes([1, 151]))
    with pytest.raises(DataError, match=r"label map .*a\.png: value 151 is outside the class list of ade150 "
                                        r"\(150 classes"):
        build("ade150", ade, "val", evaluation=True)[0]
    (ade / "annotations/validation/a.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"cannot read label map .*a\.png"):
        build("ade150", ade, "val", size=32)[0]
    write_mask(ade / "annotations/validation/a.png", stripes([1]))
    (ade / "images/validation/a.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(DataError, match=r"cannot read image .*a\.jpg"):
        build("ade150", ade, "val", evaluation=True)[0]

    pc = make(tmp_path / "pc", "pc59", {"x": grey_rgb(stripes([1, 2]))})
    with pytest.raises(DataError, match=r"x\.png has mode RGB with 3 channels"):
        build("pc59", pc, "val", evaluation=True)[0]
    folder = tmp_path / "folder"
    make(folder, "folder", {"x": stripes([0])})
    with pytest.raises(DataError, match=r"cannot read class list .*classes\.txt"):
        build("folder", folder, "val")
    (folder / "classes.txt").write_text("# only a comment\n")
    with pytest.raises(DataError, match=r"classes\.txt has no class lines"):
        build("folder", folder, "val")
    (folder / "classes.txt").write_text("a\n")
    with pytest.raises(DataError, match=r"p_absent must be in \[0, 1\]"):
        build("folder", folder, "val", p_absent=2)


def test_loveda_reads_both_domains(tmp_path):
    root = make(tmp_path, "loveda", {"2522": stripes([0, 1, 7, 3])})
    ev = build("loveda", root, "val", evaluation=True)
    assert len(ev) == 2 and ev.class_names[0] == "background" and ev.class_names[6] == "agriculture"
    np.testing.assert_array_equal(ev[0][1].numpy(), stripes([255, 0, 6, 2]))         # Rural/2522
    np.testing.assert_array_equal(ev[1][1].numpy(), stripes([0, 1, 2, 3]))           # Urban/1
    assert ev[1][2].endswith("Val/Urban/images_png/1.png")
    import shutil
    shutil.rmtree(root / "Val/Urban/masks_png")
    with pytest.raises(DataError, match=r"masks_png not found. Expected under .*Urban,Rural"):
        build("loveda", root, "val", evaluation=True)


def test_voc_split_list_names_the_samples(tmp_path):
    root = make(tmp_path, "voc", {"2007_000033": stripes([0, 1, 20, 255]), "2007_000042": stripes([0, 5, 5, 0])})
    assert len(build("voc", root, "val", evaluation=True)) == 2          # not the JPEG without a label map
    (root / "ImageSets/Segmentation/val.txt").write_text("2007_000033\n2007_999999\n")
    with pytest.raises(DataError, match=r"names 2007_999999 but .*SegmentationClass/2007_999999.png is missing"):
        build("voc", root, "val", evaluation=True)
    (root / "ImageSets/Segmentation/val.txt").unlink()
    with pytest.raises(DataError, match=r"file .*val.txt not found. Expected under"):
        build("voc", root, "val", evaluation=True)


def test_brats_regions_nest(tmp_path):
    root = make(tmp_path, "brats", {"BraTS2021_00000_077": stripes([0, 2, 1, 4])}, mode="L")
    ev = build("brats", root, "val", evaluation=True)
    labels = ev[0][1].numpy()
    np.testing.assert_array_equal(ev.class_mask(labels, 0), stripes([0, 1, 1, 1]).astype(bool))  # whole tumour
    np.testing.assert_array_equal(ev.class_mask(labels, 1), stripes([0, 0, 1, 1]).astype(bool))  # core
    np.testing.assert_array_equal(ev.class_mask(labels, 2), stripes([0, 0, 0, 1]).astype(bool))  # enhancing
    assert ev.spec.metric == "binary" and ev.present_classes(np.array([[2]])) == [0, 1, 2]


def test_merged_training_sets_share_classes_by_name(tmp_path):
    """Table 5: COCO + ADE style merging, here ADE-150 + Cityscapes (both have "road" and "car")."""
    ade = make(tmp_path / "ade", "ade150", {"ADE_train_1": stripes([7, 21])})        # raw 7 = road, 21 = car
    city = make(tmp_path / "city", "cityscapes19", {"frankfurt_000000_000294": stripes([0, 13])})  # road, car
    merged = build("ade150+cityscapes19", f"{ade},{city}", "val", size=32, p_absent=0.0)
    assert len(merged) == 2 and merged.class_names[:150] == build("ade150", ade, "val", evaluation=True).class_names
    assert len(merged.class_names) == 150 + 19 - len(set(merged.class_names[:150]) & set(
        build("cityscapes19", city, "val", evaluation=True).class_names))
    for i in range(2):
        item = merged[i]
        assert merged.class_names[item["class_index"]] in ("road", "car")
        assert item["prompt"] == f"a photo of a {merged.class_names[item['class_index']]}."
    with pytest.raises(DataError, match="one root each"):
        build("ade150+cityscapes19", str(ade), "val", size=32)


def test_train_accepts_a_merged_dataset_flag():
    import train
    assert train.parse_args(["--dataset=cocostuff171+ade150"]).dataset == "cocostuff171+ade150"
    with pytest.raises(Exception, match="--dataset=imagenet"):
        train.parse_args(["--dataset=cocostuff171+imagenet"])


def test_monuseg_draws_its_xml_polygons(tmp_path):
    write_image(tmp_path / "test/Tissue Images/TCGA-2Z-A9J9-01A-01-TS1.tif")
    region = lambda pts: ("<Region><Vertices>" + "".join(f'<Vertex X="{x}" Y="{y}" />' for x, y in pts)
                          + "</Vertices></Region>")
    (tmp_path / "test/Annotations").mkdir(parents=True)
    (tmp_path / "test/Annotations/TCGA-2Z-A9J9-01A-01-TS1.xml").write_text(
        '<?xml version="1.0"?><Annotations><Annotation><Regions>' + region([(2, 3), (12, 3), (12, 9), (2, 9)])
        + region([(30, 20), (31, 20)]) + "</Regions></Annotation></Annotations>")          # a 2-point region: skipped
    ev = build("monuseg", tmp_path, "val", evaluation=True)
    image, labels, path = ev[0]
    expected = np.full((H, W), -1)
    expected[3:10, 2:13] = 0                                    # PIL fills the polygon with its outline
    np.testing.assert_array_equal(labels.numpy(), expected)
    assert path.endswith(".tif") and ev.class_names == ["nucleus"] and ev.spec.metric == "binary"
    assert ev.check() == []
    (tmp_path / "test/Annotations/TCGA-2Z-A9J9-01A-01-TS1.xml").write_text("<Annotations><Region>")
    with pytest.raises(DataError, match="cannot read polygon annotation"):
        ev[0]


def test_agrivision_reads_overlapping_class_folders(tmp_path):
    """Agriculture-Vision: one binary PNG per class (overlapping), a field boundary and a validity mask;
    the overlap is scored by the challenge's rule (metrics.confusion_matrix)."""
    from metrics import SEVERAL, confusion_matrix
    split, key = tmp_path / "val", "1AD76MIZD_1123-7522-1635-8034"
    write_image(split / f"images/rgb/{key}.jpg")
    write_mask(split / f"boundaries/{key}.png", stripes([255, 255, 255, 0]))       # last stripe outside the field
    write_mask(split / f"masks/{key}.png", stripes([255, 255, 255, 255]))
    names = [n.replace(" ", "_") for n in data.read_class_file(data.CLASSES_DIR / "agrivision.txt")]
    for n in names:
        write_mask(split / f"labels/{n}/{key}.png", np.zeros((H, W)))
    write_mask(split / f"labels/weed_cluster/{key}.png", stripes([0, 255, 255, 255]))
    write_mask(split / f"labels/water/{key}.png", stripes([0, 0, 255, 255]))
    write_mask(split / f"labels/storm_damage/{key}.png", stripes([255, 0, 0, 0]))  # not scored: background
    ev = build("agrivision", tmp_path, "val", evaluation=True)
    assert ev.class_names[5] == "water" and ev.class_names[7] == "weed cluster" and len(ev.class_names) == 8
    labels = ev[0][1].numpy()
    np.testing.assert_array_equal(labels, stripes([-1, 7, SEVERAL + 2 ** 5 + 2 ** 7, 255]))
    np.testing.assert_array_equal(ev.class_mask(labels, 7), stripes([0, 1, 1, 0]).astype(bool))
    np.testing.assert_array_equal(ev.class_mask(labels, 5), stripes([0, 0, 1, 0]).astype(bool))
    assert ev.present_classes(labels) == [5, 7] and ev.check() == []
    # the overlap stripe: predicting either of its classes is a hit of both; another class a miss of both
    cm = confusion_matrix(stripes([-1, 7, 5, 0]), labels, 8)
    overlap = (labels == SEVERAL + 2 ** 5 + 2 ** 7).sum()
    assert cm[5, 5] == overlap and cm[7, 7] == 2 * overlap and cm[8, 8] == overlap and cm.sum() == 4 * overlap
    cm = confusion_matrix(stripes([-1, 7, 0, 0]), labels, 8)
    assert cm[5, 0] == cm[7, 0] == overlap and cm[5, 5] == 0
    train = build("agrivision", tmp_path, "val", size=32, p_absent=0.0)
    assert train[0]["prompt"] in ("a photo of a water.", "a photo of a weed cluster.")
    (split / f"labels/endrow/{key}.png").unlink()
    with pytest.raises(DataError, match=r"labels/endrow/1AD76MIZD.*png not found: every sample needs"):
        ev[0]
    (split / f"boundaries/{key}.png").unlink()
    with pytest.raises(DataError, match=r"has no partner: expected .*val/boundaries/1AD76MIZD"):
        build("agrivision", tmp_path, "val", evaluation=True)
