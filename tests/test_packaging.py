"""The core (loss, estimators, buffer, target refresh) and the iteration's parts run without Lightning or a simulator."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from lightning_helpers import subprocess_env

CORE_ONLY = """
import sys
for name in ("lightning", "lightning_fabric", "pytorch_lightning", "gymnasium", "minari", "awr_recipes"):
    sys.modules[name] = None  # not installed: the core must not need them
import torch
from tensordict import TensorDict
from awr_modules import AWRLoss, KStepReturnEstimator, make_replay_buffer, refresh_value_targets
from awr_modules import data, evaluators, execution, iteration, phases, targets, temperature  # the iteration's parts
from torchrl.modules import MLP, ValueOperator
critic = ValueOperator(MLP(in_features=3, out_features=1, num_cells=[8]), in_keys=["observation"])
buffer = make_replay_buffer(100, prioritized=False)
flag = torch.zeros(10, 1, dtype=torch.bool)
buffer.extend(TensorDict({"observation": torch.randn(10, 3), "next": {"observation": torch.randn(10, 3),
    "reward": torch.randn(10, 1), "done": flag, "terminated": flag}}, [10]))
estimator = KStepReturnEstimator(gamma=0.9, horizon=3, value_network=critic)
print(refresh_value_targets(buffer, estimator)["advantage"].shape)
print("loaded:", sorted(name for name, module in sys.modules.items() if module is not None
                        and name.split(".")[0] in ("lightning", "lightning_fabric", "pytorch_lightning")))
"""


def test_the_core_and_the_iterations_parts_run_without_lightning_or_a_simulator():
    out = subprocess.run([sys.executable, "-c", CORE_ONLY], capture_output=True, text=True, check=True,
                         env=subprocess_env())
    assert "torch.Size([10, 1])" in out.stdout and "loaded: []" in out.stdout


def test_the_readmes_library_example_runs_as_written_without_lightning_or_a_simulator():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("## The library"):]
    example = section[section.index("```python\n") + len("```python\n"):section.index("```\n", section.index("```python"))]
    hidden = "import sys\nfor name in ('lightning', 'lightning_fabric', 'gymnasium', 'minari', 'awr_recipes'):\n" \
             "    sys.modules[name] = None\n"
    out = subprocess.run([sys.executable, "-c", hidden + example], capture_output=True, text=True, check=True,
                         env=subprocess_env())
    assert out.stdout.count("transitions, loss_actor") == 3
