"""Memory of an offline fit: a dataset in memory against the same dataset in memory-mapped files.

Writes a uniform-random HalfCheetah-v5 Minari dataset of ``--steps`` transitions (once, under
``--out/datasets``), then runs ``awr fit -c configs/offline_halfcheetah.yaml`` on it for a few short
iterations twice: as shipped (the rows read into memory and copied into the dataset's buffer) and with
``--model.data.init_args.memmap_dir`` and ``--model.targets.init_args.chunk_size`` (the rows in files that are
the buffer's storage, targets refreshed in chunks). While each runs, the training process's ``/proc/<pid>/status`` is
read every 50 ms: the peak of ``RssAnon`` (memory the process allocated) and of ``RssFile`` (pages of
mapped files, which the kernel can drop and read again: the page cache, not the process's own).

    python benchmarks/dataset_memory.py --steps 1000000 --out benchmarks/results/dataset_memory

Prints the table and writes it to ``--out/summary.md``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from markdown_table import print_table

ROOT = Path(__file__).resolve().parent.parent
DATASET = "halfcheetah/random-1m-v0"


def awr(*args: str) -> list[str]:
    return [sys.executable, "-m", "awr_modules.cli", *args]


def peak_memory(command: list[str], env: dict[str, str]) -> tuple[float, float, float]:
    """Run ``command``; the peak RssAnon and RssFile (MiB) of its process, and its wall-clock seconds."""
    peaks = {"RssAnon": 0, "RssFile": 0}
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        while process.poll() is None:
            try:
                for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
                    name, _, value = line.partition(":")
                    if name in peaks:
                        peaks[name] = max(peaks[name], int(value.split()[0]))
            except OSError:
                pass
            time.sleep(0.05)
        if process.returncode:
            log.seek(0)
            raise RuntimeError(f"{command} exited with {process.returncode}:\n{log.read()[-4000:]}")
    return peaks["RssAnon"] / 1024, peaks["RssFile"] / 1024, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1_000_000)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--iterations", type=int, default=3)
    args = parser.parse_args()
    out = args.out.resolve()
    env = {**os.environ, "MINARI_DATASETS_PATH": str(out / "datasets")}
    if not (out / "datasets" / DATASET).exists():
        subprocess.run(awr("dataset", "random", "-c", str(ROOT / "configs" / "halfcheetah.yaml"), "--id", DATASET,
                           "--steps", str(args.steps)), env=env, check=True)
    fit = awr("fit", "-c", str(ROOT / "configs" / "offline_halfcheetah.yaml"),
              f"--model.data.init_args.dataset_id={DATASET}", f"--trainer.max_epochs={args.iterations}",
              "--trainer.check_val_every_n_epoch=1000", "--model.value_phase.steps=20",
              "--model.policy_phase.steps=20", "--model.targets.init_args.refresh_every=1",
              "--trainer.enable_progress_bar=false")
    ways = {"rows in memory (as shipped)": [],
            "memory-mapped rows, refresh in chunks of 100k": [f"--model.data.init_args.memmap_dir={out / 'rows'}",
                                                               "--model.targets.init_args.chunk_size=100000"]}
    rows = []
    for name, extra in ways.items():
        with tempfile.TemporaryDirectory() as runs:
            anon, mapped, seconds = peak_memory([*fit, f"--trainer.logger.init_args.save_dir={runs}",
                                                 f"--checkpoint.dirpath={runs}/checkpoints", *extra], env)
        rows.append([name, f"{anon:.0f}", f"{mapped:.0f}", f"{seconds:.0f}"])
        print(rows[-1], flush=True)
    title = f"Offline fit of {args.iterations} iterations on {args.steps:,} HalfCheetah-v5 transitions"
    header = ["dataset rows", "peak RssAnon (MiB)", "peak RssFile (MiB)", "wall-clock (s)"]
    print(f"\n{title}\n")
    print_table(header, rows)
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
             *("| " + " | ".join(row) + " |" for row in rows)]
    (out / "summary.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
