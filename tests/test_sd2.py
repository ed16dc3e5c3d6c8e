"""model/unet.py and model/vae.py against diffusers (the oracle).

Full size: the real SD2-base and 768-v configs, seeded random weights, saved by diffusers'
save_pretrained and read back by load_sd2; fp32 outputs must agree to 1e-4 absolute.
Tiny configs: our to_json config builds the same model in diffusers, output for output.
"""
import gc
import json
import os
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL as DiffusersVAE
from diffusers import UNet2DConditionModel

from model.attention import attention
from model.unet import PRESETS as UNET_PRESETS, Attention, UNet2DCondition, UNetConfig
from model.vae import PRESETS as VAE_PRESETS, AutoencoderKL, VAEConfig
from model.weights import load_sd2

TOL = 1e-4

TINY_UNET = UNetConfig(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, heads=(2, 4),
                       cross_attention_dim=32, norm_num_groups=8)
TINY_VAE = VAEConfig(block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=16)


def diffusers_unet_config(preset):
    """The SD2 U-Net config as the hub's unet/config.json writes it (FACTS.md section 1)."""
    return dict(sample_size=UNET_PRESETS[preset].sample_size, in_channels=4, out_channels=4,
                block_out_channels=[320, 640, 1280, 1280], layers_per_block=2,
                down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
                attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, use_linear_projection=True,
                upcast_attention=UNET_PRESETS[preset].upcast_attention, flip_sin_to_cos=True, freq_shift=0,
                norm_num_groups=32, norm_eps=1e-5, act_fn="silu", downsample_padding=1)


DIFFUSERS_VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[128, 256, 512, 512],
                            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                            layers_per_block=2, norm_num_groups=32, act_fn="silu", sample_size=512,
                            scaling_factor=0.18215)


def unet_inputs(cross_dim, h=16, w=24, tokens=77):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2, 4, h, w, generator=g), torch.tensor([10, 900]),
            torch.randn(2, tokens, cross_dim, generator=g))


