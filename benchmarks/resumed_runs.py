"""Which committed runs were resumed before their observation statistics froze.

Up to 0.3.10, a run resumed from a checkpoint before ``normalizer_samples`` env steps restarted its observation
statistics: ``VecNormV2.set_extra_state`` restored the saved moments but left the recorder's ``initialized`` flag
down, so the first batch after the resume started them afresh. Such a run normalised its states, from then on, with
the moments of the states collected between the resume and ``normalizer_samples`` only. 0.3.11 fixed it
(``awr_modules.observation_statistics``). A run resumed after its statistics froze, or never resumed, is unaffected.

A resumed run logs into a new ``version_N`` folder, so a seed folder with ``version_1`` or later was resumed, at the
first ``env_steps`` that folder logged (a folder that starts where the run's first did is a fresh start after a
start that died before its first checkpoint). Offline fits are left out: they collect no env steps, and their
statistics come from the whole dataset at every start. Prints a markdown table of every resume under ``--root`` and whether it came before the freeze:

    python benchmarks/resumed_runs.py --root benchmarks/results > benchmarks/results/resumed_runs.md
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import yaml


def versions(seed: Path) -> list[Path]:
    """A run folder's ``version_N`` folders, in order."""
    return sorted(seed.glob("version_*"), key=lambda folder: int(folder.name[len("version_"):]))


def first_env_steps(version: Path) -> int | None:
    """The first ``env_steps`` a version folder logged (where the resumed run went on from)."""
    with (version / "metrics.csv").open() as file:
        steps = [float(row["env_steps"]) for row in csv.DictReader(file) if row.get("env_steps")]
    return int(min(steps)) if steps else None


def run_settings(version: Path) -> tuple[int | None, bool]:
    """``normalizer_samples`` from the run's saved config (``None``: no statistics), and whether it is offline."""
    config = yaml.safe_load((version / "config.yaml").read_text())
    model = config.get("model", {})
    offline = "MinariDataset" in str((model.get("data") or {}).get("class_path", ""))
    return (model.get("recipe") or {}).get("init_args", {}).get("normalizer_samples"), offline


def resumes(root: Path) -> list[tuple[Path, int, int]]:
    """(version folder, env steps it resumed at, ``normalizer_samples``) for every online resume under ``root``.

    A version folder is a resume when it logged first at more env steps than the run's earlier folders first did: a
    start after one that died before its first checkpoint logs the same first env steps again (a fresh start)."""
    found = []
    for first in sorted(root.rglob("version_0/config.yaml")):
        seed = first.parent.parent
        freeze_after, offline = run_settings(first.parent)
        if offline or freeze_after is None:
            continue
        earliest = None  # the first env steps any earlier folder logged
        for version in versions(seed):
            start = first_env_steps(version) if (version / "metrics.csv").exists() else None
            if start is None:
                continue
            if earliest is not None and start > earliest:
                found.append((version, start, int(freeze_after)))
            earliest = start if earliest is None else min(earliest, start)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    rows = resumes(args.root)
    print("| run (resumed part) | resumed at env steps | normalizer_samples | statistics restarted |")
    print("|---|---|---|---|")
    for version, start, freeze_after in rows:
        print(f"| `{version.relative_to(args.root)}` | {start:,} | {freeze_after:,} | "
              f"{'**yes**' if start < freeze_after else 'no (frozen)'} |")
    affected = sum(start < freeze_after for _, start, freeze_after in rows)
    print(f"\n{affected} of {len(rows)} resumes came before the statistics froze.")


if __name__ == "__main__":
    main()
