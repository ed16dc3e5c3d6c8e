"""Train DiGSeg (Sec. 3.6, Eq. 6). One file, read top to bottom.

    python train.py --preset=toy                                   # CPU, minutes
    torchrun --nproc_per_node=8 train.py --preset=ade20k --sd2=PATH --clip=PATH --out_dir=out/ade
    python train.py --resume=out/ade                               # continues exactly where it stopped
    python train.py --preset=ade20k --sd2=PATH --clip=PATH --dry_run=1   # check the setup, one step

Every field of `Settings` is a `--key=value` flag. DDP comes from the torchrun environment
(RANK, LOCAL_RANK, WORLD_SIZE); only rank 0 logs and saves. Total batch = batch_size x GPUs x
grad_accum (the paper: 16 = 2 x 8 x 1, 512 x 512, AdamW lr 1e-4, 30k steps).

Reproducibility: the data order comes from a seeded DistributedSampler per epoch, augmentation
and the class drawn per sample are seeded by (seed, epoch, index) in data.py, and the timestep
and noise of every sample by (seed, epoch, index) here. So a run is the same whether it runs on
1 process with batch 2 or on 2 processes with batch 1, and a resumed run is bit-identical to an
uninterrupted one (on CPU; GPU kernels may be non-deterministic).
"""
import json
import math
import os
import resource
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler

import data
from digseg import DiGSeg, aggregate
from eval import confusion_matrix, miou
from plot import line_plot


@dataclass
class Settings:
    # model (digseg.DiGSegConfig)
    sd2: str = ""                    # diffusers SD2 folder or single-file checkpoint
    clip: str = ""                   # CLIP folder / OpenAI .pt (text conditioner)
    clip_vocab: str = ""             # bpe_simple_vocab_16e6.txt.gz for OpenAI .pt files
    text: str = "clip"               # clip | sd2
    trainable: str = "all"           # all | paper (App. A.2)
    noise: str = "multires_annealed"  # gaussian | multires | multires_annealed (Table 4)
    target: str = "epsilon"          # epsilon | v_prediction | sample
    resolution: int = 512            # inference resolution (validation)
    # data (data.py)
    dataset: str = "toy"             # toy | ade150 | ade847 | pc59 | pc459 | cocostuff171 | cityscapes19 | folder | ...
    data_root: str = "data"
    size: int = 512                  # training crop (the paper: 512)
    fraction: float = 1.0            # data-efficiency experiment: 1, 1/2, ... 1/16 (fixed, seeded subset)
    prompt_template: str = "a photo of a {}."
    p_absent: float = 0.0            # probability of drawing an absent class with an empty mask
    # optimisation
    batch_size: int = 2              # per process
    grad_accum: int = 1
    max_steps: int = 30000
    lr: float = 1e-4
    weight_decay: float = 1e-2
    warmup_steps: int = 0
    decay: str = "constant"          # constant | cosine | linear (after warmup, down to min_lr)
    min_lr: float = 0.0
    grad_clip: float = 1.0           # 0 = off
    dtype: str = "bf16"              # fp32 | bf16 | fp16 (autocast; GradScaler only for fp16)
    grad_checkpointing: bool = False
    compile: bool = False
    # bookkeeping
    out_dir: str = "out/train"
    seed: int = 0
    device: str = "auto"             # auto | cpu | cuda
    num_workers: int = 2
    log_every: int = 10
    save_every: int = 1000
    val_every: int = 0               # 0 = no validation during training
    val_images: int = 8
    max_bad_steps: int = 20          # consecutive non-finite losses before stopping
    stop_after: int = 0              # stop this run after N steps (a time-boxed job); --resume goes on
    resume: str = ""                 # an out_dir to continue
    dry_run: bool = False            # build from the weights, run one step at batch 1, report, exit


