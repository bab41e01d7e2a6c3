"""Which committed runs were resumed before their observation statistics froze.

Up to 0.3.10, a run resumed from a checkpoint before ``normalizer_samples`` env steps restarted its observation
statistics: ``VecNormV2.set_extra_state`` restored the saved moments but left the recorder's ``initialized`` flag
down, so the first batch after the resume started them afresh. Such a run normalised its states, from then on, with
the moments of the states collected between the resume and ``normalizer_samples`` only. 0.3.11 fixed it
(``awr_modules.observation_statistics``). A run resumed after its statistics froze, or never resumed, is unaffected.

A resumed run logs into a new ``version_N`` folder: a folder that first logged at more env steps than the run's
earlier folders first did is a resume, at those env steps. A folder that starts where the run's first did is a fresh
start after one that died before its first checkpoint, and offline fits, which collect no env steps, never count as
resumed (their statistics come from the whole dataset at every start). Prints a markdown table of every resume under
``--root`` and whether it came before the freeze:

    python benchmarks/resumed_runs.py --root benchmarks/results > benchmarks/results/resumed_runs.md
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import yaml
from learning_curves import run_versions  # a seed's CSVLogger version folders, in version order


def first_env_steps(version: Path) -> int | None:
    """The first ``env_steps`` a version folder logged (where the resumed run went on from)."""
    with (version / "metrics.csv").open() as file:
        steps = [float(row["env_steps"]) for row in csv.DictReader(file) if row.get("env_steps")]
    return int(min(steps)) if steps else None


def normalizer_samples(version: Path) -> int | None:
    """``normalizer_samples`` from the run's saved config (``None``: the recipe keeps no statistics)."""
    model = yaml.safe_load((version / "config.yaml").read_text()).get("model", {})
    return (model.get("recipe") or {}).get("init_args", {}).get("normalizer_samples")


def resumes(root: Path) -> list[tuple[Path, int, int]]:
    """(version folder, env steps it resumed at, ``normalizer_samples``) for every resume under ``root``."""
    found = []
    for first in sorted(root.rglob("version_0/config.yaml")):
        freeze_after = normalizer_samples(first.parent)
        if freeze_after is None:
            continue
        earliest = None  # the first env steps any earlier folder logged
        for version in run_versions(first.parent.parent):
            start = first_env_steps(version)
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