def image_inputs(h=64, w=96):
    g = torch.Generator().manual_seed(2)
    return torch.rand(2, 3, h, w, generator=g) * 2 - 1, torch.randn(2, 4, h // 8, w // 8, generator=g)


@pytest.fixture(scope="module")
def full_size(tmp_path_factory):
    """Two diffusers SD2 folders (base: epsilon; 768-v: upcast + v_prediction) with the same
    random weights, plus diffusers' outputs on fixed inputs."""
    root = tmp_path_factory.mktemp("sd2")
    torch.manual_seed(0)
    with torch.no_grad():
        vae = DiffusersVAE(**DIFFUSERS_VAE_CONFIG).eval()
        x, z = image_inputs()
        ref = {"mean": vae.encode(x).latent_dist.mean, "decoded": vae.decode(z).sample}
        unet = UNet2DConditionModel(**diffusers_unet_config("sd2-base")).eval()
        ref["base"] = unet(*unet_inputs(1024)).sample
        with torch.device("meta"):  # skip the random init: the weights are base's
            unet_v = UNet2DConditionModel.from_config(diffusers_unet_config("sd2-768-v"))
        unet_v.load_state_dict(unet.state_dict(), assign=True)
        ref["v"] = unet_v.eval()(*unet_inputs(1024)).sample
    folders = {}
    for name, model, prediction in (("base", unet, "epsilon"), ("v", unet_v, "v_prediction")):
        folder = root / name
        vae.save_pretrained(folder / "vae")
        if name == "base":
            model.save_pretrained(folder / "unet")
        else:  # same weights, another config.json: link the weights rather than writing 3.5 GB again
            model.save_config(folder / "unet")
            os.symlink(folders["base"] / "unet" / "diffusion_pytorch_model.safetensors",
                       folder / "unet" / "diffusion_pytorch_model.safetensors")
        (folder / "scheduler").mkdir()
        (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({"prediction_type": prediction}))
        folders[name] = folder
    del vae, unet, unet_v
    gc.collect()
    return folders, ref


@pytest.mark.parametrize("name", ["base", "v"])
def test_full_size_unet_matches_diffusers(full_size, name):
    folders, ref = full_size
    sd = load_sd2(folders[name])
    assert sd.prediction == ("v_prediction" if name == "v" else "epsilon")
    assert sd.unet.config.upcast_attention == (name == "v")
    assert sum(p.numel() for p in sd.unet.parameters()) == 865_910_724  # FACTS.md section 2
    with torch.no_grad():
        out = sd.unet(*unet_inputs(1024))
    diff = (out - ref[name]).abs().max().item()
    print(f"U-Net {name}: max |ours - diffusers| = {diff:.2e}, mean |out| = {out.abs().mean():.3f}")
    assert out.shape == (2, 4, 16, 24) and out.abs().mean() > 0.05
    assert diff <= TOL
    del sd
    gc.collect()


def test_full_size_vae_matches_diffusers(full_size):
    folders, ref = full_size
    sd = load_sd2(folders["base"])
    del sd.unet
    gc.collect()
    assert sd.vae_scale == 0.18215
    assert sum(p.numel() for p in sd.vae.parameters()) == 83_653_863
    x, z = image_inputs()
    with torch.no_grad():
        mean, logvar = sd.vae.encode(x)
        decoded = sd.vae.decode(z)
    d_mean = (mean - ref["mean"]).abs().max().item()
    d_dec = (decoded - ref["decoded"]).abs().max().item()
    print(f"VAE: encode mean max diff {d_mean:.2e} (mean |m| {mean.abs().mean():.3f}), "
          f"decode max diff {d_dec:.2e} (mean |x| {decoded.abs().mean():.3f})")
    assert mean.shape == logvar.shape == (2, 4, 8, 12) and decoded.shape == (2, 3, 64, 96)
    assert mean.abs().mean() > 0.01 and decoded.abs().mean() > 0.01
    assert d_mean <= TOL and d_dec <= TOL


def tiny_pair(seed=0):
    """A tiny diffusers U-Net built from our to_dict(), and ours with the same weights (scaled up so
    the output is far from zero)."""
    torch.manual_seed(seed)
    theirs = UNet2DConditionModel.from_config(TINY_UNET.to_dict()).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.1)
    ours = UNet2DCondition(TINY_UNET).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


def test_tiny_unet_config_loads_in_diffusers_and_matches(tmp_path):
    TINY_UNET.to_json(tmp_path / "config.json")
    assert UNetConfig.from_json(tmp_path / "config.json") == TINY_UNET
    theirs, ours = tiny_pair()
    assert UNetConfig.from_json(dict(theirs.config)) == TINY_UNET  # diffusers' view of the same config
    sample, t, context = unet_inputs(32, 8, 12, tokens=5)
    with torch.no_grad():
        a, b = theirs(sample, t, context).sample, ours(sample, t, context)
    assert a.abs().mean() > 0.05
    assert (a - b).abs().max() <= 1e-5


def test_tiny_unet_timestep_forms_and_sizes():
    theirs, ours = tiny_pair()
    sample, _, context = unet_inputs(32, 4, 10, tokens=5)  # non-square, any multiple of 2
    with torch.no_grad():
        per_batch = ours(sample, torch.tensor([250, 250]), context)
        assert torch.equal(ours(sample, 250, context), per_batch)
        assert torch.equal(ours(sample, torch.tensor(250), context), per_batch)
        assert torch.equal(ours(sample, 250.0, context), per_batch)
        assert (theirs(sample, 250, context).sample - per_batch).abs().max() <= 1e-5
        assert not torch.allclose(ours(sample, torch.tensor([250, 900]), context)[1], per_batch[1])


