"""Weight loaders: local files only, strict keys, errors that name the problem.

Shared rules for every loader in this file:
- read a state dict from .safetensors (preferred; memory-mapped, no extra copy) or from a
  pickle (.bin/.ckpt/.pt) with `torch.load(weights_only=True)`, so untrusted files cannot
  run code;
- build the module on the meta device and load with `assign=True`, so loading needs about
  one copy of the weights in memory;
- check keys strictly and say which keys are missing, unexpected, or of the wrong shape.
"""
import collections
import hashlib
import io
import json
import os
import pickle
import shutil
import zipfile
from dataclasses import dataclass

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from model.clip import CLIP, PRESETS, CLIPConfig, CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, Tokenizer
from model.unet import PRESETS as UNET_PRESETS, UNet2DCondition, UNetConfig
from model.vae import PRESETS as VAE_PRESETS, AutoencoderKL, VAEConfig


class WeightsError(ValueError):
    """A checkpoint that cannot be loaded; the message says which file and why."""


def read_state_dict(path):
    """Read a flat {name: tensor} dict from a .safetensors or a pickled torch file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightsError(f"{path}: no such file")
    if os.path.getsize(path) == 0:
        raise WeightsError(f"{path}: the file is empty")
    if path.endswith(".safetensors"):
        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as e:
            raise WeightsError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # pickle, zip and unpickler errors all mean the same thing here
        raise WeightsError(f"{path}: not a readable torch checkpoint (truncated, corrupt, or it holds "
                           f"code rather than tensors, which weights_only=True refuses): {e}") from e
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]  # original LDM .ckpt files: {"state_dict": ..., "global_step": ...}
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: expected a dict of tensors (a state dict), got {type(obj).__name__}")
    return obj


def check_keys(module, state_dict, where):
    """Raise a WeightsError naming every missing/unexpected key and every shape mismatch."""
    expected = {k: v.shape for k, v in module.state_dict().items()}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k])}"
             for k in sorted(set(expected) & set(state_dict)) if state_dict[k].shape != expected[k]]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_listing(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} shape mismatches: {_listing(wrong)}")
    if problems:
        raise WeightsError(f"{where}: " + "; ".join(problems))


def load_into(module, state_dict, where, dtype=torch.float32, device="cpu"):
    """Strictly load `state_dict` into `module` (usually built on meta) and move it to dtype/device."""
    check_keys(module, state_dict, where)
    state_dict = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
                  for k, v in state_dict.items()}
    module.load_state_dict(state_dict, strict=True, assign=True)
    return module.to(device=device).eval()


def write_atomic(path, write):
    """Write a file so that a crash never leaves a half-written file under `path`: write(tmp) to a
    temporary name in the same folder, fsync, then rename over the target."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_file_atomic(tensors, path, metadata=None):
    """A safetensors file, written atomically."""
    write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def file_digest(path):
    """The sha256 of a file's bytes, as hex."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def write_text_atomic(path, text):
    """A text file (JSON, say), written atomically."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    write_atomic(path, write)


def torch_save_atomic(obj, path):
    """torch.save, written atomically. Read it back with torch.load(..., weights_only=True)."""
    write_atomic(path, lambda tmp: torch.save(obj, tmp))


def _listing(names, limit=12):
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


# ---- Stable Diffusion 2

@dataclass
class SD2:
    unet: UNet2DCondition
    vae: AutoencoderKL
    vae_scale: float  # latent = vae mean * vae_scale (0.18215 for SD2)
    prediction: str  # "epsilon" (2.x-base) or "v_prediction" (2.x-768-v)
    text_encoder: object = None
    tokenizer: object = None


