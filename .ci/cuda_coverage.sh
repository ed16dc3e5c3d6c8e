#!/usr/bin/env bash
# Line coverage of the CUDA-only code under simulated CUDA (tests/test_cuda_simulated.py, on the CPU):
# all of model/cuda.py, then every line of the scripts that goes through it (a `cuda.` call).
# The lines left are the torch.cuda calls themselves, which only a GPU can run (tests/test_cuda.py).
#     bash .ci/cuda_coverage.sh          # needs coverage (requirements-dev.txt)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export COVERAGE_FILE=${TMPDIR:-/tmp}/digseg_cuda.coverage
$PY -m coverage run --include='model/cuda.py,train.py,eval.py,sample.py,bench.py,benchmarks/cuda.py,launch.py,digseg.py,e2e.py,model/proposals.py' \
    -m pytest -q -p no:cacheprovider tests/test_cuda_simulated.py -k "not gpu_quick_check"
$PY -m coverage report -m --include=model/cuda.py
$PY - <<'PY'
import re
import coverage
cov = coverage.Coverage(data_file=__import__("os").environ["COVERAGE_FILE"])
cov.load()
print("\nthe scripts' CUDA branches (lines calling model/cuda.py):")
hit = total = 0
for path in ("train.py", "eval.py", "sample.py", "bench.py", "benchmarks/cuda.py", "launch.py", "digseg.py", "e2e.py",
             "model/proposals.py"):
    _, statements, _, missing, _ = cov.analysis2(path)
    lines = open(path).read().splitlines()
    for n in statements:
        if re.search(r"\b(cuda\.\w+|tune_for_cuda|to_device)\(", lines[n - 1]) and "def " not in lines[n - 1]:
            total += 1
            hit += n not in missing
            print(f"  {'run   ' if n not in missing else 'NOT RUN'} {path}:{n}: {lines[n - 1].strip()[:90]}")
print(f"{hit} of {total} run")
PY
