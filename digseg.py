"""DiGSeg: a pretrained Stable Diffusion 2 fine-tuned into a text-conditioned segmenter.

Read this file first. It follows the paper:
  Sec. 3.4  latent pathway        image and mask both go through the frozen SD VAE
  Sec. 3.5  text conditioner      frozen CLIP text tower + trainable MLP -> U-Net cross-attention
  Sec. 3.6  training (Eq. 5, 6)   noise the mask latent (App. A.1), predict the noise, MSE
  Sec. 3.7  inference (Eq. 7, 8)  DDIM-trailing from pure noise, ensemble in latent space, decode
  App. A.2  what is trained        `trainable_parameter_names`
  App. A.3  mask generation        `segment`, `aggregate`;  class label generation: `propose_classes`

Shapes: B batch, K classes, E ensemble members, (H, W) pixels, (h, w) = (H, W) / 8 latents.
"""
import hashlib
import json
import math
import os
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.checkpoint import checkpoint

from data import pil_to_tensor, tensor_to_pil
from model.clip import views as clip_views
from model.diffusion import (add_noise, ddim_sample, ddim_timesteps, multires_noise, predicted_x0_and_eps,
                             scaled_linear_alphas_cumprod, velocity)
from model.weights import WeightsError, load_clip, load_sd2, read_state_dict, save_file_atomic, write_text_atomic

NOISE_TYPES = ("gaussian", "multires", "multires_annealed")
OBJECTIVES = ("diffusion", "e2e")
MASK_LOSSES = ("bce_dice", "mse")
TRAINABLE_SETS = ("all", "paper")
TEXT_SCALES = ("all", "paper")
TEXT_EMBEDDINGS = ("tokens", "pooled")


@dataclass
class DiGSegConfig:
    sd2: str                        # diffusers SD2 folder or single-file checkpoint
    clip: str = ""                  # CLIP folder/file for the conditioner and class proposals
    text: str = "clip"              # "clip": CLIP text tower + MLP (Sec. 3.5); "sd2": SD2's own encoder, no MLP
    text_embedding: str = "tokens"  # what the MLP maps: CLIP's 77 token states, or its pooled embedding (TextHidden)
    trainable: str = "all"          # "all" or "paper" (App. A.2)
    noise: str = "multires_annealed"  # Table 4 rows: gaussian | multires | multires_annealed
    noise_strength: float = 0.9     # s in App. A.1
    target: str = "epsilon"         # what the U-Net predicts: epsilon (paper) | v_prediction | sample
    objective: str = "diffusion"    # "diffusion": Eq. 6, the paper; "e2e": one step through the decoder (e2e_loss)
    mask_loss: str = "bce_dice"     # the e2e objective's loss on M_c (mask_loss): bce_dice | mse
    resolution: int = 512           # inference: the long side is resized to this (paper: 512)
    prompt_template: str = "a photo of a {}."
    clip_vocab: str = ""            # bpe_simple_vocab_16e6.txt.gz, for OpenAI CLIP files without a vocab
    text_scales: str = "all"        # where the text enters the U-Net: every cross-attention, or "paper" (text_skipped)