def load_sd2(path, dtype=torch.float32, device="cpu", text_encoder=False, prediction=None, vocab=None):
    """Load the SD2 U-Net and VAE from a diffusers folder (unet/, vae/, scheduler/) or from one
    original single-file checkpoint (.safetensors, or .ckpt holding "state_dict").
    `prediction` overrides the prediction type read from (or guessed for) the checkpoint.
    text_encoder=True also loads SD2's text encoder and tokenizer (load_sd2_text_encoder; a single
    file needs `vocab`, the path of bpe_simple_vocab_16e6.txt.gz)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        unet_cfg, unet_sd, vae_cfg, vae_sd, guessed = _read_diffusers_sd2(path)
    elif os.path.isfile(path):
        guessed = prediction or _guess_prediction(path)
        # base and 768-v share one weight layout; the 768-v model also needs fp32 attention (upcast)
        preset = "sd2-768-v" if guessed == "v_prediction" else "sd2-base"
        unet_cfg, vae_cfg = UNET_PRESETS[preset], VAE_PRESETS[preset]
        sd = read_state_dict(path)
        _refuse_other_models(sd, path)
        unet_sd, vae_sd = convert_ldm_unet(sd, unet_cfg), convert_ldm_vae(sd, vae_cfg)
        text = load_sd2_text_encoder(path, dtype, device, vocab, single_file_sd=sd) if text_encoder else (None, None)
        del sd
    else:
        raise WeightsError(f"{path}: no such file or folder (expected a diffusers SD2 folder with unet/ and vae/, "
                           f"or one original .safetensors/.ckpt checkpoint)")
    prediction = prediction or guessed
    if prediction not in ("epsilon", "v_prediction"):
        raise WeightsError(f"{path}: prediction type {prediction!r} is not supported (epsilon or v_prediction)")
    with torch.device("meta"):
        unet, vae = UNet2DCondition(unet_cfg), AutoencoderKL(vae_cfg)
    load_into(unet, unet_sd, f"{path} (U-Net)", dtype, device)
    load_into(vae, vae_sd, f"{path} (VAE)", dtype, device)
    if os.path.isdir(path):
        text = load_sd2_text_encoder(path, dtype, device, vocab) if text_encoder else (None, None)
    return SD2(unet=unet, vae=vae, vae_scale=vae_cfg.scaling_factor, prediction=prediction,
               text_encoder=text[0], tokenizer=text[1])


def _read_diffusers_sd2(folder):
    configs, weights = {}, {}
    for name in ("unet", "vae"):
        config = os.path.join(folder, name, "config.json")
        # the hub also ships half-precision copies (*.fp16.*), which a download may hold alone
        files = [os.path.join(folder, name, f"diffusion_pytorch_model.{ext}")
                 for ext in ("safetensors", "bin", "fp16.safetensors", "fp16.bin")]
        files = [f for f in files if os.path.isfile(f)]
        if not os.path.isfile(config) or not files:
            raise WeightsError(f"{folder}: not a diffusers SD2 folder: expected {name}/config.json and "
                               f"{name}/diffusion_pytorch_model.safetensors (or .bin, .fp16.safetensors, .fp16.bin)")
        try:
            configs[name] = (UNetConfig if name == "unet" else VAEConfig).from_json(config)
        except ValueError as e:
            raise WeightsError(f"{config}: {e}") from e
        weights[name] = read_state_dict(files[0])
    scheduler = os.path.join(folder, "scheduler", "scheduler_config.json")
    prediction = "epsilon"  # diffusers' default when the scheduler config does not say
    if os.path.isfile(scheduler):
        with open(scheduler) as f:
            prediction = json.load(f).get("prediction_type", "epsilon")
    return configs["unet"], weights["unet"], configs["vae"], convert_old_vae_attention(weights["vae"]), prediction


def _guess_prediction(path):
    """Single files do not say; the original loader (diffusers convert_from_ckpt) uses the training
    step count, 110000 for SD 2.x-768-v. Otherwise trust a "768" in the file name."""
    step = None
    if not path.endswith(".safetensors"):
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
            step = ckpt.get("global_step") if isinstance(ckpt, dict) else None
        except Exception:  # unreadable: read_state_dict reports it
            pass
    if step == 110000:
        prediction, why = "v_prediction", "global_step 110000, the SD 2.x-768-v training run"
    elif "768" in os.path.basename(path):
        prediction, why = "v_prediction", 'the file name contains "768"'
    else:
        prediction, why = "epsilon", 'neither global_step 110000 nor "768" in the file name'
    print(f"{path}: prediction type {prediction} ({why}); pass prediction= to choose")
    return prediction


def _refuse_other_models(sd, path):
    """Say what a checkpoint is when it is a Stable Diffusion but not a 2.x one."""
    if any(k.startswith("conditioner.") for k in sd):
        raise WeightsError(f"{path}: this is an SDXL checkpoint (it has conditioner.* keys); "
                           f"DiGSeg needs Stable Diffusion 2.x")
    if "model.diffusion_model.label_emb.0.0.weight" in sd:
        raise WeightsError(f"{path}: this U-Net has a label_emb (an extra embedding of image size or CLIP image "
                           f"features: SDXL or SD 2.x unCLIP); DiGSeg needs the Stable Diffusion 2.x text-to-image model")
    if not any(k.startswith("model.diffusion_model.") for k in sd):
        raise WeightsError(f"{path}: no model.diffusion_model.* keys, so not an original Stable Diffusion "
                           f"checkpoint (for a diffusers model pass its folder, which holds unet/ and vae/)")
    widths = {v.shape[-1] for k, v in sd.items()
              if k.startswith("model.diffusion_model.") and k.endswith("attn2.to_k.weight")}
    if 768 in widths:
        raise WeightsError(f"{path}: this is a Stable Diffusion 1.x checkpoint (cross-attention width 768, CLIP "
                           f"ViT-L/14 text features); DiGSeg needs Stable Diffusion 2.x (width 1024)")
    if 2048 in widths:
        raise WeightsError(f"{path}: this is an SDXL checkpoint (cross-attention width 2048); DiGSeg needs "
                           f"Stable Diffusion 2.x")
    conv_in = sd.get("model.diffusion_model.input_blocks.0.0.weight")
    if conv_in is not None and conv_in.shape[1] != 4:
        raise WeightsError(f"{path}: this U-Net takes {conv_in.shape[1]} input channels (SD 2.x inpainting: 9, "
                           f"depth: 5); DiGSeg starts from the text-to-image model (4) and widens conv_in itself")


# Original LDM names (Stability-AI/stablediffusion ldm/modules) -> diffusers names, as
# prefix tables: the longest matching dotted prefix of a key is replaced (FACTS.md section 3).
LDM_UNET_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                   "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
LDM_VAE_RESNET = {"nin_shortcut": "conv_shortcut"}
LDM_VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
OLD_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}  # diffusers < 0.14


def _ldm_unet_table(cfg):
    levels, n = len(cfg.block_out_channels), cfg.layers_per_block
    table = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
             "input_blocks.0.0": "conv_in", "middle_block.1": "mid_block.attentions.0",
             "out.0": "conv_norm_out", "out.2": "conv_out"}
    _add(table, "middle_block.0", "mid_block.resnets.0", LDM_UNET_RESNET)
    _add(table, "middle_block.2", "mid_block.resnets.1", LDM_UNET_RESNET)
    i = 1  # input_blocks.0 is conv_in; then n (resnet, attention) pairs and a downsampler per level
    for level in range(levels):
        for j in range(n):
            _add(table, f"input_blocks.{i}.0", f"down_blocks.{level}.resnets.{j}", LDM_UNET_RESNET)
            table[f"input_blocks.{i}.1"] = f"down_blocks.{level}.attentions.{j}"
            i += 1
        if level < levels - 1:
            table[f"input_blocks.{i}.0.op"] = f"down_blocks.{level}.downsamplers.0.conv"
            i += 1
    for i in range(levels * (n + 1)):  # output block i = [resnet, attention?, upsampler?]
        level, j = divmod(i, n + 1)
        cross = cfg.up_block_types[level] == "CrossAttnUpBlock2D"
        _add(table, f"output_blocks.{i}.0", f"up_blocks.{level}.resnets.{j}", LDM_UNET_RESNET)
        if cross:
            table[f"output_blocks.{i}.1"] = f"up_blocks.{level}.attentions.{j}"
        if j == n and level < levels - 1:
            table[f"output_blocks.{i}.{2 if cross else 1}.conv"] = f"up_blocks.{level}.upsamplers.0.conv"
    return table


def _ldm_vae_table(cfg):
    levels, n = len(cfg.block_out_channels), cfg.layers_per_block
    table = {"encoder.norm_out": "encoder.conv_norm_out", "decoder.norm_out": "decoder.conv_norm_out"}
    for part in ("encoder", "decoder"):
        _add(table, f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", LDM_VAE_RESNET)
        _add(table, f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0", LDM_VAE_ATTENTION)
        _add(table, f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", LDM_VAE_RESNET)
    for level in range(levels):
        for j in range(n):
            _add(table, f"encoder.down.{level}.block.{j}", f"encoder.down_blocks.{level}.resnets.{j}", LDM_VAE_RESNET)
        table[f"encoder.down.{level}.downsample.conv"] = f"encoder.down_blocks.{level}.downsamplers.0.conv"
        up = levels - 1 - level  # the LDM decoder numbers its levels from the lowest resolution up
        for j in range(n + 1):
            _add(table, f"decoder.up.{level}.block.{j}", f"decoder.up_blocks.{up}.resnets.{j}", LDM_VAE_RESNET)
        table[f"decoder.up.{level}.upsample.conv"] = f"decoder.up_blocks.{up}.upsamplers.0.conv"
    return table


def _add(table, ldm, ours, subkeys=None):
    table[ldm] = ours
    for a, b in (subkeys or {}).items():
        table[f"{ldm}.{a}"] = f"{ours}.{b}"


def _rename(key, table):
    """Replace the longest dotted prefix of `key` that `table` holds; other keys stay as they are."""
    parts = key.split(".")
    for cut in range(len(parts), 0, -1):
        head = ".".join(parts[:cut])
        if head in table:
            return ".".join([table[head], *parts[cut:]])
    return key


def conv1x1_to_linear(w):
    """A 1x1 conv weight (out, in, 1, 1) -> a Linear weight (out, in); other tensors unchanged."""
    return w[:, :, 0, 0] if w.ndim == 4 else w


def convert_ldm_unet(sd, config=UNET_PRESETS["sd2-base"]):
    """The `model.diffusion_model.*` tensors of an original checkpoint, in diffusers names.
    EMA copies (`model_ema.*`) are ignored: the released SD2 files already hold the EMA weights."""
    table, prefix = _ldm_unet_table(config), "model.diffusion_model."
    return {_rename(k[len(prefix):], table): v for k, v in sd.items() if k.startswith(prefix)}


def convert_ldm_vae(sd, config=VAE_PRESETS["sd2-base"]):
    """The `first_stage_model.*` tensors of an original checkpoint, in diffusers names; the mid-block
    attention's 1x1 conv weights become Linear weights."""
    table, prefix = _ldm_vae_table(config), "first_stage_model."
    out = {_rename(k[len(prefix):], table): v for k, v in sd.items() if k.startswith(prefix)}
    return {k: conv1x1_to_linear(v) if ".attentions." in k else v for k, v in out.items()}


