"""Weight loaders: local files only, strict keys, errors that name the problem.

Shared rules for every loader in this file:
- read a state dict safely and check its keys strictly (model/files.py);
- build the module on the meta device and load with `assign=True`, so loading needs about
  one copy of the weights in memory;
- formats other than diffusers' and HF's are renamed by the tables of model/convert.py.
"""
import json
import os
import shutil
import zipfile
from dataclasses import dataclass

import torch

from model.clip import CLIP, PRESETS, CLIPConfig, CLIPTextModel, Tokenizer
from model.convert import (convert_ldm_unet, convert_ldm_vae, convert_old_vae_attention, convert_openai_clip,
                           convert_openclip_text, openai_clip_config, read_openai_checkpoint)
from model.files import WeightsError, load_into, read_state_dict, save_file_atomic
from model.unet import PRESETS as UNET_PRESETS, UNet2DCondition, UNetConfig
from model.vae import PRESETS as VAE_PRESETS, AutoencoderKL, VAEConfig


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
