"""model/weights.py, Stable Diffusion 2 part: the original single-file format against diffusers'
own converter (diffusers.loaders.single_file_utils), the old VAE attention names, and errors
that name the problem."""
import gc
import json

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers import AutoencoderKL as DiffusersVAE
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
from safetensors.torch import save_file

from model.unet import UNet2DCondition, UNetConfig
from model.vae import AutoencoderKL, VAEConfig
from model.convert import (_ldm_unet_table, _ldm_vae_table, _rename, convert_ldm_unet, convert_ldm_vae,
                           convert_old_vae_attention)
from model.files import read_state_dict
from model.weights import WeightsError, _guess_prediction, load_sd2

SD2_UNET, SD2_VAE = UNetConfig(), VAEConfig()

# Keys as the original Stability-AI checkpoints spell them (FACTS.md section 3): the generated
# checkpoint below must contain these, so our inverse naming cannot drift from the real format.
KNOWN_LDM_KEYS = [
    "model.diffusion_model.time_embed.0.weight", "model.diffusion_model.input_blocks.0.0.weight",
    "model.diffusion_model.input_blocks.1.0.in_layers.0.weight", "model.diffusion_model.input_blocks.3.0.op.weight",
    "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight",
    "model.diffusion_model.input_blocks.4.0.skip_connection.weight",
    "model.diffusion_model.input_blocks.11.0.emb_layers.1.bias",
    "model.diffusion_model.middle_block.1.proj_in.weight", "model.diffusion_model.middle_block.2.out_layers.3.weight",
    "model.diffusion_model.output_blocks.2.1.conv.weight", "model.diffusion_model.output_blocks.5.2.conv.weight",
    "model.diffusion_model.output_blocks.11.1.proj_out.weight", "model.diffusion_model.out.2.weight",
    "first_stage_model.encoder.down.0.block.0.norm1.weight",
    "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight",
    "first_stage_model.encoder.down.2.downsample.conv.weight", "first_stage_model.encoder.mid.attn_1.q.weight",
    "first_stage_model.encoder.norm_out.weight", "first_stage_model.decoder.up.0.block.2.conv2.weight",
    "first_stage_model.decoder.up.3.upsample.conv.weight", "first_stage_model.decoder.mid.attn_1.proj_out.weight",
    "first_stage_model.quant_conv.weight", "first_stage_model.post_quant_conv.weight",
]


def ldm_names(module, table, prefix, conv_attention=False):
    """Random fp16 tensors under the original names (our table read backwards); the VAE's
    mid-block attention weights as 1x1 convs, as the original stores them."""
    inverse = {v: k for k, v in table.items()}
    g = torch.Generator().manual_seed(0)
    out = {}
    for key, shape in ((k, v.shape) for k, v in module.state_dict().items()):
        t = torch.randn(shape, generator=g, dtype=torch.float16)
        if conv_attention and ".attentions." in key and t.ndim == 2:
            t = t[:, :, None, None]
        out[prefix + _rename(key, inverse)] = t
    return out


@pytest.fixture(scope="module")
def ldm_checkpoint():
    with torch.device("meta"):
        unet, vae = UNet2DCondition(SD2_UNET), AutoencoderKL(SD2_VAE)
    sd = ldm_names(unet, _ldm_unet_table(SD2_UNET), "model.diffusion_model.")
    sd.update(ldm_names(vae, _ldm_vae_table(SD2_VAE), "first_stage_model.", conv_attention=True))
    sd["cond_stage_model.model.ln_final.weight"] = torch.ones(1024)  # other parts: ignored by both converters
    sd["alphas_cumprod"] = torch.ones(1000)
    return sd


def test_ldm_checkpoint_has_the_original_names(ldm_checkpoint):
    assert set(KNOWN_LDM_KEYS) <= set(ldm_checkpoint)
    assert sum(k.startswith("model.diffusion_model.") for k in ldm_checkpoint) == 686
    assert sum(k.startswith("first_stage_model.") for k in ldm_checkpoint) == 248


def assert_same_tensors(ours, theirs):
    assert sorted(ours) == sorted(theirs)
    different = [k for k in ours if ours[k].shape != theirs[k].shape or not torch.equal(ours[k], theirs[k])]
    assert not different, different[:5]


def test_unet_conversion_matches_diffusers(ldm_checkpoint):
    with torch.device("meta"):
        expected = UNet2DConditionModel.from_config(UNetConfig().to_dict()).state_dict().keys()
    theirs = convert_ldm_unet_checkpoint(dict(ldm_checkpoint), UNetConfig().to_dict())
    ours = convert_ldm_unet(ldm_checkpoint)
    assert sorted(ours) == sorted(expected)
    assert_same_tensors(ours, theirs)