PRESETS = {
    # The toy world: tiny models pretrained on procedural shapes; trains on a CPU in minutes.
    # v-prediction here (the paper: epsilon): the toy U-Net starts from scratch, and one trailing
    # step from t = 999 with epsilon amplifies its error by 1/sqrt(alpha_bar_999) = 14.6 (toy mIoU
    # 0.01 with epsilon vs 0.06-0.08 with v after 1000 steps, measured on an earlier, harder toy
    # world). x0 prediction (--target=sample) ties with v: val mIoU 0.546 vs 0.549 at 1500 steps.
    "toy": dict(dataset="toy", sd2="out/toy/sd2", clip="out/toy/clip", size=64, resolution=64, target="v_prediction",
                batch_size=16, max_steps=1500, lr=1e-3, warmup_steps=50, decay="cosine", min_lr=1e-4,
                dtype="fp32", num_workers=0, log_every=50, save_every=500, out_dir="out/toy/digseg"),
    # The paper's recipe (Sec. 4.1): 512^2, total batch 16 on 8 GPUs, AdamW 1e-4, 30k steps.
    "ade20k": dict(dataset="ade150", data_root="data/ADEChallengeData2016", size=512, resolution=512,
                   batch_size=2, grad_accum=1, max_steps=30000, lr=1e-4, warmup_steps=500,
                   dtype="bf16", out_dir="out/ade20k"),
    "coco-stuff": dict(dataset="cocostuff171", data_root="data/coco", size=512, resolution=512,
                       batch_size=2, grad_accum=1, max_steps=30000, lr=1e-4, warmup_steps=500,
                       dtype="bf16", out_dir="out/coco-stuff"),
}


def parse_args(argv):
    """--preset=NAME first, then --key=value overrides, typed by the Settings fields."""
    kv = {}
    for a in argv:
        if not a.startswith("--") or "=" not in a:
            raise SystemExit(f"arguments look like --key=value, got {a!r}")
        k, v = a[2:].split("=", 1)
        kv[k] = v
    preset = kv.pop("preset", None)
    if preset is not None and preset not in PRESETS:
        raise SystemExit(f"unknown preset {preset!r}; valid: {', '.join(PRESETS)}")
    s = Settings(**PRESETS.get(preset, {}))
    if "resume" in kv:                  # continue with the settings the run was started with
        with open(os.path.join(find_checkpoint(kv["resume"]), "settings.json")) as f:
            s = Settings(**{**json.load(f), "stop_after": 0})
    types = {f.name: f.type for f in fields(Settings)}
    for k, v in kv.items():
        if k not in types:
            raise SystemExit(f"unknown setting --{k}; valid: {', '.join(types)}")
        t = types[k]
        setattr(s, k, v.lower() in ("1", "true", "yes") if t in (bool, "bool") else
                (int(v) if t in (int, "int") else float(v) if t in (float, "float") else v))
    return s


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


def save_checkpoint(out_dir, model, state, s):
    """Atomic: everything goes to checkpoint.tmp/ (each file fsynced), which then replaces
    checkpoint/ by renames, so a crash at any moment leaves one complete checkpoint."""
    tmp, final, old = (os.path.join(out_dir, n) for n in ("checkpoint.tmp", "checkpoint", "checkpoint.old"))
    shutil.rmtree(tmp, ignore_errors=True)
    model.save(tmp)                                   # trainable weights (safetensors) + config (JSON)
    torch.save(state, os.path.join(tmp, "train_state.pt"))  # optimizer, scaler, RNG, data position
    with open(os.path.join(tmp, "settings.json"), "w") as f:
        json.dump(asdict(s), f, indent=2)
    for name in ("train_state.pt", "settings.json"):
        with open(os.path.join(tmp, name), "rb") as f:
            os.fsync(f.fileno())
    if os.path.isdir(final):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(out_dir):
    for name in ("checkpoint", "checkpoint.old"):    # .old only if a crash hit between the renames
        d = os.path.join(out_dir, name)
        if os.path.isfile(os.path.join(d, "train_state.pt")):
            return d
    raise SystemExit(f"--resume={out_dir}: no checkpoint/ with train_state.pt in it")


