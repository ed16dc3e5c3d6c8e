"""Every path on a GPU, with the tiny models of the suite. Skipped where there is no CUDA (CI).

    python -m pytest -q -m cuda                      # on a machine with a GPU
    DIGSEG_TEST_DEVICE=cpu python -m pytest -q tests/test_cuda.py   # the same checks on the CPU under
                                                     # simulated CUDA, to check the tests themselves
                                                     # (memory and compile checks need CUDA and skip;
                                                     # CI runs tests/test_cuda_simulated.py instead)
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import train
from digseg import DiGSeg, prepare_image, size_multiple
from model import cuda
from model.cuda import tune_for_cuda
from model.diffusion import add_noise, ddim_sample, ddim_timesteps, multires_noise, scaled_linear_alphas_cumprod

DEVICE = os.environ.get("DIGSEG_TEST_DEVICE", "cuda")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="no CUDA device")]
needs_cuda = pytest.mark.skipif(DEVICE != "cuda", reason="measures CUDA memory or compiles CUDA kernels")


@pytest.fixture(autouse=True)
def cuda_branches_on_the_cpu(monkeypatch):
    """DIGSEG_TEST_DEVICE=cpu: the CPU takes the CUDA branches (simulated CUDA, model/cuda.py)."""
    if DEVICE == "cpu":
        monkeypatch.setenv(cuda.SIMULATE, "1")


def train_args(tiny_paths, out, **kw):
    base = dict(sd2=tiny_paths[0], clip=tiny_paths[1], dataset="toy", size=32, resolution=32, batch_size=2,
                max_steps=4, lr=1e-3, dtype="fp32", num_workers=0, log_every=1, save_every=100, out_dir=str(out),
                seed=3, device=DEVICE)
    base.update(kw)
    return [f"--{k}={v}" for k, v in base.items()]


def weights(out):
    return load_file(os.path.join(out, "checkpoint", "digseg.safetensors"))


def test_diffusion_math_agrees_with_the_cpu():
    ab_cpu = scaled_linear_alphas_cumprod()
    ab = ab_cpu.to(DEVICE)
    g = torch.Generator().manual_seed(0)
    z0, eps = torch.randn(4, 4, 16, 16, generator=g), torch.randn(4, 4, 16, 16, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    assert torch.allclose(add_noise(z0.to(DEVICE), eps.to(DEVICE), t.to(DEVICE), ab).cpu(), add_noise(z0, eps, t, ab_cpu),
                          atol=1e-6)
    noise = multires_noise((4, 4, 16, 16), t, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(noise).all() and abs(noise.std().item() - 1) < 0.05
    w = torch.randn(4, 4, generator=g)

    def run(device):                                 # a linear "network" through 4 trailing DDIM steps
        ww, a = w.to(device), ab_cpu.to(device)
        steps = []
        z = ddim_sample(lambda z, t: torch.einsum("oc,bchw->bohw", ww, z), z0.to(device), ddim_timesteps(4), a,
                        "v_prediction", trace=steps)
        return torch.stack([s["x0"] for s in steps]).cpu(), z.cpu()

    (x_dev, z_dev), (x_cpu, z_cpu) = run(DEVICE), run("cpu")
    assert torch.allclose(x_dev, x_cpu, atol=1e-4) and torch.allclose(z_dev, z_cpu, atol=1e-4)


def test_buffers_are_built_on_the_device_and_frozen_parts_stay_in_eval_mode(tiny_paths):
    model = DiGSeg.from_weights(*tiny_paths, resolution=32, device=DEVICE)
    assert model.unet.conv_in.weight.device.type == torch.device(DEVICE).type
    assert model.alphas_cumprod.device.type == "cpu"      # the one schedule stays on the host (model.diffusion._gather)
    model.train()
    assert model.unet.training and model.mlp.training
    assert not model.vae.training and not model.text_encoder.training and not model.clip.training
    g = [torch.Generator().manual_seed(i) for i in range(2)]
    loss = model.loss(torch.rand(2, 3, 32, 32, device=DEVICE) * 2 - 1, torch.ones(2, 32, 32, device=DEVICE),
                      ["a photo of a circle."] * 2, g)
    loss.backward()
    assert torch.isfinite(loss)


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_training_step_resume_and_dry_run(tiny_paths, tmp_path, dtype):
    full, cut = tmp_path / "full", tmp_path / "cut"
    train.train(train.parse_args(train_args(tiny_paths, full, dtype=dtype)))
    train.train(train.parse_args(train_args(tiny_paths, cut, dtype=dtype, stop_after=2)))
    train.train(train.parse_args([f"--resume={cut}"]))
    a, b = weights(full), weights(cut)
    assert a.keys() == b.keys() and all(torch.isfinite(v).all() for v in b.values())
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 4 * 1e-3, worst                   # GPU kernels may be non-deterministic: Adam's bound
    train.train(train.parse_args(train_args(tiny_paths, tmp_path / "dry", dtype=dtype, dry_run=1)))


def test_checkpoints_cross_between_cpu_and_device(tiny_paths, tmp_path):
    on_cpu, on_dev = tmp_path / "cpu", tmp_path / "dev"
    train.train(train.parse_args(train_args(tiny_paths, on_cpu, device="cpu", stop_after=2)))
    train.train(train.parse_args([f"--resume={on_cpu}", f"--device={DEVICE}"]))          # CPU -> device
    assert json.load(open(on_cpu / "checkpoint" / "progress.json"))["step"] == 4
    train.train(train.parse_args(train_args(tiny_paths, on_dev, stop_after=2)))
    train.train(train.parse_args([f"--resume={on_dev}", "--device=cpu"]))                 # device -> CPU
    model = DiGSeg.from_checkpoint(on_dev / "checkpoint", device="cpu")
    assert model.device.type == "cpu"


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 0.05), (torch.float16, 0.02)])
def test_segment_in_half_precision_matches_fp32(tiny_model, tmp_path, dtype, tol):
    tiny_model.save(tmp_path / "ckpt")
    image = torch.rand(3, 40, 56, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ref = DiGSeg.from_checkpoint(tmp_path / "ckpt", device=DEVICE).eval()
    half = DiGSeg.from_checkpoint(tmp_path / "ckpt", device=DEVICE, dtype=dtype).eval()
    p32 = ref.segment(image, ["circle", "star"], ensemble=2, steps=2)
    p16 = half.segment(image, ["circle", "star"], ensemble=2, steps=2)
    assert p16.dtype == torch.float32 and torch.isfinite(p16).all()
    assert (p16 - p32).abs().max().item() < tol
    tuned = tune_for_cuda(DiGSeg.from_checkpoint(tmp_path / "ckpt", device=DEVICE).eval(), frozen_dtype=torch.bfloat16)
    assert (tuned.segment(image, ["circle", "star"], ensemble=2, steps=2) - p32).abs().max().item() < 0.05   # bf16 VAE


@needs_cuda
def test_gradient_checkpointing_saves_memory_with_the_same_gradients(tiny_paths):
    model = DiGSeg.from_weights(*tiny_paths, resolution=32, device=DEVICE).train()
    x, m = torch.rand(8, 3, 128, 128, device=DEVICE) * 2 - 1, torch.ones(8, 128, 128, device=DEVICE)
    peaks, grads = {}, {}
    for on in (False, True):
        model.unet.gradient_checkpointing = on
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        model.loss(x, m, ["a photo of a star."] * 8, [torch.Generator().manual_seed(i) for i in range(8)]).backward()
        peaks[on] = torch.cuda.max_memory_allocated() - base
        grads[on] = model.unet.conv_in.weight.grad.clone()
    assert peaks[True] < 0.8 * peaks[False], peaks
    assert torch.allclose(grads[True], grads[False], atol=1e-5)


@needs_cuda
def test_compiled_unet_does_not_recompile_per_step(tiny_paths, tmp_path):
    import torch._dynamo
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    train.train(train.parse_args(train_args(tiny_paths, tmp_path / "c", compile=1, max_steps=2)))
    after_two = counters["stats"]["unique_graphs"]
    train.train(train.parse_args([f"--resume={tmp_path / 'c'}", "--max_steps=6"]))
    assert counters["stats"]["unique_graphs"] - after_two <= after_two      # at most one more compile (resume)


@pytest.mark.skipif(DEVICE != "cuda" or torch.cuda.device_count() < 2, reason="needs two GPUs (NCCL)")
def test_torchrun_nccl_two_gpus_equal_one(tiny_paths, tmp_path):
    train.train(train.parse_args(train_args(tiny_paths, tmp_path / "one", batch_size=2, max_steps=2, lr=1e-4)))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29561",
                        os.path.join(ROOT, "train.py"), *train_args(tiny_paths, tmp_path / "two", batch_size=1,
                                                                     max_steps=2, lr=1e-4, device="cuda")],
                       cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 2e-4


@needs_cuda
def test_segments_denoising_loop_makes_no_host_synchronisation(tiny_model):
    """The DDIM loop and the batching of segment() never wait for the GPU (set_sync_debug_mode:
    "error" turns any synchronising call into an exception): the schedule's scalars come from the
    host, timesteps are Python ints, the (class, member) pairs are contiguous chunks."""
    import copy
    model = copy.deepcopy(tiny_model).to(DEVICE).eval()
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        z_x = model.encode_image(prepare_image(image, 32, size_multiple(model.vae, model.unet))[0].to(DEVICE))
        ctx = model.context(["a photo of a circle.", "a photo of a star."])
        z_T = torch.randn(3, *z_x.shape[1:], generator=torch.Generator().manual_seed(1)).to(DEVICE)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            z0 = ddim_sample(model.predictor(z_x, ctx.repeat_interleave(3, dim=0)), z_T.repeat(2, 1, 1, 1),
                             ddim_timesteps(4), model.alphas_cumprod, model.cfg.target)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert z0.shape == (6, *z_x.shape[1:]) and torch.isfinite(z0).all()


@needs_cuda
def test_upcast_attention_stays_fp32_under_cuda_autocast(monkeypatch):
    """SDPA is on autocast's lower-precision list: an upcast attention (SD2-768-v) must run with
    autocast off on CUDA too, or fp16 training overflows where upcast exists to prevent it."""
    import model.attention as attention_module
    seen, real = [], attention_module.F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None):
        seen.append(q.dtype)
        out = real(q, k, v, attn_mask=attn_mask)
        seen.append(out.dtype)
        return out

    q = torch.randn(2, 64, 128, device=DEVICE) * 30           # logits far beyond fp16's range if not upcast
    monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention", spy)
    with torch.autocast("cuda", dtype=torch.float16):
        out = attention_module.attention(q, q, q, heads=2, upcast=True)
    assert seen == [torch.float32, torch.float32] and torch.isfinite(out).all()