def test_vae_conversion_matches_diffusers(ldm_checkpoint):
    theirs = convert_ldm_vae_checkpoint(dict(ldm_checkpoint), VAEConfig().to_dict())
    ours = convert_ldm_vae(ldm_checkpoint)
    assert ours["encoder.mid_block.attentions.0.to_q.weight"].shape == (512, 512)
    assert sorted(ours) == sorted(DiffusersVAE(**{k: v for k, v in VAEConfig().to_dict().items()
                                                   if not k.startswith("_")}).state_dict())
    assert_same_tensors(ours, theirs)


def test_single_file_ckpt_loads(ldm_checkpoint, tmp_path, capsys):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": ldm_checkpoint, "global_step": 110000}, path)
    sd = load_sd2(path, dtype=torch.float16)
    assert "v_prediction (global_step 110000" in capsys.readouterr().out
    assert sd.prediction == "v_prediction" and sd.unet.config.upcast_attention and sd.vae_scale == 0.18215
    assert_same_tensors(sd.unet.state_dict(), convert_ldm_unet_checkpoint(dict(ldm_checkpoint), UNetConfig().to_dict()))
    assert_same_tensors(sd.vae.state_dict(), convert_ldm_vae_checkpoint(dict(ldm_checkpoint), VAEConfig().to_dict()))
    assert all(p.dtype == torch.float16 for p in sd.unet.parameters())
    del sd
    gc.collect()


def test_single_file_safetensors_loads(ldm_checkpoint, tmp_path):
    path = tmp_path / "v2-1_768-ema-pruned.safetensors"
    save_file(ldm_checkpoint, path)
    sd = load_sd2(path, dtype=torch.bfloat16, prediction="epsilon")  # the argument wins over the file name
    assert sd.prediction == "epsilon" and not sd.unet.config.upcast_attention
    assert all(p.dtype == torch.bfloat16 for p in sd.vae.parameters())
    del sd
    gc.collect()


@pytest.mark.parametrize("name, step, expected", [("v2-1_768-ema-pruned.safetensors", None, "v_prediction"),
                                                  ("sd2.ckpt", 875000, "epsilon"),
                                                  ("sd2.ckpt", 110000, "v_prediction")])
def test_prediction_guess(tmp_path, capsys, name, step, expected):
    path = tmp_path / name
    if step is None:
        save_file({"x": torch.zeros(1)}, path)
    else:
        torch.save({"state_dict": {"x": torch.zeros(1)}, "global_step": step}, path)
    assert _guess_prediction(str(path)) == expected
    assert f"prediction type {expected}" in capsys.readouterr().out


# ---- diffusers folders with tiny models: old names and errors

TINY_UNET = UNetConfig(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, heads=(2, 4),
                       cross_attention_dim=32, norm_num_groups=8)
TINY_VAE = VAEConfig(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8)


@pytest.fixture
def tiny_folder(tmp_path):
    torch.manual_seed(0)
    for name, model in (("unet", UNet2DCondition(TINY_UNET)), ("vae", AutoencoderKL(TINY_VAE))):
        (tmp_path / name).mkdir()
        model.config.to_json(tmp_path / name / "config.json")
        save_file(model.state_dict(), tmp_path / name / "diffusion_pytorch_model.safetensors")
    return tmp_path


def edit_weights(folder, name, edit):
    path = folder / name / "diffusion_pytorch_model.safetensors"
    sd = read_state_dict(path)
    edit(sd)
    save_file(sd, path)


def edit_config(folder, name, **changes):
    path = folder / name / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_old_vae_attention_names_load(tiny_folder):
    new = read_state_dict(tiny_folder / "vae" / "diffusion_pytorch_model.safetensors")
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}

    def to_old(sd):
        for key in [k for k in sd if ".attentions.0." in k]:
            head, tail = key.split(".attentions.0.")
            name, param = tail.rsplit(".", 1)
            t = sd.pop(key)
            sd[f"{head}.attentions.0.{old_names.get(name, name)}.{param}"] = t[:, :, None, None] if t.ndim == 2 else t
    edit_weights(tiny_folder, "vae", to_old)
    old = read_state_dict(tiny_folder / "vae" / "diffusion_pytorch_model.safetensors")
    assert "encoder.mid_block.attentions.0.query.weight" in old
    assert old["decoder.mid_block.attentions.0.key.weight"].ndim == 4
    assert_same_tensors(convert_old_vae_attention(old), new)
    sd = load_sd2(tiny_folder)
    assert sd.prediction == "epsilon"  # no scheduler/ folder: diffusers' default
    assert_same_tensors(sd.vae.state_dict(), new)


