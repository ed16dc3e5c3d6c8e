"""sample.py and eval.py end to end on a tiny random DiGSeg (saved and reloaded as a checkpoint)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import eval as evaluation
import sample
from data import TOY_CLASSES
from digseg import DiGSeg
from launch import UsageError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def checkpoint(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    tiny_model.save(folder)
    return str(folder)


def test_sample_writes_pngs_at_the_original_size_and_survives_a_bad_image(checkpoint, tmp_path):
    rng = np.random.default_rng(0)
    rgb = (rng.random((30, 41, 3)) * 255).astype(np.uint8)
    images = {"rgb.jpg": Image.fromarray(rgb), "rgba.png": Image.fromarray(rgb).convert("RGBA").resize((50, 20)),
              "grey.png": Image.fromarray(rgb).convert("L").resize((17, 33)),
              "palette.png": Image.fromarray(rgb).convert("P"),
              "deep.png": Image.fromarray((rng.random((25, 25)) * 65535).astype(np.uint16)),
              "cmyk.jpg": Image.fromarray(rgb).convert("CMYK")}
    for name, im in images.items():
        im.save(tmp_path / name)
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    out = tmp_path / "out"
    code = sample.main([str(tmp_path / "*.*"), f"--checkpoint={checkpoint}", "--classes=circle,star",
                        f"--out={out}", "--ensemble=2", "--steps=1", "--tau_bg=0.0"])
    assert code == 1                                           # the broken image is reported ...
    for name, im in images.items():                            # ... and every other one is written
        stem = out / os.path.splitext(name)[0]
        labels = Image.open(f"{stem}_labels.png")
        assert labels.size == im.size and labels.mode == "P"
        assert Image.open(f"{stem}_prob_circle.png").size == im.size
        overlay = Image.open(f"{stem}_overlay.png")
        assert overlay.size[1] >= im.size[1] and overlay.size[0] > im.size[0]   # + the legend
        found = json.load(open(f"{stem}.json"))
        assert [c["class"] for c in found["classes"]] == ["circle", "star"]
        assert abs(sum(c["area"] for c in found["classes"]) - 1.0) < 1e-6       # tau_bg = 0: every pixel labelled
    assert not (out / "broken_labels.png").exists()


def test_sample_missing_checkpoint_says_what_it_expected(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    with pytest.raises(Exception, match="expected digseg.json and digseg.safetensors"):
        sample.main([str(tmp_path / "a.png"), f"--checkpoint={tmp_path / 'nope'}", "--classes=a"])


def make_cityscapes(root, n=3):
    """A tiny Cityscapes in its real layout: leftImg8bit/val/CITY/*_leftImg8bit.png + gtFine labelTrainIds."""
    rng = np.random.default_rng(1)
    for i in range(n):
        city = "aachen" if i < 2 else "bremen"
        for sub in (f"leftImg8bit/val/{city}", f"gtFine/val/{city}"):
            os.makedirs(os.path.join(root, sub), exist_ok=True)
        stem = f"{city}_000000_{i:06d}"
        Image.fromarray((rng.random((24, 40, 3)) * 255).astype(np.uint8)).save(
            os.path.join(root, f"leftImg8bit/val/{city}/{stem}_leftImg8bit.png"))
        lab = rng.integers(0, 19, (24, 40)).astype(np.uint8)
        lab[:4] = 255
        Image.fromarray(lab).save(os.path.join(root, f"gtFine/val/{city}/{stem}_gtFine_labelTrainIds.png"))


def test_eval_single_process_equals_torchrun_two(checkpoint, tmp_path):
    root = tmp_path / "cityscapes"
    make_cityscapes(str(root))
    common = [f"--checkpoint={checkpoint}", "--dataset=cityscapes19", f"--data_root={root}", "--ensemble=1",
              "--steps=1", "--tau_bg=0.3", "--batch_size=19", "--proposals=0"]
    one = evaluation.main(common + [f"--out={tmp_path / 'one'}"])["main"]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29544",
                        os.path.join(ROOT, "eval.py"), *common, f"--out={tmp_path / 'two'}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    two = json.load(open(tmp_path / "two" / "metrics_main.json"))
    assert two["miou_gt"] == pytest.approx(one["miou_gt"], abs=1e-12)
    assert two["pixel_acc"] == pytest.approx(one["pixel_acc"], abs=1e-12)
    assert 0 <= one["miou_gt"] <= 1 and os.path.isfile(tmp_path / "one" / "per_class_main.csv")


def test_eval_resumes_from_partial_results(checkpoint, tmp_path, capsys):
    root = tmp_path / "cityscapes"
    make_cityscapes(str(root))
    common = [f"--checkpoint={checkpoint}", "--dataset=cityscapes19", f"--data_root={root}", "--batch_size=19",
              f"--out={tmp_path / 'out'}", "--save_every=1", "--proposals=0"]
    full = evaluation.main(common)["main"]
    first = evaluation.main(common + ["--limit=3"])["main"]  # same settings and images: everything is already done
    assert "resuming after 3 images" in capsys.readouterr().out
    assert first["miou_gt"] == full["miou_gt"]
    assert first["images_per_s"] == pytest.approx(full["images_per_s"], rel=0.2)   # the speed it was computed at


def test_vae_on_masks_study(tiny_paths):
    """Table 7 in small: the decoded masks are compared with the masks (an untrained VAE is far off)."""
    import data
    from model.weights import load_sd2
    sd = load_sd2(tiny_paths[0])
    ds = data.build("toy", "", "val", evaluation=True)
    r = evaluation.vae_on_masks(sd.vae, sd.vae_scale, ds, n=10)
    assert r["masks"] == 10 and 0 < r["mae"] < 1 and 0 <= r["label_accuracy"] <= 1
    assert r["channel_std"] > 0 and r["channel_range"] >= r["channel_std"]
    maps = evaluation.vae_on_label_maps(sd.vae, sd.vae_scale, ds, n=3)
    assert maps["maps"] == 3 and 0 <= maps["label_accuracy"] < 1


def test_table7_label_maps_through_a_perfect_autoencoder_come_back_whole():
    import types
    import data
    identity = types.SimpleNamespace(encode=lambda x: (x, x), decode=lambda z: z, parameters=lambda: iter([torch.zeros(1)]),
                                     config=types.SimpleNamespace(block_out_channels=(1, 2, 3, 4)))
    r = evaluation.vae_on_label_maps(identity, 1.0, data.build("toy", "", "val", evaluation=True), n=4)
    assert r == {"maps": 4, "label_accuracy": 1.0, "miou": 1.0}


def test_overlay_enlarges_small_images_and_leaves_unlabelled_pixels_alone():
    from plot import colour, overlay
    img = Image.new("RGB", (64, 32), (10, 20, 30))
    labels = torch.full((32, 64), -1)
    labels[:8, :8] = 1
    labels[8:16, :8] = 255                                    # an ignored pixel value
    out = np.asarray(overlay(img, labels, ["a", "b"]).convert("RGB")).astype(int)
    assert out.shape[1] >= 256 + 1 and out.shape[0] >= 128      # x4 enlargement, + the legend
    assert np.abs(out[0, 0] - (0.5 * np.array([10, 20, 30]) + 0.5 * np.array(colour(1)))).max() <= 1  # blended
    assert (out[40, 0] == [10, 20, 30]).all() and (out[100, 100] == [10, 20, 30]).all()


def test_window_starts_cover_every_pixel():
    assert evaluation.window_starts(10, 4) == [0, 3, 6] and evaluation.window_starts(3, 4) == [0]
    for length in (32, 33, 100, 2048):
        starts = evaluation.window_starts(length, 32)
        covered = np.zeros(length, bool)
        for s in starts:
            covered[s:s + 32] = True
        assert covered.all() and starts[-1] + 32 == max(length, 32)


def protocol_args(protocol):
    return evaluation.parse(["--checkpoint=x", f"--protocol={protocol}", "--ensemble=1", "--steps=1"])


def test_protocols_long_short_and_sliding_window(tiny_model):
    image = torch.rand(3, 40, 56, generator=torch.Generator().manual_seed(0)) * 2 - 1
    names = ["circle", "star"]
    seen = []
    hook = tiny_model.vae.encoder.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape[2:])))
    try:
        long = evaluation.segment_by_protocol(tiny_model, image, names, protocol_args("long"))
        short = evaluation.segment_by_protocol(tiny_model, image, names, protocol_args("short"))
    finally:
        hook.remove()
    assert seen == [(24, 32), (32, 48)]          # long side 56 -> 32 (padded to 24x32); short side 40 -> 32
    assert long.shape == short.shape == (2, 40, 56)
    assert torch.equal(long, tiny_model.segment(image, names, ensemble=1, steps=1))
    slide = evaluation.segment_by_protocol(tiny_model, image, names, protocol_args("slide"))
    total, count = torch.zeros(2, 40, 56), torch.zeros(40, 56)
    for top in (0, 8):                            # 32 px windows at full resolution, stride 21
        for left in (0, 21, 24):
            total[:, top:top + 32, left:left + 32] += tiny_model.segment(image[:, top:top + 32, left:left + 32],
                                                                         names, ensemble=1, steps=1)
            count[top:top + 32, left:left + 32] += 1
    assert torch.allclose(slide, total / count, atol=1e-6)
    assert (slide - long).abs().max() > 1e-3


def test_the_references_protocols_meet_the_model_at_their_sizes():
    """square: R x R whatever the aspect; short: short side R, long side at most 4R (mmseg's 2048 for
    512); san: short side 640, long side at most 2560; catseg: 640 x 640, four 384 windows at stride
    256 and the whole image at 384, averaged. Every one answers at the label map's size. A stand-in
    model records what segment() is given (the tiny U-Net at 640 px would take minutes)."""
    from types import SimpleNamespace

    class Recorder:
        cfg, device = SimpleNamespace(resolution=32), torch.device("cpu")

        def __init__(self):
            self.calls = []

        def segment(self, image, names, long_side=None, **kw):
            self.calls.append((tuple(image.shape[1:]), long_side))
            return torch.full((len(names), *image.shape[1:]), 1.0 if len(self.calls) == 5 else 0.2)   # catseg: whole = 5th

    for protocol, (h, w), expected in (("square", (40, 56), [((32, 32), 32)]),
                                       ("short", (40, 56), [((40, 56), 45)]),
                                       ("short", (8, 64), [((8, 64), 128)]),        # capped at 4R; uncapped 256
                                       ("san", (40, 56), [((40, 56), 896)]),
                                       ("san", (10, 100), [((10, 100), 2560)]),
                                       ("catseg", (40, 56), [((384, 384), 384)] * 4 + [((384, 384), 384)])):
        model = Recorder()
        probs = evaluation.segment_by_protocol(model, torch.rand(3, h, w) * 2 - 1, ["circle", "star"],
                                               protocol_args(protocol))
        assert model.calls == expected, (protocol, model.calls)
        assert probs.shape == (2, h, w)
        if protocol == "catseg":
            assert torch.allclose(probs, torch.full_like(probs, 0.6))    # (windows' 0.2 + whole's 1.0) / 2


def test_the_protocol_follows_the_dataset(checkpoint, tmp_path):
    root = tmp_path / "cityscapes"
    make_cityscapes(str(root))
    evaluation.main([f"--checkpoint={checkpoint}", "--dataset=cityscapes19", f"--data_root={root}", "--limit=1",
                     "--proposals=0", f"--out={tmp_path / 'o'}"])
    assert json.load(open(tmp_path / "o" / "metrics_main.json"))["key"]["protocol"] == "slide"
    assert evaluation.PROTOCOLS["ade150"] == "short" and evaluation.PROTOCOLS.get("toy", "long") == "long"


def test_binary_benchmarks_print_table_3s_scores(checkpoint, tmp_path, capsys):
    root = tmp_path / "dg"
    for i in range(2):
        os.makedirs(root / "val", exist_ok=True)
        Image.fromarray((np.random.default_rng(i).random((40, 56, 3)) * 255).astype(np.uint8)).save(root / f"val/{i}_sat.jpg")
        road = np.zeros((40, 56, 3), np.uint8)
        road[:, 20:30] = 255
        Image.fromarray(road).save(root / f"val/{i}_mask.png")
    r = evaluation.main([f"--checkpoint={checkpoint}", "--dataset=deepglobe", f"--data_root={root}", "--proposals=0",
                         "--tau=0.3", f"--out={tmp_path / 'o'}"])["main"]
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("  road:")][0]
    assert f"precision {r['binary_precision'][0]:.4f}, recall {r['binary_recall'][0]:.4f}" in line
    assert r["binary_f1"][0] == pytest.approx(r["binary_dice"][0])


def test_fig3_tau_study_and_fig6_fractions(tiny_model, tmp_path):
    runs = []
    for fraction, scale in ((1.0, 1.0), (0.25, 0.5)):        # two "runs": the model, and one with other weights
        run_dir = tmp_path / f"f{fraction}"
        model = DiGSeg.from_checkpoint(tiny_model_ckpt(tiny_model, tmp_path), device="cpu")
        with torch.no_grad():
            model.unet.conv_out.weight.mul_(scale)
        model.save(run_dir / "checkpoint")
        (run_dir / "checkpoint" / "settings.json").write_text(json.dumps({"fraction": fraction}))
        runs.append(str(run_dir))
    common = ["--dataset=toy", "--limit=3", "--proposals=0"]
    r = evaluation.main(common + ["--study=fractions", f"--runs={','.join(runs)}", f"--out={tmp_path / 'f6'}"])
    assert [p["fraction"] for p in r["fractions"]] == [0.25, 1.0] and (tmp_path / "f6" / "fig6_fractions.png").is_file()
    direct = evaluation.main(common + [f"--checkpoint={runs[1]}/checkpoint", f"--out={tmp_path / 'd'}"])["main"]
    assert r["fractions"][0]["miou"] == direct["miou_gt"]
    tau = evaluation.main(common + [f"--checkpoint={runs[0]}/checkpoint", "--study=tau", f"--out={tmp_path / 't'}"])
    curves = json.load(open(tmp_path / "t" / "tau_curves.json"))
    assert curves["tau"] == list(evaluation.TAUS) and (tmp_path / "t" / "fig3_tau.png").is_file()
    at07 = {c: v[evaluation.TAUS.index(0.7)] for c, v in curves["iou"].items()}
    names = list(TOY_CLASSES)
    for c, v in at07.items():                                # the row's binary IoU is the curve at tau = 0.7
        assert tau["tau"]["binary_iou"][names.index(c)] == pytest.approx(v, nan_ok=True)


def tiny_model_ckpt(tiny_model, tmp_path):
    folder = tmp_path / "base"
    if not folder.is_dir():
        tiny_model.save(folder)
    return folder


def test_binary_scores_count_the_misses_of_classes_clip_did_not_propose(tmp_path, monkeypatch):
    """Two images, each half road: CLIP proposes nothing on the first, the mask is perfect on the
    second. 32 of the 64 road pixels are found: binary IoU 0.5 and recall 0.5, as the confusion
    matrix says, not 1.0 from the proposed image alone."""
    from types import SimpleNamespace
    from metrics import miou, pooled_iou_dice, pooled_precision_recall_f1

    gt = torch.full((8, 8), -1, dtype=torch.long)
    gt[:, :4] = 0                                              # road on the left half: 32 pixels per image
    perfect = (gt == 0).float()[None]                          # M_road of the second image

    class TwoImages:
        class_names, ignore_index = ["road"], 255

        def __len__(self):
            return 2

        def __getitem__(self, i):
            return torch.zeros(3, 8, 8), gt, f"img{i}"

        def class_mask(self, labels, c):
            return labels == c

        def present_classes(self, labels):
            return sorted(int(v) for v in np.unique(labels) if 0 <= v < 1)

    answers = iter([(torch.full_like(gt, -1), None, []), (gt.clone(), perfect, [0])])
    monkeypatch.setattr(evaluation, "predict", lambda *a: next(answers))
    args = SimpleNamespace(out=str(tmp_path), study="", tau=0.7, save_every=100, overlays=0)
    cm, counts, _ = evaluation.evaluate(SimpleNamespace(device="cpu"), TwoImages(), args, {"images": 2}, "t")
    assert miou(cm)["per_class"][0] == pytest.approx(0.5)
    iou, dice = pooled_iou_dice(counts[0])
    precision, recall, f1 = pooled_precision_recall_f1(counts[0])
    assert (iou[0], precision[0], recall[0]) == (pytest.approx(0.5), 1.0, pytest.approx(0.5))
    assert f1[0] == pytest.approx(2 / 3) and counts[0, 0, 3] == 64        # every road pixel counted

    nothing = np.zeros((1, 1, 4), np.int64)                    # nothing proposed on any image: IoU 0, not NaN
    evaluation.add_binary_counts(nothing, None, [], gt.numpy(), TwoImages(), (0.7,))
    assert pooled_iou_dice(nothing[0])[0][0] == 0.0


def test_table7_draws_its_masks_at_random_and_reports_the_std(tiny_paths):
    """App. B samples 1,000 masks at random and reports MAE +- std: a seeded draw over all (image,
    class present) pairs, not the first n, and the std of the per-mask MAE."""
    import data
    from model.weights import load_sd2
    ds = data.build("toy", "", "val", evaluation=True, fraction=0.04)          # 20 scenes
    pairs = [(i, c) for i in range(len(ds)) for c in ds.present_classes(ds[i][1].numpy())]
    first = [torch.from_numpy(ds.class_mask(ds[i][1].numpy(), c)).float() for i, c in pairs[:6]]
    drawn = {s: list(evaluation._class_masks(ds, 6, seed=s)) for s in (0, 1)}
    assert len(drawn[0]) == 6 and all(m.shape == (64, 64) for m in drawn[0])
    same = lambda a, b: len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
    assert not same(drawn[0], first) and not same(drawn[0], drawn[1])
    assert same(drawn[0], list(evaluation._class_masks(ds, 6, seed=0)))       # seeded
    assert len(list(evaluation._class_masks(ds, 10 ** 6))) == len(pairs)     # fewer pairs than asked: all of them
    sd = load_sd2(tiny_paths[0])
    r = evaluation.vae_on_masks(sd.vae, sd.vae_scale, ds, n=6, seed=1)
    with torch.no_grad():
        maes = [(evaluation.image_to_mask(sd.vae.decode(sd.vae.encode(evaluation.mask_to_image(m[None]))[0])) - m).abs().mean()
                for m in drawn[1]]
    assert r["mae"] == pytest.approx(float(torch.stack(maes).mean()), abs=1e-5)
    assert r["mae_std"] == pytest.approx(float(torch.stack(maes).std()), abs=1e-5) and r["mae_std"] > 0


def test_fig7_ensemble_study_and_the_papers_defaults_in_help(checkpoint, tmp_path, capsys):
    r = evaluation.main([f"--checkpoint={checkpoint}", "--dataset=toy", "--limit=2", "--proposals=0", "--study=ensemble",
                         f"--out={tmp_path / 'f7'}"])
    assert list(r) == ["E1xS1-trailing", "E2xS1-trailing", "E4xS1-trailing", "E8xS1-trailing"]
    assert (tmp_path / "f7" / "fig7_ensemble.png").is_file()
    assert json.load(open(tmp_path / "f7" / "metrics_E8xS1-trailing.json"))["key"]["ensemble"] == 8
    with pytest.raises(SystemExit):
        evaluation.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert 'the paper: 8 "unless otherwise stated"' in help_text and "E x S = 8 x 2" in help_text


def test_every_ade847_class_can_win_a_pixel():
    """ADE-847 has nine first synonyms that 19 classes share ("bag" thrice). A model that sees only
    the prompt answers the same for equal prompts; with one distinct name per class (the prompt),
    each class lights its own pixel and eval.predict maps every one back to its own index."""
    from types import SimpleNamespace

    from data import CLASSES_DIR, class_names_of, read_class_file
    lines = read_class_file(CLASSES_DIR / "ade847.txt")
    names = class_names_of(lines)
    assert len(names) == 847 and len(set(names)) == 847
    assert names[114] == "bag" and names[191] == "bag, traveling bag" and names[252] == "bag, handbag"
    pixel_of = {}                                          # a prompt's answer: the pixel of its first class
    for k, n in enumerate(names):
        pixel_of.setdefault(n, k)

    class PromptOnly:
        cfg, device = SimpleNamespace(resolution=30), torch.device("cpu")

        def propose_classes(self, image, vocabulary, *a, synonyms=None, **k):
            return list(vocabulary), {}

        def segment(self, image, classes, **kw):
            probs = torch.zeros(len(classes), 30 * 30)
            for j, c in enumerate(classes):
                probs[j, pixel_of[c]] = 1
            return probs.view(len(classes), 30, 30)

    args = evaluation.parse(["--checkpoint=x", "--protocol=long", "--tau_bg=0.5"])
    labels, _, classes = evaluation.predict(PromptOnly(), torch.zeros(3, 30, 30), names, args, lines)
    assert sorted(set(labels.flatten().tolist()) - {-1}) == list(range(847))


def test_proposals_average_each_synonym_and_refuse_repeated_names(tiny_model):
    """The proposals' class embedding of 'circle, ring' is the normalised mean of the two prompts'
    normalised embeddings (CAT-Seg's class_embeddings); a vocabulary with a name twice is an error."""
    import torch.nn.functional as F
    proposer = tiny_model.proposer
    both = proposer.text_embeddings(("circle, ring", "star"), "A photo of a {}.")
    one = proposer.text_embeddings(("circle", "ring", "star"), "A photo of a {}.")
    assert torch.allclose(F.normalize(both, dim=-1)[0], F.normalize(one[0] + one[1], dim=-1), atol=1e-6)
    assert torch.allclose(both[1], one[2], atol=1e-6)
    image = torch.rand(3, 32, 32) * 2 - 1
    classes, _ = tiny_model.propose_classes(image, ["circle", "star"], tau_global=-1, synonyms=["circle, ring", "star"])
    assert sorted(classes) == ["circle", "star"]
    with pytest.raises(ValueError, match="the vocabulary repeats \\['bag'\\]"):
        tiny_model.propose_classes(image, ["bag", "star", "bag"])


def test_table7_reports_the_channel_spread_in_the_maes_unit():
    """A decoder that answers (-1, 0, 1) on R, G, B everywhere: channel mean 0 -> M = 0.5, so the
    MAE is 0.5 on [0, 1]; its channel std is 0.5 and its max - min 1 on the same [0, 1] (1 and 2 on
    the decoder's [-1, 1])."""
    import types
    import data
    rgb = torch.tensor([-1.0, 0.0, 1.0])[None, :, None, None]
    spread = types.SimpleNamespace(encode=lambda x: (x, x), decode=lambda z: rgb.expand(len(z), 3, *z.shape[2:]),
                                   parameters=lambda: iter([torch.zeros(1)]))
    r = evaluation.vae_on_masks(spread, 1.0, data.build("toy", "", "val", evaluation=True), n=4)
    assert r["mae"] == pytest.approx(0.5) and r["channel_std"] == pytest.approx(0.5)
    assert r["channel_range"] == pytest.approx(1.0)


def test_sample_with_the_ade847_vocabulary_proposes_distinct_classes(checkpoint, tmp_path, monkeypatch):
    """sample.py --vocab=ade847 hands the proposals distinct names and each class's synonym line."""
    seen = {}

    def propose(self, image, vocabulary, tau_global, tau_patch, synonyms=None):
        seen.update(vocabulary=list(vocabulary), synonyms=synonyms)
        return ["bag, handbag"], {"bag, handbag": {"global": 0.3, "patch": 0.3}}

    monkeypatch.setattr(DiGSeg, "propose_classes", propose)
    Image.new("RGB", (24, 16), (10, 200, 10)).save(tmp_path / "g.png")
    assert sample.main([str(tmp_path / "g.png"), f"--checkpoint={checkpoint}", "--vocab=ade847",
                        f"--out={tmp_path / 'o'}", "--ensemble=1"]) == 0
    assert len(seen["vocabulary"]) == 847 == len(set(seen["vocabulary"])) == len(seen["synonyms"])
    assert seen["synonyms"][252] == "bag, handbag, pocketbook, purse"
    found = json.load(open(tmp_path / "o" / "g.json"))["classes"]
    assert [c["class"] for c in found] == ["bag, handbag"]
    with pytest.raises(UsageError, match="a class is named twice"):
        sample.main([str(tmp_path / "g.png"), f"--checkpoint={checkpoint}", "--classes=a,b,a"])


def test_the_readmes_python_example_runs(tiny_model, tmp_path, monkeypatch):
    """The README's first Python block, as written, on a tiny checkpoint where command 1 puts its own."""
    import re

    import data
    block = re.search(r"```python\n(.*?)```", open(os.path.join(ROOT, "README.md")).read(), re.S).group(1)
    tiny_model.save(tmp_path / "out" / "toy" / "digseg" / "checkpoint")
    Image.fromarray(data.toy_scene(2000, 7)[0]).save(tmp_path / "scene.png")
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(block, "README.md", "exec"), scope)
    assert scope["probs"].shape == (3, 64, 64) and 0 <= scope["probs"].min() and scope["probs"].max() <= 1
    assert Image.open(tmp_path / "scene_overlay.png").size[1] >= 64
