"""digseg.py: the method, on tiny random models saved in the real formats (tests/conftest.py)."""
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from digseg import DiGSeg, aggregate, binary_mask, prepare_image, size_multiple, trainable_parameter_names, widen_conv_in
from model.diffusion import ddim_sample, ddim_timesteps
from model.proposals import ClassProposer, select_candidates
from model.unet import cross_attention_maps


def prepared(model, image):
    """The (1, 3, H', W') image segment() encodes."""
    return prepare_image(image, model.cfg.resolution, size_multiple(model.vae, model.unet))[0]


def denoise(model, z_x, z_T, ctx, steps, trace=None):
    """S trailing DDIM steps of N (prompt, noise) pairs, as segment() runs them -> z_0 (N, 4, h, w)."""
    return ddim_sample(model.predictor(z_x, ctx), z_T, ddim_timesteps(steps), model.alphas_cumprod, model.cfg.target,
                       trace=trace)


def test_widened_conv_in_reproduces_the_pretrained_response(tiny_model):
    from model.unet import UNet2DCondition
    unet = UNet2DCondition(tiny_model.unet.config.__class__(**{**vars(tiny_model.unet.config), "in_channels": 4}))
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    before = unet.conv_in(z)
    widen_conv_in(unet)
    assert unet.conv_in.weight.shape[1] == 8 and unet.config.in_channels == 8
    # the same response up to fp32 rounding: 8 halved products summed instead of 4 whole ones, so a
    # few ulps of the output (an absolute 1e-6 failed at outputs of about 8, one ulp being 9.5e-7)
    torch.testing.assert_close(unet.conv_in(torch.cat([z, z], dim=1)), before, rtol=1e-6, atol=1e-6)


def test_paper_trainable_set_on_the_real_sd2_config():
    """App. A.2 on the real SD2 U-Net (built on meta: no memory): exactly conv_in, attn2 + norm2
    of the 1/4-resolution transformers (down_blocks.2, up_blocks.1) and the whole mid-block
    transformer, plus the MLP."""
    from model.unet import PRESETS, UNet2DCondition

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            with torch.device("meta"):
                self.unet = UNet2DCondition(PRESETS["sd2-base"])
                self.mlp = torch.nn.Linear(768, 1024)

    m = Holder()
    names = trainable_parameter_names(m, "paper")
    n_params = sum(dict(m.named_parameters())[n].numel() for n in names)
    groups = sorted({".".join(n.split(".")[:4]) for n in names})
    assert groups == ["mlp.bias", "mlp.weight", "unet.conv_in.bias", "unet.conv_in.weight",
                      "unet.down_blocks.2.attentions", "unet.mid_block.attentions.0", "unet.up_blocks.1.attentions"]
    level = [n for n in names if ".attentions." in n and not n.startswith("unet.mid_block")]
    assert all(".attn2." in n or ".norm2." in n for n in level)
    # 2 transformers in down_blocks.2 and 3 in up_blocks.1 (1280 ch): attn2 = q (C,C), k,v (C,1024), out (C,C)+b; norm2 2C
    C = 1280
    per_block = C * C + 2 * C * 1024 + C * C + C + 2 * C
    assert len(level) == 5 * 7 and sum(dict(m.named_parameters())[n].numel() for n in level) == 5 * per_block
    print(f"paper trainable set on SD2: {n_params:,} parameters")
    assert len(trainable_parameter_names(m, "all")) == len(list(m.parameters()))


def test_loss_backpropagates_only_into_trainable_parameters(tiny_paths):
    m = DiGSeg.from_weights(*tiny_paths, trainable="paper", resolution=32)
    img, mask = torch.rand(2, 3, 32, 32) * 2 - 1, (torch.rand(2, 32, 32) > 0.5).float()
    m.loss(img, mask, ["a photo of a circle.", "a photo of a star."],
           [torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)]).backward()
    for n, p in m.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, n
        else:
            assert p.grad is None, n
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == set(trainable_parameter_names(m, "paper"))
    assert not any(n.startswith(("vae.", "text_encoder.", "clip.")) for n in trainable)


