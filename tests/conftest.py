"""Shared fixtures: tiny actors and critics of every distribution family the loss accepts.

Also a linear critic with known weights (``V(s) = s . w``) so that value targets can
be recomputed in plain Python, and :func:`dist_params` which runs an actor's
parameter network on its own to expose ``loc``/``scale``/``logits`` for hand
computations of ``log pi(a|s)``.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import NormalParamExtractor, TensorDictModule
from torch import nn
from torchrl.modules import MLP, IndependentNormal, OneHotCategorical, ProbabilisticActor, TanhNormal, ValueOperator

from awr_recipes.gym_recipe import FixedStd

# Tests of optional extras run where the extra is installed; elsewhere, e.g. on the GPU machine with carried wheels,
# their files are left out (and a test that needs an extra of its own calls pytest.importorskip) and the report
# header says which. CI must run every test: with AWR_REQUIRE_EXTRAS=1 (.ci/run sets it) a missing extra is an
# error before any test runs, and a test skipped by pytest.importorskip fails.
REQUIRE_EXTRAS = os.environ.get("AWR_REQUIRE_EXTRAS") == "1"
OPTIONAL_EXTRAS = {"test_offline_data.py": ("minari", "h5py"), "test_trackers.py": ("mlflow", "wandb", "tensorboardX"),
                   "test_videos.py": ("moviepy",)}
MISSING_EXTRAS = {name: [module for module in modules if importlib.util.find_spec(module) is None]
                  for name, modules in OPTIONAL_EXTRAS.items()}
collect_ignore = [name for name, missing in MISSING_EXTRAS.items() if missing]
IMPORTORSKIP_REASON = "could not import"  # how pytest.importorskip words its skip


def pytest_configure(config) -> None:
    if REQUIRE_EXTRAS and collect_ignore:
        missing = "; ".join(f"{name} needs {', '.join(MISSING_EXTRAS[name])}" for name in collect_ignore)
        raise pytest.UsageError(f"AWR_REQUIRE_EXTRAS=1: every test must run, but optional extras are not installed "
                                f"({missing}). Install them: pip install -e '.[test]'.")


def pytest_report_header(config) -> str | None:
    if collect_ignore:
        return f"left out, their optional extra is not installed: {', '.join(collect_ignore)}"
    return None


def _fail_a_skip_for_a_missing_extra(report) -> None:
    """Under AWR_REQUIRE_EXTRAS=1, a module or test skipped by ``pytest.importorskip`` is reported as failed."""
    if REQUIRE_EXTRAS and report.skipped and IMPORTORSKIP_REASON in str(report.longrepr):
        report.outcome = "failed"
        report.longrepr = f"AWR_REQUIRE_EXTRAS=1: skipped for a missing extra: {report.longrepr}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    _fail_a_skip_for_a_missing_extra(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    report = yield
    _fail_a_skip_for_a_missing_extra(report)
    return report


OBS_DIM = 3
ACT_DIM = 2
N_ACTIONS = 4


@pytest.fixture(autouse=True)
def _one_thread_and_seed():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    np.random.seed(0)  # TorchRL's prioritized sampler draws from numpy's global generator on CPU


def make_actor(kind: str) -> ProbabilisticActor:
    if kind == "normal":
        net = nn.Sequential(MLP(in_features=OBS_DIM, out_features=ACT_DIM, num_cells=[16]), FixedStd(0.4))
        module = TensorDictModule(net, in_keys=["observation"], out_keys=["loc", "scale"])
        return ProbabilisticActor(module, in_keys=["loc", "scale"], distribution_class=IndependentNormal,
                                  return_log_prob=True)
    if kind == "plain_normal":
        net = nn.Sequential(MLP(in_features=OBS_DIM, out_features=2 * ACT_DIM, num_cells=[16]), NormalParamExtractor())
        module = TensorDictModule(net, in_keys=["observation"], out_keys=["loc", "scale"])
        return ProbabilisticActor(module, in_keys=["loc", "scale"], distribution_class=torch.distributions.Normal,
                                  return_log_prob=True)
    if kind == "tanh_normal":
        net = nn.Sequential(MLP(in_features=OBS_DIM, out_features=2 * ACT_DIM, num_cells=[16]), NormalParamExtractor())
        module = TensorDictModule(net, in_keys=["observation"], out_keys=["loc", "scale"])
        return ProbabilisticActor(module, in_keys=["loc", "scale"], distribution_class=TanhNormal,
                                  return_log_prob=True)
    if kind == "categorical":
        module = TensorDictModule(MLP(in_features=OBS_DIM, out_features=N_ACTIONS, num_cells=[16]),
                                  in_keys=["observation"], out_keys=["logits"])
        return ProbabilisticActor(module, in_keys=["logits"], distribution_class=OneHotCategorical,
                                  return_log_prob=True)
    raise ValueError(kind)


def make_critic() -> ValueOperator:
    return ValueOperator(MLP(in_features=OBS_DIM, out_features=1, num_cells=[16]), in_keys=["observation"])


def make_batch(kind: str, n: int = 8) -> TensorDict:
    """A flat batch of transitions with stored actions, advantages and returns."""
    obs = torch.randn(n, OBS_DIM)
    if kind == "categorical":
        action = torch.nn.functional.one_hot(torch.randint(N_ACTIONS, (n,)), N_ACTIONS)
    elif kind == "tanh_normal":
        action = torch.rand(n, ACT_DIM) * 1.8 - 0.9
    else:
        action = torch.randn(n, ACT_DIM)
    return TensorDict(
        {
            "observation": obs,
            "action": action,
            "advantage": torch.randn(n, 1) * 2,
            "value_target": torch.randn(n, 1),
            "sample_log_prob": -torch.rand(n),
        },
        [n],
    )


ACTOR_KINDS = ["normal", "plain_normal", "tanh_normal", "categorical"]


def make_linear_critic(weight: list[float]) -> ValueOperator:
    """``V(s) = s . weight``, no bias: values a test can recompute by hand."""
    linear = nn.Linear(len(weight), 1, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([weight]))
    return ValueOperator(linear, in_keys=["observation"])


def dist_params(actor: ProbabilisticActor, td: TensorDict) -> TensorDict:
    """Run the actor's parameter network alone (``loc``/``scale`` or ``logits``), without sampling."""
    return actor[0](td.select(*actor[0].in_keys).clone())


def td_lambda_reference(
    reward: list[float],
    next_value: list[float],
    end: list[bool],
    terminated: list[bool],
    gamma: float,
    lmbda: float,
) -> list[float]:
    """Plain-Python TD(lambda) returns of a chronological sequence cut into paths at ``end``.

    Inside a path ``G_t = r_t + gamma ((1 - lambda) V(s'_t) + lambda G_{t+1})``; at a path's
    last step ``G_t = r_t + gamma V(s'_t) (1 - terminated_t)``.
    """
    returns = [0.0] * len(reward)
    for t in reversed(range(len(reward))):
        if end[t]:
            returns[t] = reward[t] + gamma * next_value[t] * (0.0 if terminated[t] else 1.0)
        else:
            returns[t] = reward[t] + gamma * ((1 - lmbda) * next_value[t] + lmbda * returns[t + 1])
    return returns
