"""The toy world's dataset (data/toy.py): deterministic scenes whose labels match what is drawn."""
import os

import numpy as np
import pytest
import torch

import data


def test_scenes_are_deterministic_and_labelled():
    a, la = data.toy_scene(0, 5)
    b, lb = data.toy_scene(0, 5)
    c, _ = data.toy_scene(1, 5)
    assert np.array_equal(a, b) and np.array_equal(la, lb) and not np.array_equal(a, c)
    assert a.shape == (64, 64, 3) and la.dtype == np.int64
    assert set(np.unique(la)) <= {-1, 0, 1, 2, 3, 4, 5} and (la >= 0).any() and (la == -1).any()
    # a shape's pixels share one colour, different from the background under it
    for cls in np.unique(la[la >= 0]):
        colours = np.unique(a[la == cls].reshape(-1, 3), axis=0)
        assert len(colours) == 1


def test_train_items_follow_the_prompt():
    ds = data.build("toy", "", "train", size=64, seed=0)
    for i in range(20):
        it = ds[i]
        c = it["class_index"]
        assert it["prompt"] == f"a photo of a {data.TOY_CLASSES[c]}."
        assert it["mask"].sum() > 0 and set(it["mask"].unique().tolist()) <= {0.0, 1.0}
    ds.set_epoch(1)
    assert any(ds[i]["class_index"] != data.build("toy", "", "train", size=64)[i]["class_index"] for i in range(20)) \
        or any(not torch.equal(ds[i]["image"], data.build("toy", "", "train", size=64)[i]["image"]) for i in range(20))


def test_train_crops_are_windows_of_the_scene_and_the_class_is_drawn_in_the_crop():
    ds = data.build("toy", "", "train", size=48, p_absent=0.0, seed=0)
    offsets = set()
    for i in range(12):
        it = ds[i]
        img, lab = data.toy_scene(1000, i)                          # the train split's scene i, 64 px
        whole = torch.from_numpy(img).permute(2, 0, 1).float() / 127.5 - 1
        assert it["image"].shape == (3, 48, 48) and it["mask"].shape == (48, 48)
        found = None
        for top in range(17):
            for left in range(17):
                window = whole[:, top:top + 48, left:left + 48]
                for flip in (False, True):
                    if torch.equal(window.flip(-1) if flip else window, it["image"]):
                        found = (top, left, flip)
        assert found is not None, i                                   # a window of the scene, maybe flipped
        top, left, flip = found
        offsets.add((top, left))
        y = torch.from_numpy(lab[top:top + 48, left:left + 48] == it["class_index"]).float()
        assert torch.equal(y.flip(-1) if flip else y, it["mask"]) and it["mask"].sum() > 0    # present in the crop
    assert len(offsets) > 6                                           # random offsets, not one window
    for bad in (40 + 4, 72, 0):
        with pytest.raises(data.DataError, match="crop"):
            data.build("toy", "", "train", size=bad)


def test_absent_classes_give_empty_masks():
    ds = data.build("toy", "", "train", size=64, p_absent=1.0)
    it = ds[0]
    _, labels = data.toy_scene(1000, 0)
    assert it["class_index"] not in np.unique(labels) and it["mask"].sum() == 0


def test_splits_do_not_share_scenes_and_eval_view_matches():
    train = data.build("toy", "", "train", evaluation=True)
    val = data.build("toy", "", "val", evaluation=True)
    assert not torch.equal(train[0][0], val[0][0])
    x, labels, name = val[0]
    img, lab = data.toy_scene(2000, 0)
    assert torch.equal(labels, torch.from_numpy(lab)) and x.shape == (3, 64, 64) and name == "toy-2000-0"
    assert val.class_names == list(data.TOY_CLASSES) and len(val) == 500


def test_each_class_paints_in_its_own_hue_family():
    import colorsys
    for index in range(30):
        img, lab = data.toy_scene(7, index)
        for cls in np.unique(lab[lab >= 0]):
            r, g, b = img[lab == cls][0] / 255
            hue = colorsys.rgb_to_hsv(r, g, b)[0]
            distance = abs((hue - data.TOY_HUES[cls] + 0.5) % 1.0 - 0.5)    # on the hue circle
            assert distance < 0.045, (index, data.TOY_CLASSES[cls], hue)