@torch.no_grad()
def validate(model, val_set, n, device):
    """mIoU on the first n validation images through the method's own segment() (all classes)."""
    names = val_set.class_names
    cm = 0
    for i in range(min(n, len(val_set))):
        image, labels, _ = val_set[i]
        probs = model.segment(image.to(device), names, ensemble=1, steps=1)
        pred = aggregate(probs, tau_bg=0.5).cpu()
        cm = cm + confusion_matrix(pred, labels, len(names), ignore_index=val_set.ignore_index)
    return miou(cm)["miou_gt"]


def train(s):
    # ---- processes and devices -------------------------------------------------------------
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    use_cuda = s.device == "cuda" or (s.device == "auto" and torch.cuda.is_available())
    if ddp:
        dist.init_process_group("nccl" if use_cuda else "gloo")
        rank, world, local_rank = dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_RANK"])
    else:
        rank, world, local_rank = 0, 1, 0
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    torch.manual_seed(s.seed + rank)
    ptdtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[s.dtype]
    autocast = torch.autocast(device.type, dtype=ptdtype) if s.dtype != "fp32" else nullcontext()
    scaler = torch.amp.GradScaler(device.type, enabled=s.dtype == "fp16")

    # ---- model ---------------------------------------------------------------------------------
    start_step, epoch, position, losses, bad_total = 0, 0, 0, [], 0
    if s.resume:
        ckpt = find_checkpoint(s.resume)
        model = DiGSeg.from_checkpoint(ckpt, device=device)
        state = torch.load(os.path.join(ckpt, "train_state.pt"), map_location="cpu", weights_only=True)
    else:
        model = DiGSeg.from_weights(s.sd2, s.clip, text=s.text, trainable=s.trainable, device=device,
                                    noise=s.noise, target=s.target, resolution=s.resolution,
                                    prompt_template=s.prompt_template, clip_vocab=s.clip_vocab)
    model.unet.gradient_checkpointing = s.grad_checkpointing
    params = [p for p in model.parameters() if p.requires_grad]
    n_train, n_all = sum(p.numel() for p in params), sum(p.numel() for p in model.parameters())
    log(f"parameters: {n_all:,} in all, {n_train:,} trainable ({s.trainable}); "
        f"unet {sum(p.numel() for p in model.unet.parameters()):,}, vae {sum(p.numel() for p in model.vae.parameters()):,}")
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=s.lr, betas=(0.9, 0.999))
    if s.resume:
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_cpu"])
        start_step, epoch, position = state["step"], state["epoch"], state["position"]
        losses, bad_total = state["losses"], state["bad_total"]
        log(f"resumed from {ckpt} at step {start_step} (epoch {epoch}, batch {position})")
    raw = model                                   # what we save: never the DDP or compiled wrapper
    if ddp:
        model = DDP(model, device_ids=[local_rank] if use_cuda else None)
    if s.compile:
        model = torch.compile(model)

    if s.dry_run:
        return dry_run(raw, model, optimizer, s, device, autocast, n_all, n_train)

    # ---- data ----------------------------------------------------------------------------------
    train_set = data.build(s.dataset, s.data_root, "train", size=s.size, fraction=s.fraction,
                           template=s.prompt_template, p_absent=s.p_absent, seed=s.seed)
    val_set = data.build(s.dataset, s.data_root, "val", seed=s.seed, evaluation=True) if s.val_every else None
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=s.seed, drop_last=True)
    total_batch = s.batch_size * world * s.grad_accum
    log(f"data: {len(train_set)} {s.dataset} samples; total batch {total_batch} = "
        f"{s.batch_size} per process x {world} processes x {s.grad_accum} accumulation steps")
    os.makedirs(s.out_dir, exist_ok=True)

    def batches():
        """(epoch, position, indices, batch) from the saved data position onwards, forever."""
        nonlocal epoch, position
        while True:
            plan = epoch_batches(sampler, epoch, s.batch_size)
            train_set.set_epoch(epoch)
            loader = DataLoader(train_set, batch_sampler=plan[position:], num_workers=s.num_workers,
                                collate_fn=data.collate)
            for indices, batch in zip(plan[position:], loader):
                position += 1
                yield epoch, indices, batch
            epoch, position = epoch + 1, 0

    # ---- the loop ------------------------------------------------------------------------------
    stream = batches()
    bad_in_a_row, t0, seen = 0, time.time(), 0
    step = start_step
    while step < s.max_steps:
        lr = lr_at(step, s)
        for g in optimizer.param_groups:
            g["lr"] = lr
        total = 0.0
        for micro in range(s.grad_accum):
            ep, indices, batch = next(stream)
            gens = sample_generators(s.seed, ep, indices, len(train_set))
            sync = nullcontext() if (not ddp or micro == s.grad_accum - 1) else model.no_sync()
            with sync:
                with autocast:
                    loss = model(batch["image"].to(device), batch["mask"].to(device), batch["prompt"], gens)
                scaler.scale(loss / s.grad_accum).backward()
            total += loss.item() / s.grad_accum
            seen += len(indices) * world
        finite = torch.tensor([float(math.isfinite(total))], device=device)
        if ddp:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)   # all ranks skip together
        if finite.item() == 0:
            optimizer.zero_grad(set_to_none=True)
            bad_in_a_row, bad_total = bad_in_a_row + 1, bad_total + 1
            log(f"step {step}: non-finite loss ({total}); step skipped ({bad_in_a_row} in a row, {bad_total} in all)")
            if bad_in_a_row >= s.max_bad_steps:
                raise SystemExit(f"stopping: {bad_in_a_row} non-finite losses in a row. The last good "
                                 f"checkpoint is in {s.out_dir}/checkpoint; try a lower lr or --dtype=fp32.")
            continue
        bad_in_a_row = 0
        if s.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        losses.append((step, total))

        if master and (step % s.log_every == 0 or step == s.max_steps):
            dt = time.time() - t0
            rate = seen / dt
            eta = (s.max_steps - step) * total_batch / max(rate, 1e-9)
            print(f"step {step}/{s.max_steps} | loss {total:.4f} | lr {lr:.2e} | {rate:.1f} img/s | "
                  f"ETA {eta / 60:.1f} min", flush=True)
        if master and val_set is not None and step % s.val_every == 0:
            raw.eval()
            print(f"step {step}: val mIoU {validate(raw, val_set, s.val_images, device):.4f}", flush=True)
            raw.train()
        done = step == s.max_steps or (s.stop_after and step - start_step >= s.stop_after)
        if master and (step % s.save_every == 0 or done):
            save_checkpoint(s.out_dir, raw, {
                "step": step, "epoch": epoch, "position": position, "losses": losses, "bad_total": bad_total,
                "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "rng_cpu": torch.get_rng_state(),
            }, s)
        if done:
            break

    if master:
        xs, ys = zip(*losses) if losses else ((), ())
        line_plot(os.path.join(s.out_dir, "loss.png"), {"train loss": (xs, ys)}, title="DiGSeg training loss (Eq. 6)",
                  xlabel="step", logy=True)
        print(f"done at step {step}; checkpoint in {s.out_dir}/checkpoint, loss curve in {s.out_dir}/loss.png")
    if ddp:
        dist.barrier()                  # every rank done (rank 0 writes last) before tearing down
        dist.destroy_process_group()
    return raw


def dry_run(raw, model, optimizer, s, device, autocast, n_all, n_train):
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
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        where = "GPU memory (max allocated)"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        where = "process memory (peak RSS)"
    print(f"dry run: loss {loss.item():.4f}, one step at batch 1 and {s.size}px took {dt:.1f} s; "
          f"peak {where}: {peak:.2f} GiB; parameters {n_all:,}, trainable {n_train:,}")
    return raw


if __name__ == "__main__":
    train(parse_args(sys.argv[1:]))
