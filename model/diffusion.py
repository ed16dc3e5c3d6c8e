"""The diffusion math of DiGSeg: schedule, forward noising, DDIM, multi-resolution noise.

Pure functions over tensors, no model inside. Names follow the paper (Sec. 3): `alpha_bar`
is DDPM's cumulative product of (1 - beta), which the DDIM paper calls alpha.
T = 1000 training timesteps, t in {0, ..., T-1}.
"""

import numpy as np
import torch
import torch.nn.functional as F

SPACINGS = ("leading", "linspace", "trailing")
PREDICTIONS = ("epsilon", "v_prediction", "sample")


def scaled_linear_alphas_cumprod(T=1000, beta_start=0.00085, beta_end=0.012, zero_terminal_snr=False):
    """SD2's training schedule: betas linear in sqrt-space, alpha_bar_t = prod_{s<=t} (1 - beta_s).

    alpha_bar_0 = 0.99915, alpha_bar_999 = 0.0046601 (diffusers DDIMScheduler, LDM "linear").
    """
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float32) ** 2
    if zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)
    return torch.cumprod(1.0 - betas, dim=0)  # (T,)


def rescale_zero_terminal_snr(betas):
    """OPTIONAL, off by default (SD2 does not use it). Lin et al. 2024, "Common diffusion noise
    schedules and sample steps are flawed", Alg. 1: shift sqrt(alpha_bar) so that the last value
    is 0 (pure noise at t = T-1, SNR 0) and rescale so the first is unchanged. Marigold v1.1
    pairs it with trailing timesteps. A model must be trained with it to sample with it."""
    sqrt_ab = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    alpha_bar = sqrt_ab**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1.0 - alphas


def _gather(alphas_cumprod, t, like):
    """alpha_bar_t for a timestep t (an int, or a 0-d or (B,) tensor), shaped to broadcast against
    `like` (B, C, H, W). An int gives a 0-d tensor of the schedule's device, which torch takes as a
    scalar on any device: no copy, nothing read back. DiGSeg keeps its one schedule on the host with
    its timesteps (drawn there), so a training step copies B numbers to the device (without waiting
    for it) and never reads one back."""
    if isinstance(t, int):
        return alphas_cumprod[t].to(like.dtype)
    t = torch.as_tensor(t, device=alphas_cumprod.device)
    a = alphas_cumprod[t.long()].to(like.device, like.dtype, non_blocking=True)
    return a.reshape(-1, *([1] * (like.dim() - 1))) if a.dim() else a


def add_noise(z0, eps, t, alphas_cumprod):
    """Eq. 5: z_t = sqrt(alpha_bar_t) z_0 + sqrt(1 - alpha_bar_t) eps."""
    a = _gather(alphas_cumprod, t, z0)
    return a.sqrt() * z0 + (1 - a).sqrt() * eps


def velocity(z0, eps, t, alphas_cumprod):
    """The v target (Salimans & Ho 2022): v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) z_0."""
    a = _gather(alphas_cumprod, t, z0)
    return a.sqrt() * eps - (1 - a).sqrt() * z0


def predicted_x0_and_eps(pred, z_t, t, alphas_cumprod, prediction="epsilon"):
    """Turn a network output of any parameterisation into the pair (x0, eps) at timestep t."""
    a = _gather(alphas_cumprod, t, z_t)
    if prediction == "epsilon":
        eps = pred
        x0 = (z_t - (1 - a).sqrt() * eps) / a.sqrt()
    elif prediction == "v_prediction":
        x0 = a.sqrt() * z_t - (1 - a).sqrt() * pred
        eps = a.sqrt() * pred + (1 - a).sqrt() * z_t
    elif prediction == "sample":
        x0 = pred
        eps = (z_t - a.sqrt() * x0) / (1 - a).sqrt()
    else:
        raise ValueError(f"unknown prediction type {prediction!r}; valid: {', '.join(PREDICTIONS)}")
    return x0, eps


