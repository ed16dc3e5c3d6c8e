"""DiGSeg: a pretrained Stable Diffusion 2 fine-tuned into a text-conditioned segmenter.

Read this file first. It follows the paper, top to bottom:
  Sec. 3.4  latent pathway        image and mask both go through the frozen SD VAE      encode_image, encode_mask
  Sec. 3.5  text conditioner      frozen CLIP text tower + trainable MLP -> cross-attention   context
  Sec. 3.6  training (Eq. 5, 6)   noise the mask latent (App. A.1), predict the noise, MSE    loss
  Sec. 3.7  inference (Eq. 7, 8)  DDIM-trailing from pure noise, ensemble in latent space     segment
  App. A.3  mask generation       segment, aggregate;  class label generation: propose_classes (model/proposals.py)
  App. A.2  what is trained       trainable_parameter_names, text_skipped
  then      building and saving   DiGSeg.from_weights / from_checkpoint / save, DiGSegConfig (at the end)
  beyond    one step, end to end  e2e.py (Garcia et al. 2024; not the paper), joined in forward() and segment()

Shapes: B batch, K classes, E ensemble members, (H, W) pixels, (h, w) = (H, W) / 8 latents.
The diffusion math is model/diffusion.py, the checkpoint format model/checkpoint.py, the GPU
tuning model/cuda.py.
"""
import math
import warnings
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import e2e
from data import pil_to_tensor
from model import checkpoint as ckpt_format
from model.cuda import to_device
from model.diffusion import (PREDICTIONS, add_noise, ddim_sample, ddim_timesteps, multires_noise, scaled_linear_alphas_cumprod,
                             velocity)
from model.proposals import ClassProposer
from model.weights import WeightsError, load_clip, load_sd2

ENSEMBLE = 8     # E, the seeds averaged in latent space (Eq. 8): the paper's "unless otherwise stated"


