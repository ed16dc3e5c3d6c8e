"""Train DiGSeg (Sec. 3.6, Eq. 6). One file, read top to bottom.

    python train.py --preset=toy                                   # CPU, minutes
    torchrun --nproc_per_node=8 train.py --preset=ade20k --sd2=PATH --clip=PATH --out_dir=out/ade
    python train.py --resume=out/ade                               # continues exactly where it stopped
    python train.py --preset=ade20k --sd2=PATH --clip=PATH --dry_run=1   # check the setup, one step
    python train.py --help                                         # every setting, from `Settings`

Every field of `Settings` is a `--key=value` flag. DDP comes from the torchrun environment
(RANK, LOCAL_RANK, WORLD_SIZE); only rank 0 logs and saves. Total batch = batch_size x GPUs x
grad_accum (the paper: 16 = 2 x 8 x 1, 512 x 512, AdamW lr 1e-4, 30k steps).

Checkpoints: out_dir/checkpoint/ is always the newest; the `keep` - 1 before it stay beside it as
checkpoint-<step>/. Each holds digseg.safetensors + digseg.json (what sample.py and eval.py load),
train_state.pt (optimizer, RNG, data position), settings.json and progress.json. A fresh run
refuses an out_dir that holds checkpoints unless --overwrite=1; --resume writes into the run's
folder, or into --out_dir when given.

Reproducibility: the data order comes from a seeded DistributedSampler per epoch, augmentation
and the class drawn per sample are seeded by (seed, epoch, index) in data/, and the timestep
and noise of every sample by (seed, epoch, index) here. So a run is the same whether it runs on
1 process with batch 2 or on 2 processes with batch 1, and a resumed run is bit-identical to an
uninterrupted one (on CPU; GPU kernels may be non-deterministic).
"""
import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler

import data
import digseg
from digseg import DiGSeg, DiGSegConfig, aggregate
from launch import (DTYPES, POSITIVE, SHARE, UsageError, apply_flags, check_ranges, checkpoint_step, checkpoints,
                    find_checkpoint, parse_settings, prepare_out_dir, run, save_checkpoint, split_flags, start_processes,
                    stop_processes, wants_help)
from metrics import confusion_matrix, miou
from model import cuda
from plot import line_plot


@dataclass
class Settings(DiGSegConfig):
    # the model: every field of digseg.DiGSegConfig (sd2, clip, text, trainable, noise, target, ...)
    # data (data/)
    dataset: str = "toy"             # toy, a benchmark of data.DATASETS, or folder (your own)
    data_root: str = "datasets"      # the dataset's folder (merged sets: ROOT1,ROOT2)
    size: int = 512                  # training crop (the paper: 512)
    fraction: float = 1.0            # data-efficiency experiment: 1, 1/2, ... 1/16 (fixed, seeded subset)
    p_absent: float = 0.0            # probability of drawing an absent class with an empty mask
    t_max_share: float = 0.0         # share of samples trained at t = T-1 (not the paper: toy preset)
    check_data: bool = True          # read every label map once before step 1 (not for the toy world)
    # optimisation
    batch_size: int = 2              # per process
    grad_accum: int = 1              # micro-batches per optimizer step
    max_steps: int = 30000           # optimizer steps
    lr: float = 1e-4                 # AdamW's learning rate (the paper: 1e-4)
    weight_decay: float = 1e-2       # ours (the paper states AdamW and lr only): AdamW's usual default
    warmup_steps: int = 0            # linear warmup from 0
    decay: str = "constant"          # after warmup, down to min_lr at max_steps
    min_lr: float = 0.0              # the end of the decay
    grad_clip: float = 1.0           # ours, 0 = off (the paper names no clipping)
    seed: int = 0                    # the data order, classes, timesteps and noise of every sample
    # precision, memory and speed
    dtype: str = "bf16"              # autocast dtype, ours (the paper names none); GradScaler only for fp16
    grad_checkpointing: bool = False  # recompute U-Net activations in the backward pass: less memory
    decoder_checkpointing: bool = False  # objective=e2e: recompute the VAE decoder's activations too
    compile: bool = False            # torch.compile the U-Net and VAE encoder (static shapes; step 1 compiles)
    # where it runs
    device: str = "auto"             # auto | cpu | cuda | cuda:N
    num_workers: int = 2             # data loader processes
    force_ddp: bool = False          # wrap the model in DDP in one process too (torchrun --nproc_per_node=1): the DDP path on one GPU
    # the run folder: checkpoints, resuming, starting from another run
    out_dir: str = "out/train"       # checkpoints, settings and the loss curve
    overwrite: bool = False          # a fresh run may replace the checkpoints in out_dir
    keep: int = 2                    # checkpoints kept in out_dir (checkpoint/ + keep - 1 older)
    save_every: int = 1000           # steps between checkpoints
    stop_after: int = 0              # stop this run after N steps (a time-boxed job); --resume goes on
    resume: str = ""                 # a run's out_dir (its newest checkpoint) or one checkpoint folder
    change_processes: bool = False   # resume with another number of processes (changes the data order)
    init: str = ""                   # start from a trained checkpoint's weights and model settings (e.g. e2e on top)
    # what it reports, and when it stops itself
    log_every: int = 10              # steps between log lines
    val_every: int = 0               # steps between validations (0 = none)
    val_images: int = 8              # validation images, segmented with E = 1, S = 1
    tau_bg: float = 0.5              # validation's background threshold (as eval.py's)
    max_bad_steps: int = 20          # consecutive non-finite losses before stopping
    dry_run: bool = False            # build from the weights, run one step at batch 1, report, exit
    debug: bool = False              # show tracebacks of errors


