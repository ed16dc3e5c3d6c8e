"""Every CUDA-only branch, run on the CPU (simulated CUDA, model/cuda.py), so that CI sees them.

Why a simulated run can be trusted: the scripts ask one question, model.cuda.is_cuda(device),
before every CUDA-only branch, and make the few torch.cuda calls only through model/cuda.py. With
DIGSEG_SIMULATE_CUDA=1 the question is answered yes on the CPU, so each branch runs as written:
its attribute names, dtypes and arguments are checked by real tensors. What is answered on the
host instead is listed in model/cuda.py (pinning, memory figures, synchronize, set_device, DDP's
device_ids, the compile backend); test_the_stubs_are_the_only_difference checks that list. The
kernels themselves run in tests/test_cuda.py, on a GPU. Line coverage of these branches:
`bash .ci/cuda_coverage.sh` (README, "Tests").
"""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import bench
import digseg
import eval as evaluation
import sample
import train
from digseg import DiGSeg
from launch import UsageError, pick_device
from model import cuda

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def simulated(monkeypatch):
    monkeypatch.setenv(cuda.SIMULATE, "1")


def train_args(tiny_paths, out, **kw):
    base = dict(sd2=tiny_paths[0], clip=tiny_paths[1], dataset="toy", size=32, resolution=32, batch_size=2,
                max_steps=4, lr=1e-3, dtype="bf16", num_workers=0, log_every=1, save_every=100, out_dir=str(out),
                seed=3, device="cuda")
    base.update(kw)
    return [f"--{k}={v}" for k, v in base.items()]


def weights(out):
    return load_file(os.path.join(out, "checkpoint", "digseg.safetensors"))


def dtypes(module):
    return {p.dtype for p in module.parameters()}


def test_the_device_decision_and_the_stubs(simulated, monkeypatch, tiny_paths):
    cpu = torch.device("cpu")
    assert cuda.is_cuda(cpu) and not cuda.hardware(cpu)
    assert pick_device("cuda") == cpu and pick_device("auto") == cpu
    assert cuda.ddp_device_ids(cpu) is None and cuda.loader_pins(cpu) is torch.cuda.is_available()
    x = torch.arange(6.0)
    assert torch.equal(cuda.to_device(x, cpu), x)
    gib, what = cuda.peak_memory_gib(cpu)
    assert gib > 0 and "RSS" in what and "simulated CUDA" in cuda.device_name(cpu)
    monkeypatch.delenv(cuda.SIMULATE)
    assert not cuda.is_cuda(cpu) and torch.equal(cuda.to_device(x, cpu), x)
    model = DiGSeg.from_weights(*tiny_paths, resolution=32)
    assert cuda.tune_for_cuda(model, frozen_dtype=torch.bfloat16) is model and dtypes(model.vae) == {torch.float32}
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="no CUDA"):
            pick_device("cuda")


def test_tune_for_cuda_casts_every_frozen_network_and_the_model_still_trains_and_segments(simulated, tiny_paths):
    """The regression: tune_for_cuda read an attribute that had been renamed (proposal_clip ->
    proposer) and stopped every GPU run at load time."""
    torch.manual_seed(0)
    model = DiGSeg.from_weights(*tiny_paths, resolution=32)
    model.use_proposal_clip(tiny_paths[1])                      # a second CLIP, as eval.py --proposal_clip loads one
    assert model.proposer.clip is not model.clip
    cuda.tune_for_cuda(model, frozen_dtype=torch.bfloat16)
    for frozen in (model.vae, model.text_encoder, model.clip, model.proposer.clip):
        assert dtypes(frozen) == {torch.bfloat16}
    assert dtypes(model.unet) == {torch.float32} and dtypes(model.mlp) == {torch.float32}
    model.train()
    g = [torch.Generator().manual_seed(i) for i in range(2)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.loss(torch.rand(2, 3, 32, 32) * 2 - 1, torch.ones(2, 32, 32), ["a photo of a circle."] * 2, g)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(model.unet.conv_in.weight.grad).all()
    model.eval()
    probs = model.segment(torch.rand(3, 40, 24) * 2 - 1, ["circle", "star"], ensemble=2, steps=2)
    assert probs.shape == (2, 40, 24) and probs.dtype == torch.float32 and torch.isfinite(probs).all()
    classes, _ = model.propose_classes(torch.rand(3, 40, 24) * 2 - 1, ["circle", "star"], tau_global=-1)
    assert sorted(classes) == ["circle", "star"]


@pytest.mark.parametrize("extra", [dict(dtype="bf16"), dict(dtype="fp16"), dict(dtype="bf16", grad_checkpointing=1)])
def test_train_py_on_the_cuda_path_resumes_exactly(simulated, tiny_paths, tmp_path, capsys, extra):
    full, cut = tmp_path / "full", tmp_path / "cut"
    train.train(train.parse_args(train_args(tiny_paths, full, **extra)))
    train.train(train.parse_args(train_args(tiny_paths, cut, stop_after=2, **extra)))
    train.train(train.parse_args([f"--resume={cut}"]))
    a, b = weights(full), weights(cut)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)      # the CPU: bit-identical
    assert " GiB | ETA" in capsys.readouterr().out                                # the CUDA log line's memory