def test_the_prior_stage_trains_saves_and_digseg_widens_it(tmp_path):
    """Stage 2b's plumbing: the text-to-image U-Net is saved as an SD2 folder, its samples and the
    CLIP check are written, and DiGSeg fine-tunes it through the real loader with conv_in widened."""
    import json
    import os

    from digseg import DiGSeg
    from model.weights import load_sd2
    from toyworld import world as toy
    out = str(tmp_path / "toy")
    ckpt = toy.build_world(out, vae_steps=2, clip_steps=2, train_steps=2, prior_steps=3)
    prior = load_sd2(os.path.join(out, "sd2-prior"))
    scratch = load_sd2(os.path.join(out, "sd2"))
    assert prior.unet.conv_in.in_channels == 4
    assert not torch.equal(prior.unet.conv_out.weight, scratch.unet.conv_out.weight)      # it trained
    assert os.path.isfile(os.path.join(out, "prior_samples.png"))
    assert 0 <= json.load(open(os.path.join(out, "sd2-prior", "prior_check.json")))["clip_hit_rate"] <= 1
    cfg = DiGSeg.config_of(ckpt)
    assert cfg.sd2 == os.path.abspath(os.path.join(out, "sd2-prior"))
    fresh = DiGSeg.from_weights(cfg.sd2, cfg.clip)
    w = fresh.unet.conv_in.weight
    assert w.shape[1] == 8 and torch.allclose(w[:, :4] * 2, prior.unet.conv_in.weight)
    assert torch.equal(fresh.unet.mid_block.attentions[0].proj_in.weight, prior.unet.mid_block.attentions[0].proj_in.weight)


def test_the_error_budget_adds_up(tiny_model, tiny_paths, tmp_path):
    """toyworld.ceiling.error_budget splits the shapes' pixels into found, missed and taken for another class
    (their shares add up to 1), scores every background threshold and working size it is asked for;
    the VAE's ceiling reports the same breakdown at each scale."""
    from toyworld import ceiling
    tiny_model.save(tmp_path / "ck")
    r = ceiling.error_budget(str(tmp_path / "ck"), 3, tau_bgs=(0.3, 0.5), long_sides=(32, 64))
    assert r["scenes"] == 3 and set(r["miou_by_tau_bg"]) == {"0.3", "0.5"} and set(r["miou_by_long_side"]) == {"32", "64"}
    assert r["miou_by_long_side"]["32"] == r["miou_by_tau_bg"]["0.5"]
    assert sum(r["shape_pixels"].values()) == pytest.approx(1.0)
    assert set(r["per_class"]) == set(data.TOY_CLASSES) and 0 <= r["background_taken_for_a_class"] <= 1
    assert list(r["recall_by_depth"]) == ["1", "2", "3", "4+"]
    c = ceiling.vae_ceiling(tiny_paths[0], 2)
    assert set(c["miou_by_long_side"]) == {"64", "128"} and c["miou"] == c["miou_by_long_side"]["64"]
    assert sum(c["shape_pixels"].values()) == pytest.approx(1.0) and all(0 <= v <= 1 for v in c["recall_by_depth"].values())


def test_edge_depth_counts_steps_in_from_the_edge_and_recall_by_depth_follows_it():
    """A pixel's depth is 1 on a shape's edge and one more per 4-neighbour step inwards; the image's
    border is not an edge. A prediction one pixel thinner than the truth loses exactly depth 1."""
    from toyworld import ceiling
    mask = np.zeros((9, 9), bool)
    mask[1:8, 1:8] = True                                            # a 7 x 7 square, one pixel from the border
    d = ceiling.edge_depth(mask)
    assert d[0].tolist() == [0] * 9 and d[4].tolist() == [0, 1, 2, 3, 4, 3, 2, 1, 0]
    at_border = np.zeros((6, 6), bool)
    at_border[:, :3] = True                                          # cut by the left border: its edge is on the right only
    assert ceiling.edge_depth(at_border)[2].tolist() == [3, 2, 1, 0, 0, 0]
    gt = torch.full((9, 9), -1)
    gt[torch.from_numpy(mask)] = 2
    thinner = torch.zeros(6, 9, 9)
    thinner[2][torch.from_numpy(d >= 2)] = 1.0                       # the shape less its edge
    tally = ceiling.Tally(6, (0.5,))
    tally.add(thinner, gt)
    assert tally.recall_by_depth() == {"1": 0.0, "2": 1.0, "3": 1.0, "4+": 1.0}