CHOICES = {**digseg.CHOICES, "dataset": ("toy", *data.DATASETS), "decay": ("constant", "cosine", "linear"),
           "dtype": tuple(DTYPES), "device": ("auto", "cpu", "cuda")}
RANGES = {**{k: POSITIVE for k in ("batch_size", "grad_accum", "max_steps", "keep", "log_every", "save_every",
                                   "max_bad_steps")},
          **{k: SHARE for k in ("p_absent", "t_max_share", "fraction", "noise_strength")}}

# The paper's recipe (Sec. 4.1), said once: 512^2 crops, total batch 16 = 2 per GPU x 8 GPUs, AdamW
# 1e-4, 30k steps. Ours, not the paper's: warmup 500 steps, weight decay 0.01 and grad clip 1.0 (the
# Settings defaults), bf16 autocast, and trainable=all (the whole U-Net).
PAPER = dict(size=512, resolution=512, batch_size=2, grad_accum=1, max_steps=30000, lr=1e-4, warmup_steps=500,
             dtype="bf16")

PRESETS = {
    # The toy world (toy.py): tiny models pretrained on procedural shapes, trained on a CPU in minutes.
    # Its departures from the paper, each measured in docs/results.md ("The toy preset"):
    #  - target v_prediction: the toy U-Net starts from scratch, and with epsilon one trailing step
    #    from t = 999 amplifies its error by 1 / sqrt(alpha_bar_999) = 14.6;
    #  - p_absent 0.3: evaluation scores every class, so the model must learn to answer an absent
    #    class with an empty mask, which it never sees with p_absent = 0;
    #  - t_max_share 0.75: one-step trailing inference only runs the U-Net at t = T-1, which uniform
    #    t almost never trains; the other quarter keeps uniform t, so that multi-step sampling
    #    (Fig. 8) still has a model to run;
    #  - size 48: random 48 px crops of the 64 px scenes, segmented whole, as the paper trains on
    #    512 px crops of larger images (a step costs about 2/3 of one on whole scenes);
    #  - resolution 128: scenes are segmented at twice their side. The toy VAE downsamples 4x, so
    #    a 64 px scene is a 16 x 16 latent, coarse for shapes a few latent cells wide: even the
    #    ground truth loses its edges through the VAE at 64 px, far fewer at 128, and the model,
    #    trained at 1x, segments the enlarged scenes better (toyworld/ceiling.py). Inference only:
    #    training stays at 48 px crops;
    #  - 1600 steps of the (32, 64) toy U-Net: a narrower net learns faster per second than the
    #    (64, 128) one; segmented at 128 px, 1600 steps are past what fewer steps reach over seeds
    #    (smaller crops, a higher lr, a narrower VAE or cached latents were worse).
    # dtype fp32 here; toy.py passes bf16 where the CPU or a GPU computes it natively.
    "toy": dict(dataset="toy", sd2="out/toy/sd2", clip="out/toy/clip", size=48, resolution=128, target="v_prediction",
                p_absent=0.3, t_max_share=0.75, batch_size=16, max_steps=1600, lr=1e-3, warmup_steps=50,
                decay="cosine", min_lr=1e-4, dtype="fp32", num_workers=0, log_every=50, save_every=500,
                out_dir="out/toy/digseg"),
    # The paper's recipe (PAPER, above) on each of its training sets; the -paper presets train App.
    # A.2's set instead of the whole U-Net (our reading: digseg.trainable_parameter_names; the run's
    # first line prints the count).
    "ade20k": dict(PAPER, dataset="ade150", data_root="datasets/ADEChallengeData2016", out_dir="out/ade20k"),
    "coco-stuff": dict(PAPER, dataset="cocostuff171", data_root="datasets/coco", out_dir="out/coco-stuff"),
    "ade20k-paper": dict(PAPER, dataset="ade150", data_root="datasets/ADEChallengeData2016", trainable="paper",
                         out_dir="out/ade20k-paper"),
    "coco-stuff-paper": dict(PAPER, dataset="cocostuff171", data_root="datasets/coco", trainable="paper",
                             out_dir="out/coco-stuff-paper"),
}


