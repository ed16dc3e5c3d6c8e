#!/usr/bin/env bash
# The checks that need a GPU, in one command for a GPU machine without internet (see README, "On a
# GPU"). Carry gpu_wheels/ (the diffusers wheel, the oracle of bench.py, and open_clip's
# bpe_simple_vocab_16e6.txt.gz). Logs go to $OUT (default out/gpu).
#     bash .ci/gpu.sh [quick] [tests] [real] [speed] [bench] [choices] [toy] [toyquick] [compile]   # default: tests real bench toy
# quick: the check sized for a short GPU loan (each step time-limited; not yet run on a GPU): the CUDA tests, real
# shapes with random weights through train.py (20 steps at batch 2 and 16, a resume, torchrun x 1),
# eval.py and sample.py in bf16 and fp16, segment() and e2e speed. Then: cd $OUT && tar czf logs.tgz *.log
set -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PY=${PY:-python3}
if ls gpu_wheels/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site gpu_wheels/*.whl && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())"
W=/tmp/gpu_world
parts=${*:-tests real bench toy}
run() { local log=$1 limit=$2; shift 2; echo "== $* (limit ${limit}s)" | tee -a "$OUT/$log.log";
        /usr/bin/time -f "   wall %e s" timeout "$limit" "$@" 2>&1 | tee -a "$OUT/$log.log"; echo "   rc $?" | tee -a "$OUT/$log.log"; }
world() { [ -d $W/sd2 ] || run real 300 $PY .ci/gpu_world.py $W gpu_wheels/bpe_simple_vocab_16e6.txt.gz; }
REAL="--sd2=$W/sd2 --clip=$W/clip --dataset=folder --data_root=$W/data --check_data=0 --num_workers=4"
for part in $parts; do case $part in
  quick) run tests 150 $PY -m pytest -q -x -m cuda -p no:cacheprovider tests/test_cuda.py
         world
         run real 60 $PY train.py --preset=ade20k $REAL --max_steps=20 --log_every=10 --save_every=20 --out_dir=/tmp/q/b2
         run real 60 $PY train.py --resume=/tmp/q/b2 --max_steps=24 --log_every=2
         run real 60 $PY train.py --preset=ade20k $REAL --max_steps=20 --log_every=10 --save_every=20 --batch_size=16 --out_dir=/tmp/q/b16
         run real 60 torchrun --nproc_per_node=1 train.py --preset=ade20k $REAL --max_steps=10 --log_every=5 --save_every=10 --out_dir=/tmp/q/tr
         run real 60 $PY eval.py --checkpoint=/tmp/q/b2/checkpoint --dataset=folder --data_root=$W/data --split=val --limit=8 --dtype=bf16 --out=/tmp/q/ev
         run real 60 $PY sample.py $W/data/images/val --checkpoint=/tmp/q/b2/checkpoint --classes=sky,road,car --dtype=fp16 --out=/tmp/q/s
         run bench 90 $PY bench.py --device=cuda --only=segment,e2e ;;
  tests) run tests 300 $PY -m pytest -q -m cuda -p no:cacheprovider tests/test_cuda.py ;;
  real)  world
         run real 200 $PY train.py --preset=ade20k $REAL --dry_run=1 --out_dir=/tmp/r/dry
         run real 200 $PY train.py --preset=ade20k $REAL --max_steps=60 --log_every=20 --save_every=60 --out_dir=/tmp/r/b2
         run real 200 $PY train.py --preset=ade20k $REAL --max_steps=40 --log_every=20 --save_every=40 --batch_size=16 --out_dir=/tmp/r/b16
         run real 200 $PY train.py --preset=ade20k $REAL --max_steps=40 --log_every=20 --save_every=40 --batch_size=16 --grad_checkpointing=1 --out_dir=/tmp/r/b16c
         run real 200 torchrun --nproc_per_node=1 train.py --preset=ade20k $REAL --max_steps=20 --log_every=10 --save_every=20 --out_dir=/tmp/r/tr
         run real 200 $PY train.py --resume=/tmp/r/b2 --max_steps=70 --log_every=5
         run real 200 $PY eval.py --checkpoint=/tmp/r/b2/checkpoint --dataset=folder --data_root=$W/data --split=val --dtype=bf16 --out=/tmp/r/ev
         run real 200 torchrun --nproc_per_node=1 eval.py --checkpoint=/tmp/r/b2/checkpoint --dataset=folder --data_root=$W/data --split=val --dtype=bf16 --out=/tmp/r/ev2
         run real 200 $PY sample.py $W/data/images/val --checkpoint=/tmp/r/b2/checkpoint --classes=sky,road,car --dtype=fp16 --out=/tmp/r/s ;;
  speed) world
         run real 200 $PY train.py --preset=ade20k $REAL --max_steps=60 --log_every=20 --save_every=1000 --out_dir=/tmp/r/s2
         run real 200 $PY train.py --preset=ade20k $REAL --max_steps=60 --log_every=20 --save_every=1000 --batch_size=16 --out_dir=/tmp/r/s16 ;;
  choices) run bench 300 $PY bench.py --device=cuda --only=choices,profile ;;
  compile) world
         run real 500 $PY train.py --preset=ade20k $REAL --max_steps=100 --log_every=20 --save_every=100 --batch_size=16 --compile=1 --out_dir=/tmp/r/b16k ;;
  bench) run bench 330 $PY bench.py --device=cuda --only=unet,segment,train ;;
  toy)   run toy 420 $PY toy.py --out=/tmp/toy ;;
  toyquick) run toy 200 $PY toy.py --out=/tmp/toyq --vae_steps=40 --clip_steps=40 --train_steps=40 --val_images=10 ;;
esac; done