def test_a_study_carries_on_from_its_results_file(tmp_path, monkeypatch):
    """--study=prior resumes by cell: a rerun skips the cells the results file holds (whichever commit
    and machine wrote them), runs only the rest, and appends each one as it finishes, with its commit
    and machine; a line that is not a cell is a one-line error naming the file and line."""
    import json
    import types

    from toyworld import cells as cells_module, studies
    runs = []

    def fake_train_and_eval(run, flags, val_images, env=None):
        runs.append(os.path.basename(run))
        if len(runs) == 3:
            raise KeyboardInterrupt                      # the session ends mid-study
        return 0.5 + 0.01 * len(runs), 12.0

    monkeypatch.setattr(studies, "train_and_eval", fake_train_and_eval)
    monkeypatch.setattr(studies, "build_bases", lambda out, v, c: ("sd2", "clip"))
    monkeypatch.setattr(studies, "build_prior", lambda out, s, c, w: "sd2-prior")
    monkeypatch.setattr(studies, "line_plot", lambda *a, **k: None)
    path = tmp_path / "cells.jsonl"
    args = types.SimpleNamespace(vae_steps=2, clip_steps=2, prior_steps=3, study_steps=5, val_images=4, study_seeds=1,
                                 study_cells=str(path))
    with pytest.raises(KeyboardInterrupt):
        studies.study_prior(str(tmp_path / "toy"), args)
    lines = [json.loads(ln) for ln in path.read_text().splitlines()]
    assert [ln["cell"] for ln in lines] == ["scratch-50-all", "scratch-200-all"]
    assert all(ln["commit"] and ln["machine"] and ln["settings"]["steps"] == 5 for ln in lines)
    runs.clear()
    monkeypatch.setattr(studies, "train_and_eval", lambda run, flags, n, env=None: runs.append(run) or (0.6, 10.0))
    results = studies.study_prior(str(tmp_path / "toy"), args)
    assert len(runs) == 2 * len(studies.STUDY_SCENES) + 2 - 2            # every cell but the two already there
    assert results["scratch"][:2] == [[0.51], [0.52]]                     # theirs, read back from the file
    assert len(path.read_text().splitlines()) == 2 * len(studies.STUDY_SCENES) + 2
    runs.clear()
    args.study_steps = 6                                                   # other settings: other cells
    studies.study_prior(str(tmp_path / "toy"), args)
    assert len(runs) == 2 * len(studies.STUDY_SCENES) + 2
    path.write_text(path.read_text() + "not json\n")
    with pytest.raises(ValueError, match=r"cells.jsonl:\d+: not a study cell"):
        cells_module.Cells(str(path), ".")


def test_a_share_of_the_e2e_study_runs_its_rows_and_reports_them(tmp_path, monkeypatch):
    """--study_rows runs those rows' cells only, the table holds the rows done so far, and an unknown
    row is a one-line error that lists the valid ones."""
    import types

    from toyworld import studies
    runs = []
    monkeypatch.setattr(studies, "train_and_eval", lambda run, flags, n, env=None: runs.append(os.path.basename(run)) or (0.7, 9.0))
    monkeypatch.setattr(studies, "build_bases", lambda out, v, c: ("sd2", "clip"))
    monkeypatch.setattr(studies, "build_prior", lambda out, s, c, w: "sd2-prior")
    monkeypatch.setattr(studies, "vae_ceiling", lambda sd2, n: {"miou": 0.9})
    monkeypatch.setattr(studies, "e2e_figures", lambda *a: None)
    args = types.SimpleNamespace(vae_steps=2, clip_steps=2, prior_steps=3, e2e_steps=8, train_steps=16, val_images=4,
                                 study_seeds=2, study_jobs=1, study_cells=str(tmp_path / "cells.jsonl"),
                                 study_rows="e2e-c1time,preset-c1")
    results = studies.study_e2e(str(tmp_path / "toy"), args)
    assert sorted(runs) == ["e2e-c1time-20000-seed0", "e2e-c1time-20000-seed1", "preset-c1-20000-seed0",
                            "preset-c1-20000-seed1"]
    assert set(results["rows"]) == {"e2e-c1time", "preset-c1"} and results["seeds"] == 2
    assert results["rows"]["e2e-c1time"]["20000"]["steps"] == round(16 / studies.E2E_STEP_COST)
    args.study_rows = "e2e-c2"
    with pytest.raises(SystemExit, match="--study_rows: unknown e2e-c2; valid: .*e2e-c1time"):
        studies.study_e2e(str(tmp_path / "toy"), args)