def parse_args(argv):
    """--preset=NAME first, then --key=value overrides, typed and checked by the Settings fields
    (launch.parse_settings). --resume=DIR starts from the settings the run was started with
    (its settings.json), then the overrides."""
    if wants_help(argv) or not any(a.startswith("--resume=") for a in argv):
        s = parse_settings(Settings, argv, __doc__, CHOICES, RANGES, PRESETS)
    else:
        kv, _ = split_flags(argv)
        ckpt = find_checkpoint(kv["resume"])
        with open(os.path.join(ckpt, "settings.json")) as f:
            saved = json.load(f)
        unknown = sorted(set(saved) - {f.name for f in fields(Settings)})
        if unknown:
            raise UsageError(f"{ckpt}/settings.json: unknown settings {unknown}")
        s = Settings(**saved)
        s.out_dir, s.stop_after, s.overwrite, s.dry_run = os.path.dirname(ckpt), 0, False, False
        s = check_ranges(apply_flags(s, kv, CHOICES), RANGES)
    for key in ("sd2", "clip", "clip_vocab"):       # absolute, so a resume from elsewhere finds them
        setattr(s, key, os.path.abspath(getattr(s, key)) if getattr(s, key) else "")
    return s


def model_config(s):
    """The DiGSegConfig part of the settings."""
    return DiGSegConfig(**{f.name: getattr(s, f.name) for f in fields(DiGSegConfig)})


# ---- schedule, seeds, data order ------------------------------------------------------------------

def lr_at(step, s):
    """Linear warmup, then constant / cosine / linear decay to min_lr at max_steps."""
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    if s.decay == "constant":
        return s.lr
    p = (step - s.warmup_steps) / max(1, s.max_steps - s.warmup_steps)
    f = 0.5 * (1 + math.cos(math.pi * p)) if s.decay == "cosine" else 1 - p
    return s.min_lr + (s.lr - s.min_lr) * f


def sample_generators(seed, epoch, indices, n):
    """One generator per sample, seeded by (seed, epoch, dataset index): the timestep and noise of
    a sample do not depend on how the batch is split across processes or accumulation steps."""
    return [torch.Generator().manual_seed(seed * 1_000_003 + epoch * n + i) for i in indices]


def epoch_batches(sampler, epoch, batch_size):
    """The per-process list of index batches of one epoch (DistributedSampler order, seeded)."""
    sampler.set_epoch(epoch)
    idx = list(sampler)
    return [idx[i:i + batch_size] for i in range(0, len(idx) - batch_size + 1, batch_size)]


def batch_stream(train_set, sampler, s, epoch, position, pin=False):
    """(epoch, position, indices, batch) from a saved data position onwards, forever; `position`
    is the number of this epoch's batches consumed, this one included (what a checkpoint saves).
    pin: batches in page-locked memory, so that their copies to the GPU do not wait."""
    while True:
        plan = epoch_batches(sampler, epoch, s.batch_size)
        train_set.set_epoch(epoch)
        loader = DataLoader(train_set, batch_sampler=plan[position:], num_workers=s.num_workers,
                            collate_fn=data.collate, pin_memory=pin)
        for indices, batch in zip(plan[position:], loader):
            position += 1
            yield epoch, position, indices, batch
        epoch, position = epoch + 1, 0


# ---- checkpoints (the run folder itself: launch.py) ----------------------------------------------