def test_gradient_checkpointing_gives_the_same_gradients():
    _, ours = tiny_pair()
    ours.train()
    sample, t, context = unet_inputs(32, 8, 8, tokens=5)
    grads = []
    for flag in (False, True):
        ours.gradient_checkpointing = flag
        ours.zero_grad()
        ours(sample, t, context).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in ours.parameters()]))
    assert grads[0].abs().max() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_upcast_attention_computes_in_float32():
    """768-v's upcast_attention: attention of half-precision inputs computed in float32, in every
    transformer of the U-Net (in fp32, as in the full-size parity test, it changes nothing)."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 50, 64, generator=g).bfloat16() for _ in range(3))
    out = attention(q, k, v, heads=2, upcast=True)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, attention(q.float(), k.float(), v.float(), heads=2).bfloat16())
    _, ours = tiny_pair()
    upcast = UNet2DCondition(replace(TINY_UNET, upcast_attention=True)).eval()
    upcast.load_state_dict(ours.state_dict())
    assert all(m.upcast for m in upcast.modules() if isinstance(m, Attention))
    sample, t, context = (x.bfloat16() if x.is_floating_point() else x for x in unet_inputs(32, 8, 8, tokens=5))
    with torch.no_grad():
        assert not torch.equal(upcast.bfloat16()(sample, t, context), ours.bfloat16()(sample, t, context))


def test_attention_under_cpu_bf16_autocast_runs_in_float32():
    """Under the CPU's bf16 autocast (the toy's training) the attention product is computed in
    fp32 from the bf16 projections (faster on the CPU; upcast or not), and returns bf16 as the
    layers around it expect; gradients flow back through the casts."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 50, 64, generator=g).bfloat16().requires_grad_() for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(q, k, v, heads=2)
    assert out.dtype == torch.bfloat16
    fp32 = attention(q.float(), k.float(), v.float(), heads=2)
    assert torch.equal(out, fp32.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        in_bf16 = F.scaled_dot_product_attention(*(x.view(2, 50, 2, 32).transpose(1, 2) for x in (q, k, v)))
    assert not torch.equal(out, in_bf16.transpose(1, 2).reshape(2, 50, 64).bfloat16())   # what autocast alone does
    out.float().square().sum().backward()
    assert q.grad is not None and q.grad.dtype == torch.bfloat16 and q.grad.abs().max() > 0


def test_tiny_vae_config_loads_in_diffusers_and_matches(tmp_path):
    TINY_VAE.to_json(tmp_path / "config.json")
    assert VAEConfig.from_json(tmp_path / "config.json") == TINY_VAE
    torch.manual_seed(0)
    theirs = DiffusersVAE.from_config(json.loads((tmp_path / "config.json").read_text())).eval()
    assert VAEConfig.from_json(dict(theirs.config)) == TINY_VAE
    ours = AutoencoderKL(TINY_VAE).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x, _ = image_inputs(32, 48)
    with torch.no_grad():
        dist = theirs.encode(x).latent_dist
        mean, logvar = ours.encode(x)
        assert mean.shape == (2, 4, 8, 12)  # 3 levels: factor 4
        assert (mean - dist.mean).abs().max() <= 1e-5 and (logvar - dist.logvar).abs().max() <= 1e-5
        assert (ours.decode(mean) - theirs.decode(mean).sample).abs().max() <= 1e-5


def test_presets_and_config_refusals():
    assert UNET_PRESETS["sd2-768-v"].upcast_attention and UNET_PRESETS["sd2-768-v"].sample_size == 96
    assert not UNET_PRESETS["sd2-base"].upcast_attention and VAE_PRESETS["sd2-base"].scaling_factor == 0.18215
    assert UNetConfig.from_json(diffusers_unet_config("sd2-768-v")) == UNET_PRESETS["sd2-768-v"]
    assert VAEConfig.from_json(DIFFUSERS_VAE_CONFIG) == VAE_PRESETS["sd2-base"]
    with pytest.raises(ValueError, match="Stable Diffusion 1.x"):
        UNetConfig.from_json({**diffusers_unet_config("sd2-base"), "cross_attention_dim": 768})
    with pytest.raises(ValueError, match="SDXL"):
        UNetConfig.from_json({**diffusers_unet_config("sd2-base"), "cross_attention_dim": 2048,
                              "addition_embed_type": "text_time"})
    with pytest.raises(ValueError, match="use_linear_projection"):
        UNetConfig.from_json({**diffusers_unet_config("sd2-base"), "use_linear_projection": False})
    with pytest.raises(ValueError, match="use_quant_conv"):
        VAEConfig.from_json({**DIFFUSERS_VAE_CONFIG, "use_quant_conv": False})
