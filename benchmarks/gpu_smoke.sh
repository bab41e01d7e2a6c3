#!/usr/bin/env bash
# The GPU checks of issue 3, in one command for the lent GPU machine:
#   1. install the carried wheels of benchmarks/gpu_wheels.sh (if .whl/ exists) beside the machine's torch;
#   2. the test suite on that stack (torch 2.11 + torchrl 0.12 there), as a compatibility check;
#   3. two short AWR iterations of Pendulum-v1 on the GPU in fp32, bf16-mixed and 16-mixed, each
#      followed by `awr validate` on its checkpoint and a resumed third iteration (`--ckpt_path last`,
#      the buffer restored onto the GPU), with the per-phase wall-clock of each run; then the same in
#      fp32 with `--model.compile true`.
#
#   bash benchmarks/gpu_smoke.sh [REPORT_DIR]   # defaults to $OUT (device tool) or runs/gpu_smoke
#
# Reports (versions, test summary, one log per precision) go to REPORT_DIR; checkpoints and metrics stay
# under runs/gpu_smoke/work. ACCELERATOR=cpu runs the same sequence on a machine without a GPU; RUN_TESTS=0 skips step 2.
#
# Elsewhere (a cluster with a fixed torch): install torchrl/tensordict built for that torch, then
# `pip install --no-deps -e .` and run this script without .whl/.
set -uo pipefail
out="${1:-${OUT:-runs/gpu_smoke}}"
work=runs/gpu_smoke/work
accelerator="${ACCELERATOR:-gpu}"
rm -rf "$work"; mkdir -p "$out" "$work"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 - <<'PY' 2>&1 | tee "$out/versions.txt"
import lightning, tensordict, torch, torchrl
from torchrl.data import PrioritizedSampler
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
print("torchrl", torchrl.__version__, "tensordict", tensordict.__version__, "lightning", lightning.__version__)
PrioritizedSampler(8, alpha=1.0, beta=0.0)  # raises if torchrl's compiled extension does not fit this torch
print("prioritized sampler: ok")
PY

if [ "${RUN_TESTS:-1}" = 1 ]; then
  python3 -m pytest tests -q -p no:cacheprovider -W ignore 2>&1 | tail -n 40 > "$out/pytest.txt"
  echo "== test suite: $(tail -n 1 "$out/pytest.txt")"
fi

status=0
small=(--trainer.max_epochs=2 --trainer.check_val_every_n_epoch=1 --trainer.enable_progress_bar=false
       --model.critic_steps=50 --model.actor_steps=200 --model.eval_episodes=2)
for run in 32-true bf16-mixed 16-mixed 32-true_compile; do
  precision="${run%_compile}" dir="$work/$run" log="$out/$run.log"
  [ "$run" != "$precision" ] && small+=(--model.compile=true)
  if python3 -m awr_modules.cli fit -c configs/pendulum.yaml "${small[@]}" --trainer.accelerator="$accelerator" \
       --trainer.devices=1 --trainer.precision="$precision" --trainer.logger.init_args.save_dir="$dir" \
       --checkpoint.dirpath="$dir/checkpoints" > "$log" 2>&1 \
     && python3 -m awr_modules.cli validate -c configs/pendulum.yaml --trainer.accelerator="$accelerator" --trainer.devices=1 \
       --trainer.precision="$precision" --model.eval_episodes=2 --trainer.logger.init_args.save_dir="$dir" \
       --ckpt_path="$dir/checkpoints/last.ckpt" >> "$log" 2>&1 \
     && python3 -m awr_modules.cli fit -c configs/pendulum.yaml "${small[@]}" --trainer.max_epochs=3 \
       --trainer.accelerator="$accelerator" --trainer.devices=1 --trainer.precision="$precision" \
       --trainer.logger.init_args.save_dir="$dir" --checkpoint.dirpath="$dir/checkpoints" --ckpt_path=last \
       >> "$log" 2>&1; then
    echo "== $run: ok"
    grep -h "eval/return " "$log" | tail -n 1
    python3 - "$dir" <<'PY'
import csv, pathlib, sys
rows = [r for f in pathlib.Path(sys.argv[1]).rglob("metrics.csv") for r in csv.DictReader(open(f))]
times = {k: v for r in rows for k, v in r.items() if k.startswith("time/") and v}
print("   last iteration seconds:", {k: round(float(v), 3) for k, v in sorted(times.items())})
PY
  else
    status=1
    echo "== $run: FAILED"; tail -n 25 "$log"
  fi
done
exit $status