def load_checkpoint(ckpt, s, device):
    """-> (model, train state) of a checkpoint folder, the base weights from s.sd2 / s.clip."""
    model = DiGSeg.from_checkpoint(ckpt, device=device, sd2=s.sd2 or None, clip=s.clip or None)
    state = torch.load(os.path.join(ckpt, "train_state.pt"), map_location="cpu", weights_only=True)
    return model, state


def check_processes(state, s, count):
    """The total batch and data order of a run depend on its number of processes: a resume with
    another one is refused unless --change_processes=1. Then the data position is carried over as the
    number of samples consumed in the epoch."""
    saved = state.get("processes", state.get("world", 1))     # "world": checkpoints before the rename
    if saved == count:
        return state["position"]
    if not s.change_processes:
        raise UsageError(
            f"this run was trained with {saved} processes (total batch {s.batch_size} x {saved} x {s.grad_accum} = "
            f"{s.batch_size * saved * s.grad_accum}); resuming with {count} would change the total batch and the data "
            f"order. Resume it with torchrun --nproc_per_node={saved}, or pass --change_processes=1 (and, to keep the "
            f"total batch, --grad_accum={s.batch_size * saved * s.grad_accum // (s.batch_size * count)})")
    return state["position"] * saved // count


# ---- validation and the setup check ---------------------------------------------------------------

@torch.no_grad()
def validate(model, val_set, n, device, tau_bg):
    """mIoU on the first n validation images through the method's own segment() (all classes)."""
    names = val_set.class_names
    cm = 0
    for i in range(min(n, len(val_set))):
        image, labels, _ = val_set[i]
        probs = model.segment(image.to(device), names, ensemble=1, steps=1)
        cm = cm + confusion_matrix(aggregate(probs, tau_bg).cpu(), labels, len(names), val_set.ignore_index)
    return miou(cm)["miou_gt"]


def dry_run(model, optimizer, s, device, autocast):
    """One training step at batch 1 on a random image at the training size: checks that the
    weights load, the step fits in memory, and reports the peak memory."""
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, s.size, s.size, generator=g).to(device) * 2 - 1
    mask = (torch.rand(1, s.size, s.size, generator=g) > 0.5).float().to(device)
    t0 = time.time()
    with autocast:
        loss = model(image, mask, [s.prompt_template.format("cat")], [g])
    loss.backward()
    optimizer.step()
    dt = time.time() - t0
    peak, where = cuda.peak_memory_gib(device)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"dry run: loss {loss.item():.4f}, one step at batch 1 and {s.size}px took {dt:.1f} s; "
          f"peak {where}: {peak:.2f} GiB; parameters {sum(p.numel() for p in model.parameters()):,}, "
          f"trainable {n_train:,}")