class DiGSeg(nn.Module):
    def __init__(self, cfg, unet, vae, vae_scale, text_encoder, tokenizer, mlp=None, clip=None):
        super().__init__()
        self.cfg = cfg.check()
        self.unet = unet            # trained; conv_in takes cat([z_x, z_t]) -> 8 channels
        self.vae = vae              # frozen
        self.vae_scale = vae_scale  # 0.18215 for SD2: latents are E(x).mean * scale
        self.text_encoder = text_encoder  # frozen: ids (B, 77) -> hidden (B, 77, D)
        self.tokenizer = tokenizer
        self.mlp = mlp              # trainable text projection (B, 77, D) -> (B, 77, 1024), None for text="sd2"
        self.clip = clip            # frozen CLIP (text conditioner, and its vision tower for the proposals); may be None
        self.proposer = ClassProposer(clip) if hasattr(clip, "image") else None   # App. A.3 (use_proposal_clip)
        self.decoder_checkpointing = False   # e2e: recompute the decoder's activations in the backward pass
        # SD2's schedule alpha_bar_t (T,), on the host: the timesteps are drawn there, and the sampler's
        # per-step scalars are read there (model.diffusion._gather)
        self.alphas_cumprod = scaled_linear_alphas_cumprod()
        self.clear_caches()
        for frozen in (vae, text_encoder, clip):
            if frozen is not None:
                frozen.requires_grad_(False)
        skipped = text_skipped(unet, cfg.text_scales)
        for name, block in text_blocks(unet):
            block.use_text = name not in skipped
        names = set(trainable_parameter_names(self, cfg.trainable, cfg.text_scales))
        for n, p in self.named_parameters():
            if n.startswith(("unet.", "mlp.")):
                p.requires_grad_(n in names)

    def train(self, mode=True):
        """Only the trained parts change mode (checkpointing acts in training mode); the frozen stay in eval."""
        super().train(mode)
        for frozen in (self.vae, self.text_encoder, self.clip, self.proposer):
            if frozen is not None:
                frozen.eval()
        return self

    def clear_caches(self):
        self._prompt_cache = {}     # prompt -> frozen text features (77, D)
        if getattr(self, "proposer", None) is not None:
            self.proposer.cache.clear()

    # ---- Sec. 3.4: the latent pathway ---------------------------------------------------

    def encode_image(self, x):
        """x (B, 3, H, W) in [-1, 1] -> z_x (B, 4, h, w): the mean of the VAE posterior, scaled.
        fp32 whatever the frozen VAE computes in, so the sampler and Eq. 5 never round to bf16."""
        return self.vae.encode(x.to(self.vae_dtype))[0].float() * self.vae_scale

    def encode_mask(self, y):
        """y (B, H, W) in {0, 1} -> z_y (B, 4, h, w): the mask as an image, 2y - 1 on 3 channels."""
        return self.encode_image(mask_to_image(y))

    def decode_mask(self, z):
        """z (B, 4, h, w) -> M (B, H, W) in [0, 1]: decode, mean over RGB, back from [-1, 1]."""
        return image_to_mask(self.vae.decode((z / self.vae_scale).to(self.vae_dtype)))

    # ---- Sec. 3.5: the text conditioner ---------------------------------------------------

    def text_hidden(self, prompts):
        """Frozen text tower: prompts -> (B, 77, D), or (B, 1, E) with text_embedding="pooled". Each prompt
        encoded once, alone: batched, its features would round by batch size (no bit-identical resume)."""
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

    # ---- Sec. 3.6: training (Eq. 5, Eq. 6) -----------------------------------------------

    def loss(self, images, masks, prompts, generators, t_max_share=0.0):
        """images (B, 3, H, W) in [-1, 1], masks (B, H, W) in {0, 1}, prompts: B strings -> scalar.
        generators: one per sample (train.py seeds them by (seed, epoch, index)), so that a sample's
        t and noise do not depend on the batch it is in. t_max_share: NOT the paper, which draws
        t ~ U{0..T-1}; this share of the samples trains at t = T-1, the only timestep one-step
        trailing inference visits (the toy preset, train.py)."""
        if len(generators) != len(images):
            raise ValueError(f"loss() needs one generator per sample: {len(generators)} for {len(images)} images")
        with torch.no_grad():
            z_x = self.encode_image(images)                       # (B, 4, h, w)
            z_y = self.encode_mask(masks)                         # (B, 4, h, w)
        t = torch.cat([self.sample_timestep(g, t_max_share) for g in generators])       # (B,) t ~ U{0..T-1}, host
        eps = torch.cat([self.sample_noise(z_y.shape[1:], t[i], g) for i, g in enumerate(generators)])
        eps = to_device(eps, self.device)
        z_t = add_noise(z_y, eps, t, self.alphas_cumprod)         # Eq. 5
        pred = self.predictor(z_x, self.context(prompts))(z_t, to_device(t, self.device))  # in: (B, 8, h, w)
        if self.cfg.target == "epsilon":
            target = eps
        elif self.cfg.target == "v_prediction":
            target = velocity(z_y, eps, t, self.alphas_cumprod)
        else:
            target = z_y
        return F.mse_loss(pred, target)                           # Eq. 6

    def forward(self, images, masks, prompts, generators, t_max_share=0.0, valid=None):
        """The training objective, what train.py minimises (DistributedDataParallel wraps forward):
        the paper's loss (Eq. 6), or with objective=e2e the end-to-end loss of e2e.py, over the
        annotated pixels (valid). One of the two places the e2e objective joins; segment() the other."""
        if self.cfg.objective == "e2e":
            return e2e.loss(self, images, masks, prompts, valid)
        return self.loss(images, masks, prompts, generators, t_max_share)

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

    def predictor(self, z_x, ctx):
        """The U-Net as the sampler sees it (model.diffusion.ddim_sample knows no model): (z_t, t) ->
        its output in float32, for N (prompt, noise) pairs: z_x (1 or N, 4, h, w) the image latent,
        ctx (N, 77, C), z_t (N, 4, h, w), t an int or (N,) tensor."""
        def predict(z_t, t):
            t = timestep_tensor(t, z_t) if isinstance(t, int) else t
            x = torch.cat([z_x.expand(len(z_t), -1, -1, -1), z_t], dim=1)          # (N, 8, h, w): Sec. 3.4
            return self.unet(x.to(self.unet_dtype), t, ctx).float()
        return predict

    # ---- Sec. 3.7 and App. A.3 "Mask generation": inference --------------------------------

    @torch.no_grad()
    def segment(self, image, class_names, ensemble=ENSEMBLE, steps=1, spacing="trailing", seed=0, batch_size=8, eta=0.0,
                long_side=None):
        """image: PIL image or (3, H, W) tensor in [-1, 1]; K class names -> probs (K, H, W) in [0, 1].
        For each class c and each member e: from z_T^e ~ N(0, I), S DDIM steps (Eq. 7) conditioned on
        c's prompt; the members averaged in latent space, then decoded (Eq. 8): M_c = (mean_RGB
        D(mean_e z_0^(c,e)) + 1) / 2. eta > 0: Eq. 7's sigma_t term. long_side: the working size's
        long side (default cfg.resolution; eval.py's protocols set it). The K x E (class, member)
        pairs are denoised batch_size at a time; member e's noise is seed + e's whatever the batch."""
        if len(class_names) == 0:
            raise ValueError("segment() needs at least one class name")
        if not isinstance(ensemble, int) or ensemble < 1:
            raise ValueError(f"the ensemble size E must be an integer >= 1, got {ensemble!r}")
        x, size, box = prepare_image(image, long_side or self.cfg.resolution, size_multiple(self.vae, self.unet))
        z_x = self.encode_image(to_device(x, self.device))                                      # (1, 4, h, w)
        ctx = self.context([self.cfg.prompt_template.format(c) for c in class_names])           # (K, 77, C)
        if self.cfg.objective == "e2e":
            z_T, noises = e2e.start(z_x, ensemble, steps, spacing, eta)                          # z_T = 0, (1, 4, h, w)
        else:
            z_T, noises = member_noise(z_x.shape[1:], ensemble, steps, seed, eta, self.device)   # (E, 4, h, w)
        K, E = len(ctx), len(z_T)
        ctx, z_T = ctx.repeat_interleave(E, dim=0), z_T.repeat(K, 1, 1, 1)                   # (K*E, ...), class-major
        noises = noises.repeat(1, K, 1, 1, 1) if noises is not None else None                  # (S, K*E, 4, h, w)
        timesteps = ddim_timesteps(steps, len(self.alphas_cumprod), spacing)
        z0 = []
        for i in range(0, K * E, batch_size):
            chunk = slice(i, i + batch_size)
            z0.append(ddim_sample(self.predictor(z_x, ctx[chunk]), z_T[chunk], timesteps, self.alphas_cumprod,
                                  self.cfg.target, eta, noises[:, chunk] if noises is not None else None))
        z0 = torch.cat(z0).view(K, E, *z_T.shape[1:]).mean(dim=1)            # (K, 4, h, w): Eq. 8, in latent space
        probs = torch.cat([self.decode_mask(z) for z in z0.split(batch_size)])                # (K, H', W')
        return crop_back(probs, box, size)                                                     # (K, H, W)

    # ---- App. A.3 "Class label generation" ----------------------------------------------

    def propose_classes(self, image, vocabulary, tau_global=0.25, tau_patch=0.3, template="A photo of a {}.",
                        synonyms=None):
        """The candidate classes of an image among `vocabulary` (distinct names; synonyms: their
        synonym lines) -> (classes, scores): ClassProposer, with the proposal CLIP if one is set
        (use_proposal_clip), else the conditioner's."""
        if self.proposer is None:
            raise ValueError("propose_classes needs a CLIP model with a vision tower (clip_path)")
        return self.proposer(image, vocabulary, tau_global, tau_patch, template, synonyms)

    def use_proposal_clip(self, path, vocab=None):
        """Propose classes with another CLIP than the conditioner's, e.g. ViT-B/16 (Table 1 lists
        DiGSeg with it) beside ViT-L/14 text (App. A.2). Frozen, not part of the checkpoint."""
        clip = load_clip(path, dtype=self.vae_dtype, device=self.device, vocab=vocab)
        if not hasattr(clip, "image"):
            raise WeightsError(f"{path}: a proposal CLIP needs a vision tower")
        self.proposer = ClassProposer(clip)
        return self

    # ---- building and saving (the format: model/checkpoint.py) ---------------------------------

    @classmethod
    def from_weights(cls, sd2_path, clip_path="", dtype=torch.float32, device="cpu", **options):
        """The pretrained pieces, conv_in widened, a fresh MLP; options: DiGSegConfig's fields."""
        return cls.from_config(DiGSegConfig(sd2=str(sd2_path), clip=str(clip_path), **options), dtype, device)

    @classmethod
    def from_config(cls, cfg, dtype=torch.float32, device="cpu"):
        cfg.check()
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
        widen_conv_in(sd.unet)
        return cls(cfg, sd.unet, sd.vae, sd.vae_scale, text_encoder, tokenizer, mlp, clip)

    @classmethod
    def from_checkpoint(cls, ckpt_dir, dtype=torch.float32, device="cpu", sd2=None, clip=None):
        """A saved DiGSeg: the base weights named in digseg.json, then the fine-tuned tensors."""
        return ckpt_format.load_tuned(cls.from_config(cls.config_of(ckpt_dir, sd2, clip), dtype, device), ckpt_dir)

    @staticmethod
    def config_of(ckpt_dir, sd2=None, clip=None):
        """The DiGSegConfig of a checkpoint folder; sd2=/clip= where the base weights have moved."""
        return DiGSegConfig(**ckpt_format.read_config(ckpt_dir, [f.name for f in fields(DiGSegConfig)], sd2, clip))

    def save(self, out_dir):
        ckpt_format.save(self, out_dir)

    @property
    def vae_dtype(self):
        return next(self.vae.parameters()).dtype

    @property
    def unet_dtype(self):
        return self.unet.conv_in.weight.dtype

    @property
    def device(self):
        return self.unet.conv_in.weight.device



