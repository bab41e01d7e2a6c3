#!/usr/bin/env bash
# GPU checks of issue 3, for a machine with a CUDA device: two short AWR iterations of Pendulum-v1 on the
# GPU in fp32, bf16-mixed and 16-mixed, each followed by `awr validate` on its checkpoint.
#
#   bash benchmarks/gpu_smoke.sh [OUT_DIR]
#
# Needs the package importable with a matching torch/torchrl pair already installed (on a cluster with a
# fixed torch: `pip install --no-deps -e .` after installing torchrl/tensordict built for that torch).
set -euo pipefail
out="${1:-runs/gpu_smoke}"
small=(--trainer.max_epochs=2 --trainer.check_val_every_n_epoch=1 --trainer.enable_progress_bar=false
       --model.critic_steps=20 --model.actor_steps=50 --model.eval_episodes=2)
for precision in 32-true bf16-mixed 16-mixed; do
  dir="$out/$precision"
  python -m awr_modules.cli fit -c configs/pendulum.yaml "${small[@]}" --trainer.accelerator=gpu --trainer.devices=1 \
    --trainer.precision="$precision" --trainer.logger.init_args.save_dir="$dir" --checkpoint.dirpath="$dir/checkpoints"
  python -m awr_modules.cli validate -c configs/pendulum.yaml --trainer.accelerator=gpu --trainer.devices=1 \
    --trainer.precision="$precision" --model.eval_episodes=2 --trainer.logger.init_args.save_dir="$dir" \
    --ckpt_path="$dir/checkpoints/last.ckpt"
  echo "== $precision: ok"
done