def make_optimizer(model, s):
    """AdamW, no weight decay on biases and norms; fused into one kernel per step, on CUDA and on the
    CPU alike (faster than the per-tensor loop: docs/results.md)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": s.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=s.lr, betas=(0.9, 0.999), fused=True)


# ---- training ----------------------------------------------------------------------------------------

def train(s):
    procs = start_processes(s.device, s.force_ddp)
    device, master = procs.device, procs.master
    log = print if master else (lambda *a, **k: None)
    torch.manual_seed(s.seed + procs.rank)
    autocast = torch.autocast(device.type, dtype=DTYPES[s.dtype]) if s.dtype != "fp32" else nullcontext()
    scaler = torch.amp.GradScaler(device.type, enabled=s.dtype == "fp16")

    # ---- model and optimizer
    ckpt = find_checkpoint(s.resume) if s.resume else None
    if master and not s.dry_run:
        prepare_out_dir(s, (checkpoint_step(ckpt), ckpt) if ckpt else None)
    if ckpt:
        model, state = load_checkpoint(ckpt, s, device)
    elif s.init:                                  # fine-tune a trained DiGSeg further, e.g. with objective=e2e
        model = DiGSeg.from_checkpoint(s.init, device=device)
        model.cfg.objective, model.cfg.mask_loss = s.objective, s.mask_loss
        for f in fields(DiGSegConfig):            # its model settings, recorded in settings.json for --resume
            setattr(s, f.name, getattr(model.cfg, f.name))
        log(f"initialised from {s.init} ({model.cfg.trainable}, {model.cfg.target}); objective {s.objective}")
    else:
        model = DiGSeg.from_config(model_config(s), device=device)
    model.train()                                 # the U-Net and MLP; the frozen parts stay in eval mode
    model.unet.gradient_checkpointing = s.grad_checkpointing
    model.decoder_checkpointing = s.decoder_checkpointing
    cuda.tune_for_cuda(model, frozen_dtype=torch.bfloat16 if s.dtype == "bf16" else None, compile=s.compile)
    optimizer = make_optimizer(model, s)
    params = [p for p in model.parameters() if p.requires_grad]
    log(f"parameters: {sum(p.numel() for p in model.parameters()):,} in all, "
        f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable ({s.trainable}); "
        f"unet {sum(p.numel() for p in model.unet.parameters()):,}, vae {sum(p.numel() for p in model.vae.parameters()):,}")
    if s.dry_run:
        dry_run(model, optimizer, s, device, autocast)
        stop_processes(procs)
        return model
    step, epoch, position, losses, bad_total, overflow_total = 0, 0, 0, [], 0, 0
    if ckpt:
        optimizer.load_state_dict(state["optimizer"])
        load_scaler(scaler, state["scaler"], log)
        torch.set_rng_state(state["rng_cpu"])
        step, epoch, losses, bad_total = state["step"], state["epoch"], state["losses"], state["bad_total"]
        overflow_total = state.get("overflow_total", 0)
        position = check_processes(state, s, procs.count)
        log(f"resumed from {ckpt} at step {step} (epoch {epoch}, batch {position}); saving into {s.out_dir}")
    ddp_model = DDP(model, device_ids=cuda.ddp_device_ids(device)) if procs.ddp else model
    if procs.ddp:
        log(f"DistributedDataParallel over {procs.count} process(es), {dist.get_backend()}")

    # ---- data
    train_set = data.build(s.dataset, s.data_root, "train", size=s.size, fraction=s.fraction,
                           template=s.prompt_template, p_absent=s.p_absent, seed=s.seed)
    if s.check_data and s.dataset != "toy" and master:
        problems = train_set.check()
        if problems:
            raise data.DataError(f"{len(problems)} bad label maps in {s.data_root}, e.g.: {problems[0]}\n" +
                                 "\n".join(problems[1:]))
    val_set = data.build(s.dataset, s.data_root, "val", seed=s.seed, evaluation=True) if s.val_every else None
    sampler = DistributedSampler(train_set, num_replicas=procs.count, rank=procs.rank, shuffle=True, seed=s.seed,
                                 drop_last=True)
    total_batch = s.batch_size * procs.count * s.grad_accum
    log(f"data: {len(train_set)} {s.dataset} samples; total batch {total_batch} = "
        f"{s.batch_size} per process x {procs.count} processes x {s.grad_accum} accumulation steps")
    stream = batch_stream(train_set, sampler, s, epoch, position, pin=cuda.loader_pins(device))

    # ---- the loop: accumulate, check the loss is finite on every rank, clip, step, log, save
    start_step, bad_in_a_row, first_bad, t0, seen = step, 0, None, time.time(), 0
    scale, overflows_in_a_row = scaler.get_scale() if scaler.is_enabled() else None, 0
    while step < s.max_steps:
        lr = lr_at(step, s)
        for g in optimizer.param_groups:
            g["lr"] = lr
        total = torch.zeros((), device=device)
        for micro in range(s.grad_accum):
            epoch, position, indices, batch = next(stream)
            gens = sample_generators(s.seed, epoch, indices, len(train_set))
            last = micro == s.grad_accum - 1
            with ddp_model.no_sync() if procs.ddp and not last else nullcontext():
                with autocast:
                    loss = ddp_model(batch["image"].to(device, non_blocking=True),
                                     batch["mask"].to(device, non_blocking=True), batch["prompt"], gens,
                                     s.t_max_share, batch["valid"].to(device, non_blocking=True))
                scaler.scale(loss / s.grad_accum).backward()
            total += loss.detach().float() / s.grad_accum
            seen += len(indices) * procs.count
        finite = torch.isfinite(total).float()
        if procs.ddp:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)   # all ranks skip together
        finite, value = torch.stack([finite, total]).tolist()   # the one host sync of a step
        if finite == 0:
            optimizer.zero_grad(set_to_none=True)
            bad_in_a_row, bad_total = bad_in_a_row + 1, bad_total + 1
            first_bad = step if bad_in_a_row == 1 else first_bad
            log(f"step {step}: non-finite loss ({value}); step skipped ({bad_in_a_row} in a row, {bad_total} in all)")
            if bad_in_a_row >= s.max_bad_steps:
                raise SystemExit(diverged_message(s, bad_in_a_row, first_bad))
            continue
        bad_in_a_row = 0
        if s.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if scaler.is_enabled():      # fp16 only, one more host sync: did GradScaler skip the update?
            scale, before = scaler.get_scale(), scale
            overflows_in_a_row = overflows_in_a_row + 1 if scale < before else 0
            if overflows_in_a_row:
                overflow_total += 1
                log(f"step {step}: fp16 gradients overflowed; GradScaler skipped the update and lowered its scale "
                    f"to {scale:g} ({overflows_in_a_row} in a row, {overflow_total} in all)")
                if overflows_in_a_row >= s.max_bad_steps:
                    raise SystemExit(diverged_message(s, overflows_in_a_row, step - overflows_in_a_row + 1,
                                                      "fp16 overflows"))
        step += 1
        losses.append((step, value))

        if master and (step % s.log_every == 0 or step == s.max_steps):
            rate = seen / (time.time() - t0)          # over the steps since the last log line
            t0, seen = time.time(), 0
            memory = f" | {cuda.peak_memory_gib(device)[0]:.1f} GiB" if cuda.is_cuda(device) else ""
            print(f"step {step}/{s.max_steps} | loss {losses[-1][1]:.4f} | lr {lr:.2e} | {rate:.1f} img/s{memory} | "
                  f"ETA {(s.max_steps - step) * total_batch / max(rate, 1e-9) / 60:.1f} min", flush=True)
        if master and val_set is not None and step % s.val_every == 0:
            model.eval()
            print(f"step {step}: val mIoU {validate(model, val_set, s.val_images, device, s.tau_bg):.4f}", flush=True)
            model.train()
        done = step == s.max_steps or (s.stop_after and step - start_step >= s.stop_after)
        if master and (step % s.save_every == 0 or done):
            save_checkpoint(s.out_dir, model, {
                "step": step, "epoch": epoch, "position": position, "losses": losses, "bad_total": bad_total,
                "overflow_total": overflow_total,
                "processes": procs.count, "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "rng_cpu": torch.get_rng_state()}, s)
        if done:
            break

    if master:
        xs, ys = zip(*losses) if losses else ((), ())
        line_plot(os.path.join(s.out_dir, "loss.png"), {"train loss": (xs, ys)}, title="DiGSeg training loss (Eq. 6)",
                  xlabel="step", logy=True)
        skipped = f"; {bad_total} non-finite losses and {overflow_total} fp16 overflows skipped" if bad_total or \
            overflow_total else ""
        print(f"done at step {step}{skipped}; checkpoint in {s.out_dir}/checkpoint, loss curve in {s.out_dir}/loss.png")
    stop_processes(procs)
    return model


def load_scaler(scaler, saved, log):
    """GradScaler's state from a checkpoint. Only fp16 runs have one: resuming a bf16 or fp32 run
    with --dtype=fp16 starts a fresh scaler, and the other way round drops the saved one; both said."""
    if scaler.is_enabled() and not saved:
        log(f"this run was not trained in fp16: GradScaler starts fresh (scale {scaler.get_scale():g})")
    elif saved and not scaler.is_enabled():
        log("this run was trained in fp16: its GradScaler state is not used in this dtype")
    else:
        scaler.load_state_dict(saved)


def diverged_message(s, bad_in_a_row, first_bad, what="non-finite losses"):
    """The NaN stop names the newest checkpoint saved before the first non-finite loss of the streak:
    a checkpoint at step k holds the weights the loss of step k was computed with, so one at
    k >= first_bad may already be diverged."""
    before = [(k, f) for k, f in checkpoints(s.out_dir) if k < first_bad]
    where = (f"the newest checkpoint from before the divergence is {before[-1][1]} (step {before[-1][0]}): "
             f"--resume={before[-1][1]} with a lower --lr" if before else
             f"no checkpoint from before step {first_bad} is left; start again with a lower --lr")
    return f"stopping: {bad_in_a_row} {what} in a row since step {first_bad}. {where}, or --dtype=fp32."


def main(argv):
    train(parse_args(argv))


if __name__ == "__main__":
    run(main)