class DiGSeg(nn.Module):
    def __init__(self, cfg, unet, vae, vae_scale, text_encoder, tokenizer, mlp=None, clip=None):
        super().__init__()
        self.cfg = cfg
        self.unet = unet            # trained; conv_in takes cat([z_x, z_t]) -> 8 channels
        self.vae = vae              # frozen
        self.vae_scale = vae_scale  # 0.18215 for SD2: latents are E(x).mean * scale
        self.text_encoder = text_encoder  # frozen: ids (B, 77) -> hidden (B, 77, D)
        self.tokenizer = tokenizer
        self.mlp = mlp              # trainable text projection (B, 77, D) -> (B, 77, 1024), None for text="sd2"
        self.clip = clip            # frozen CLIP with a vision tower, for class proposals (App. A.3); may be None
        self.proposal_clip = None   # another CLIP for the proposals only (use_proposal_clip), else self.clip
        self.decoder_checkpointing = False   # e2e: recompute the decoder's activations in the backward pass
        # SD2's schedule, created on the U-Net's device; a buffer, so .to(device) moves it too
        self.register_buffer("alphas_cumprod", scaled_linear_alphas_cumprod().to(unet.conv_in.weight.device),
                             persistent=False)
        self.schedule_on_host = scaled_linear_alphas_cumprod()   # the sampler's per-step scalars: no device reads
        self._prompt_cache = {}     # prompt -> frozen text hidden state (77, D)
        self._vocab_cache = {}      # (template, vocabulary) -> CLIP's projected text embeddings (V, E)
        for p in list(self.vae.parameters()) + list(self.text_encoder.parameters()):
            p.requires_grad_(False)
        if clip is not None:
            clip.requires_grad_(False)
        skipped = text_skipped(unet, cfg.text_scales)
        for name, block in text_blocks(unet):
            block.use_text = name not in skipped
        names = set(trainable_parameter_names(self, cfg.trainable, cfg.text_scales))
        for n, p in self.named_parameters():
            if n.startswith("unet.") or n.startswith("mlp."):
                p.requires_grad_(n in names)

    def train(self, mode=True):
        """Only the trained parts change mode (gradient checkpointing acts in training mode); the
        frozen VAE, text tower and CLIP always stay in eval mode."""
        super().train(mode)
        for frozen in (self.vae, self.text_encoder, self.clip, self.proposal_clip):
            if frozen is not None:
                frozen.eval()
        return self

    @property
    def proposer(self):
        """The CLIP that proposes classes: the proposal CLIP if one is set, else the conditioner's."""
        return self.proposal_clip if self.proposal_clip is not None else self.clip

    def use_proposal_clip(self, path, vocab=None):
        """Propose classes (App. A.3) with another CLIP than the conditioner's. The paper is of two
        minds: Table 1 lists DiGSeg with CLIP ViT-B/16, App. A.2 injects ViT-L/14 text embeddings;
        one reading is B/16 proposals + L/14 text, which this allows (eval.py/sample.py
        --proposal_clip). Frozen, not part of the checkpoint."""
        clip = load_clip(path, dtype=next(self.vae.parameters()).dtype, device=self.device, vocab=vocab)
        if not hasattr(clip, "image"):
            raise WeightsError(f"{path}: a proposal CLIP needs a vision tower")
        self.proposal_clip = clip.requires_grad_(False).eval()
        self._vocab_cache.clear()
        return self

    def tune_for_cuda(self, frozen_dtype=None, compile=False):
        """The same math, faster on a GPU (no-op elsewhere). Measured on one H100 (bench.py
        --device=cuda --only=choices), what each choice buys:
        - the frozen VAE and text tower stored in `frozen_dtype` (bf16 when training under bf16
          autocast), so their fp32 weights are not cast at every call;
        - compile: torch.compile of the U-Net and of the VAE encoder alone, static shapes (a new
          image size compiles once more). The encoder runs twice per training step (image and
          mask): bf16 batch 16 at 512^2 93.7 -> 53.3 ms, 16 s to compile. Compiling the whole loss
          (CPU generators, Python lists of prompts) recompiled at every step instead.
        Left out, measured: channels_last (NHWC). PyTorch's GroupNorm converts NHWC back, so the
        VAE got slower (encode b16 93.7 -> 135.0 ms, decode b1 22.6 -> 28.2 ms) and the U-Net's
        training pass no faster (b2 126.5 -> 155.0 ms, b16 191.6 -> 185.3 ms); cudnn.benchmark
        changed nothing."""
        if self.device.type != "cuda":
            return self
        if frozen_dtype is not None:
            self.vae.to(frozen_dtype)
            self.text_encoder.to(frozen_dtype)
            for clip in (self.clip, self.proposal_clip):
                if clip is not None:
                    clip.to(frozen_dtype)
            self._prompt_cache.clear()
            self._vocab_cache.clear()
        if compile:
            self.unet.compile(dynamic=False)          # in place: the saved names stay those of the U-Net
            self.vae.encoder.compile(dynamic=False)
        return self

    # ---- building and saving -------------------------------------------------------------

    @classmethod
    def from_weights(cls, sd2_path, clip_path="", text="clip", trainable="all", dtype=torch.float32,
                     device="cpu", **options):
        """The pretrained pieces with a widened conv_in and a freshly initialised MLP."""
        cfg = DiGSegConfig(sd2=str(sd2_path), clip=str(clip_path), text=text, trainable=trainable, **options)
        model = cls._build(cfg, dtype, device)
        widen_conv_in(model.unet)
        return model

    @classmethod
    def _build(cls, cfg, dtype, device):
        if cfg.trainable not in TRAINABLE_SETS:
            raise ValueError(f"unknown trainable set {cfg.trainable!r}; valid: {', '.join(TRAINABLE_SETS)}")
        if cfg.text_scales not in TEXT_SCALES:
            raise ValueError(f"unknown text_scales {cfg.text_scales!r}; valid: {', '.join(TEXT_SCALES)}")
        if cfg.noise not in NOISE_TYPES:
            raise ValueError(f"unknown noise type {cfg.noise!r}; valid: {', '.join(NOISE_TYPES)}")
        if cfg.objective not in OBJECTIVES or cfg.mask_loss not in MASK_LOSSES:
            raise ValueError(f"objective={cfg.objective!r}, mask_loss={cfg.mask_loss!r}: expected an objective of "
                             f"{', '.join(OBJECTIVES)} and a mask loss of {', '.join(MASK_LOSSES)}")
        if cfg.text not in ("clip", "sd2"):
            raise ValueError(f"unknown text conditioner {cfg.text!r}; valid: clip, sd2")
        if cfg.text_embedding not in TEXT_EMBEDDINGS or (cfg.text == "sd2" and cfg.text_embedding != "tokens"):
            raise ValueError(f"text_embedding={cfg.text_embedding!r}: expected one of {', '.join(TEXT_EMBEDDINGS)} "
                             f"(text='sd2' feeds SD2's own token states: tokens only)")
        sd = load_sd2(cfg.sd2, dtype=dtype, device=device, text_encoder=(cfg.text == "sd2"))
        clip = load_clip(cfg.clip, dtype=dtype, device=device, vocab=cfg.clip_vocab or None) if cfg.clip else None
        if cfg.text == "sd2":
            text_encoder, tokenizer, mlp = sd.text_encoder, sd.tokenizer, None
        else:
            if clip is None:
                raise ValueError("text='clip' needs a CLIP checkpoint (clip_path); or use text='sd2'")
            pooled = cfg.text_embedding == "pooled"
            text_encoder, tokenizer = TextHidden(clip, pooled), clip.tokenizer
            width = clip.config.projection_dim if pooled else clip.config.text_config.hidden_size
            mlp = TextMLP(width, sd.unet.config.cross_attention_dim).to(device=device, dtype=dtype)
        return cls(cfg, sd.unet, sd.vae, sd.vae_scale, text_encoder, tokenizer, mlp, clip)

    def save(self, out_dir):
        """The fine-tuned part only (trainable tensors, safetensors) + the config (JSON) that names
        the frozen base weights by absolute path, so the checkpoint loads from any working
        directory. Both written atomically (temp file, fsync, rename)."""
        os.makedirs(out_dir, exist_ok=True)
        tensors = {n: p.detach().contiguous() for n, p in self.named_parameters() if p.requires_grad}
        tensors["unet.conv_in.weight"] = self.unet.conv_in.weight.detach().contiguous()  # always: 8-channel
        save_file_atomic(tensors, os.path.join(out_dir, "digseg.safetensors"))
        cfg = asdict(self.cfg)
        for key in ("sd2", "clip", "clip_vocab"):
            cfg[key] = os.path.abspath(cfg[key]) if cfg[key] else ""
        write_text_atomic(os.path.join(out_dir, "digseg.json"), json.dumps(cfg, indent=2))

    @staticmethod
    def config_of(ckpt_dir, sd2=None, clip=None):
        """The DiGSegConfig saved in a checkpoint folder (digseg.json), its base paths resolved:
        absolute as saved, or (older checkpoints) relative to the working directory or to the
        checkpoint folder. sd2=/clip= point at the base weights where they have moved."""
        cfg_path = os.path.join(ckpt_dir, "digseg.json")
        if not os.path.isfile(cfg_path):
            raise WeightsError(f"{ckpt_dir}: not a DiGSeg checkpoint (expected digseg.json and digseg.safetensors)")
        with open(cfg_path) as f:
            saved = json.load(f)
        known = {f.name for f in fields(DiGSegConfig)}
        unknown = sorted(set(saved) - known)
        if unknown or "sd2" not in saved:
            raise WeightsError(f"{cfg_path}: " + (f"unknown keys {unknown}" if unknown else "no 'sd2' key") +
                               f"; a DiGSeg config has {', '.join(sorted(known))}")
        saved.update({k: v for k, v in (("sd2", sd2), ("clip", clip)) if v})
        for key, flag in (("sd2", "--sd2"), ("clip", "--clip"), ("clip_vocab", "--clip_vocab")):
            if saved.get(key):
                saved[key] = _base_path(saved[key], ckpt_dir, f"{cfg_path} names {key}={saved[key]!r}, which does "
                                        f"not exist; if the weights moved, pass {flag}=NEW_PATH")
        return DiGSegConfig(**saved)

    @classmethod
    def from_checkpoint(cls, ckpt_dir, dtype=torch.float32, device="cpu", sd2=None, clip=None):
        """A saved DiGSeg: the base weights named in digseg.json, then the fine-tuned tensors, every
        one of them: a tensor missing from digseg.safetensors is an error, not a random weight."""
        cfg = cls.config_of(ckpt_dir, sd2, clip)
        model = cls._build(cfg, dtype, device)
        widen_conv_in(model.unet)
        path = os.path.join(ckpt_dir, "digseg.safetensors")
        tuned = read_state_dict(path)
        own = dict(model.named_parameters())
        unknown = sorted(set(tuned) - set(own))
        if unknown:
            raise WeightsError(f"{path}: keys that are not DiGSeg parameters: {unknown[:8]}")
        needed = {n for n, p in own.items() if p.requires_grad} | {"unet.conv_in.weight"}
        missing = sorted(needed - set(tuned))
        if missing:
            raise WeightsError(f"{path}: {len(missing)} trained tensors missing (trainable={cfg.trainable}): "
                               f"{missing[:8]}")
        with torch.no_grad():
            for n, v in tuned.items():
                if own[n].shape != v.shape:
                    raise WeightsError(f"{path}: {n} has shape {tuple(v.shape)}, the model expects {tuple(own[n].shape)}")
                own[n].copy_(v)
        return model

    @staticmethod
    def checkpoint_digest(ckpt_dir):
        """sha256 of digseg.json and digseg.safetensors: what a result computed from them depends on."""
        h = hashlib.sha256()
        for name in ("digseg.json", "digseg.safetensors"):
            with open(os.path.join(ckpt_dir, name), "rb") as f:
                while chunk := f.read(1 << 24):
                    h.update(chunk)
        return h.hexdigest()

    # ---- Sec. 3.4: the latent pathway ---------------------------------------------------

    def encode_image(self, x):
        """x (B, 3, H, W) in [-1, 1] -> z_x (B, 4, h, w): the mean of the VAE posterior, scaled."""
        return self.vae.encode(x.to(self.vae_dtype))[0].float() * self.vae_scale

    def encode_mask(self, y):
        """y (B, H, W) in {0, 1} -> z_y (B, 4, h, w): the mask as an image, 2y - 1 on 3 channels."""
        return self.vae.encode(mask_to_image(y).to(self.vae_dtype))[0].float() * self.vae_scale

    def decode_mask(self, z):
        """z (B, 4, h, w) -> M (B, H, W) in [0, 1]: decode, mean over RGB, back from [-1, 1]."""
        return image_to_mask(self.vae.decode((z / self.vae_scale).to(self.vae_dtype)))

    @property
    def vae_dtype(self):
        return next(self.vae.parameters()).dtype

    @property
    def unet_dtype(self):
        return self.unet.conv_in.weight.dtype

    # ---- Sec. 3.5: the text conditioner ---------------------------------------------------

    def text_hidden(self, prompts):
        """Frozen text tower: prompts -> (B, 77, D), or (B, 1, E) with text_embedding="pooled"
        (TextHidden). The tower is frozen, so each prompt is encoded
        once and kept; alone, so that its features do not depend on the prompts it came with (a
        batched matmul rounds differently by batch size, which would break bit-identical resume).
        Warns when a prompt is cut at 77 tokens."""
        for p in dict.fromkeys(prompts):
            if p not in self._prompt_cache:
                ids = self.tokenizer([p]).to(self.device)                 # (1, 77)
                n = self.tokenizer.token_counts([p])[0]
                if n > ids.shape[1]:
                    warnings.warn(f"prompt {p[:60]!r} has {n} tokens; it is truncated to {ids.shape[1]}")
                with torch.no_grad():
                    self._prompt_cache[p] = self.text_encoder(ids)[0]     # (77, D) or (1, E)
        return torch.stack([self._prompt_cache[p] for p in prompts])

    def context(self, prompts):
        """prompts -> ctx (B, 77, 1024) for the U-Net cross-attention: MLP(CLIP(prompt)), Sec. 3.5."""
        hidden = self.text_hidden(prompts)
        if self.mlp is None:
            return hidden.to(self.unet_dtype)
        return self.mlp(hidden.to(self.mlp.fc1.weight.dtype))

    @property
    def device(self):
        return self.unet.conv_in.weight.device

    # ---- Sec. 3.6: training (Eq. 5, Eq. 6) -----------------------------------------------

    def loss(self, images, masks, prompts, generators, t_max_share=0.0, valid=None):
        """images (B, 3, H, W) in [-1, 1], masks (B, H, W) in {0, 1}, prompts: B strings -> scalar.
        The paper's objective (Eq. 6); with cfg.objective = "e2e", e2e_loss instead.

        generators: one torch.Generator per sample (train.py seeds them by (seed, epoch, index)), so
        that a sample's t and noise do not depend on the batch it is in.
        t_max_share: NOT the paper (which draws t ~ U{0..T-1}): this share of the samples is trained
        at t = T-1, the only timestep one-step trailing inference visits (Garcia et al. 2024 train
        there only). 0 by default; the toy preset uses it, see train.py.
        valid (B, H, W): 1 where the mask is annotated; only the e2e loss, in pixel space, can use it."""
        if self.cfg.objective == "e2e":
            return self.e2e_loss(images, masks, prompts, valid)
        if len(generators) != len(images):
            raise ValueError(f"loss() needs one generator per sample: {len(generators)} for {len(images)} images")
        T = len(self.alphas_cumprod)
        with torch.no_grad():
            z_x = self.encode_image(images)                       # (B, 4, h, w)
            z_y = self.encode_mask(masks)                         # (B, 4, h, w)
        t = torch.cat([self.sample_timestep(g, t_max_share) for g in generators])          # t ~ U{0..T-1}
        eps = torch.cat([self.sample_noise(z_y.shape[1:], t[i], g) for i, g in enumerate(generators)])
        t, eps = to_device(t, self.device), to_device(eps, self.device)
        z_t = add_noise(z_y, eps, t, self.alphas_cumprod)            # Eq. 5, in fp32 whatever the VAE computes in
        pred = self.unet(torch.cat([z_x, z_t], dim=1).to(self.unet_dtype), t, self.context(prompts))
        if self.cfg.target == "epsilon":
            target = eps
        elif self.cfg.target == "v_prediction":
            target = velocity(z_y, eps, t, self.alphas_cumprod)
        else:
            target = z_y
        return F.mse_loss(pred.float(), target)                   # Eq. 6

    def forward(self, images, masks, prompts, generators, t_max_share=0.0, valid=None):
        """The training loss, so that DistributedDataParallel (which wraps forward) can be used."""
        return self.loss(images, masks, prompts, generators, t_max_share, valid)

    def e2e_loss(self, images, masks, prompts, valid=None):
        """NOT the paper: end-to-end fine-tuning of the one-step model (Garcia et al. 2024, for depth
        and normals; here for masks). Every sample at t = T-1 with the mask-latent input zeros; the
        U-Net's output -> x0_hat -> the frozen decoder, *with* its autograd graph -> M_c, the channel
        mean as at inference but not clamped -> mask_loss against the mask, ignored pixels left out.
        The same computation as inference's one trailing DDIM step from z_T = 0 (segment)."""
        T = len(self.alphas_cumprod)
        with torch.no_grad():
            z_x = self.encode_image(images)                                # (B, 4, h, w)
        z_T = torch.zeros_like(z_x)
        pred = self.unet(torch.cat([z_x, z_T], dim=1).to(self.unet_dtype), T - 1, self.context(prompts))
        x0, _ = predicted_x0_and_eps(pred.float(), z_T, T - 1, self.schedule_on_host, self.cfg.target)
        z = (x0 / self.vae_scale).to(self.vae_dtype)
        rgb = checkpoint(self.vae.decode, z, use_reentrant=False) if self.decoder_checkpointing else self.vae.decode(z)
        with torch.autocast(self.device.type, enabled=False):             # the loss in fp32
            m = (rgb.float().mean(dim=1) + 1) / 2                          # (B, H, W), M_c before the clamp
            return mask_loss(m, masks.float(), valid, self.cfg.mask_loss)

    def sample_timestep(self, generator, t_max_share=0.0):
        """One sample's t (1,) from its generator: uniform, or T-1 with probability t_max_share."""
        T = len(self.alphas_cumprod)
        if t_max_share > 0 and torch.rand((), generator=generator) < t_max_share:
            return torch.full((1,), T - 1)
        return torch.randint(0, T, (1,), generator=generator)

    def sample_noise(self, shape, t, generator):
        """The noise of one sample (1, C, h, w) at its timestep t, App. A.1. Drawn on the CPU from the
        sample's own generator: the same numbers on any device, in any batch."""
        if self.cfg.noise == "gaussian":
            return torch.randn((1, *shape), generator=generator)
        return multires_noise((1, *shape), t.reshape(1), T=len(self.alphas_cumprod), strength=self.cfg.noise_strength,
                              annealed=self.cfg.noise == "multires_annealed", generator=generator)

    # ---- Sec. 3.7 and App. A.3 "Mask generation": inference --------------------------------

    @torch.no_grad()
    def segment(self, image, class_names, ensemble=8, steps=1, spacing="trailing", seed=0, batch_size=8, eta=0.0,
                long_side=None):
        """image: PIL image or (3, H, W) tensor in [-1, 1]; K class names -> probs (K, H, W) in [0, 1].

        For each class c, the E members start from z_T ~ N(0, I) (member e always uses the noise of
        seed + e, whatever the batching), run S DDIM steps (Eq. 7) conditioned on the prompt of c,
        and are averaged in latent space before decoding (Eq. 8): M_c = (mean_RGB D(z_0) + 1) / 2.
        eta > 0: Eq. 7's sigma_t term; member e's step noises come from the same seed + e stream.
        long_side: the working size's long side (default cfg.resolution; eval.py's protocols set it).
        """
        if len(class_names) == 0:
            raise ValueError("segment() needs at least one class name")
        if not isinstance(ensemble, int) or ensemble < 1:
            raise ValueError(f"the ensemble size E must be an integer >= 1, got {ensemble!r}")
        x, (H, W), crop = self.prepare_image(image, long_side)        # (1, 3, H', W') padded
        z_x = self.encode_image(x)                                    # (1, 4, h, w)
        ctx = self.context([self.cfg.prompt_template.format(c) for c in class_names])   # (K, 77, C)
        K, E = len(class_names), ensemble
        if self.cfg.objective == "e2e":                              # one deterministic step from z_T = 0
            E = e2e_inference(ensemble, steps, spacing, eta)
            noise = torch.zeros(1, *z_x.shape[1:], device=self.device)
        else:
            gens = [torch.Generator().manual_seed(seed + e) for e in range(E)]
            noise = torch.stack([torch.randn(z_x.shape[1:], generator=g) for g in gens]).to(self.device)  # (E, 4, h, w)
        step_noise = torch.stack([torch.stack([torch.randn(z_x.shape[1:], generator=g) for g in gens])
                                  for _ in range(steps)]).to(self.device) if eta > 0 else None   # (S, E, 4, h, w)
        z0 = self.denoise_pairs(z_x, ctx, noise, steps, spacing, eta, step_noise, batch_size)   # (K, E, 4, h, w)
        z0 = z0.mean(dim=1)                                          # (K, 4, h, w) Eq. 8: ensemble in latent space
        probs = torch.cat([self.decode_mask(z0[i:i + batch_size]) for i in range(0, K, batch_size)])   # (K, H', W')
        top, left, h, w = crop
        probs = probs[:, top:top + h, left:left + w]
        return F.interpolate(probs[None], size=(H, W), mode="bilinear", align_corners=False)[0].clamp(0, 1)

    def denoise_pairs(self, z_x, ctx, z_T, steps, spacing, eta, noises, batch_size):
        """Every (class k, member e) pair denoised, batch_size pairs per U-Net call: ctx (K, 77, C),
        z_T (E, 4, h, w), noises (S, E, 4, h, w) or None -> z_0 (K, E, 4, h, w). The pairs are laid
        out flat, class-major, and cut into contiguous chunks: no index tensor is built per chunk."""
        K, E = len(ctx), len(z_T)
        ctx = ctx.repeat_interleave(E, dim=0)                                  # (K*E, 77, C)
        z_T = z_T.repeat(K, 1, 1, 1)                                           # (K*E, 4, h, w)
        noises = noises.repeat(1, K, 1, 1, 1) if noises is not None else None  # (S, K*E, 4, h, w)
        z0 = [self.denoise(z_x, z_T[i:i + batch_size], ctx[i:i + batch_size], steps, spacing, eta,
                           noises[:, i:i + batch_size] if noises is not None else None)
              for i in range(0, K * E, batch_size)]
        return torch.cat(z0).view(K, E, *z_T.shape[1:])

    def denoise(self, z_x, z_T, ctx, steps, spacing, eta=0.0, noises=None):
        """S steps of DDIM (Eq. 7; deterministic with eta = 0, the paper's Sec. 4.1) from z_T
        (N, 4, h, w) for N (prompt, noise) pairs -> z_0 (N, 4, h, w). t_prev = t - T//S as in
        diffusers' DDIMScheduler; the last step goes to alpha_bar = 1. eta > 0 needs `noises`
        (S, N, 4, h, w)."""
        for step in self.denoise_steps(z_x, z_T, ctx, steps, spacing, eta, noises):
            pass
        return step["z_prev"]

    def denoise_steps(self, z_x, z_T, ctx, steps, spacing, eta=0.0, noises=None):
        """The same as an iterator over the steps (model.diffusion.ddim_sample): for each, a dict of
        t, z_t, pred (the U-Net's output), x0 (x0_hat) and z_prev, all (N, 4, h, w) in float32."""
        cond = z_x.expand(len(z_T), -1, -1, -1)

        def predict(z, t):   # U-Net input: cat([z_x, z_t]) on the channel axis, (N, 8, h, w); t an int
            return self.unet(torch.cat([cond, z], dim=1).to(self.unet_dtype), t, ctx).float()

        T = len(self.alphas_cumprod)
        yield from ddim_sample(predict, z_T.float(), ddim_timesteps(steps, T, spacing), self.schedule_on_host,
                               self.cfg.target, T, eta, noises)

    def prepare_image(self, image, long_side=None):
        """Any image -> (1, 3, H', W') in [-1, 1]: long side resized to `long_side` (default
        cfg.resolution), then padded
        (reflect) to a multiple of `self.multiple` px. Returns the original (H, W) and the crop box of
        the content inside the padded image, so masks go back to the original size.

        Small images (even a few pixels) are upscaled to the working resolution, like any other."""
        if isinstance(image, Image.Image):
            image = pil_to_tensor(image)
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"expected an image tensor (3, H, W) in [-1, 1], got shape {tuple(image.shape)}")
        H, W = image.shape[1:]
        scale = (long_side or self.cfg.resolution) / max(H, W)
        h, w = max(1, round(H * scale)), max(1, round(W * scale))
        x = F.interpolate(image[None].float(), size=(h, w), mode="bilinear", align_corners=False, antialias=scale < 1)
        m = self.multiple
        ph, pw = math.ceil(h / m) * m - h, math.ceil(w / m) * m - w
        top, left = ph // 2, pw // 2
        x = F.pad(x, (left, pw - left, top, ph - top), mode="replicate")
        return x.clamp(-1, 1).to(self.device), (H, W), (top, left, h, w)

    @property
    def multiple(self):
        """Pixel sizes must divide by the VAE factor (8 for SD2) times the U-Net's (8): 64."""
        vae_down = 2 ** (len(self.vae.config.block_out_channels) - 1)
        unet_down = 2 ** (len(self.unet.config.block_out_channels) - 1)
        return vae_down * unet_down

    @contextmanager
    def cross_attention_maps(self):
        """Record the U-Net's cross-attention to the text (Sec. 3.5: text-to-region binding) while
        the block runs: yields {module name: list of (N, h_l * w_l, 77) maps, one per call}, each
        the attention probabilities of every latent position over the 77 prompt tokens, averaged
        over heads; h_l x w_l is the resolution of that U-Net level. Outputs are unchanged."""
        layers = {n: m for n, m in self.unet.named_modules() if n.endswith("attn2")}
        for m in layers.values():
            m.maps = []
        try:
            yield {n: m.maps for n, m in layers.items()}
        finally:
            for m in layers.values():
                m.maps = None

    # ---- App. A.3 "Class label generation" ----------------------------------------------

    @torch.no_grad()
    def propose_classes(self, image, vocabulary, tau_global=0.25, tau_patch=0.3, template="A photo of a {}."):
        """CLIP image-text similarity picks the candidate classes K of an image (App. A.3), with
        the proposal CLIP if one is set (use_proposal_clip), else the conditioner's."""
        clip = self.proposer
        if clip is None or not hasattr(clip, "image"):
            raise ValueError("propose_classes needs a CLIP model with a vision tower (clip_path)")
        whole, tiles = clip_views(image if isinstance(image, Image.Image) else tensor_to_pil(image),
                                  clip.config.vision_config.image_size)      # the whole image, not a centre crop
        dtype = next(clip.parameters()).dtype
        img, patches = clip.image(whole.to(self.device, dtype))              # (1, E), (1, N, E)
        if len(tiles) > 1:                                                   # not square: the tiles' patches
            patches = clip.image(tiles.to(self.device, dtype))[1].flatten(0, 1)[None]   # (n, N, E) -> (1, n*N, E)
        text = self.vocabulary_embeddings(tuple(vocabulary), template)
        return select_candidates(img[0], patches[0], text, vocabulary, tau_global, tau_patch)

    def vocabulary_embeddings(self, vocabulary, template):
        key = (template, vocabulary)
        if key not in self._vocab_cache:
            clip = self.proposer
            ids = clip.tokenizer([template.format(c) for c in vocabulary]).to(self.device)
            self._vocab_cache[key] = clip.text(ids)[1]                      # (V, E) pooled + projected
        return self._vocab_cache[key]