def test_train_py_dry_run_reports_memory_on_the_cuda_path(simulated, tiny_paths, tmp_path, capsys):
    train.train(train.parse_args(train_args(tiny_paths, tmp_path / "dry", dry_run=1)))
    assert "peak process memory (peak RSS)" in capsys.readouterr().out


def test_resuming_a_bf16_run_in_fp16_starts_a_fresh_scaler_and_says_so(simulated, tiny_paths, tmp_path, capsys):
    run = tmp_path / "run"
    train.train(train.parse_args(train_args(tiny_paths, run, max_steps=2)))
    train.train(train.parse_args([f"--resume={run}", "--dtype=fp16", "--max_steps=3"]))
    out = capsys.readouterr().out
    assert "not trained in fp16: GradScaler starts fresh (scale 65536)" in out and "done at step 3" in out
    train.train(train.parse_args([f"--resume={run}", "--dtype=bf16", "--max_steps=4"]))
    assert "its GradScaler state is not used in this dtype" in capsys.readouterr().out


def test_fp16_steps_that_gradscaler_skips_are_counted_and_reported(simulated, tiny_paths, tmp_path, capsys,
                                                                   monkeypatch):
    """A scale of 2^120 overflows fp16 in the backward pass at every step: GradScaler skips each
    update (the weights stay as they were) and halves its scale; train.py counts the skips, logs
    them like the NaN guard's, keeps the count in the checkpoint, and stops after max_bad_steps."""
    real = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler", lambda *a, **k: real(*a, **{**k, "init_scale": 2.0 ** 120}))
    out = tmp_path / "o"
    train.train(train.parse_args(train_args(tiny_paths, out, dtype="fp16", max_steps=3, grad_clip=0)))
    log = capsys.readouterr().out
    assert "step 0: fp16 gradients overflowed; GradScaler skipped the update" in log
    assert "(3 in a row, 3 in all)" in log and "3 fp16 overflows skipped" in log
    state = torch.load(out / "checkpoint" / "train_state.pt", weights_only=True)
    assert state["overflow_total"] == 3
    fresh = DiGSeg.from_weights(*tiny_paths, resolution=32)
    trained = weights(out)
    assert torch.equal(trained["unet.conv_in.weight"], fresh.unet.conv_in.weight)   # no update went through
    with pytest.raises(SystemExit, match="stopping: 2 fp16 overflows in a row since step 0"):
        train.train(train.parse_args(train_args(tiny_paths, tmp_path / "p", dtype="fp16", max_steps=5,
                                                max_bad_steps=2)))


def test_compiled_unet_compiles_once_for_every_ddim_timestep(simulated, tiny_model):
    """With static shapes, a Python-int timestep is a constant of the graph: before DiGSeg passed
    tensors, each of the S timesteps of a sampling run compiled a graph of its own."""
    import copy

    import torch._dynamo
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    model = cuda.tune_for_cuda(copy.deepcopy(tiny_model), compile=True)
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    model.segment(image, ["circle"], ensemble=1, steps=1)
    after_one = counters["stats"]["unique_graphs"]
    model.segment(image, ["circle"], ensemble=1, steps=4)       # three more timesteps: no new graph
    assert after_one >= 1 and counters["stats"]["unique_graphs"] == after_one, dict(counters["stats"])
    torch._dynamo.reset()


def test_train_py_compiled_does_not_recompile_per_step(simulated, tiny_paths, tmp_path):
    import torch._dynamo
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    train.train(train.parse_args(train_args(tiny_paths, tmp_path / "c", compile=1, max_steps=2)))
    after_two = counters["stats"]["unique_graphs"]
    train.train(train.parse_args(train_args(tiny_paths, tmp_path / "d", compile=1, max_steps=5)))
    assert 1 <= after_two and counters["stats"]["unique_graphs"] == after_two      # same shapes: nothing new
    torch._dynamo.reset()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_force_ddp_wraps_the_model_in_one_process(simulated, tiny_paths, tmp_path, monkeypatch):
    """--force_ddp=1 under torchrun --nproc_per_node=1 (its environment set here, gloo): the DDP
    branch of train.py, with a process group of one, gives the weights of a plain run."""
    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(k, v)
    seen = []
    real = train.DDP
    monkeypatch.setattr(train, "DDP", lambda model, **kw: seen.append(kw) or real(model, **kw))
    train.train(train.parse_args(train_args(tiny_paths, tmp_path / "ddp", force_ddp=1, max_steps=2)))
    assert seen == [{"device_ids": None}] and not torch.distributed.is_initialized()
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k)
    train.train(train.parse_args(train_args(tiny_paths, tmp_path / "plain", max_steps=2)))
    a, b = weights(tmp_path / "ddp"), weights(tmp_path / "plain")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    with pytest.raises(UsageError, match="--force_ddp=1 needs torchrun"):
        train.train(train.parse_args(train_args(tiny_paths, tmp_path / "x", force_ddp=1)))