def test_bf16_and_bin_weights(tiny_folder):
    path = tiny_folder / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(read_state_dict(path), tiny_folder / "unet" / "diffusion_pytorch_model.bin")
    path.unlink()
    sd = load_sd2(tiny_folder, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in sd.unet.parameters())
    out = sd.unet(torch.randn(1, 4, 8, 8, dtype=torch.bfloat16), 5, torch.randn(1, 3, 32, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and out.shape == (1, 4, 8, 8)


def test_fp16_variant_file_loads(tiny_folder):
    """A hub download of the half-precision copies only (diffusion_pytorch_model.fp16.safetensors)."""
    path = tiny_folder / "vae" / "diffusion_pytorch_model.safetensors"
    weights = {k: v.half() for k, v in read_state_dict(path).items()}
    save_file(weights, tiny_folder / "vae" / "diffusion_pytorch_model.fp16.safetensors")
    path.unlink()
    sd = load_sd2(tiny_folder)
    assert sd.vae.encoder.conv_in.weight.dtype == torch.float32
    assert_same_tensors({k: v.half() for k, v in sd.vae.state_dict().items()}, weights)


def test_missing_path_and_parts(tmp_path, tiny_folder):
    with pytest.raises(WeightsError, match="no such file or folder"):
        load_sd2(tmp_path / "nowhere")
    (tiny_folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(WeightsError, match=r"expected vae/config.json and vae/diffusion_pytorch_model.safetensors"):
        load_sd2(tiny_folder)


def test_missing_unexpected_and_misshapen_keys(tiny_folder):
    edit_weights(tiny_folder, "unet", lambda sd: sd.pop("conv_in.bias"))
    with pytest.raises(WeightsError, match=r"\(U-Net\): 1 missing keys: conv_in.bias"):
        load_sd2(tiny_folder)
    restored_and_extra = {"conv_in.bias": torch.zeros(32), "extra.weight": torch.ones(1)}
    edit_weights(tiny_folder, "unet", lambda sd: sd.update(restored_and_extra))
    with pytest.raises(WeightsError, match="1 unexpected keys: extra.weight"):
        load_sd2(tiny_folder)

    def misshape(sd):
        del sd["extra.weight"]
        sd["conv_in.bias"] = torch.zeros(7)
    edit_weights(tiny_folder, "unet", misshape)
    with pytest.raises(WeightsError, match=r"conv_in.bias: checkpoint \(7,\) vs model \(32,\)"):
        load_sd2(tiny_folder)


def test_other_stable_diffusions_refused(tiny_folder, tmp_path):
    edit_config(tiny_folder, "unet", cross_attention_dim=768)
    with pytest.raises(WeightsError, match=r"unet/config.json: .*Stable Diffusion 1.x"):
        load_sd2(tiny_folder)
    edit_config(tiny_folder, "unet", cross_attention_dim=2048, addition_embed_type="text_time")
    with pytest.raises(WeightsError, match="SDXL"):
        load_sd2(tiny_folder)
    k = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    save_file({k: torch.zeros(320, 768)}, tmp_path / "sd15.safetensors")
    with pytest.raises(WeightsError, match="Stable Diffusion 1.x checkpoint"):
        load_sd2(tmp_path / "sd15.safetensors", prediction="epsilon")
    save_file({"conditioner.embedders.0.x": torch.zeros(1)}, tmp_path / "sdxl.safetensors")
    with pytest.raises(WeightsError, match="SDXL checkpoint"):
        load_sd2(tmp_path / "sdxl.safetensors", prediction="epsilon")
    save_file({"model.diffusion_model.label_emb.0.0.weight": torch.zeros(1)}, tmp_path / "unclip.safetensors")
    with pytest.raises(WeightsError, match="label_emb .*SD 2.x unCLIP"):
        load_sd2(tmp_path / "unclip.safetensors", prediction="epsilon")
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 9, 3, 3)}, tmp_path / "inpaint.safetensors")
    with pytest.raises(WeightsError, match="takes 9 input channels"):
        load_sd2(tmp_path / "inpaint.safetensors", prediction="epsilon")
    save_file({"x": torch.zeros(1)}, tmp_path / "other.safetensors")
    with pytest.raises(WeightsError, match="not an original Stable Diffusion checkpoint"):
        load_sd2(tmp_path / "other.safetensors", prediction="epsilon")


def test_truncated_files(tiny_folder, tmp_path):
    path = tiny_folder / "unet" / "diffusion_pytorch_model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(WeightsError, match="truncated or corrupt"):
        load_sd2(tiny_folder)
    ckpt = tmp_path / "sd2.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1000)}}, ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:-300])
    with pytest.raises(WeightsError, match="not a readable torch checkpoint"):
        load_sd2(ckpt, prediction="epsilon")


def test_text_encoder_requested_but_absent(tiny_folder):
    """SD2's text encoder loads through load_sd2_text_encoder (tests/test_clip.py checks its parity);
    a folder without text_encoder/ says what it expected."""
    with pytest.raises(WeightsError, match="expected text_encoder/config.json"):
        load_sd2(tiny_folder, text_encoder=True)