E2E_LOGIT_SCALE = 6.0     # bce_dice reads M_c = 0.5 as an even chance and M_c = 1 (0) as sigmoid(+-6), near certain


def mask_loss(m, y, valid=None, kind="bce_dice"):
    """The e2e objective's loss between M (B, H, W), decoded and not clamped, and the mask y (B, H, W)
    in {0, 1}, over the valid pixels (all when valid is None).
      mse:      the pixel mean of (M - y)^2;
      bce_dice: binary cross-entropy on the logit k (2M - 1), k = E2E_LOGIT_SCALE, so that M = 0.5,
                inference's background threshold, is the decision boundary and no pixel, however far
                outside [0, 1] it decodes, loses its gradient; plus the soft Dice loss of each sample
                on sigmoid(logit), smoothed by 1, so that a small shape weighs as much as a large one."""
    valid = torch.ones_like(y) if valid is None else valid.float()
    n = valid.sum().clamp(min=1)
    if kind == "mse":
        return ((m - y) ** 2 * valid).sum() / n
    logit = E2E_LOGIT_SCALE * (2 * m - 1)
    bce = (F.binary_cross_entropy_with_logits(logit, y, reduction="none") * valid).sum() / n
    p, y = torch.sigmoid(logit) * valid, y * valid
    dice = 1 - (2 * (p * y).sum(dim=(1, 2)) + 1) / (p.sum(dim=(1, 2)) + y.sum(dim=(1, 2)) + 1)
    return bce + dice.mean()


