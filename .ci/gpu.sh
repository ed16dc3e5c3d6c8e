#!/usr/bin/env bash
# The checks that need a GPU, in one command for a GPU machine without internet (README, "On a GPU").
#     bash .ci/gpu.sh [quick] [tests] [real] [speed] [bench] [choices] [compile] [toy] [toyquick]   # default: quick
# Needs only the repository: the weights are random at the real shapes (.ci/gpu_world.py). Optional,
# carried in gpu_wheels/: open_clip's bpe_simple_vocab_16e6.txt.gz (else a small vocabulary is built)
# and the diffusers wheel (bench.py's unet section compares with it). Logs: $OUT/<part>.log (default
# out/gpu); bring them back with: cd $OUT && tar czf logs.tgz *.log
# GPU_WORLD=tiny: the same steps at the toy's shapes on the CPU under simulated CUDA (model/cuda.py),
# in about a minute; CI runs it (tests/test_cuda_simulated.py), so the script cannot rot between loans.
#
# quick on one H100, by estimate (not yet run on a GPU), the sum of its parts:
#     5 s  versions                          45 s  pytest -m cuda tests/test_cuda.py (tiny models, one inductor compile)
#    25 s  world: SD2-base + CLIP-L, random, written once (5.2 GB)
#    25 s  1 train.py fp16, batch 2, grad_checkpointing, 20 steps, checkpoints at 10 and 20 (trainable=paper: 0.8 GB each)
#    20 s  2 resume 1 from step 10; its losses compared with 1's, step by step (.ci/gpu_checks.py resume)
#   100 s  3 train.py bf16, batch 16, --compile=1 (U-Net + VAE encoder, inductor), 12 steps: the least certain part
#    25 s  4 torchrun x 1 --force_ddp=1 (the model DDP-wrapped on one GPU), --objective=e2e --decoder_checkpointing=1
#    35 s  5 eval.py bf16 (8 images, CLIP proposals), sample.py fp16 (16 images)
#    10 s  6 the 768-v U-Net's upcast attention in fp16 autocast, forward + backward (.ci/gpu_checks.py upcast)
#    25 s  7 bench.py segment() rows, fp32 and bf16 weights
#   315 s  = 5.3 min in all; every step has its own time limit, and at most ~11 GB lands on the disk.
set -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PY=${PY:-python3}
T=${TMPDIR:-/tmp}/digseg_gpu; rm -rf "$T"; mkdir -p "$T"
if ls gpu_wheels/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target "$T/site" gpu_wheels/*.whl && export PYTHONPATH="$T/site:$PYTHONPATH"
fi
if [ "${GPU_WORLD:-real}" = tiny ]; then              # the dry run: CPU, toy shapes, CUDA branches simulated
  export DIGSEG_SIMULATE_CUDA=1 DIGSEG_TEST_DEVICE=cpu
  SIZE=64; SHAPES=toy; UPCAST=toy; WORLD_ARGS=--tiny; BIG=4; WORKERS=0
  LIMIT_SCALE=4      # the limits guard the GPU's budget; a busy 2-core CPU may take longer (no failure from load)
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  SIZE=512; SHAPES=sd2-base; UPCAST=sd2-768-v; WORLD_ARGS=$(ls gpu_wheels/bpe_simple_vocab_16e6.txt.gz 2>/dev/null); BIG=16; WORKERS=4
fi
$PY -c "import torch; from model import cuda; print('torch', torch.__version__, 'CUDA', torch.version.cuda, cuda.device_name(torch.device('cuda' if torch.cuda.is_available() else 'cpu')))"
W=$T/world
run() { local log=$1 limit=$(( $2 * ${LIMIT_SCALE:-1} )); shift 2; echo "== $* (limit ${limit}s)" | tee -a "$OUT/$log.log"; local t0=$(date +%s)
        timeout "$limit" "$@" 2>&1 | tee -a "$OUT/$log.log"; local rc=$?
        echo "   wall $(( $(date +%s) - t0 )) s" | tee -a "$OUT/$log.log"; echo "   rc $rc" | tee -a "$OUT/$log.log"; }
world() { [ -d "$W/sd2" ] || run real 120 $PY .ci/gpu_world.py "$W" $WORLD_ARGS; }
DATA="--dataset=folder --data_root=$W/data --check_data=0 --num_workers=$WORKERS"
REAL="--sd2=$W/sd2 --clip=$W/clip $DATA --size=$SIZE --resolution=$SIZE --val_every=0"
for part in ${*:-quick}; do case $part in
  quick) run tests 150 $PY -m pytest -q -x -m cuda -p no:cacheprovider tests/test_cuda.py
         world
         Q="--preset=ade20k $REAL --trainable=paper --log_every=5"
         run real 90 $PY train.py $Q --dtype=fp16 --grad_checkpointing=1 --max_steps=20 --save_every=10 --keep=3 --out_dir=$T/fp16
         run real 90 $PY train.py --resume=$T/fp16/checkpoint-0000010 --out_dir=$T/fp16r
         run real 30 $PY .ci/gpu_checks.py resume $T/fp16 $T/fp16r 10
         run real 240 $PY train.py $Q --dtype=bf16 --batch_size=$BIG --compile=1 --max_steps=12 --log_every=4 --out_dir=$T/compiled
         run real 90 $PY -m torch.distributed.run --nproc_per_node=1 --master_port=29571 train.py $Q --dtype=bf16 --force_ddp=1 --objective=e2e \
             --target=v_prediction --decoder_checkpointing=1 --max_steps=10 --out_dir=$T/e2e
         run real 60 $PY eval.py --checkpoint=$T/fp16/checkpoint --dataset=folder --data_root=$W/data --split=val --limit=8 --dtype=bf16 --out=$T/ev
         run real 60 $PY sample.py $W/data/images/val --checkpoint=$T/fp16/checkpoint --classes=sky,road,car --dtype=fp16 --out=$T/s
         run real 60 $PY .ci/gpu_checks.py upcast $UPCAST
         run bench 90 $PY bench.py --device=cuda --shapes=$SHAPES --only=segment ;;
  tests) run tests 300 $PY -m pytest -q -m cuda -p no:cacheprovider tests/test_cuda.py ;;
  real)  world
         run real 200 $PY train.py --preset=ade20k $REAL --dry_run=1 --out_dir=$T/dry
         run real 200 $PY train.py --preset=ade20k $REAL --max_steps=60 --log_every=20 --save_every=60 --out_dir=$T/b2
         run real 200 $PY train.py --preset=ade20k $REAL --max_steps=40 --log_every=20 --save_every=40 --batch_size=$BIG --out_dir=$T/b16
         run real 200 $PY train.py --preset=ade20k $REAL --max_steps=40 --log_every=20 --save_every=40 --batch_size=$BIG --grad_checkpointing=1 --out_dir=$T/b16c
         run real 200 $PY train.py --resume=$T/b2 --max_steps=70 --log_every=5
         run real 200 $PY eval.py --checkpoint=$T/b2/checkpoint --dataset=folder --data_root=$W/data --split=val --dtype=bf16 --out=$T/ev
         run real 200 $PY -m torch.distributed.run --nproc_per_node=1 eval.py --checkpoint=$T/b2/checkpoint --dataset=folder --data_root=$W/data --split=val --dtype=bf16 --out=$T/ev2
         run real 200 $PY sample.py $W/data/images/val --checkpoint=$T/b2/checkpoint --classes=sky,road,car --dtype=fp16 --out=$T/s ;;
  speed) world
         run real 200 $PY train.py --preset=ade20k $REAL --max_steps=60 --log_every=20 --save_every=1000 --trainable=paper --out_dir=$T/s2
         run real 200 $PY train.py --preset=ade20k $REAL --max_steps=60 --log_every=20 --save_every=1000 --trainable=paper --batch_size=$BIG --out_dir=$T/s16 ;;
  choices) run bench 300 $PY bench.py --device=cuda --shapes=$SHAPES --only=choices,profile ;;
  compile) world
         run real 500 $PY train.py --preset=ade20k $REAL --max_steps=100 --log_every=20 --save_every=100 --batch_size=$BIG --compile=1 --trainable=paper --out_dir=$T/b16k ;;
  bench) run bench 330 $PY bench.py --device=cuda --shapes=$SHAPES --only=unet,segment,train,e2e ;;
  toy)   run toy 420 $PY toy.py --out=$T/toy ;;
  toyquick) run toy 200 $PY toy.py --out=$T/toyq --vae_steps=40 --clip_steps=40 --train_steps=40 --val_images=10 ;;
  *)     echo "unknown part $part (quick tests real speed bench choices compile toy toyquick)"; exit 2 ;;
esac; done
