#!/usr/bin/env bash
# The SDXL and SD3 figures on one GPU (not yet run: no GPU was lent to the session that wrote it): the sampler and the
# learner at the real architectures (random weights, bench/families.py), one JSON line each, into $OUT. The learner
# runs at batch 1 with gradient checkpointing in bfloat16, the sd35_pickscore / sdxl_aesthetic settings, and reports
# peak_memory_GiB (the issue's 24 GB question). Same setup as bench/gpu_check.sh (carry the .whl/ wheels).
#
#   device tool:  run(command="bash bench/gpu_families.sh", carry=[".whl"], timeout_s=600)
set -uo pipefail
OUT=${OUT:-$PWD/gpu-families-out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if ! "$PY" -c "import diffusers, pydantic" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "diffusers/pydantic missing and .whl/ did not install (see bench/gpu_check.sh)"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
fi
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "no nvidia-smi") >"$OUT/gpu.txt" 2>&1

bench() {  # bench NAME PRESET SECONDS FLAGS...: $OUT/NAME-PRESET.json and .log
  local name=$1 preset=$2 limit=$3
  shift 3
  timeout "$limit" "$PY" -m bench "$name" --preset "$preset" "$@" >"$OUT/$name-$preset.json" 2>"$OUT/$name-$preset.log"
  echo "$name $preset: exit $? $(cat "$OUT/$name-$preset.json")"
}

FAST="dtype=bfloat16,autocast=bf16,gradient_checkpointing=true"
bench sampler sd3 120 --dtype bfloat16 --rounds 2 --iters 1 --warmup 1 --fast none
bench learner sd3 120 --dtype bfloat16 --samples 2 --rounds 1 --fast "$FAST"
bench sampler sdxl 150 --dtype bfloat16 --batch 2 --steps 20 --rounds 2 --iters 1 --warmup 1 --fast none
bench learner sdxl 150 --dtype bfloat16 --samples 1 --steps 20 --rounds 1 --fast "$FAST"
