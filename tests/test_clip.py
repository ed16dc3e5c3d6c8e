"""model/clip.py against transformers (the oracle) at the real configs, with seeded random weights.
Tolerance: max abs difference <= 1e-4 in fp32."""
import glob
import os
import pickle
import zipfile

import pytest
import torch
from PIL import Image

from model.clip import PRESETS, CLIPConfig, preprocess
from model.convert import read_openai_checkpoint
from model.weights import WeightsError, load_clip, load_sd2_text_encoder
from tests.clip_oracle import hf_config, openai_clip_model, openai_state_dict, save_openai_jit, save_torchscript

VOCAB = (glob.glob(os.path.join(os.path.dirname(torch.__file__), "..", "open_clip", "bpe_simple_vocab_16e6.txt.gz"))
         or [None])[0]
OPENAI = openai_clip_model()


def randomise(model, seed):
    """transformers initialises LayerNorms to (1, 0) and biases to 0: perturb everything, so that
    a wrong mapping of any tensor changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)


@pytest.fixture(scope="module", params=["clip-vit-b16", "clip-vit-l14"])
def hf_pair(request, tmp_path_factory):
    import transformers
    torch.manual_seed(0)
    ref = transformers.CLIPModel(hf_config(PRESETS[request.param])).eval()
    randomise(ref, 1)
    folder = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(folder)
    if VOCAB:
        write_hf_vocab(VOCAB, folder)
    yield request.param, ref, folder
    del ref


def write_hf_vocab(bpe_gz, folder):
    import gzip
    import json
    from model.clip import SOT, EOT, bytes_to_unicode
    lines = gzip.open(bpe_gz, "rt", encoding="utf-8").read().split("\n")[1:49152 - 256 - 2 + 1]
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in lines] + [SOT, EOT]
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(tokens)}, f)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(lines) + "\n")


def ids_and_pixels(vocab_size, image_size, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((2, 77), 49407)
    ids[:, 0] = 49406
    ids[0, 1:10] = torch.randint(1, vocab_size - 2, (9,), generator=g)
    ids[0, 10] = 49407
    ids[1, 1:40] = torch.randint(1, vocab_size - 2, (39,), generator=g)
    ids[1, 40] = 49407
    return ids, torch.randn(2, 3, image_size, image_size, generator=g)


def compare(ours, ref, ids, pixels):
    with torch.no_grad():
        h, pooled = ours.text(ids)
        img, patches = ours.image(pixels)
        r_text = ref.text_model(input_ids=ids)
        r_vis = ref.vision_model(pixel_values=pixels)
        r_patches = ref.visual_projection(ref.vision_model.post_layernorm(r_vis.last_hidden_state[:, 1:]))
        diffs = {"text hidden": (h - r_text.last_hidden_state).abs().max().item(),
                 "text pooled": (pooled - ref.text_projection(r_text.pooler_output)).abs().max().item(),
                 "image pooled": (img - ref.visual_projection(r_vis.pooler_output)).abs().max().item(),
                 "patch tokens": (patches - r_patches).abs().max().item()}
    assert h.abs().mean() > 0.1 and patches.abs().mean() > 0.01   # non-trivial outputs
    return diffs


def test_hf_folder_parity(hf_pair):
    name, ref, folder = hf_pair
    ours = load_clip(folder)
    cfg = ours.config
    ids, pixels = ids_and_pixels(cfg.text_config.vocab_size, cfg.vision_config.image_size)
    diffs = compare(ours, ref, ids, pixels)
    print(name, "HF parity, max abs diff:", diffs)
    assert max(diffs.values()) <= 1e-4, diffs


def test_openai_formats_load_equal(hf_pair, tmp_path):
    """OpenAI names, written by tests/clip_oracle.py and checked by openai/CLIP's own model.py (its
    build_model loads them strictly; its encode_text/encode_image must match transformers), then read
    by load_clip from a plain state-dict file and from a traced fp16 TorchScript archive."""
    name, ref, folder = hf_pair
    if name != "clip-vit-b16":
        pytest.skip("one OpenAI round is enough (ViT-B/16 keeps the test fast)")
    if VOCAB is None or OPENAI is None:
        pytest.skip("open_clip_torch (the vocabulary) or clip-anytorch (openai/CLIP's model.py) is not installed")
    sd = openai_state_dict(ref.state_dict())
    ids, pixels = ids_and_pixels(49408, 224, seed=3)
    openai = OPENAI.build_model(dict(sd)).float().eval()   # built from shapes, in fp16 as OpenAI ships it
    openai.load_state_dict(sd)                              # strict; back to the full-precision weights
    with torch.no_grad():
        writer = max((openai.encode_text(ids) - ref.text_projection(ref.text_model(input_ids=ids).pooler_output)).abs().max(),
                     (openai.encode_image(pixels) - ref.visual_projection(ref.vision_model(pixel_values=pixels).pooler_output)).abs().max()).item()
    torch.save(sd, tmp_path / "plain.pt")
    diffs = compare(load_clip(tmp_path / "plain.pt", vocab=VOCAB), ref, ids, pixels)
    print(f"OpenAI writer vs openai/CLIP: {writer:.2e}; plain state dict vs HF: {diffs}")
    assert writer <= 1e-4 and max(diffs.values()) <= 1e-4, (writer, diffs)

    openai.half().float()                                   # the released files hold fp16 weights
    with torch.no_grad():
        expected = openai.encode_text(ids), openai.encode_image(pixels)
    save_openai_jit(openai, ids, pixels, tmp_path / "ViT-B-16.pt")
    jit = torch.jit.load(tmp_path / "ViT-B-16.pt").state_dict()
    read = read_openai_checkpoint(tmp_path / "ViT-B-16.pt")
    assert sorted(read) == sorted(jit) and {"input_resolution", "context_length", "vocab_size"} <= set(read)
    assert all(read[k].dtype == jit[k].dtype and torch.equal(read[k], jit[k]) for k in jit)
    with pytest.raises(WeightsError, match="carry no vocabulary"):
        load_clip(tmp_path / "ViT-B-16.pt")
    ours = load_clip(tmp_path / "ViT-B-16.pt", vocab=VOCAB)
    assert ours.config.vision_config.patch_size == 16 and ours.config.text_config.num_hidden_layers == 12
    with torch.no_grad():
        jit_diff = max((ours.text(ids)[1] - expected[0]).abs().max(), (ours.image(pixels)[0] - expected[1]).abs().max()).item()
    print(f"OpenAI TorchScript archive (fp16) vs openai/CLIP: {jit_diff:.2e}")
    assert jit_diff <= 1e-4
    assert ours.tokenizer(["a cat"])[0, 4].item() == 0      # OpenAI's clip.tokenize pads with 0


def test_torchscript_reader_runs_nothing(tmp_path):
    """A scripted archive reads as torch.jit.load reads it; a data.pkl that names any other Python
    object than a tensor rebuild is refused before anything is called."""
    g = torch.Generator().manual_seed(0)
    sd = {"a.b.weight": torch.randn(3, 4, generator=g), "a.c": torch.randn(5, generator=g).half(), "d": torch.tensor(7)}
    save_torchscript(sd, tmp_path / "scripted.pt")
    read = read_openai_checkpoint(tmp_path / "scripted.pt")
    assert sorted(read) == sorted(sd) and all(read[k].dtype == sd[k].dtype and torch.equal(read[k], sd[k]) for k in sd)
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    with zipfile.ZipFile(tmp_path / "evil.pt", "w") as z:
        z.writestr("evil/data.pkl", pickle.dumps({"visual.conv1.weight": Evil()}, protocol=2))
        z.writestr("evil/code/__torch__/evil.py", "")
    with pytest.raises(WeightsError, match="refusing to load it"):
        load_clip(tmp_path / "evil.pt", vocab=VOCAB)
    assert not marker.exists()


def test_sd2_text_encoder_parity_diffusers_folder_and_single_file(tmp_path):
    import transformers
    torch.manual_seed(0)
    cfg = PRESETS["sd2-text"]
    ref = transformers.CLIPTextModel(hf_config(cfg)).eval()
    randomise(ref, 2)
    ref.save_pretrained(tmp_path / "text_encoder")
    if VOCAB:
        write_hf_vocab(VOCAB, tmp_path / "text_encoder")
        os.makedirs(tmp_path / "tokenizer")
        for f in ("vocab.json", "merges.txt"):
            os.replace(tmp_path / "text_encoder" / f, tmp_path / "tokenizer" / f)
        (tmp_path / "tokenizer" / "special_tokens_map.json").write_text('{"pad_token": "!"}')
    else:
        pytest.skip("open_clip_torch (the vocabulary) is not installed")
    ids, _ = ids_and_pixels(49408, 0)
    with torch.no_grad():
        expected = ref(input_ids=ids).last_hidden_state
        enc, tok = load_sd2_text_encoder(tmp_path)
        d1 = (enc(ids) - expected).abs().max().item()
        # the single-file (OpenCLIP) naming, with a 24th block and the projection that SD2 drops
        hf = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in ref.state_dict().items()}
        hf["text_projection.weight"] = torch.zeros(1, 1)
        openclip = {k: v for k, v in openai_text_only(hf).items()}
        openclip.update({"transformer.resblocks.23.ln_1.weight": torch.ones(1024), "text_projection": torch.zeros(1024, 1024),
                         "logit_scale": torch.tensor(1.0)})
        single = {"cond_stage_model.model." + k: v for k, v in openclip.items()}
        enc2, tok2 = load_sd2_text_encoder("sd2.ckpt", vocab=VOCAB, single_file_sd=single)
        d2 = (enc2(ids) - expected).abs().max().item()
    print(f"SD2 text encoder max abs diff: folder {d1:.2e}, single file {d2:.2e}")
    assert d1 <= 1e-4 and d2 <= 1e-4
    assert tok(["a cat"])[0, 4].item() == 0 and tok2(["a cat"])[0, 4].item() == 0   # SD2 pads with "!" = 0


def openai_text_only(hf):
    sd = {}
    n = 0
    while f"text_model.encoder.layers.{n}.layer_norm1.weight" in hf:
        s, d = f"text_model.encoder.layers.{n}.", f"transformer.resblocks.{n}."
        for kind in ("weight", "bias"):
            sd[d + f"attn.in_proj_{kind}"] = torch.cat([hf[s + f"self_attn.{p}_proj.{kind}"] for p in "qkv"])
            for a, b in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("attn.out_proj", "self_attn.out_proj"),
                         ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                sd[d + f"{a}.{kind}"] = hf[s + f"{b}.{kind}"]
        n += 1
    sd["token_embedding.weight"] = hf["text_model.embeddings.token_embedding.weight"]
    sd["positional_embedding"] = hf["text_model.embeddings.position_embedding.weight"]
    sd["ln_final.weight"], sd["ln_final.bias"] = hf["text_model.final_layer_norm.weight"], hf["text_model.final_layer_norm.bias"]
    return sd


def test_preprocess_matches_transformers():
    import numpy as np
    from transformers import CLIPImageProcessor
    # a smooth image: the two bicubic resamplers (PIL here, transformers' own there) differ in
    # detail, but a wrong crop, channel order or normalisation would be far off this tolerance
    small = (np.random.default_rng(0).random((18, 26, 3)) * 255).astype("uint8")
    img = Image.fromarray(small).resize((260, 180), Image.BILINEAR)
    ref = CLIPImageProcessor()(images=img, return_tensors="pt")["pixel_values"][0]
    ours = preprocess(img, 224)
    assert ours.shape == (3, 224, 224)
    assert (ours - ref).abs().mean() < 0.06
    assert (preprocess(img.transpose(Image.FLIP_LEFT_RIGHT), 224) - ref).abs().mean() > 0.2
    assert preprocess(img.convert("L"), 224).shape == (3, 224, 224)


def test_bad_inputs(tmp_path):
    with pytest.raises(WeightsError, match="no such file or folder"):
        load_clip(tmp_path / "nothing")
    os.makedirs(tmp_path / "empty")
    with pytest.raises(WeightsError, match="expected config.json"):
        load_clip(tmp_path / "empty")
    (tmp_path / "text").mkdir()
    PRESETS["sd2-text"].to_json(tmp_path / "text" / "config.json")
    with pytest.raises(WeightsError, match="text-only CLIP"):
        load_clip(tmp_path / "text")
    from safetensors.torch import save_file
    save_file({"model.diffusion_model.conv_in.weight": torch.zeros(1),
               "cond_stage_model.model.token_embedding.weight": torch.zeros(1)}, str(tmp_path / "sd2.safetensors"))
    with pytest.raises(WeightsError, match="Stable Diffusion checkpoint, not CLIP"):
        load_clip(tmp_path / "sd2.safetensors")
    save_file({"visual.conv1.weight": torch.zeros(1)}, str(tmp_path / "vision_only.safetensors"))
    with pytest.raises(WeightsError, match="not an OpenAI CLIP checkpoint"):
        load_clip(tmp_path / "vision_only.safetensors")
    save_file({"visual.conv1.weight": torch.zeros(1), "token_embedding.weight": torch.zeros(1)},
              str(tmp_path / "partial.safetensors"))
    with pytest.raises(WeightsError, match="not a full OpenAI CLIP checkpoint: missing ln_final.weight"):
        load_clip(tmp_path / "partial.safetensors")
    import transformers
    transformers.CLIPVisionConfig().save_pretrained(tmp_path / "vision")
    with pytest.raises(WeightsError, match="clip_vision_model.*not a CLIPModel"):
        load_clip(tmp_path / "vision")


def test_tiny_config_roundtrip_through_an_hf_folder(tmp_path):
    """The toy world's tiny CLIP: saved by save_clip_folder, read by transformers and by load_clip."""
    import transformers
    from model.clip import CLIP, CLIPTextConfig, CLIPVisionConfig, train_bpe
    from model.weights import save_clip_folder
    tok = train_bpe(["a photo of a circle.", "a photo of a star.", "a ring"] * 5, 300, tmp_path / "bpe")
    cfg = CLIPConfig(CLIPTextConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=2, eos_token_id=tok.eot),
                     CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                      image_size=32, patch_size=8), projection_dim=16)
    torch.manual_seed(0)
    model = CLIP(cfg)
    save_clip_folder(tmp_path / "clip", model, tmp_path / "bpe")
    ref = transformers.CLIPModel.from_pretrained(tmp_path / "clip").eval()
    ours = load_clip(tmp_path / "clip")
    ids = ours.tokenizer(["a photo of a circle.", "a star"])
    assert ids[0, 0] == tok.sot and (ids[0] == tok.eot).any()
    with torch.no_grad():
        feats = ref.get_text_features(input_ids=ids)
        feats = getattr(feats, "pooler_output", feats)     # transformers 5 may wrap it in an output object
        assert (ours.text(ids)[1] - feats).abs().max() <= 1e-5