# ---- the pieces of the method, as functions ---------------------------------------------------

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


def timestep_tensor(t, z):
    """An int timestep as a (N,) tensor on z's device, filled there (no copy, no host sync). The
    U-Net takes ints too, but a compiled U-Net (model.cuda.tune_for_cuda, static shapes) would
    treat each int as a constant of its graph and compile again for every DDIM timestep."""
    return torch.full((len(z),), t, device=z.device, dtype=torch.long)


def member_noise(shape, ensemble, steps, seed=0, eta=0.0, device="cpu"):
    """The ensemble's starting noises z_T (E, *shape), member e drawn on the CPU from a generator
    seeded seed + e, so that batching never changes a result; with eta > 0 also each member's step
    noises (S, E, *shape), from the same stream, else None. Both moved to `device`."""
    gens = [torch.Generator().manual_seed(seed + e) for e in range(ensemble)]
    draw = lambda: torch.stack([torch.randn(shape, generator=g) for g in gens])
    z_T = draw().to(device)
    return z_T, torch.stack([draw() for _ in range(steps)]).to(device) if eta > 0 else None


def size_multiple(vae, unet):
    """Pixel sizes must divide by the VAE's factor (8 for SD2) times the U-Net's (8): 64."""
    return 2 ** (len(vae.config.block_out_channels) - 1) * 2 ** (len(unet.config.block_out_channels) - 1)