def convert_old_vae_attention(sd):
    """A diffusers VAE state dict with the old attention names (query/key/value/proj_attn, possibly
    1x1 conv weights) -> the current names; a current state dict is returned unchanged."""
    table = {f"{part}.mid_block.attentions.0.{a}": f"{part}.mid_block.attentions.0.{b}"
             for part in ("encoder", "decoder") for a, b in OLD_VAE_ATTENTION.items()}
    out = {_rename(k, table): v for k, v in sd.items()}
    return {k: conv1x1_to_linear(v) if ".attentions." in k else v for k, v in out.items()}


# ---- Writers: the inverse of the loaders, in the same public formats (the toy world saves its
# tiny pretrained models with these, so that it goes through the real loading path)

def save_sd2_folder(folder, unet, vae, prediction="epsilon"):
    """A diffusers-format SD2 folder: unet/ and vae/ (config.json + diffusion_pytorch_model.safetensors)
    and scheduler/scheduler_config.json with SD2's training schedule and the prediction type."""
    for name, module in (("unet", unet), ("vae", vae)):
        os.makedirs(os.path.join(folder, name), exist_ok=True)
        module.config.to_json(os.path.join(folder, name, "config.json"))
        save_file_atomic({k: v.detach().contiguous() for k, v in module.state_dict().items()},
                         os.path.join(folder, name, "diffusion_pytorch_model.safetensors"))
    os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump({"_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                   "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "steps_offset": 1,
                   "clip_sample": False, "set_alpha_to_one": False, "prediction_type": prediction}, f, indent=2)


