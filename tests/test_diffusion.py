"""model/diffusion.py against diffusers' DDIMScheduler (the oracle), plus statistics of the
multi-resolution noise. Tolerance for the oracle comparisons: 1e-6 absolute (fp32)."""
import pytest
import torch
from diffusers import DDIMScheduler

from model.diffusion import (add_noise, ddim_step, ddim_timesteps, multires_noise, previous_timestep,
                             scaled_linear_alphas_cumprod, velocity)

T = 1000
AB = scaled_linear_alphas_cumprod()


def oracle(spacing, prediction="epsilon", zero_snr=False):
    # set_alpha_to_one=True: our final step goes to the clean limit alpha_bar = 1 (FACTS.md).
    return DDIMScheduler(num_train_timesteps=T, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=True, steps_offset=1, timestep_spacing=spacing,
                         prediction_type=prediction, rescale_betas_zero_snr=zero_snr)


def test_schedule_matches_diffusers():
    ref = oracle("leading").alphas_cumprod
    assert torch.allclose(AB, ref, atol=1e-7, rtol=0)
    assert abs(AB[0].item() - 0.99915) < 1e-6 and abs(AB[-1].item() - 0.0046601) < 1e-6


def test_zero_terminal_snr_option_matches_diffusers():
    ab = scaled_linear_alphas_cumprod(zero_terminal_snr=True)
    ref = oracle("trailing", zero_snr=True).alphas_cumprod
    assert ab[-1].item() < 1e-10  # SNR(T-1) = 0
    assert torch.allclose(ab, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("steps", [1, 2, 3, 4, 10, 25, 50])
def test_timesteps_identical(spacing, steps):
    s = oracle(spacing)
    s.set_timesteps(steps)
    ours = ddim_timesteps(steps, T, spacing)
    assert ours.dtype == torch.long
    assert ours.tolist() == s.timesteps.tolist()


def test_trailing_starts_from_pure_noise_and_leading_does_not():
    assert ddim_timesteps(1, spacing="trailing").tolist() == [999]
    assert ddim_timesteps(1, spacing="leading").tolist() == [1]
    assert ddim_timesteps(50, spacing="trailing")[[0, -1]].tolist() == [999, 19]
    assert ddim_timesteps(50, spacing="leading")[[0, -1]].tolist() == [981, 1]


def test_add_noise_and_velocity_match_diffusers():
    g = torch.Generator().manual_seed(0)
    z0, eps = torch.randn(3, 4, 8, 6, generator=g), torch.randn(3, 4, 8, 6, generator=g)
    t = torch.tensor([0, 500, 999])
    s = oracle("trailing")
    assert (add_noise(z0, eps, t, AB) - s.add_noise(z0, eps, t)).abs().max() <= 1e-6
    assert (velocity(z0, eps, t, AB) - s.get_velocity(z0, eps, t)).abs().max() <= 1e-6
    # a scalar t broadcasts over the batch
    assert torch.equal(add_noise(z0, eps, 500, AB), add_noise(z0, eps, torch.full((3,), 500), AB))


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
def test_single_steps_match_diffusers(prediction, spacing):
    g = torch.Generator().manual_seed(1)
    s = oracle(spacing, prediction)
    s.set_timesteps(10)
    for t in s.timesteps:
        z, pred = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
        ref = s.step(pred, t, z, eta=0.0).prev_sample
        ours = ddim_step(pred, z, t, previous_timestep(t, 10), AB, prediction)
        assert (ours - ref).abs().max() <= 1e-6


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.3, 1.0])
def test_stochastic_steps_match_diffusers(prediction, eta):
    """Eq. 7 with sigma_t (eta > 0): diffusers' step(eta, variance_noise) is the oracle."""
    g = torch.Generator().manual_seed(2)
    s = oracle("trailing", prediction)
    s.set_timesteps(4)
    for t in s.timesteps:
        z, pred, noise = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
        ref = s.step(pred, t, z, eta=eta, variance_noise=noise).prev_sample
        ours = ddim_step(pred, z, t, previous_timestep(t, 4), AB, prediction, eta=eta, noise=noise)
        assert (ours - ref).abs().max() <= 1e-5
        change = (ours - ddim_step(pred, z, t, previous_timestep(t, 4), AB, prediction)).abs().max()
        assert change > 1e-3 if previous_timestep(t, 4) >= 0 else change == 0    # sigma = 0 at the last step
    with pytest.raises(ValueError, match="needs noise"):
        ddim_step(pred, z, 999, 749, AB, prediction, eta=eta)


def fake_model(z, t):
    """A deterministic stand-in for the U-Net: any smooth function of (z, t) will do."""
    return torch.tanh(z * 0.7 + t / 1000.0) - 0.1 * z


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("steps", [1, 2, 3, 50])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_sampling_loops_match_diffusers(prediction, steps, spacing):
    z_T = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(2))
    s = oracle(spacing, prediction)
    s.set_timesteps(steps)
    ref = z_T.clone()
    for t in s.timesteps:
        ref = s.step(fake_model(ref, t), t, ref).prev_sample
    z = z_T.clone()
    for t in ddim_timesteps(steps, T, spacing):
        z = ddim_step(fake_model(z, t), z, t, previous_timestep(t, steps), AB, prediction)
    assert (z - ref).abs().max() <= 1e-6