@pytest.mark.parametrize("target", ["epsilon", "v_prediction"])
def test_overfitting_one_pair_drives_the_loss_down(tiny_paths, target):
    torch.manual_seed(0)
    m = DiGSeg.from_weights(*tiny_paths, trainable="all", target=target, noise="gaussian", resolution=32)
    img = torch.rand(1, 3, 32, 32) * 2 - 1
    mask = torch.zeros(1, 32, 32)
    mask[:, 8:24, 4:20] = 1
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=3e-3)

    def fixed_loss():  # the same t and noise every time, so the curve measures fitting only
        return m.loss(img, mask, ["a photo of a square."], [torch.Generator().manual_seed(123)])

    first = fixed_loss().item()
    for _ in range(60):
        opt.zero_grad()
        fixed_loss().backward()
        opt.step()
    last = fixed_loss().item()
    assert last < first / 10, (first, last)


def test_batched_segmentation_equals_one_at_a_time(tiny_model):
    img = torch.rand(3, 40, 56) * 2 - 1
    names = ["circle", "square", "star"]
    batched = tiny_model.segment(img, names, ensemble=3, steps=2, seed=5, batch_size=4)
    assert batched.shape == (3, 40, 56) and batched.min() >= 0 and batched.max() <= 1
    again = tiny_model.segment(img, names, ensemble=3, steps=2, seed=5, batch_size=9)
    assert (batched - again).abs().max() <= 1e-5
    # one class and one member at a time: the latent mean over members, decoded, must agree
    alone = torch.stack([tiny_model.segment(img, [c], ensemble=3, steps=2, seed=5, batch_size=1)[0] for c in names])
    assert (batched - alone).abs().max() <= 1e-5
    other_seed = tiny_model.segment(img, names, ensemble=3, steps=2, seed=6)
    assert (batched - other_seed).abs().max() > 1e-4


def test_stochastic_ddim_keeps_each_members_noise_whatever_the_batching(tiny_model):
    """eta > 0 (Eq. 7's sigma_t): member e's step noises come from its own seed + e stream."""
    img = torch.rand(3, 40, 56, generator=torch.Generator().manual_seed(3)) * 2 - 1
    names = ["circle", "square"]
    batched = tiny_model.segment(img, names, ensemble=2, steps=3, seed=5, batch_size=4, eta=1.0)
    alone = torch.stack([tiny_model.segment(img, [c], ensemble=2, steps=3, seed=5, batch_size=1, eta=1.0)[0]
                         for c in names])
    assert (batched - alone).abs().max() <= 1e-5
    assert (batched - tiny_model.segment(img, names, ensemble=2, steps=3, seed=5)).abs().max() > 1e-4