# ---- CLIP (model/clip.py): HF folders, OpenAI checkpoints, SD2's OpenCLIP text tower

def load_clip(path, dtype=torch.float32, device="cpu", vocab=None):
    """A full CLIP (text + vision) from an HF folder (config.json + model.safetensors or
    pytorch_model.bin, tokenizer files in the folder or in tokenizer/) or an OpenAI checkpoint
    (ViT-L-14.pt, ViT-B-16.pt; `vocab` = bpe_simple_vocab_16e6.txt.gz, which those files lack)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        cfg_file = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_file):
            raise WeightsError(f"{path}: not an HF CLIP folder: expected config.json and model.safetensors "
                               f"(or pytorch_model.bin)")
        cfg = _clip_config(cfg_file)
        if cfg.vision_config is None:
            raise WeightsError(f"{path}: a text-only CLIP (CLIPTextModel, e.g. SD2's text_encoder/); load_clip "
                               f"needs text and vision towers (use load_sd2(..., text_encoder=True) for SD2's)")
        sd = {k: v for k, v in read_state_dict(_first_file(path, ("model.safetensors", "pytorch_model.bin"),
                                                           "model.safetensors or pytorch_model.bin")).items()
              if not k.endswith("position_ids")}   # a buffer of older transformers exports
        tokenizer = _hf_tokenizer(path, vocab)
    elif os.path.isfile(path):
        sd = read_openai_checkpoint(path)
        if "cond_stage_model.model.token_embedding.weight" in sd or "model.diffusion_model.conv_in.weight" in sd:
            raise WeightsError(f"{path}: a Stable Diffusion checkpoint, not CLIP; use load_sd2")
        if "visual.conv1.weight" not in sd or "token_embedding.weight" not in sd:
            raise WeightsError(f"{path}: not an OpenAI CLIP checkpoint (no visual.conv1.weight / token_embedding.weight)")
        cfg = openai_clip_config(sd, path)
        try:
            sd = convert_openai_clip(sd)
        except WeightsError as e:
            raise WeightsError(f"{path}: {e}") from e
        if vocab is None:
            raise WeightsError(f"{path}: OpenAI CLIP files carry no vocabulary; pass vocab=PATH of "
                               f"bpe_simple_vocab_16e6.txt.gz (shipped in the open_clip_torch and clip-anytorch wheels)")
        tokenizer = Tokenizer.from_openai(vocab, pad_token="!")   # clip.tokenize pads with 0 = "!"
    else:
        raise WeightsError(f"{path}: no such file or folder (expected an HF CLIP folder or an OpenAI .pt)")
    with torch.device("meta"):
        model = CLIP(cfg)
    load_into(model, sd, f"{path} (CLIP)", dtype, device)
    model.tokenizer = tokenizer
    return model


def _clip_config(path):
    try:
        return CLIPConfig.from_json(path)
    except (ValueError, TypeError) as e:
        raise WeightsError(f"{path}: {e}") from e


def _first_file(folder, names, expected):
    for n in names:
        if os.path.isfile(os.path.join(folder, n)):
            return os.path.join(folder, n)
    raise WeightsError(f"{folder}: expected {expected}")


def _hf_tokenizer(folder, vocab=None):
    """vocab.json + merges.txt, or tokenizer.json alone (current transformers saves only that), in
    the folder or its tokenizer/ subfolder; the pad token from special_tokens_map.json /
    tokenizer_config.json (SD2: "!"), else <|endoftext|>."""
    for d in (folder, os.path.join(folder, "tokenizer")):
        pair = os.path.isfile(os.path.join(d, "vocab.json")) and os.path.isfile(os.path.join(d, "merges.txt"))
        single = os.path.isfile(os.path.join(d, "tokenizer.json"))
        if pair or single:
            pad = "<|endoftext|>"
            for name in ("special_tokens_map.json", "tokenizer_config.json"):
                if os.path.isfile(os.path.join(d, name)):
                    with open(os.path.join(d, name)) as f:
                        p = json.load(f).get("pad_token")
                    if p:
                        pad = p["content"] if isinstance(p, dict) else p
                        break
            if pair:
                return Tokenizer.from_files(os.path.join(d, "vocab.json"), os.path.join(d, "merges.txt"), pad)
            try:
                return Tokenizer.from_tokenizer_json(os.path.join(d, "tokenizer.json"), pad)
            except ValueError as e:
                raise WeightsError(str(e)) from None
    if vocab:
        return Tokenizer.from_openai(vocab, pad_token="<|endoftext|>")
    raise WeightsError(f"{folder}: no tokenizer: expected vocab.json and merges.txt or tokenizer.json (in the "
                       f"folder or tokenizer/), or pass vocab=PATH of bpe_simple_vocab_16e6.txt.gz")


def read_openai_checkpoint(path):
    """The tensors of an OpenAI .pt file, by their dotted attribute names, without running TorchScript.

    OpenAI's ViT-*.pt files are TorchScript archives (a zip: <name>/data.pkl, <name>/data/N,
    <name>/code/..., constants.pkl). torch.load(weights_only=True) refuses them, and torch.jit.load
    would compile the archive's code. We read data.pkl alone with an unpickler that resolves only:
    the TorchScript module classes (`__torch__.*`), to an inert record of their attributes; the
    storage type names, to dtypes; the tensor rebuild function, to our own as_strided view of the
    raw bytes in data/N; and OrderedDict. Any other name in the pickle is refused, so nothing from
    the file is imported or called. It gives exactly torch.jit.load(f).state_dict() on traced and
    scripted archives written by torch 2.13 (tests/test_clip.py); the released files (torch 1.7 era)
    share the zip layout but were not available here to check. Plain state-dict files go through
    weights_only=True."""
    if not zipfile.is_zipfile(path):
        return read_state_dict(path)
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        roots = [n[: -len("data.pkl")] for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(roots) != 1 or not any(n.startswith(roots[0] + "code/") for n in names):
            return read_state_dict(path)    # a torch.save zip, not TorchScript
        if roots[0] + "byteorder" in names and z.read(roots[0] + "byteorder").strip() != b"little":
            raise WeightsError(f"{path}: a big-endian TorchScript archive is not supported")
        try:
            root = _TorchScriptUnpickler(z, roots[0], path).load()
        except (pickle.UnpicklingError, zipfile.BadZipFile, KeyError, ValueError, TypeError, EOFError) as e:
            raise WeightsError(f"{path}: a TorchScript archive whose data.pkl cannot be read: {e}") from e
    return dict(_script_tensors(root))


STORAGE_DTYPES = {"HalfStorage": torch.float16, "FloatStorage": torch.float32, "DoubleStorage": torch.float64,
                  "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
                  "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
                  "BoolStorage": torch.bool}


class _ScriptObject:
    """Stands in for a TorchScript module of data.pkl: keeps the attributes it is built with."""

    def __setstate__(self, state):
        self.attributes = state


def _rebuild_tensor(storage, offset, size, stride, *unused):   # torch._utils._rebuild_tensor_v2's arguments
    return storage.as_strided(size, stride, offset)


class _TorchScriptUnpickler(pickle.Unpickler):
    def __init__(self, z, root, path):
        super().__init__(io.BytesIO(z.read(root + "data.pkl")))
        self.z, self.root, self.path, self.storages = z, root, path, {}

    def find_class(self, module, name):
        if module.startswith("__torch__."):
            return _ScriptObject
        if module == "torch" and name in STORAGE_DTYPES:
            return STORAGE_DTYPES[name]
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        raise WeightsError(f"{self.path}: data.pkl refers to {module}.{name}, which a file of weights does not "
                           f"need; refusing to load it")

    def persistent_load(self, pid):
        """('storage', dtype, key, location, numel) -> the raw bytes of data/<key> as a flat tensor."""
        _, dtype, key, _, _ = pid
        if key not in self.storages:
            raw = bytearray(self.z.read(f"{self.root}data/{key}"))
            self.storages[key] = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        return self.storages[key]


def _script_tensors(obj, prefix=""):
    for name, value in obj.attributes.items():
        if isinstance(value, torch.Tensor):
            yield prefix + name, value
        elif isinstance(value, _ScriptObject):
            yield from _script_tensors(value, f"{prefix}{name}.")


def openai_clip_config(sd, where="OpenAI CLIP"):
    """The architecture of an OpenAI checkpoint, read off its tensor shapes (as openai/CLIP does)."""
    needed = ["ln_final.weight", "token_embedding.weight", "positional_embedding", "text_projection",
              "visual.conv1.weight", "visual.positional_embedding"]
    if any(k not in sd for k in needed):
        raise WeightsError(f"{where}: not a full OpenAI CLIP checkpoint: missing {_listing([k for k in needed if k not in sd])}")
    width = sd["ln_final.weight"].shape[0]
    vwidth, patch = sd["visual.conv1.weight"].shape[0], sd["visual.conv1.weight"].shape[-1]
    grid = int(round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5))
    layers = lambda prefix: len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})
    text = CLIPTextConfig(vocab_size=sd["token_embedding.weight"].shape[0], hidden_size=width,
                          intermediate_size=4 * width, num_hidden_layers=layers("transformer.resblocks."),
                          num_attention_heads=width // 64, max_position_embeddings=sd["positional_embedding"].shape[0])
    vision = CLIPVisionConfig(hidden_size=vwidth, intermediate_size=4 * vwidth,
                              num_hidden_layers=layers("visual.transformer.resblocks."),
                              num_attention_heads=vwidth // 64, image_size=grid * patch, patch_size=patch)
    return CLIPConfig(text, vision, projection_dim=sd["text_projection"].shape[1])


# OpenAI / OpenCLIP name -> HF name, per transformer block and for the tower ends.
CLIP_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
              "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
CLIP_TEXT_ENDS = {"token_embedding.weight": "text_model.embeddings.token_embedding.weight",
                  "positional_embedding": "text_model.embeddings.position_embedding.weight",
                  "ln_final.weight": "text_model.final_layer_norm.weight",
                  "ln_final.bias": "text_model.final_layer_norm.bias"}
CLIP_VISION_ENDS = {"visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
                    "visual.class_embedding": "vision_model.embeddings.class_embedding",
                    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
                    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
                    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
                    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
                    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
                    "logit_scale": "logit_scale"}
CLIP_PROJECTIONS = {"text_projection": "text_projection.weight", "visual.proj": "visual_projection.weight"}


def _convert_blocks(sd, src, dst):
    """transformer.resblocks.N.* -> encoder.layers.N.*; the fused in_proj (rows q | k | v) is split."""
    out = {}
    for k, v in sd.items():
        if not k.startswith(src):
            continue
        n, rest = k[len(src):].split(".", 1)
        base = f"{dst}.encoder.layers.{n}."
        if rest.startswith("attn.in_proj_"):
            kind = rest.rsplit("_", 1)[1]                   # weight | bias
            for name, part in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3, dim=0)):
                out[f"{base}self_attn.{name}.{kind}"] = part
        else:
            module, kind = rest.rsplit(".", 1)
            if module not in CLIP_BLOCK:
                raise WeightsError(f"unexpected key {k}: not a CLIP transformer block tensor")
            out[base + CLIP_BLOCK[module] + "." + kind] = v
    return out


# Integer tensors the JIT files carry besides the weights (openai/CLIP build_model deletes them too).
OPENAI_METADATA = ("input_resolution", "context_length", "vocab_size")


def convert_openai_clip(sd):
    """OpenAI CLIP names -> ours (HF). Projections are stored [in, out] (x @ P) -> Linear [out, in].
    Keys the tables do not name are an error (missing ones are reported by load_into, in HF names)."""
    ends = {**CLIP_TEXT_ENDS, **CLIP_VISION_ENDS}
    blocks = ("transformer.resblocks.", "visual.transformer.resblocks.")
    unknown = [k for k in sd if not k.startswith(blocks) and k not in ends and k not in CLIP_PROJECTIONS
               and k not in OPENAI_METADATA]
    if unknown:
        raise WeightsError(f"{len(unknown)} unexpected keys for an OpenAI CLIP checkpoint: {_listing(sorted(unknown))}")
    out = _convert_blocks(sd, "transformer.resblocks.", "text_model")
    out.update(_convert_blocks(sd, "visual.transformer.resblocks.", "vision_model"))
    out.update({new: sd[old] for old, new in ends.items() if old in sd})
    out.update({new: sd[old].t().contiguous() for old, new in CLIP_PROJECTIONS.items() if old in sd})
    return out


def convert_openclip_text(sd, prefix="cond_stage_model.model.", layers=23):
    """SD2's single-file text encoder (OpenCLIP ViT-H/14 text tower) -> our CLIPTextModel (HF names).
    SD2 conditions on the penultimate layer: resblock 23 is dropped, and so are text_projection and
    logit_scale, which the U-Net never sees."""
    text = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    text = {k: v for k, v in text.items() if not any(k.startswith(f"transformer.resblocks.{i}.") for i in range(layers, 64))}
    out = _convert_blocks(text, "transformer.resblocks.", "text_model")
    out.update({new: text[old] for old, new in CLIP_TEXT_ENDS.items()})
    return out


def load_sd2_text_encoder(path, dtype=torch.float32, device="cpu", vocab=None, single_file_sd=None):
    """SD2's text encoder and tokenizer: from a diffusers folder (text_encoder/ in HF naming,
    tokenizer/ padding with "!"), or from a single file's state dict (OpenCLIP naming; the
    tokenizer then comes from `vocab` = bpe_simple_vocab_16e6.txt.gz, padded with "!" = id 0)."""
    if single_file_sd is None:
        folder = os.path.join(path, "text_encoder")
        cfg_file = os.path.join(folder, "config.json")
        if not os.path.isfile(cfg_file):
            raise WeightsError(f"{path}: expected text_encoder/config.json and text_encoder/model.safetensors")
        cfg = _clip_config(cfg_file)
        sd = read_state_dict(_first_file(folder, ("model.safetensors", "pytorch_model.bin"),
                                         "model.safetensors or pytorch_model.bin"))
        sd = {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in sd.items()
              if not k.endswith("position_ids")}   # transformers >= 5.6 saves CLIPTextModel without the prefix
        tokenizer = _hf_tokenizer(os.path.join(path, "tokenizer"), vocab)
    else:
        if "cond_stage_model.model.token_embedding.weight" not in single_file_sd:
            raise WeightsError(f"{path}: no OpenCLIP text encoder (cond_stage_model.model.*) in this checkpoint")
        cfg = PRESETS["sd2-text"]
        sd = convert_openclip_text(single_file_sd, layers=cfg.text_config.num_hidden_layers)
        if vocab is None:
            raise WeightsError(f"{path}: a single-file checkpoint has no vocabulary; pass vocab=PATH of "
                               f"bpe_simple_vocab_16e6.txt.gz to load SD2's tokenizer")
        tokenizer = Tokenizer.from_openai(vocab, pad_token="!")
    with torch.device("meta"):
        model = CLIPTextModel(cfg)
    load_into(model, sd, f"{path} (SD2 text encoder)", dtype, device)
    return model, tokenizer


def save_clip_folder(folder, clip, vocab_dir):
    """An HF CLIP folder: config.json, model.safetensors, vocab.json and merges.txt."""
    os.makedirs(folder, exist_ok=True)
    clip.config.to_json(os.path.join(folder, "config.json"))
    save_file_atomic({k: v.detach().contiguous() for k, v in clip.state_dict().items()},
                     os.path.join(folder, "model.safetensors"))
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(os.path.join(vocab_dir, name), os.path.join(folder, name))