def test_eval_copies_an_image_to_the_device_once_for_proposals_and_segments(simulated, tiny_model, monkeypatch):
    """A 2:1 image: the proposals' whole view and both tiles go to the device in one copy, the
    prepared image in one more; the proposals read the host image (no device -> host -> device)."""
    import model.proposals
    copies = []
    real = digseg.to_device
    for module in (digseg, model.proposals):
        monkeypatch.setattr(module, "to_device", lambda x, d: copies.append(tuple(x.shape)) or real(x, d))
    args = evaluation.parse(["--checkpoint=x", "--dataset=toy", "--tau_global=-1", "--ensemble=1", "--steps=1",
                             "--protocol=long"])
    image = torch.rand(3, 32, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    labels, probs, classes = evaluation.predict(tiny_model, image, ["circle", "star"], args)
    S = tiny_model.clip.config.vision_config.image_size
    assert len(copies) == 2 and copies[0] == (3, 3, S, S) and copies[1][:2] == (1, 3)   # the views; the image
    assert labels.shape == (32, 64) and sorted(classes) == [0, 1]


def test_eval_and_sample_on_the_cuda_path_in_half_precision(simulated, tiny_model, tmp_path):
    tiny_model.save(tmp_path / "ckpt")
    r = evaluation.main([f"--checkpoint={tmp_path / 'ckpt'}", "--dataset=toy", "--split=val", "--limit=2",
                         "--device=cuda", "--dtype=bf16", "--proposals=0", f"--out={tmp_path / 'ev'}"])
    assert 0 <= r["main"]["miou_gt"] <= 1
    from PIL import Image
    Image.new("RGB", (40, 24), (200, 30, 30)).save(tmp_path / "red.png")
    code = sample.main([str(tmp_path / "red.png"), f"--checkpoint={tmp_path / 'ckpt'}", "--classes=circle,star",
                        "--device=cuda", "--dtype=fp16", f"--out={tmp_path / 's'}", "--ensemble=1"])
    assert code == 0 and json.load(open(tmp_path / "s" / "red.json"))["settings"]["dtype"] == "fp16"


def test_bench_cuda_sections_run_on_the_toy_shapes(simulated, capsys):
    bench.main(["--device=cuda", "--shapes=toy", "--only=segment,e2e,choices,profile"])
    from benchmarks.cuda import Target, bench_cuda_train
    bench_cuda_train(Target(torch.device("cpu"), "toy", 64), batches=(2,))
    out = capsys.readouterr().out
    assert "simulated CUDA" in out and "E=8 S=2, 1 class" in out and "e2e       decoder checkpointing=1" in out
    assert "encode compiled" in out and "segment() E=1 S=1 one class" in out
    assert "checkpointing=1 compile=0 batch   2" in out and "compile=1 batch  16" in out


def test_bench_refuses_cuda_without_a_gpu_and_says_how_to_dry_run(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    monkeypatch.delenv(cuda.SIMULATE, raising=False)
    with pytest.raises(SystemExit, match="DIGSEG_SIMULATE_CUDA=1 python bench.py --device=cuda --shapes=toy"):
        bench.main(["--device=cuda"])


def test_gpu_quick_check_dry_run_on_the_cpu(tmp_path):
    """.ci/gpu.sh quick at the toy's shapes on the CPU under simulated CUDA: every step runs and
    reports rc 0, so the script cannot rot between GPU loans."""
    env = {**os.environ, "OUT": str(tmp_path / "out"), "GPU_WORLD": "tiny", "TMPDIR": str(tmp_path),
           "PY": sys.executable, "PYTHONPATH": ROOT}
    r = subprocess.run(["bash", os.path.join(ROOT, ".ci", "gpu.sh"), "quick"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=1200)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    steps = [line for line in log.splitlines() if line.startswith("   rc ")]
    assert len(steps) >= 10 and all(line == "   rc 0" for line in steps), log[-4000:]
    assert "loss continues exactly" in log and "DistributedDataParallel over 1 process(es), gloo" in log, log[-4000:]
    assert "8 attention calls inside fp16 autocast, dtypes ['torch.float32']" in log