def ddim_timesteps(num_steps, T=1000, spacing="trailing", steps_offset=1):
    """The S timesteps DDIM visits, descending (LongTensor), as diffusers' DDIMScheduler sets them.

    leading : 0, T//S, 2T//S, ... (+ steps_offset, 1 for SD2): the largest is ~T - T//S, so a
              1-step sampler starts from t = 1 -- almost clean -- and cannot denoise pure noise.
    linspace: S points from 0 to T-1, rounded.
    trailing: T-1, T-1-T/S, ... (Lin et al. 2024): the first step always starts at t = T-1,
              where z_T is (nearly) pure noise. This is DiGSeg's "DDIM-trailing" (Sec. 4.3): even
              S = 1 goes from pure noise to a mask in one network call.
    """
    if spacing not in SPACINGS:
        raise ValueError(f"unknown timestep spacing {spacing!r}; valid: {', '.join(SPACINGS)}")
    if not isinstance(num_steps, int) or not 1 <= num_steps <= T:
        raise ValueError(f"num_steps must be an integer in [1, {T}], got {num_steps!r}")
    if spacing == "leading":
        ts = torch.arange(num_steps) * (T // num_steps) + steps_offset
    elif spacing == "linspace":
        ts = torch.from_numpy(np.linspace(0, T - 1, num_steps).round())
    else:
        ts = torch.from_numpy(np.arange(T, 0, -T / num_steps).round()) - 1
    return ts.long().sort(descending=True).values


def previous_timestep(t, num_steps, T=1000):
    """The t_prev diffusers' DDIMScheduler steps to: t - T//S, whatever the listed timesteps are.

    With trailing spacing and an S that does not divide T this differs from the next listed
    timestep (S = 3: 999 -> 666 -> 333, where the list has 332). Our sampler uses this rule too,
    so that it matches the reference implementation step for step. t_prev < 0 means "clean".
    """
    return t - T // num_steps


def ddim_step(pred, z_t, t, t_prev, alphas_cumprod, prediction="epsilon", eta=0.0, noise=None):
    """One DDIM step, Eq. 7:

        z_{t_prev} = sqrt(alpha_bar_prev) x0_hat + sqrt(1 - alpha_bar_prev - sigma_t^2) eps_hat + sigma_t z
        sigma_t = eta sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t)) sqrt(1 - alpha_bar_t / alpha_bar_prev)

    Eq. 7 is printed with sigma_t; Sec. 4.1 samples deterministically, so eta = 0 (sigma_t = 0, no
    noise) is the default and the paper's setting; eta = 1 is the ancestral (DDPM-like) step, and
    then `noise` (z ~ N(0, I), shaped like z_t) must be given. Same formula as diffusers'
    DDIMScheduler.step(eta, variance_noise).

    t_prev < 0 is the final step: alpha_bar_prev = 1, so the step returns x0_hat itself (the clean
    limit; diffusers' set_alpha_to_one=True. SD2's scheduler config would use alpha_bar_0 instead),
    and sigma_t = 0 there whatever eta is.
    """
    x0, eps = predicted_x0_and_eps(pred, z_t, t, alphas_cumprod, prediction)
    return ddim_update(x0, eps, z_t, t, t_prev, alphas_cumprod, eta, noise)


def ddim_update(x0, eps, z_t, t, t_prev, alphas_cumprod, eta=0.0, noise=None):
    """Eq. 7 from the pair (x0_hat, eps_hat) that the network's output implies (ddim_step)."""
    if isinstance(t_prev, int):
        a_prev = _gather(alphas_cumprod, t_prev, z_t) if t_prev >= 0 else torch.ones((), dtype=z_t.dtype)
    else:
        t_prev = torch.as_tensor(t_prev, device=alphas_cumprod.device)
        one = torch.ones((), dtype=alphas_cumprod.dtype, device=alphas_cumprod.device)
        a_prev = torch.where(t_prev >= 0, alphas_cumprod[t_prev.clamp(min=0).long()], one)
        a_prev = a_prev.to(z_t.device, z_t.dtype, non_blocking=True)
        a_prev = a_prev.reshape(-1, *([1] * (z_t.dim() - 1))) if a_prev.dim() else a_prev
    if eta == 0:
        return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps  # Eq. 7, sigma_t = 0
    if noise is None:
        raise ValueError("ddim_step with eta > 0 needs noise (z ~ N(0, I), shaped like z_t)")
    a_t = _gather(alphas_cumprod, t, z_t)
    sigma = eta * ((1 - a_prev) / (1 - a_t)).sqrt() * (1 - a_t / a_prev).sqrt()
    return a_prev.sqrt() * x0 + (1 - a_prev - sigma ** 2).sqrt() * eps + sigma * noise.to(z_t)   # Eq. 7


def ddim_sample(predict, z_T, timesteps, alphas_cumprod, prediction="epsilon", eta=0.0, noises=None, trace=None):
    """The DDIM sampler (Eq. 7; eta = 0 by default, see ddim_step): from z_T, one step per listed
    timestep (ddim_timesteps) -> the sample z_0. The sampler knows nothing of the model: `predict`
    (z_t, t) -> the network output closes over it and over any conditioning.

    eta > 0 needs `noises`: one N(0, I) tensor shaped like z_T per step. trace: a list that gets,
    for every step, a dict a reader can look at:

        t       the timestep of this step (an int)  z_t    the latent it starts from
        pred    predict(z_t, t), the network output in its own parameterisation
        x0      the clean latent that output implies (x0_hat)
        z_prev  the latent after the step; the last step's z_prev is the sample
    """
    S, T, z = len(timesteps), len(alphas_cumprod), z_T
    if eta > 0 and (noises is None or len(noises) < S):
        raise ValueError(f"ddim_sample with eta = {eta} needs one noise tensor per step ({S})")
    # The schedule and the timesteps on the host, as Python numbers: each step's alpha_bar is then a
    # host scalar, and the loop never waits for the GPU (a 0-d CUDA index, or a timestep copied to the
    # device, would be a host synchronisation at every step).
    ab = alphas_cumprod.detach().cpu()
    for i, t in enumerate(torch.as_tensor(timesteps).tolist()):
        pred = predict(z, t)
        x0, eps = predicted_x0_and_eps(pred, z, t, ab, prediction)
        z_prev = ddim_update(x0, eps, z, t, previous_timestep(t, S, T), ab, eta, noises[i] if eta > 0 else None)
        if trace is not None:
            trace.append({"t": t, "z_t": z, "pred": pred, "x0": x0, "z_prev": z_prev})
        z = z_prev
    return z


def multires_noise(shape, t, T=1000, strength=0.9, annealed=True, levels=None, generator=None,
                   device=None, dtype=torch.float32):
    """App. A.1: annealed multi-resolution noise for the mask latent. What the loop computes:

        eps = normalise( eps_0 + sum_{i=1..L} w_i(t) * up(eps_i) ),   eps_0, eps_i ~ N(0, I)
        eps_i at (h_i, w_i), h_i = max(1, floor(h_{i-1} / r_i)), h_0 = H (w_i alike),  r_i ~ U[2, 4)

    so level i is at about H / (r_1 r_2 ... r_i): each level divides the previous one's size by a
    fresh factor, drawn once per level and shared by the batch. up() is bilinear back to (H, W);
    the levels stop at 1 x 1 (or after `levels`). Per-sample weights, s = 0.9:
        annealed:  w_i(t) = (s * t / T)^i      not annealed:  w_i = s^i
    normalise: each sample to zero mean and unit variance.

    Marigold's `multi_res_noise_like` (prs-eth/Marigold, src/util/multi_res_noise.py, its default
    "original" strategy), which App. A.1 builds on, differs in three ways: its loop starts at i = 0,
    adding a second full-resolution Gaussian with weight 1; it divides the running size by r_i^i,
    not r_i (sizes H / (r_1 r_2^2 ... r_i^i)), stopping when either side reaches 1; and it divides
    by one std over the whole batch, without removing the mean. Its annealing is the same, strength
    s * t / T.

    The appendix formula is garbled in our copy of the paper; this is our reading of its stated
    intent: low-frequency components are strong at large t (coarse structure is destroyed first)
    and fade as t -> 0, where the noise becomes plain Gaussian. Sec. 3.6 describes the schedule
    the other way round (which frequencies dominate when); we follow App. A.1, which matches the
    annealing of Marigold that the paper builds on. The other reading would weight level i by
    (s (1 - t/T))^i; it is not implemented.

    shape: (B, C, H, W); t: int or (B,) per-sample timesteps; levels: how many coarse levels
    (None: until the coarse grid is 1x1). Returns (B, C, H, W).
    """
    B, C, H, W = shape
    eps = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    t = torch.as_tensor(t, dtype=torch.float32, device=eps.device).expand(B)
    s = strength * t / T if annealed else torch.full((B,), float(strength), device=eps.device)
    s = s.reshape(B, 1, 1, 1)
    h, w = H, W
    for i in range(1, (levels or 64) + 1):
        if h == 1 and w == 1:
            break
        r = 2 + 2 * torch.rand((), generator=generator, device=device).item()
        h, w = max(1, int(h / r)), max(1, int(w / r))
        low = torch.randn((B, C, h, w), generator=generator, device=device)  # eps_i at (h_i, w_i)
        eps = eps + s**i * F.interpolate(low, size=(H, W), mode="bilinear", align_corners=False)
    eps = eps - eps.mean(dim=(1, 2, 3), keepdim=True)
    eps = eps / eps.std(dim=(1, 2, 3), keepdim=True)
    return eps.to(dtype)