def select_candidates(image_embed, patch_embeds, text_embeds, vocabulary, tau_global=0.25, tau_patch=0.3):
    """image_embed (E,), patch_embeds (N, E), text_embeds (V, E) -> (classes, scores).

    Global: keep c when cos(image, text_c) > tau_global (the paper: 0.25).
    Patch-level refinement: also keep c when its best patch, max_n cos(patch_n, text_c), exceeds
    tau_patch -- small objects that do not dominate the global embedding. Scores are the larger of
    the two similarities, and the classes come back sorted by score."""
    t = F.normalize(text_embeds.float(), dim=-1)
    g = F.normalize(image_embed.float(), dim=-1) @ t.T                         # (V,)
    p = (F.normalize(patch_embeds.float(), dim=-1) @ t.T).max(dim=0).values    # (V,)
    g, p = torch.stack([g, p]).tolist()                                        # one copy to the host, not one per class
    scores = {c: {"global": g[i], "patch": p[i]} for i, c in enumerate(vocabulary) if g[i] > tau_global or p[i] > tau_patch}
    order = sorted(scores, key=lambda c: -max(scores[c].values()))
    return order, {c: scores[c] for c in order}


def e2e_inference(ensemble, steps, spacing, eta):
    """An e2e checkpoint (cfg.objective = "e2e") is one computation: one trailing step at t = T-1 from
    z_T = 0, as it was trained. Other steps, spacings or eta would run a different computation than
    the one trained, so they are refused; an ensemble of E identical members is run once. -> E = 1."""
    if steps != 1 or spacing != "trailing" or eta != 0:
        raise ValueError(f"this checkpoint was fine-tuned end to end (objective=e2e): it segments in one "
                         f"deterministic step, steps=1 spacing=trailing eta=0; got steps={steps} spacing={spacing} eta={eta}")
    if ensemble > 1:
        warnings.warn(f"objective=e2e: the {ensemble} ensemble members would be identical (z_T = 0); one is run")
    return 1