def test_ensemble_averages_latents_not_pixels(tiny_model):
    img = torch.rand(3, 32, 32) * 2 - 1
    z_x = tiny_model.encode_image(prepared(tiny_model, img))
    ctx = tiny_model.context(["a photo of a ring."])
    noise = torch.stack([torch.randn(z_x.shape[1:], generator=torch.Generator().manual_seed(e)) for e in range(2)])
    z0 = denoise(tiny_model, z_x, noise, ctx.expand(2, -1, -1), 1)
    expected = tiny_model.decode_mask(z0.mean(0, keepdim=True))[0]
    got = tiny_model.segment(img, ["ring"], ensemble=2, steps=1, seed=0)[0]
    assert (got - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("size", [(37, 53), (100, 20), (5, 7)])
def test_masks_come_back_at_the_image_size(tiny_model, size):
    H, W = size
    probs = tiny_model.segment(torch.rand(3, H, W) * 2 - 1, ["circle", "bar"], ensemble=1, steps=1)
    assert probs.shape == (2, H, W)


@pytest.mark.parametrize("mode", ["L", "RGBA", "I;16", "P", "CMYK"])
def test_any_pil_mode_is_converted(tiny_model, mode):
    rgb = Image.fromarray((np.random.default_rng(0).random((24, 30, 3)) * 255).astype(np.uint8))
    if mode == "I;16":
        img = Image.fromarray((np.random.default_rng(0).random((24, 30)) * 65535).astype(np.uint16))
    else:
        img = rgb.convert(mode)
    probs = tiny_model.segment(img, ["star"], ensemble=1, steps=1)
    assert probs.shape == (1, 24, 30) and torch.isfinite(probs).all()


def test_sixteen_bit_images_are_scaled_not_clipped():
    from data import pil_to_tensor
    a = np.full((4, 4), 32768, np.uint16)
    x = pil_to_tensor(Image.fromarray(a))
    assert abs(x.mean().item() - (32768 / 65535 * 2 - 1)) < 1e-6


def test_bad_input(tiny_model):
    with pytest.raises(ValueError, match="at least one class"):
        tiny_model.segment(torch.zeros(3, 32, 32), [])
    with pytest.raises(ValueError, match=r"expected an image tensor \(3, H, W\)"):
        tiny_model.segment(torch.zeros(32, 32), ["circle"])
    long = "a photo of a " + " ".join(["very"] * 100) + " round circle"
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        tiny_model.context([long])
    assert any("truncated to 77" in str(x.message) for x in w)


def test_options_are_checked(tiny_paths):
    with pytest.raises(ValueError, match="gaussian, multires, multires_annealed"):
        DiGSeg.from_weights(*tiny_paths, noise="pink")
    with pytest.raises(ValueError, match="all, paper"):
        DiGSeg.from_weights(*tiny_paths, trainable="some")


def test_save_and_from_checkpoint_round_trip(tiny_paths, tmp_path):
    m = DiGSeg.from_weights(*tiny_paths, trainable="paper", resolution=32)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    m.save(tmp_path / "ck")
    m2 = DiGSeg.from_checkpoint(tmp_path / "ck")
    for (n, a), (_, b) in zip(m.named_parameters(), m2.named_parameters()):
        assert torch.equal(a, b), n
    assert m2.cfg == m.cfg


def test_aggregate_on_hand_made_maps():
    probs = torch.tensor([[[0.9, 0.2], [0.4, 0.1]],
                          [[0.8, 0.7], [0.45, 0.2]]])
    labels = aggregate(probs, tau_bg=0.5)
    assert labels.tolist() == [[0, 1], [-1, -1]]
    assert aggregate(probs, tau_bg=0.3).tolist() == [[0, 1], [1, -1]]
    assert binary_mask(probs[0]).tolist() == [[True, False], [False, False]]


def test_candidate_selection_global_and_patch_paths():
    text = torch.eye(4)                                  # four orthogonal class embeddings
    image = torch.tensor([1.0, 0.8, 0.1, 0.0])           # close to class 0 and 1 globally
    patches = torch.tensor([[0.0, 0.0, 0.0, 1.0],        # one patch is exactly class 3
                            [1.0, 0.0, 0.0, 0.0]])
    names = ["a", "b", "c", "d"]
    classes, scores = select_candidates(image, patches, text, names, tau_global=0.25, tau_patch=0.9)
    assert set(classes) == {"a", "b", "d"}               # d only through its patch
    assert scores["d"]["global"] < 0.25 < scores["d"]["patch"]
    assert "c" not in scores                              # 0.08 global, 0 patch
    classes, _ = select_candidates(image, patches, text, names, tau_global=0.25, tau_patch=1.1)
    assert set(classes) == {"a", "b"}
    assert classes[0] == "a"                               # sorted by score


def test_the_samplers_trace_shows_every_step_and_ends_on_its_sample(tiny_model):
    z_x = tiny_model.encode_image(torch.rand(1, 3, 32, 32) * 2 - 1)
    ctx = tiny_model.context(["a photo of a star.", "a photo of a ring."])
    z_T = torch.randn(2, *z_x.shape[1:], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        steps = []
        final = denoise(tiny_model, z_x, z_T, ctx, 3, trace=steps)
    assert [int(s["t"]) for s in steps] == [999, 666, 332]            # the listed trailing timesteps
    assert torch.equal(steps[0]["z_t"], z_T) and torch.equal(steps[1]["z_t"], steps[0]["z_prev"])
    assert torch.equal(steps[-1]["z_prev"], final)
    assert torch.allclose(steps[-1]["x0"], final, atol=1e-6)      # the last step lands on x0_hat (alpha_bar = 1)


def test_cross_attention_maps_are_probabilities_over_the_prompt_and_change_nothing(tiny_model):
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        plain = tiny_model.segment(image, ["circle", "bar"], ensemble=1, steps=2)
        with cross_attention_maps(tiny_model.unet) as maps:
            recorded = tiny_model.segment(image, ["circle", "bar"], ensemble=1, steps=2)
    assert torch.equal(plain, recorded)
    assert set(maps) == {n for n, _ in tiny_model.unet.named_modules() if n.endswith("attn2")}
    for name, calls in maps.items():
        assert len(calls) == 2                                    # one U-Net call per DDIM step
        m = calls[0]                                              # (K*E, h*w, 77)
        assert m.shape[0] == 2 and m.shape[2] == 77
        assert torch.allclose(m.sum(-1), torch.ones_like(m[..., 0]), atol=1e-5)
    assert all(m.maps is None for n, m in tiny_model.unet.named_modules() if n.endswith("attn2"))


def test_t_max_share_draws_from_the_samples_generator(tiny_model):
    """0 (the paper): t ~ U{0..T-1}, exactly the draws of before; 1: always T-1; between: that share."""
    plain = [torch.randint(0, 1000, (1,), generator=torch.Generator().manual_seed(i)).item() for i in range(50)]
    assert [tiny_model.sample_timestep(torch.Generator().manual_seed(i)).item() for i in range(50)] == plain
    assert {tiny_model.sample_timestep(torch.Generator().manual_seed(i), 1.0).item() for i in range(20)} == {999}
    share = sum(tiny_model.sample_timestep(torch.Generator().manual_seed(i), 0.5).item() == 999 for i in range(400)) / 400
    assert 0.4 < share < 0.6


def test_a_separate_proposal_clip_proposes_and_the_conditioner_stays(tiny_paths, tmp_path):
    """--proposal_clip: proposals from another CLIP (Table 1's B/16 reading), text from the first."""
    from conftest import make_tiny_world
    from model.weights import load_clip
    other = make_tiny_world(str(tmp_path), seed=1)[1]                # same shapes, other weights
    model = DiGSeg.from_weights(*tiny_paths, resolution=32).eval()
    image = Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8))
    vocab = ["circle", "square", "star"]
    ctx = model.context(["a photo of a circle."])
    own = model.propose_classes(image, vocab, tau_global=-1, tau_patch=2)[1]
    model.use_proposal_clip(other)
    theirs = model.propose_classes(image, vocab, tau_global=-1, tau_patch=2)[1]
    clip = load_clip(other)
    img, patches = clip.image(clip.preprocess(image)[None])
    text = clip.text(clip.tokenizer([f"A photo of a {c}." for c in vocab]))[1]
    expected = select_candidates(img[0], patches[0], text, vocab, -1, 2)[1]
    assert all(abs(theirs[c]["global"] - expected[c]["global"]) < 1e-5 for c in vocab)
    assert any(abs(theirs[c]["global"] - own[c]["global"]) > 1e-3 for c in vocab)
    assert torch.equal(model.context(["a photo of a circle."]), ctx)  # the conditioner is unchanged
    assert not any(n.startswith("proposer") for n, p in model.named_parameters() if p.requires_grad)


