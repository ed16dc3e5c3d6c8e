"""Beyond the paper: the one-step model fine-tuned end to end (Garcia et al. 2024, "Fine-tuning
image-conditional diffusion models is easier than you think", did it for depth and normals).

The paper trains DiGSeg with the diffusion loss (Eq. 6) and samples with DDIM. Here every sample
is at t = T-1 with the mask-latent input zeros, so the U-Net's output gives x0_hat in one step;
x0_hat goes through the frozen decoder *with* its autograd graph, and the decoded mask M_c is
compared with the ground truth in pixel space (mask_loss). At test time the same computation is
segment()'s one trailing step from z_T = 0.

It joins digseg.DiGSeg at one seam, `objective="e2e"` in its config: DiGSeg.forward (the
training objective) calls `loss` here, and DiGSeg.segment starts from `start` here.
"""
import warnings

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from model.diffusion import predicted_x0_and_eps

LOGIT_SCALE = 6.0     # bce_dice reads M_c = 0.5 as an even chance and M_c = 1 (0) as sigmoid(+-6), near certain


def mask_loss(m, y, valid=None, kind="bce_dice"):
    """The e2e objective's loss between M (B, H, W), decoded and not clamped, and the mask y (B, H, W)
    in {0, 1}, over the valid pixels (all when valid is None).
      mse:      the pixel mean of (M - y)^2;
      bce_dice: binary cross-entropy on the logit k (2M - 1), k = LOGIT_SCALE, so that M = 0.5,
                inference's background threshold, is the decision boundary and no pixel, however far
                outside [0, 1] it decodes, loses its gradient; plus the soft Dice loss of each sample
                on sigmoid(logit), smoothed by 1, so that a small shape weighs as much as a large one."""
    valid = torch.ones_like(y) if valid is None else valid.float()
    n = valid.sum().clamp(min=1)
    if kind == "mse":
        return ((m - y) ** 2 * valid).sum() / n
    logit = LOGIT_SCALE * (2 * m - 1)
    bce = (F.binary_cross_entropy_with_logits(logit, y, reduction="none") * valid).sum() / n
    p, y = torch.sigmoid(logit) * valid, y * valid
    dice = 1 - (2 * (p * y).sum(dim=(1, 2)) + 1) / (p.sum(dim=(1, 2)) + y.sum(dim=(1, 2)) + 1)
    return bce + dice.mean()


def loss(model, images, masks, prompts, valid=None):
    """images (B, 3, H, W) in [-1, 1], masks (B, H, W) in {0, 1} -> scalar: the U-Net's one step at
    t = T-1 from z_T = 0 (model.predictor, as segment() runs it) -> x0_hat -> the frozen decoder
    with its graph -> M_c, the channel mean as at inference but not clamped -> mask_loss against
    the mask, over the annotated pixels (valid)."""
    T = len(model.alphas_cumprod)
    with torch.no_grad():
        z_x = model.encode_image(images)                                   # (B, 4, h, w)
    z_T = torch.zeros_like(z_x)
    pred = model.predictor(z_x, model.context(prompts))(z_T, T - 1)
    x0, _ = predicted_x0_and_eps(pred, z_T, T - 1, model.alphas_cumprod, model.cfg.target)
    z = (x0 / model.vae_scale).to(model.vae_dtype)
    rgb = checkpoint(model.vae.decode, z, use_reentrant=False) if model.decoder_checkpointing else model.vae.decode(z)
    with torch.autocast(model.device.type, enabled=False):                # the loss in fp32
        m = (rgb.float().mean(dim=1) + 1) / 2                              # (B, 3, H, W) -> (B, H, W), not clamped
        return mask_loss(m, masks.float(), valid, model.cfg.mask_loss)


def start(z_x, ensemble, steps, spacing, eta):
    """segment()'s starting latents for an e2e checkpoint -> (z_T = 0 (1, 4, h, w), no step noises).
    It is one computation: one trailing step at t = T-1 from z_T = 0, as it was trained. Other
    steps, a spacing or eta would run something it was not trained for: refused. An ensemble of E
    members would be E identical copies: one is run, with a warning."""
    if steps != 1 or spacing != "trailing" or eta != 0:
        raise ValueError(f"this checkpoint was fine-tuned end to end (objective=e2e): it segments in one "
                         f"deterministic step, steps=1 spacing=trailing eta=0; got steps={steps} spacing={spacing} eta={eta}")
    if ensemble > 1:
        warnings.warn(f"objective=e2e: the {ensemble} ensemble members would be identical (z_T = 0); one is run")
    return torch.zeros_like(z_x), None