def mask_to_image(y):
    """Sec. 3.4: a mask y (B, H, W) in {0, 1} as the VAE sees an image: 2y - 1 on 3 channels (B, 3, H, W)."""
    return (2 * y.float() - 1).unsqueeze(1).expand(-1, 3, -1, -1)


def image_to_mask(x):
    """The way back: a decoded image (B, 3, H, W) -> M (B, H, W) in [0, 1], mean over RGB, from [-1, 1]."""
    return ((x.float().mean(dim=1) + 1) / 2).clamp(0, 1)


def aggregate(probs, tau_bg=0.5):
    """probs (K, H, W) -> labels (H, W): argmax over classes, -1 (background) where max < tau_bg."""
    best, labels = probs.max(dim=0)
    return torch.where(best < tau_bg, torch.full_like(labels, -1), labels)


def binary_mask(prob, tau=0.7):
    """One class: M_c > tau (the paper's tau = 0.7)."""
    return prob > tau


# ---- App. A.2: what is trained ---------------------------------------------------------------

def trainable_parameter_names(model, trainable, text_scales="all"):
    """`all`: the whole U-Net (with the widened conv_in) and the MLP.

    `paper` (App. A.2): conv_in, the MLP, the cross-attention of the U-Net levels at 1/4 and 1/8
    resolution, and all mid-block attention. Our reading of the ambiguous "1/4 and 1/8": relative
    to the *latent* (64x64 for a 512 image), the SD2 U-Net has levels at 1/1, 1/2, 1/4 and 1/8.
    Cross-attention exists at 1/1, 1/2 and 1/4 (down_blocks.0-2, up_blocks.1-3); the 1/8 level
    (down_blocks.3, up_blocks.0) has none, only the mid-block, which works at 1/8 too. So we train
    attn2 (+ its pre-norm, norm2) of every transformer at 1/4 (down_blocks.2, up_blocks.1) and the
    mid-block's whole transformer (mid_block.attentions.0), which covers the 1/8 level.

    Either way, a cross-attention that text_scales skips (attn2 and its norm2) takes no part in the
    output, so it does not train: a parameter without a gradient would stall DDP's all-reduce.
    """
    skipped = tuple(f"unet.{b}.{part}." for b in text_skipped(model.unet, text_scales) for part in ("attn2", "norm2"))
    names = [n for n, _ in model.named_parameters() if n.startswith(("unet.", "mlp.")) and not n.startswith(skipped)]
    if trainable == "all":
        return names
    levels = len(model.unet.config.block_out_channels)
    quarter_down, quarter_up = f"unet.down_blocks.{levels - 2}.", f"unet.up_blocks.{1}."  # 1/4 of the latent

    def chosen(n):
        if n.startswith(("mlp.", "unet.conv_in.", "unet.mid_block.attentions.")):
            return True
        return n.startswith((quarter_down, quarter_up)) and ".attentions." in n and (".attn2." in n or ".norm2." in n)

    return [n for n in names if chosen(n)]