def test_text_scales_paper_keeps_the_text_at_one_quarter_and_one_eighth():
    """App. A.2's "two scales" on the SD2 U-Net: cross-attention at 1/4 (down_blocks.2, up_blocks.1)
    and the mid-block (1/8) keep the text; the 1/1 and 1/2 levels skip it."""
    from digseg import text_blocks, text_skipped
    from model.unet import BasicTransformerBlock, UNet2DCondition, UNetConfig
    with torch.device("meta"):
        unet = UNet2DCondition(UNetConfig())
    skipped = text_skipped(unet, "paper")
    kept = {n for n, _ in text_blocks(unet)} - skipped
    assert text_skipped(unet, "all") == set() and len(skipped) == 10
    assert {n.split(".attentions")[0] for n in kept} == {"down_blocks.2", "up_blocks.1", "mid_block"}
    assert {n.split(".attentions")[0] for n in skipped} == {"down_blocks.0", "down_blocks.1", "up_blocks.2", "up_blocks.3"}
    block = BasicTransformerBlock(16, 2, 8, False).eval()
    x, c1, c2 = torch.randn(1, 5, 16), torch.randn(1, 7, 8), torch.randn(1, 7, 8)
    assert not torch.allclose(block(x, c1), block(x, c2))
    block.use_text = False                                   # skipped: the text no longer matters
    assert torch.equal(block(x, c1), block(x, c2))


