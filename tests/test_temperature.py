"""The self-tuning temperature: ESS and KL of the AWR weights, the bisection that meets a target, and the module's
``temperature_tuning`` (the target met every iteration, the loss and the sampling priorities using it).

Known answers: advantages ``A ~ N(0, s^2)`` (unclipped weights are log-normal) give ``ESS = exp(-s^2 / beta^2)``
and ``KL(pi || mu) = s^2 / (2 beta^2)`` (pi shifts the Gaussian's mean by ``s^2 / beta``); a two-point advantage
gives the ESS in closed form with the clip active.
"""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from lightning_helpers import RecordPriorities, metric_rows, tiny_args

from awr_modules import AWRLoss, AWRModule
from awr_modules.cli import cli_main
from awr_modules.temperature import (
    TunedToESS,
    TunedToKL,
    effective_sample_size,
    kl_from_behaviour,
    measure_weights,
    solve_temperature,
)
from awr_recipes.classic_control import ClassicControl

SCALE = 1.5


@pytest.fixture(scope="module")
def gaussian_advantages() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return SCALE * torch.randn(400_000, generator=generator, dtype=torch.float64)


def test_equal_weights_have_full_ess_and_no_kl() -> None:
    advantage = torch.zeros(100)
    assert effective_sample_size(advantage, 0.3) == pytest.approx(1.0)
    assert kl_from_behaviour(advantage, 0.3) == pytest.approx(0.0, abs=1e-12)


def test_ess_and_kl_of_gaussian_advantages_match_their_closed_forms(gaussian_advantages) -> None:
    beta = 2.0
    assert effective_sample_size(gaussian_advantages, beta) == pytest.approx(math.exp(-SCALE**2 / beta**2), rel=0.02)
    assert kl_from_behaviour(gaussian_advantages, beta) == pytest.approx(SCALE**2 / (2 * beta**2), rel=0.02)


@pytest.mark.parametrize("target", [0.2, 0.5, 0.8])
def test_the_ess_target_is_met_at_the_closed_form_temperature(gaussian_advantages, target: float) -> None:
    beta = solve_temperature(gaussian_advantages, target, "ess")
    assert beta == pytest.approx(SCALE / math.sqrt(-math.log(target)), rel=0.03)
    assert effective_sample_size(gaussian_advantages, beta) == pytest.approx(target, rel=1e-4)


@pytest.mark.parametrize("target", [0.05, 0.2, 1.0])
def test_the_kl_target_is_met_at_the_closed_form_temperature(gaussian_advantages, target: float) -> None:
    beta = solve_temperature(gaussian_advantages, target, "kl")
    assert beta == pytest.approx(SCALE / math.sqrt(2 * target), rel=0.03)
    assert kl_from_behaviour(gaussian_advantages, beta) == pytest.approx(target, rel=1e-4)


def test_the_clip_enters_the_measure_and_the_solution() -> None:
    """A fraction q of the transitions has advantage 1, the rest 0: with beta small enough the weight of the first is
    the clip c, so ESS = (q c + 1 - q)^2 / (q c^2 + 1 - q) whatever beta; above log-c-crossing it follows exp(1/beta)."""
    q, clip = 0.1, 20.0
    advantage = torch.cat([torch.ones(100), torch.zeros(900)])
    clipped_ess = (q * clip + 1 - q) ** 2 / (q * clip**2 + 1 - q)
    assert effective_sample_size(advantage, 0.1, clip) == pytest.approx(clipped_ess)
    beta = 0.5  # exp(2) < 20: unclipped
    weight = math.exp(1 / beta)
    target = (q * weight + 1 - q) ** 2 / (q * weight**2 + 1 - q)
    assert solve_temperature(advantage, target, "ess", max_weight=clip) == pytest.approx(beta, rel=1e-4)
    # no beta gives an ESS below the clipped one: the search ends at its lower bound
    assert solve_temperature(advantage, clipped_ess / 2, "ess", max_weight=clip) == pytest.approx(1e-3, rel=1e-6)


