#!/usr/bin/env bash
# The GPU checks, in one command for the lent GPU machine:
#   1. install the carried wheels of benchmarks/gpu_wheels.sh (if .whl/ exists) beside the machine's torch;
#   2. the test suite on that stack (torch 2.11 + torchrl 0.12 there), in the background: a compatibility
#      check, and the CUDA-only tests (tests/test_cuda_graphs.py: graphs train like eager in fp32, bf16, fp16;
#      tests/test_lightning.py: value targets stay float32 under bf16-mixed and 16-mixed on the GPU);
#   3. at the same time, short Pendulum-v1 runs on the GPU, one process chain per mode: fit 2 iterations,
#      `awr validate` on the checkpoint, a resumed third iteration (`--ckpt_path last`, the buffer restored
#      onto the GPU); modes: 32-true, bf16-mixed, 16-mixed, each also with the execution part
#      awr_modules.execution.CudaGraphs (compile: false), and 32-true with awr_modules.execution.Compiled and
#      with CudaGraphs (compile: true); the plain modes run eagerly (awr_modules.execution.Eager);
#   4. then benchmarks/iteration_time.py --accelerator gpu on LunarLander (ITERATIONS iterations, the median
#      of the last TIMED; the test suite may still run beside it on other cores), skipped with TIMING=0.
#
#   bash benchmarks/gpu_smoke.sh [REPORT_DIR]   # defaults to $OUT (device tool) or runs/gpu_smoke
#
# Reports (versions, test summary, one log per mode, the timing table) go to REPORT_DIR; checkpoints and
# metrics stay under runs/gpu_smoke/work. ACCELERATOR=cpu runs steps 2-3 on a machine without a GPU (there
# CudaGraphs warns and runs eagerly, and Lightning refuses 16-mixed); MODES="32-true 32-true_compile" runs only
# the modes named; RUN_TESTS=0 skips step 2, WHEELS=0 ignores .whl/.
#
# Elsewhere (a cluster with a fixed torch): install torchrl/tensordict built for that torch, then
# `pip install --no-deps -e .` and run this script without .whl/.
set -uo pipefail
out="${1:-${OUT:-runs/gpu_smoke}}"
work=runs/gpu_smoke/work
accelerator="${ACCELERATOR:-gpu}"
rm -rf "$work"; mkdir -p "$out" "$work"
if [ "${WHEELS:-1}" = 1 ] && [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site
fi
# recipes/ installs as `awr_recipes` (pyproject's package-dir); without an install, a link gives it that name
mkdir -p /tmp/awr_src && ln -sfn "$PWD/recipes" /tmp/awr_src/awr_recipes
export PYTHONPATH="$PWD:/tmp/awr_src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 - <<'PY' 2>&1 | tee "$out/versions.txt"
import lightning, tensordict, torch, torchrl
from torchrl.data import PrioritizedSampler
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
print("torchrl", torchrl.__version__, "tensordict", tensordict.__version__, "lightning", lightning.__version__)
PrioritizedSampler(8, alpha=1.0, beta=0.0)  # raises if torchrl's compiled extension does not fit this torch
print("prioritized sampler: ok")
PY

tests_pid=""
if [ "${RUN_TESTS:-1}" = 1 ]; then
  (python3 -m pytest tests -p no:cacheprovider -W ignore -rfEs --tb=short > "$out/pytest_full.txt" 2>&1;
   { grep -E '^(FAILED|ERROR|SKIPPED)|[0-9]+ (passed|failed)' "$out/pytest_full.txt"; echo;
     tail -n 200 "$out/pytest_full.txt"; } > "$out/pytest.txt") &
  tests_pid=$!
fi

small=(--trainer.max_epochs=2 --trainer.check_val_every_n_epoch=1 --trainer.enable_progress_bar=false
       --model.value_phase.steps=50 --model.policy_phase.steps=200 --model.evaluator.init_args.episodes=2)
one_mode() {  # NAME PRECISION EXTRA...: fit 2 iterations, validate, resume to 3; exit status 0 if all ran
  local run="$1" precision="$2"; shift 2
  local dir="$work/$run" log="$work/$run.log"
  local common=(-c configs/pendulum.yaml --trainer.accelerator="$accelerator" --trainer.devices=1
                --trainer.precision="$precision" --trainer.logger.init_args.save_dir="$dir")
  python3 -m awr_modules.cli fit "${common[@]}" "${small[@]}" "$@" --checkpoint.dirpath="$dir/checkpoints" > "$log" 2>&1 \
    && python3 -m awr_modules.cli validate "${common[@]}" --model.evaluator.init_args.episodes=2 \
         --ckpt_path="$dir/checkpoints/last.ckpt" >> "$log" 2>&1 \
    && python3 -m awr_modules.cli fit "${common[@]}" "${small[@]}" "$@" --trainer.max_epochs=3 \
         --checkpoint.dirpath="$dir/checkpoints" --ckpt_path=last >> "$log" 2>&1
}
execution=--model.execution=awr_modules.execution
eager=$execution.Eager
graphs="$execution.CudaGraphs:--model.execution.init_args.compile=false"
compiled_graphs="$execution.CudaGraphs:--model.execution.init_args.compile=true"
declare -A pids
runs=()
for mode in "32-true:32-true:$eager" "bf16-mixed:bf16-mixed:$eager" "16-mixed:16-mixed:$eager" \
            "32-true_cudagraphs:32-true:$graphs" "bf16-mixed_cudagraphs:bf16-mixed:$graphs" \
            "16-mixed_cudagraphs:16-mixed:$graphs" "32-true_compile:32-true:$execution.Compiled" \
            "32-true_compile_cudagraphs:32-true:$compiled_graphs"; do
  IFS=: read -r -a parts <<< "$mode"
  if [ -n "${MODES:-}" ] && [[ " $MODES " != *" ${parts[0]} "* ]]; then continue; fi
  OMP_NUM_THREADS=1 one_mode "${parts[@]}" &
  pids[${parts[0]}]=$!
  runs+=("${parts[0]}")
done

status=0
summary="$out/smoke.txt"; : > "$summary"
for run in "${runs[@]}"; do
  if wait "${pids[$run]}"; then
    echo "== $run: ok" >> "$summary"
    grep -h "eval/return " "$work/$run.log" | tail -n 1 >> "$summary"
    python3 - "$work/$run" >> "$summary" <<'PY'
import csv, pathlib, sys
rows = [r for f in pathlib.Path(sys.argv[1]).rglob("metrics.csv") for r in csv.DictReader(open(f))]
steps = max((float(r["env_steps"]) for r in rows if r.get("env_steps")), default=0)
times = {k: v for r in rows for k, v in r.items() if k.startswith("time/") and v}
print("   env_steps", int(steps), "last iteration seconds:", {k: round(float(v), 3) for k, v in sorted(times.items())})
PY
  else
    status=1
    echo "== $run: FAILED" >> "$summary"; tail -n 30 "$work/$run.log" >> "$summary"
  fi
done
cat "$summary"

if [ "${TIMING:-1}" = 1 ] && [ "$accelerator" = gpu ]; then  # beside the rest of the test suite, if still running
  timeout "${TIMING_LIMIT:-300}" python3 benchmarks/iteration_time.py --config configs/lunarlander.yaml --accelerator gpu \
    --iterations "${ITERATIONS:-4}" --timed "${TIMED:-1}" --rounds 1 --out "$out" > "$work/timing.full" 2>&1
  tail -n 40 "$work/timing.full" | grep -v "Warning\|warn" | tee "$out/timing.txt"
fi
if [ -n "$tests_pid" ]; then
  wait "$tests_pid"
  echo "== test suite: $(grep -E '[0-9]+ (passed|failed)' "$out/pytest.txt" | tail -n 1)"
fi
exit $status