def text_blocks(unet):
    """[(name, BasicTransformerBlock)] of every transformer block of the U-Net (each has one
    cross-attention to the text, attn2)."""
    return [(n, m) for n, m in unet.named_modules() if n.endswith(".transformer_blocks.0")]


def text_skipped(unet, text_scales):
    """Names of the transformer blocks whose cross-attention is skipped.

    "all" (ours, the default): the MLP's context goes into every cross-attention layer, the frozen
    ones at 1/1 and 1/2 of the latent included. "paper": App. A.2 injects the text "at two scales",
    1/4 and 1/8 (read as in trainable_parameter_names: the transformers at 1/4 and the mid-block at
    1/8). Our reading of where the text then does not go: the cross-attention of the 1/1 and 1/2
    levels is skipped (its residual adds nothing), rather than fed something else (e.g. SD2's own
    empty-prompt embedding), which the paper does not mention."""
    if text_scales == "all":
        return set()
    levels = len(unet.config.block_out_channels)
    fine = tuple(f"down_blocks.{i}." for i in range(levels - 2)) + tuple(
        f"up_blocks.{j}." for j in range(2, levels))       # down i / up j at 1/2^i / 1/2^(levels-1-j)
    return {n for n, _ in text_blocks(unet) if n.startswith(fine)}


