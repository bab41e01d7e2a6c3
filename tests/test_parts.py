"""Each part's own argument checks, and the combinations of parts that are refused before any step.

A refusal names the field at fault (and, for a combination, both parts) and what to do instead.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_actor, make_critic
from lightning_helpers import tiny_args

from awr_modules import AWRLoss, make_replay_buffer
from awr_modules.cli import cli_main
from awr_modules.data import Collected, CollectedAfterDataset, CollectedBesideDataset, GivenBuffers, MinariDataset
from awr_modules.evaluators import InProcess, InWorker
from awr_modules.execution import Compiled, CudaGraphs, Eager, PlainSteps
from awr_modules.iteration import AWRIteration
from awr_modules.phases import Phase
from awr_modules.targets import GAE, KStep, TDLambda
from awr_modules.temperature import Fixed, TunedToESS, TunedToKL


@pytest.mark.parametrize(("build", "message"), [
    (lambda: Phase(-1), "steps must be >= 0"),
    (lambda: Phase(10, 0), "batch_size must be >= 1"),
    (lambda: Collected(frames_per_iteration=100, num_envs=8), r"frames_per_iteration \(100\).*multiple of num_envs"),
    (lambda: Collected(buffer_size=0), "buffer_size must be >= 1"),
    (lambda: Collected(num_envs=0), "num_envs must be >= 1"),
    (lambda: TDLambda(gamma=1.0), r"gamma must be in \[0, 1\)"),
    (lambda: TDLambda(lmbda=1.1), r"lmbda must be in \[0, 1\]"),
    (lambda: GAE(lmbda=-0.1), r"lmbda must be in \[0, 1\]"),
    (lambda: KStep(horizon=0), "horizon must be >= 1"),
    (lambda: TDLambda(chunk_size=0), "chunk_size must be >= 1"),
    (lambda: TDLambda(refresh_every=0), "refresh_every must be >= 1"),
    (lambda: TDLambda(value_scale=0.0), "value_scale must be > 0"),
    (lambda: Fixed(0.0), "beta must be > 0"),
    (lambda: TunedToESS(1.0), r"ESS in \(0, 1\)"),
    (lambda: TunedToKL(0.0), "KL > 0"),
    (lambda: Compiled(fused_steps=0), "fused_steps must be >= 1"),
    (lambda: InProcess(episodes=0), "episodes must be >= 1"),
    (lambda: InWorker(episodes=0), "episodes must be >= 1"),
])
def test_each_part_refuses_its_bad_arguments(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_the_module_refuses_a_part_of_the_wrong_kind():
    from awr_modules import AWRModule
    from awr_recipes.classic_control import ClassicControl

    with pytest.raises(TypeError, match="model.data must be a DataSource part, got 'threads'"):
        AWRModule(ClassicControl("Pendulum-v1", hidden_sizes=[8]), data="threads")
    with pytest.raises(TypeError, match="asynchronous must be true or false"):
        Collected(asynchronous="threads")
    first, second = (AWRModule(ClassicControl("Pendulum-v1", hidden_sizes=[8])) for _ in range(2))
    for a, b in ((first.awr.data, second.awr.data), (first.awr.targets, second.awr.targets),
                 (first.evaluator, second.evaluator), (first.awr.execution, second.awr.execution)):
        assert type(a) is type(b) and a is not b  # parts hold state: each module its own default
    assert type(first.awr.data) is Collected and type(first.awr.execution) is Eager


def test_the_default_parts_are_lazy_instances_that_pickle_and_leave_inspect_as_it_was():
    """The defaults are jsonargparse's lazy instances, their classes registered in ``module_parts`` (so that
    ``ddp_spawn`` can pickle a module holding them), built without leaving ``inspect.stack`` patched."""
    import inspect
    import pickle

    from awr_modules import module_parts

    assert inspect.stack.__module__ == "inspect"
    for name, part in module_parts.DEFAULT_PARTS.items():
        kind = type(part)
        assert kind.__module__ == "awr_modules.module_parts" and getattr(module_parts, kind.__qualname__) is kind
        assert isinstance(part, module_parts.PART_TYPES[name][1])
        assert type(pickle.loads(pickle.dumps(part))) is kind


def test_value_scale_defaults_to_the_reference_and_targets_attach_their_estimator():
    assert TDLambda(gamma=0.99).value_scale == pytest.approx(100.0)
    assert TDLambda(gamma=0.9, value_scale=3.0).value_scale == 3.0
    loss = AWRLoss(make_actor("normal"), make_critic())
    for part, name in ((TDLambda(0.9, 0.5), "TDLambdaEstimator"), (GAE(0.9, 0.5), "GAE"),
                       (KStep(0.9, 3), "KStepReturnEstimator")):
        part.attach(loss)
        assert type(loss.value_estimator).__name__ == name
        assert float(loss.value_estimator.gamma) == pytest.approx(0.9)
    assert int(loss.value_estimator.horizon) == 3


def _iteration(loss: AWRLoss, data, targets=None, temperature=None) -> AWRIteration:
    return AWRIteration(loss, data, targets or TDLambda(), temperature or Fixed(), Phase(1), Phase(1), Eager())


def test_online_data_refuses_spaced_refreshes_naming_both_parts():
    loss = AWRLoss(make_actor("normal"), make_critic())
    with pytest.raises(ValueError, match=r"model.targets.refresh_every=2.*model.data \(Collected\)"):
        _iteration(loss, Collected(), TDLambda(refresh_every=2))
    _iteration(loss, MinariDataset("any/dataset-v0"), TDLambda(refresh_every=2))  # offline: allowed


def test_sampling_by_weight_is_refused_beside_a_kept_dataset():
    loss = AWRLoss(make_actor("normal"), make_critic(), weighting="sampling")
    with pytest.raises(ValueError, match=r"weighting='sampling'.*CollectedBesideDataset"):
        _iteration(loss, CollectedBesideDataset("pendulum/random-v0"))
    _iteration(loss, CollectedAfterDataset("pendulum/random-v0"))  # one buffer: allowed
    with pytest.raises(ValueError, match="one prioritized buffer, got 2"):
        _iteration(loss, GivenBuffers(make_replay_buffer(4), make_replay_buffer(4)))


def test_a_tuned_temperature_is_refused_for_behaviour_cloning():
    loss = AWRLoss(make_actor("normal"), make_critic(), weighting="uniform")
    with pytest.raises(ValueError, match=r"model.temperature \(TunedToKL\).*weighting='uniform'"):
        _iteration(loss, Collected(), temperature=TunedToKL(0.5))
    _iteration(loss, Collected(), temperature=Fixed())


def test_cuda_graphs_are_refused_under_ddp_and_warn_without_cuda():
    loss = AWRLoss(make_actor("normal"), make_critic(), functional=False)
    optimizers = {"policy": torch.optim.SGD(loss.actor_network.parameters(), lr=0.1),
                  "value": torch.optim.SGD(loss.critic_network.parameters(), lr=0.1)}
    networks = {"policy": loss.actor_network, "value": loss.critic_network}
    with pytest.raises(ValueError, match=r"world size 2.*Compiled"):
        CudaGraphs().bind(loss, networks, optimizers, PlainSteps(), device=torch.device("cpu"), world_size=2)
    with pytest.warns(UserWarning, match="need a CUDA device"):
        CudaGraphs(compile=False).bind(loss, networks, optimizers, PlainSteps(), device=torch.device("cpu"),
                                       world_size=1)


@pytest.mark.parametrize(("extra", "message"), [
    (["--model.loss.init_args.temperature=0.5"], r"temperature=0.5: set it in model.temperature"),
    (["--model.loss.init_args.value_scale=3.0"], r"value_scale=3.0: set it in model.targets.init_args.value_scale"),
    (["--model.loss.init_args.functional=false"], "functional=False: the module fixes it"),
])
def test_the_module_refuses_loss_settings_that_other_parts_own(tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):
        cli_main([*tiny_args(tmp_path, extra=extra), "--trainer.logger=false"], run=False)


def test_a_config_of_parts_builds_the_module_it_names(tmp_path):
    extra = ["--model.data.init_args.num_envs=4", "--model.targets=awr_modules.targets.GAE",
             "--model.temperature=awr_modules.temperature.TunedToESS", "--model.temperature.init_args.target=0.3",
             "--model.execution=awr_modules.execution.Compiled", "--model.actor_optimizer=torch.optim.Adam",
             "--model.actor_optimizer.init_args.lr=0.003"]
    module = cli_main([*tiny_args(tmp_path, extra=extra), "--trainer.logger=false"], run=False).model
    awr = module.awr
    assert (awr.data.frames_per_iteration, awr.data.num_envs) == (128, 4)
    assert type(awr.targets) is GAE and type(awr.loss.value_estimator).__name__ == "GAE"
    assert awr.temperature.target == 0.3 and type(awr.execution) is Compiled
    assert (awr.value_phase, awr.policy_phase) == (Phase(3, 32), Phase(3, 32))
    actor_optimizer, critic_optimizer = module.configure_optimizers()[0]
    assert type(actor_optimizer) is torch.optim.Adam and actor_optimizer.defaults["lr"] == 0.003
    assert type(critic_optimizer) is torch.optim.SGD and critic_optimizer.defaults["momentum"] == 0.9


def test_offline_data_without_a_dataset_cannot_be_written(tmp_path, capsys):
    """Training offline needs a dataset: MinariDataset's dataset_id has no default, and the parser names it."""
    with pytest.raises(SystemExit):
        cli_main([*tiny_args(tmp_path, extra=["--model.data=awr_modules.data.MinariDataset"]),
                  "--trainer.logger=false"], run=False)
    assert "dataset_id" in capsys.readouterr().err
