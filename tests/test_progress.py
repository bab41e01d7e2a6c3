"""``AWRProgressBar``: env steps toward the budget, env steps per second and the last evaluation return, as text.

The rate is computed from a clock the tests set, so nothing here depends on how fast the machine is.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from awr_modules.progress import AWRProgressBar, EnvStepRate, format_number, progress_metrics


@pytest.mark.parametrize(("value", "shown"), [
    (6144.0, "6144"), (6144, "6144"), (torch.tensor(3.0), "3"), (-0.0, "0"), (200000.0, "200000"),
    (-141.27, "-141.3"), (12345.67, "12345.7"), (0.123456, "0.1235"), (-3.14159, "-3.142"), (2.5e-05, "2.5e-05"),
    (float("nan"), "nan"), (float("-inf"), "-inf"),
])
def test_whole_numbers_print_as_integers_and_others_briefly(value, shown):
    assert format_number(value) == shown


def test_the_postfix_shows_env_steps_toward_the_budget_the_rate_and_the_return_first():
    metrics = progress_metrics(6144, 200000, 1234.6, -141.27,
                               {"v_num": 3, "env_steps": 6144.0, "eval/return": -141.27, "train/return": -1200.0})
    assert metrics == {"env_steps": "6144/200000", "env_steps/s": "1235", "eval/return": "-141.3",
                       "train/return": "-1200"}
    assert list(metrics)[:3] == ["env_steps", "env_steps/s", "eval/return"]


def test_without_a_budget_rate_or_evaluation_the_bar_shows_what_it_knows():
    assert progress_metrics(512, None, None, None) == {"env_steps": "512"}
    assert progress_metrics(0, 1000, 2.25, None) == {"env_steps": "0/1000", "env_steps/s": "2.25"}


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_rate_counts_steps_and_time_since_the_start_only():
    clock = Clock()
    rate = EnvStepRate(clock)
    assert rate.rate(100) is None  # not started
    rate.start(4096)  # a resumed run: its earlier steps are not this fit's
    assert rate.rate(4096) is None  # no step and no time yet
    clock.now += 2.0
    assert rate.rate(6144) == pytest.approx(1024.0)
    clock.now += 2.0
    assert rate.rate(8192) == pytest.approx(1024.0)


def test_the_bar_reads_the_module_and_keeps_the_last_evaluation_return():
    clock = Clock()
    bar = AWRProgressBar()
    bar.env_step_rate = EnvStepRate(clock)
    module = SimpleNamespace(env_steps=4096, max_env_steps=200000)
    bar.env_step_rate.start(module.env_steps)
    clock.now += 4.0
    module.env_steps = 6144
    evaluated = SimpleNamespace(callback_metrics={"eval/return": torch.tensor(-141.27)},
                                progress_bar_metrics={"v_num": 0, "env_steps": 6144.0})
    assert bar.get_metrics(evaluated, module) == {"env_steps": "6144/200000", "env_steps/s": "512",
                                                  "eval/return": "-141.3"}
    module.env_steps = 8192  # an iteration without an evaluation: the last return stays on the bar
    later = SimpleNamespace(callback_metrics={}, progress_bar_metrics={"iteration": 4.0})
    assert bar.get_metrics(later, module) == {"env_steps": "8192/200000", "env_steps/s": "1024",
                                              "eval/return": "-141.3", "iteration": "4"}


def test_a_module_without_a_budget_shows_its_steps_alone():
    bar = AWRProgressBar()
    trainer = SimpleNamespace(callback_metrics={}, progress_bar_metrics={})
    assert bar.get_metrics(trainer, SimpleNamespace(env_steps=128, max_env_steps=None)) == {"env_steps": "128"}


def test_the_bar_shows_no_iterations_per_second():
    assert "rate" not in AWRProgressBar.BAR_FORMAT and "{postfix}" in AWRProgressBar.BAR_FORMAT