def widen_conv_in(unet, in_channels=8):
    """conv_in 4 -> 8 input channels (Sec. 3.4): the pretrained kernel repeated on the input axis and
    halved, bias unchanged, so conv_in(cat([z, z])) equals the pretrained conv_in(z)."""
    old = unet.conv_in
    if old.in_channels == in_channels:
        return unet
    new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding,
                    device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        reps = in_channels // old.in_channels
        new.weight.copy_(old.weight.repeat(1, reps, 1, 1) / reps)
        new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.config.in_channels = in_channels
    return unet


def to_device(x, device):
    """A host tensor on `device` without a host synchronisation: on CUDA it is pinned, then copied
    asynchronously (a plain copy from pageable memory waits for the GPU)."""
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


class TextMLP(nn.Module):
    """Sec. 3.5: the small trainable projection from CLIP's text width (768 for ViT-L/14) to the
    U-Net's cross-attention width (1024 for SD2), applied to every one of the 77 tokens."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_out)
        self.fc2 = nn.Linear(d_out, d_out)

    def forward(self, h):  # (B, 77, d_in) -> (B, 77, d_out)
        return self.fc2(F.gelu(self.fc1(h)))


class TextHidden(nn.Module):
    """The CLIP text tower as the conditioner sees it. The paper is of two minds: Sec. 3.5 maps "the
    text embedding" with an MLP into the cross-attention, App. A.3 speaks of "its precomputed text
    embedding t_c", CLIP's pooled, projected embedding of the prompt. Ours (tokens, the default):
    the last hidden state after the final LN, 77 token states, as SD2 feeds its own text encoder's
    states to the same cross-attention. pooled=True: t_c alone, one context token.
    ids (B, 77) -> (B, 77, D), or (B, 1, E) pooled."""

    def __init__(self, clip, pooled=False):
        super().__init__()
        self.clip, self.pooled = clip, pooled

    def forward(self, ids):
        hidden, embedding = self.clip.text(ids)
        return embedding[:, None] if self.pooled else hidden


def _base_path(path, ckpt_dir, error):
    """A base-weights path from digseg.json: as it is if it exists (absolute, or relative to the
    working directory), else relative to the checkpoint folder."""
    for candidate in (path, os.path.join(ckpt_dir, path)):
        if os.path.exists(candidate):
            return os.path.abspath(candidate)
    raise WeightsError(error)