def prepare_image(image, long_side, multiple):
    """Any image (PIL, or (3, H, W) in [-1, 1]) -> (1, 3, H', W') in [-1, 1]: the long side resized to
    `long_side` (small images are upscaled like any other), then padded (replicating the edge) to a
    multiple of `multiple` px. Also returns the original (H, W) and the box (top, left, h, w) of the
    content inside the padded image, so that masks go back to the original size (crop_back)."""
    if isinstance(image, Image.Image):
        image = pil_to_tensor(image)
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an image tensor (3, H, W) in [-1, 1], got shape {tuple(image.shape)}")
    H, W = image.shape[1:]
    scale = long_side / max(H, W)
    h, w = max(1, round(H * scale)), max(1, round(W * scale))
    x = F.interpolate(image[None].float(), size=(h, w), mode="bilinear", align_corners=False, antialias=scale < 1)
    ph, pw = math.ceil(h / multiple) * multiple - h, math.ceil(w / multiple) * multiple - w
    top, left = ph // 2, pw // 2
    x = F.pad(x, (left, pw - left, top, ph - top), mode="replicate")
    return x.clamp(-1, 1), (H, W), (top, left, h, w)


def crop_back(probs, box, size):
    """probs (K, H', W') of a prepared image -> (K, H, W) at the original size, in [0, 1]."""
    top, left, h, w = box
    probs = probs[:, top:top + h, left:left + w]
    return F.interpolate(probs[None], size=size, mode="bilinear", align_corners=False)[0].clamp(0, 1)