def test_train_bpe_gives_one_vocabulary_per_corpus(tmp_path):
    """The tokenizers trainer numbers the end-of-word characters in hash-map order, a new order in
    each training; train_bpe renumbers them, so that the toy world's CLIP (whose embedding rows follow
    the ids) is the same from run to run. The renumbered vocabulary still encodes as the trainer's."""
    import json
    from model.clip import train_bpe
    texts = [f"a {w} of a {c}." for w in ("photo", "picture", "drawing") for c in ("circle", "star", "ring", "bar")] * 4
    vocabs = []
    for i in range(5):
        tok = train_bpe(texts, 300, tmp_path / f"bpe{i}")
        vocabs.append(json.loads((tmp_path / f"bpe{i}" / "vocab.json").read_text()))
        assert sorted(vocabs[-1].values()) == list(range(len(vocabs[-1])))
        name = {i: t for t, i in vocabs[-1].items()}
        ids = tok.encode("a picture of a star.")
        assert "".join(name[i] for i in ids[1:-1]).replace("</w>", " ").strip() == "a picture of a star ."
    assert all(v == vocabs[0] for v in vocabs)


@pytest.mark.parametrize("size", [(512, 256), (256, 512), (400, 300), (300, 300)])
def test_proposal_views_show_the_whole_image(size):
    """App. A.3's views (model.clip.views): content only at the left (or top) edge of a wide (tall)
    image reaches the tiles and the padded whole image, where preprocess's centre crop loses it; a
    square image is one tile, equal to preprocess."""
    import numpy as np
    from model.clip import MEAN, STD, views
    w, h = size
    pixels = np.full((h, w, 3), 128, np.uint8)
    pixels[:, : w // 10] = pixels[: h // 10, :] = (255, 0, 0)          # red along the left and top edges
    img = Image.fromarray(pixels)
    red = ((1 - MEAN[0]) / STD[0], (0 - MEAN[1]) / STD[1])
    is_red = lambda x: (x[0] > red[0] - 0.2) & (x[1] < red[1] + 0.2)  # (3, S, S) -> (S, S)
    whole, tiles = views(img, 224)
    assert whole.shape == (1, 3, 224, 224) and tiles.shape[1:] == (3, 224, 224)
    assert len(tiles) == -(-max(w, h) // min(w, h))
    red_share = lambda x: is_red(x).float().mean().item()
    assert red_share(tiles[0]) > 0.09 and red_share(whole[0]) > 0.04     # the edge is seen, in a tile and whole
    left_only = np.full((h, w, 3), 128, np.uint8)
    left_only[:, : w // 10] = (255, 0, 0)
    if w > h:
        assert red_share(preprocess(Image.fromarray(left_only), 224)) == 0.0   # the centre crop never sees it
    if w == h:
        assert torch.equal(tiles[0], preprocess(img, 224)) and torch.equal(whole[0], preprocess(img, 224))
    if w != h:                                                # the padding: CLIP's mean colour, 0 once normalised
        assert whole[0, :, -1, -1].abs().max() < 0.02