def test_text_scales_is_checked_and_saved(tiny_paths, tmp_path):
    with pytest.raises(ValueError, match="unknown text_scales 'some'"):
        DiGSeg.from_weights(*tiny_paths, resolution=32, text_scales="some")
    DiGSeg.from_weights(*tiny_paths, resolution=32, text_scales="paper").save(tmp_path / "c")
    assert DiGSeg.from_checkpoint(tmp_path / "c").cfg.text_scales == "paper"


def test_skipped_cross_attention_does_not_train_so_ddp_gets_every_gradient(tmp_path):
    """--trainable=all --text_scales=paper on a U-Net with cross-attention at more levels than two:
    the skipped attn2 / norm2 take no part in the loss, so they are frozen; every parameter left
    trainable gets a gradient (what DistributedDataParallel needs at every step)."""
    from conftest import make_tiny_world
    from digseg import text_skipped
    paths = make_tiny_world(str(tmp_path), levels=3)
    m = DiGSeg.from_weights(*paths, trainable="all", text_scales="paper", resolution=32)
    skipped = text_skipped(m.unet, "paper")
    assert skipped and all(not p.requires_grad for b in skipped for part in ("attn2", "norm2")
                           for p in m.unet.get_submodule(f"{b}.{part}").parameters())
    m.loss(torch.rand(2, 3, 32, 32) * 2 - 1, torch.ones(2, 32, 32), ["a photo of a star."] * 2,
           [torch.Generator().manual_seed(i) for i in range(2)]).backward()
    missing = [n for n, p in m.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing[:5]
    m.save(tmp_path / "ck")
    assert torch.equal(DiGSeg.from_checkpoint(tmp_path / "ck").unet.conv_in.weight, m.unet.conv_in.weight)


def test_latents_stay_fp32_when_the_frozen_vae_computes_in_bf16(tiny_paths):
    """The frozen VAE may compute in bf16 (tune_for_cuda), but z_x, z_y and z_t stay fp32: the
    U-Net (fp32 here) receives the exact fp32 z_t of Eq. 5, not a copy rounded to bf16."""
    from model.diffusion import add_noise
    m = DiGSeg.from_weights(*tiny_paths, resolution=32, noise="gaussian")
    m.vae.to(torch.bfloat16)
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, (torch.rand(2, 32, 32) > 0.5).float()
    assert m.encode_image(x).dtype == torch.float32 and m.encode_mask(y).dtype == torch.float32
    seen = []
    m.unet.conv_in.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    with torch.no_grad():
        m.loss(x, y, ["a photo of a star."] * 2, gens)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    t = torch.cat([m.sample_timestep(g) for g in gens])
    eps = torch.cat([m.sample_noise((4, 16, 16), t[i], g) for i, g in enumerate(gens)])
    with torch.no_grad():
        z_t = add_noise(m.encode_mask(y), eps, t, m.alphas_cumprod)
    assert seen[0].dtype == torch.float32 and torch.equal(seen[0][:, 4:], z_t)


def test_pooled_text_embedding_is_one_context_token(tiny_paths, tmp_path):
    """text_embedding="pooled" (App. A.3's "precomputed text embedding t_c"): the MLP maps CLIP's
    pooled, projected embedding to one context token; "tokens" (ours) maps the 77 token states."""
    m = DiGSeg.from_weights(*tiny_paths, resolution=32, text_embedding="pooled")
    ids = m.clip.tokenizer(["a photo of a star."])
    ctx = m.context(["a photo of a star."])
    assert ctx.shape == (1, 1, m.unet.config.cross_attention_dim)
    assert torch.allclose(ctx, m.mlp(m.clip.text(ids)[1][:, None]), atol=1e-6)
    assert m.segment(torch.rand(3, 32, 32) * 2 - 1, ["star"], ensemble=1).shape == (1, 32, 32)
    m.save(tmp_path / "p")
    assert DiGSeg.from_checkpoint(tmp_path / "p").cfg.text_embedding == "pooled"
    assert DiGSeg.from_weights(*tiny_paths, resolution=32).context(["a star"]).shape[1] == 77
    with pytest.raises(ValueError, match="unknown text_embedding 'words'"):
        DiGSeg.from_weights(*tiny_paths, text_embedding="words")


def test_the_denoising_loop_and_the_proposals_read_nothing_back_from_the_device(tiny_model):
    """No host synchronisation in the loops: the DDIM loop and the batching of segment() make no
    aten._local_scalar_dense call (what .item(), float(t) or a 0-d index tensor does), and the
    proposals make one per image, not one per vocabulary word."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Reads(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                Reads.count += 1
            return func(*args, **(kwargs or {}))

    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z_x = tiny_model.encode_image(prepared(tiny_model, image))
    ctx = tiny_model.context(["a photo of a circle.", "a photo of a star."])
    z_T = torch.randn(3, *z_x.shape[1:], generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), Reads():
        denoise(tiny_model, z_x, z_T.repeat(2, 1, 1, 1), ctx.repeat_interleave(3, dim=0), 4)
    assert Reads.count == 0
    vocab = [f"class {i}" for i in range(20)]
    tiny_model.proposer.text_embeddings(tuple(vocab), "A photo of a {}.")
    with Reads():
        tiny_model.propose_classes(Image.fromarray((np.random.default_rng(0).random((32, 48, 3)) * 255).astype(np.uint8)),
                                   vocab, tau_global=-1.0)
    assert Reads.count <= 2, Reads.count


def test_proposals_see_content_at_the_edge_of_a_wide_image(tiny_model):
    """App. A.3 on the whole image: a red object only in the left tenth of a 2:1 image is proposed
    through its patches (with CLIP's centre crop the left quarter never reached the vision tower)."""
    from types import SimpleNamespace

    class ColourCLIP(torch.nn.Module):       # a stand-in CLIP whose patch embeddings say "red" or not
        def __init__(self):
            super().__init__()
            self.dummy = torch.nn.Parameter(torch.zeros(()))
            self.config = SimpleNamespace(vision_config=SimpleNamespace(image_size=32))

        def image(self, pixels):               # (B, 3, 32, 32) normalised -> (B, 2), (B, 16, 2)
            redness = pixels[:, 0] - (pixels[:, 1] + pixels[:, 2]) / 2
            patches = torch.nn.functional.avg_pool2d(redness[:, None], 8).flatten(1)
            embed = lambda r: torch.stack([r, torch.ones_like(r)], -1)
            return embed(redness.mean((1, 2))), embed(patches)

    pixels = np.full((64, 128, 3), 128, np.uint8)
    pixels[24:40, :12] = (255, 0, 0)
    image = Image.fromarray(pixels)
    proposer = ClassProposer(ColourCLIP())
    proposer.text_embeddings = lambda vocab, template: torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    classes, scores = proposer(image, ["red thing", "not red"], tau_global=1.1, tau_patch=0.5)
    assert classes == ["red thing"] and scores["red thing"]["patch"] > 0.5


def test_upcast_attention_computes_in_fp32_under_autocast(monkeypatch):
    """upcast=True (SD2-768-v) runs the attention product in fp32 with autocast off, on whatever
    device autocast is on; without upcast, autocast decides (on the CPU: fp32 too, for speed)."""
    import model.attention as attention_module
    from model.attention import attention
    seen = []
    real = attention_module.F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None):
        seen.append((q.dtype, torch.is_autocast_enabled(q.device.type)))
        return real(q, k, v, attn_mask=attn_mask)

    monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention", spy)
    q = torch.randn(2, 5, 8, dtype=torch.float16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(q, q, q, heads=2, upcast=True)
    assert out.dtype == torch.float16 and seen[-1] == (torch.float32, False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        attention(q.float(), q.float(), q.float(), heads=2)
    assert seen[-1] == (torch.float32, False)
    # CUDA, faked (no GPU here): autocast on, fp16 inputs. An upcast layer turns autocast off for the
    # product (a CPU-only build cannot run CUDA's autocast casts; tests/test_cuda.py checks them).
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        q = torch.empty(2, 5, 8, device="cuda", dtype=torch.float16)
        torch.set_autocast_enabled("cuda", True)
        try:
            attention(q, q, q, heads=2, upcast=True)
            assert seen[-1] == (torch.float32, False)
            attention(q, q, q, heads=2)
            assert seen[-1] == (torch.float16, True)                 # elsewhere autocast decides
        finally:
            torch.set_autocast_enabled("cuda", False)


# ---- beyond the paper: the e2e objective (Garcia et al. 2024) ---------------------------------------------

def test_e2e_loss_is_one_step_through_the_decoder_with_gradients(tiny_paths):
    """objective=e2e: t = T-1, the mask-latent input zeros, the U-Net's output -> x0_hat -> the frozen
    decoder with its graph -> M_c (channel mean, not clamped) -> mask_loss; the U-Net gets gradients
    through the decoder, the VAE none; decoder checkpointing gives the same gradients."""
    from e2e import mask_loss
    from model.diffusion import predicted_x0_and_eps
    torch.manual_seed(0)
    m = DiGSeg.from_weights(*tiny_paths, resolution=32, objective="e2e", target="v_prediction")
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, (torch.rand(2, 32, 32) > 0.5).float()
    prompts = ["a photo of a star.", "a photo of a ring."]
    loss = m(x, y, prompts, [None, None])
    with torch.no_grad():
        z_x = m.encode_image(x)
        pred = m.unet(torch.cat([z_x, torch.zeros_like(z_x)], 1), torch.full((2,), 999), m.context(prompts))
        x0 = predicted_x0_and_eps(pred, torch.zeros_like(z_x), 999, m.alphas_cumprod, "v_prediction")[0]
        by_hand = mask_loss((m.vae.decode(x0 / m.vae_scale).mean(1) + 1) / 2, y)
    assert abs(loss.item() - by_hand.item()) < 1e-5
    loss.backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}
    assert all(p.grad is None for p in m.vae.parameters()) and grads["unet.conv_in.weight"].abs().sum() > 0
    m.zero_grad(set_to_none=True)
    m.decoder_checkpointing = True
    m(x, y, prompts, [None, None]).backward()
    assert all(torch.allclose(p.grad, grads[n], atol=1e-6) for n, p in m.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("kind", ["bce_dice", "mse"])
def test_mask_loss_leaves_ignored_pixels_out_and_prefers_the_right_mask(kind):
    from e2e import mask_loss
    y = torch.zeros(1, 8, 8)
    y[:, 2:6, 2:6] = 1
    valid = torch.ones_like(y)
    valid[:, :, :2] = 0
    noisy = y.clone()
    noisy[:, :, :2] = torch.rand(1, 8, 2) * 3 - 1               # anything at all where nothing is annotated
    assert mask_loss(noisy, y, valid, kind) == pytest.approx(mask_loss(y, y, valid, kind).item(), abs=1e-6)
    assert mask_loss(y, y, None, kind) < mask_loss(1 - y, y, None, kind)
    overshoot, timid = y * 1.5 - 0.25, y * 0.6 + 0.2            # beyond [0, 1] on the right side; close to 0.5
    if kind == "bce_dice":                                     # a logit: the further on the right side, the better
        assert mask_loss(overshoot, y, None, kind) < mask_loss(y, y, None, kind) < mask_loss(timid, y, None, kind)
    else:                                                      # a regression to y exactly
        assert mask_loss(y, y, None, kind) == 0 < mask_loss(overshoot, y, None, kind)


def test_an_e2e_checkpoint_segments_in_its_one_step(tiny_paths, tmp_path):
    """segment() follows the checkpoint: one trailing step from z_T = 0, what e2e.loss trains; S > 1,
    another spacing or eta > 0 is refused in one line; E > 1 members would be identical: one runs."""
    m = DiGSeg.from_weights(*tiny_paths, resolution=32, objective="e2e")
    m.save(tmp_path / "e2e")
    m = DiGSeg.from_checkpoint(tmp_path / "e2e").eval()
    assert m.cfg.objective == "e2e"
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    probs = m.segment(image, ["star"], ensemble=1)
    with torch.no_grad():
        z_x = m.encode_image(prepared(m, image))
        z0 = denoise(m, z_x, torch.zeros_like(z_x), m.context(["a photo of a star."]), 1)
        assert torch.allclose(probs, m.decode_mask(z0).clamp(0, 1), atol=1e-6)
    with pytest.warns(UserWarning, match="identical"):
        assert torch.equal(m.segment(image, ["star"], ensemble=4), probs)
    for bad in (dict(steps=2), dict(spacing="leading"), dict(eta=1.0)):
        with pytest.raises(ValueError, match="fine-tuned end to end"):
            m.segment(image, ["star"], **bad)