# ---- App. A.2: what is trained, and where the text goes ----------------------------------------

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
    quarter_down, quarter_up = f"unet.down_blocks.{levels - 2}.", "unet.up_blocks.1."   # 1/4 of the latent

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


# ---- Sec. 3.5: the text conditioner's modules ---------------------------------------------------

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


# ---- the configuration: what a checkpoint's digseg.json holds ------------------------------------

CHOICES = {                                # the values each DiGSegConfig setting may take
    "text": ("clip", "sd2"),
    "text_embedding": ("tokens", "pooled"),
    "trainable": ("all", "paper"),
    "text_scales": ("all", "paper"),
    "noise": ("gaussian", "multires", "multires_annealed"),
    "target": PREDICTIONS,
    "objective": ("diffusion", "e2e"),
    "mask_loss": ("bce_dice", "mse"),
}


@dataclass
class DiGSegConfig:
    sd2: str = ""                   # SD2 weights: a diffusers folder or a single-file checkpoint
    clip: str = ""                  # CLIP weights (HF folder or OpenAI .pt): the text conditioner, and the proposals
    clip_vocab: str = ""            # bpe_simple_vocab_16e6.txt.gz, for OpenAI CLIP files without a vocabulary
    text: str = "clip"              # CLIP text tower + MLP (Sec. 3.5), or SD2's own text encoder without an MLP
    text_embedding: str = "tokens"  # what the MLP maps: CLIP's 77 token states (ours), or its pooled embedding t_c
    trainable: str = "all"          # the whole U-Net + MLP, or App. A.2's set (trainable_parameter_names)
    text_scales: str = "all"        # text into every cross-attention (ours), or at 1/4 and 1/8 only (App. A.2)
    noise: str = "multires_annealed"  # Table 4's noise types (App. A.1)
    noise_strength: float = 0.9     # s of the multi-resolution noise (App. A.1)
    target: str = "epsilon"         # what the U-Net predicts (the paper: epsilon)
    objective: str = "diffusion"    # the paper's loss (Eq. 6), or e2e: one step through the decoder (NOT the paper)
    mask_loss: str = "bce_dice"     # objective=e2e: the loss on the decoded mask (mask_loss)
    resolution: int = 512           # inference: the image's long side is resized to this (the paper: 512)
    prompt_template: str = "a photo of a {}."   # the prompt of class c

    def check(self):
        for key, allowed in CHOICES.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"unknown {key} {getattr(self, key)!r}; valid: {', '.join(allowed)}")
        if not 0 <= self.noise_strength <= 1:
            raise ValueError(f"noise_strength {self.noise_strength}: expected a number in [0, 1] (App. A.1's s: level i "
                             f"weighs (s t / T)^i, so s > 1 would let the coarsest noise outweigh the white noise)")
        if self.text == "sd2" and self.text_embedding != "tokens":
            raise ValueError("text_embedding='pooled' needs text='clip': SD2's own encoder feeds its token states")
        return self