def test_with_the_clip_the_solution_is_on_the_branch_where_a_larger_beta_flattens_the_weights(
        gaussian_advantages) -> None:
    """With w_max = 20 the ESS of N(0, s^2) advantages dips (at small beta most positive advantages sit at the clip,
    and the ESS rises again towards the fraction of positive ones): the target is met above the dip."""
    betas = [0.01 * SCALE, 0.3 * SCALE, SCALE, 2 * SCALE]
    ess = [effective_sample_size(gaussian_advantages, beta, 20.0) for beta in betas]
    assert ess[0] > ess[1] < ess[2] < ess[3]  # not monotone: a plain bisection could end on the left branch
    for target in (0.45, ess[0] - 0.02):  # also one that the left branch reaches too
        beta = solve_temperature(gaussian_advantages, target, "ess", max_weight=20.0)
        assert beta > 0.3 * SCALE
        assert effective_sample_size(gaussian_advantages, beta, 20.0) == pytest.approx(target, rel=1e-4)
    kl_beta = solve_temperature(gaussian_advantages, 0.3, "kl", max_weight=20.0)
    assert kl_beta > 0.3 * SCALE and kl_from_behaviour(gaussian_advantages, kl_beta, 20.0) == pytest.approx(0.3, rel=1e-4)


def test_a_small_temperature_does_not_overflow() -> None:
    advantage = torch.tensor([0.0, 5.0, 10.0])
    assert effective_sample_size(advantage, 1e-3) == pytest.approx(1 / 3)
    assert kl_from_behaviour(advantage, 1e-3) == pytest.approx(math.log(3))


def test_targets_outside_the_measures_range_are_refused() -> None:
    advantage = torch.randn(10)
    with pytest.raises(ValueError, match="ESS target must be in"):
        solve_temperature(advantage, 1.0, "ess")
    with pytest.raises(ValueError, match="KL target must be > 0"):
        solve_temperature(advantage, 0.0, "kl")
    with pytest.raises(ValueError, match="measure must be one of"):
        measure_weights(advantage, 1.0, "entropy")


@pytest.mark.parametrize("measure, target", [("ess", 0.5), ("kl", 0.3)])
def test_fit_tunes_the_temperature_to_the_target_every_iteration(tmp_path, measure: str, target: float) -> None:
    """Each iteration the buffer's weights meet the target at the logged temperature, which the loss then uses."""
    part = {"ess": "TunedToESS", "kl": "TunedToKL"}[measure]
    tuning = [f"--model.temperature=awr_modules.temperature.{part}", f"--model.temperature.init_args.target={target}"]
    cli = cli_main(["fit", *tiny_args(tmp_path, epochs=3, extra=tuning)])
    temperatures = metric_rows(tmp_path, "train/temperature")
    measured = metric_rows(tmp_path, f"train/buffer_weight_{measure}")
    assert len(temperatures) == len(measured) == 3
    assert measured == pytest.approx([target] * 3, rel=1e-4)
    assert len(set(temperatures)) == 3 and 1e-3 < min(temperatures)  # re-solved on each iteration's advantages
    assert float(cli.model.loss_module.temperature) == pytest.approx(temperatures[-1], rel=1e-6)


def test_fixed_temperature_logs_the_buffer_weights_and_keeps_beta(tmp_path) -> None:
    cli_main(["fit", *tiny_args(tmp_path, epochs=2, extra=["--model.temperature.init_args.beta=0.7"])])
    assert metric_rows(tmp_path, "train/temperature") == pytest.approx([0.7, 0.7])
    assert all(0 < ess < 1 for ess in metric_rows(tmp_path, "train/buffer_weight_ess"))


def test_sampling_priorities_use_the_tuned_temperature(tmp_path) -> None:
    extra = ["--model.loss.init_args.weighting=sampling", "--model.temperature=awr_modules.temperature.TunedToESS",
             "--model.temperature.init_args.target=0.4",
             "--trainer.callbacks+=lightning_helpers.RecordPriorities"]
    cli = cli_main(["fit", *tiny_args(tmp_path, epochs=1, extra=extra)])
    (recorder,) = [callback for callback in cli.trainer.callbacks if isinstance(callback, RecordPriorities)]
    end = recorder.records["end"]
    assert float(cli.model.loss_module.temperature) != pytest.approx(1.0)
    torch.testing.assert_close(end["priority"], cli.model.loss_module.weights(end["advantage"]) + end["buffer"].sampler._eps,
                               rtol=1e-6, atol=0)


@pytest.mark.parametrize("build, message", [
    (lambda: TunedToESS(1.5), "ESS in \\(0, 1\\)"),
    (lambda: TunedToKL(-1.0), "KL > 0"),
    (lambda: AWRModule(ClassicControl("Pendulum-v1", hidden_sizes=[8]), temperature=TunedToESS(0.5),
                       loss=partial(AWRLoss, weighting="uniform")), "weighting='uniform'"),
])
def test_bad_temperature_tuning_is_refused(build, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()