def test_per_sample_timesteps_in_a_batch():
    g = torch.Generator().manual_seed(3)
    z, pred = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    both = ddim_step(pred, z, torch.tensor([999, 500]), torch.tensor([499, -1]), AB)
    assert torch.allclose(both[0], ddim_step(pred[:1], z[:1], 999, 499, AB)[0], atol=1e-7)
    assert torch.allclose(both[1], ddim_step(pred[1:], z[1:], 500, -1, AB)[0], atol=1e-7)


def test_one_trailing_step_with_a_perfect_model_recovers_x0():
    """At t_prev < 0 alpha_bar_prev = 1, so the last step returns the model's x0 estimate."""
    g = torch.Generator().manual_seed(4)
    x0, eps = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    z = add_noise(x0, eps, 999, AB)
    out = ddim_step(eps, z, 999, previous_timestep(999, 1), AB)
    assert (out - x0).abs().max() < 1e-4


def test_errors_name_the_valid_choices():
    with pytest.raises(ValueError, match="leading, linspace, trailing"):
        ddim_timesteps(10, spacing="uniform")
    with pytest.raises(ValueError, match=r"num_steps must be an integer in \[1, 1000\]"):
        ddim_timesteps(0)
    with pytest.raises(ValueError, match=r"\[1, 1000\], got 1001"):
        ddim_timesteps(1001)
    with pytest.raises(ValueError, match="epsilon, v_prediction, sample"):
        ddim_step(torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 8), 10, 0, AB, prediction="x0")


# ---- multi-resolution noise (App. A.1): statistics that would fail for a wrong implementation


def lag1_correlation(x):
    """Mean correlation between horizontally adjacent pixels, per sample."""
    a, b = x[..., :, :-1].flatten(1), x[..., :, 1:].flatten(1)
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (a * b).mean(1) / (a.std(1) * b.std(1))


def test_multires_noise_is_normalised_per_sample():
    t = torch.tensor([0, 250, 500, 999])
    eps = multires_noise((4, 4, 64, 48), t, generator=torch.Generator().manual_seed(0))
    assert eps.shape == (4, 4, 64, 48)
    assert eps.mean(dim=(1, 2, 3)).abs().max() < 1e-5
    assert (eps.var(dim=(1, 2, 3)) - 1).abs().max() < 1e-4


def test_annealed_noise_gets_smoother_with_t_and_is_white_at_t0():
    g = torch.Generator().manual_seed(0)
    ts = [0, 250, 500, 750, 999]
    corr = [lag1_correlation(multires_noise((8, 4, 64, 64), t, generator=g)).mean().item() for t in ts]
    assert abs(corr[0]) < 0.02  # plain Gaussian at t = 0
    assert all(a < b for a, b in zip(corr, corr[1:])), corr
    assert corr[-1] > 0.3
    plain = lag1_correlation(torch.randn(8, 4, 64, 64, generator=g)).mean().item()
    assert abs(plain) < 0.02


def test_non_annealed_noise_does_not_depend_on_t():
    a = multires_noise((2, 4, 32, 32), 0, annealed=False, generator=torch.Generator().manual_seed(5))
    b = multires_noise((2, 4, 32, 32), 999, annealed=False, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert lag1_correlation(a).mean() > 0.3


def test_multires_noise_deterministic_under_a_generator():
    a = multires_noise((2, 4, 24, 40), torch.tensor([10, 900]), generator=torch.Generator().manual_seed(7))
    b = multires_noise((2, 4, 24, 40), torch.tensor([10, 900]), generator=torch.Generator().manual_seed(7))
    c = multires_noise((2, 4, 24, 40), torch.tensor([10, 900]), generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_per_sample_t_in_one_batch():
    """Sample 0 at t = 0 is white, sample 1 at t = 999 is smooth, in one call (non-square)."""
    eps = multires_noise((2, 4, 32, 80), torch.tensor([0, 999]), generator=torch.Generator().manual_seed(9))
    c = lag1_correlation(eps)
    assert abs(c[0]) < 0.05 and c[1] > 0.3


def test_multires_levels_divide_the_previous_size_by_a_fresh_factor(monkeypatch):
    """The formula multires_noise's docstring writes: level i at floor(h_{i-1} / r_i), one r_i ~ U[2, 4)
    per level, down to 1 x 1 (Marigold's loop divides by r_i^i instead and adds a level at i = 0)."""
    import model.diffusion as diffusion
    sizes, factors, real_randn, real_rand = [], [], torch.randn, torch.rand

    def randn(shape, *a, **k):
        sizes.append(tuple(shape)[-2:])
        return real_randn(shape, *a, **k)

    def rand(shape, *a, **k):
        r = real_rand(shape, *a, **k)
        factors.append(2 + 2 * r.item())
        return r

    monkeypatch.setattr(diffusion.torch, "randn", randn)
    monkeypatch.setattr(diffusion.torch, "rand", rand)
    multires_noise((2, 4, 96, 64), 999, generator=torch.Generator().manual_seed(3))
    assert sizes[0] == (96, 64) and sizes[-1] == (1, 1) and len(sizes) == len(factors) + 1
    h, w = 96, 64
    for (hi, wi), r in zip(sizes[1:], factors):
        h, w = max(1, int(h / r)), max(1, int(w / r))
        assert (hi, wi) == (h, w)
