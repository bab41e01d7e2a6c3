"""``model.execution: awr_modules.execution.CudaGraphs``: each phase's gradient computation replayed as a CUDA graph.

On any machine:
- a phase's graph is reused while the stored data, the parameters and the gradients keep
  their addresses (and the data its length), and recaptured when one changes (the buffer
  grew, a key was reallocated, Lightning reset the gradients, a parameter was replaced);
- gradients keep their tensors through a phase (zeroed in place, never reset to None);
- the captured function returns detached outputs and runs with autocast's cache off
  (with the cache on, a graph would keep reading stale low-precision weight copies);
- ``CapturedGradients`` hands ``CudaGraphModule`` its warm-up (3 with ``compile``, else 2), the
  stored data's device and a detached step (checked with a stand-in that replays eagerly);
- the graphed path of ``CudaGraphs``, with ``CudaGraphModule`` replaced by that eager stand-in, trains
  exactly the parameters of the eager path and recaptures only when the layout moved (this
  checks the execution's side of the graphs, not CUDA graph capture itself);
- ``CudaGraphs`` under DDP fails before training with a clear message; on a CPU it warns,
  builds no ``CapturedGradients`` and so runs the eager path.

The eager fits these compare against are run once per module (:func:`eager_fit`), shared by the tests that
compare the same configuration.

On a CUDA device (skipped elsewhere; ``benchmarks/gpu_smoke.sh`` runs them on the lent GPU):
- two iterations with graphs train the same parameters as eager (fp32, bf16-mixed, 16-mixed;
  fixed-std Gaussian and TanhNormal actors), each phase captured;
- with a full buffer and no evaluation in between, one graph per phase is reused across
  iterations and training still matches eager.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from lightning_helpers import FRAMES, tiny_args
from tensordict import TensorDict

from awr_modules import AWRModule
from awr_modules.cli import cli_main
from awr_modules.cuda_graphs import CapturedGradients, _capturable, move_distribution_kwargs
from awr_modules.execution import CudaGraphs, PlainSteps
from awr_recipes.classic_control import ClassicControl

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GRAPHS = ["--model.execution=awr_modules.execution.CudaGraphs", "--model.execution.init_args.compile=false"]
"""CUDA graphs of the eager loss (the old ``cudagraphs=true`` with ``compile=false``): warm-up 2."""
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _stored(rows: int) -> TensorDict:
    return TensorDict({"observation": torch.randn(rows, 3, device=DEVICE)}, [rows], device=DEVICE)


def test_a_phase_graph_is_reused_until_what_it_reads_or_writes_moves():
    captured = CapturedGradients()
    stored = _stored(64)
    network = torch.nn.Linear(3, 1).to(DEVICE)
    step = lambda index: TensorDict({"x": network(stored[index]["observation"]).sum()}, [])
    first = captured("policy", stored, step, network)
    assert all(p.grad is not None for p in network.parameters())  # zero gradients exist before any capture
    assert captured("policy", stored, step, network) is first
    assert captured("policy", stored.clone(), step, network) is not first   # same length, other addresses
    grown = captured("policy", _stored(128), step, network)                 # the buffer grew
    assert grown is not first
    assert captured("value", stored, step, network) is not grown            # one graph per phase
    again = captured("value", stored, step, network)
    network.zero_grad(set_to_none=True)                                     # Lightning's reset before evaluation
    recaptured = captured("value", stored, step, network)
    assert recaptured is not again
    assert captured("value", stored, step, network) is recaptured           # one recapture per reset
    network.weight.data = network.weight.data.clone()                       # a parameter replaced, not updated
    assert captured("value", stored, step, network) is not recaptured


def test_captured_function_detaches_and_turns_the_autocast_cache_off():
    weight = torch.ones(3, requires_grad=True, device=DEVICE)
    seen = {}

    def step(index):
        seen["cache"] = torch.is_autocast_cache_enabled()
        seen["dtype"] = torch.get_autocast_dtype(DEVICE)
        seen["enabled"] = torch.is_autocast_enabled(DEVICE)
        return TensorDict({"loss": (weight * index.float()).sum()}, [])

    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        assert torch.is_autocast_cache_enabled()
        out = _capturable(step)(torch.arange(3, device=DEVICE))
        assert torch.is_autocast_cache_enabled()  # restored afterwards
    assert seen == {"cache": False, "dtype": torch.bfloat16, "enabled": True}
    assert not out["loss"].requires_grad


def _optimizers(module: AWRModule) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    return (torch.optim.SGD(module.actor.parameters(), lr=0.1), torch.optim.SGD(module.critic.parameters(), lr=0.1))


def test_cudagraphs_under_ddp_fails_with_a_clear_message():
    """The module's iteration binds its execution at the start of training with the trainer's world size."""
    module = AWRModule(ClassicControl("Pendulum-v1", hidden_sizes=[8]), execution=CudaGraphs())
    with pytest.raises(ValueError, match="CUDA graphs are for a single device.*DDP"):
        module.awr.bind(*_optimizers(module), PlainSteps(), device="cpu", world_size=2)


def _fit(tmp_path, name: str, extra: list[str], epochs: int = 2) -> list[torch.Tensor]:
    args = tiny_args(tmp_path / name, epochs=epochs,
                     extra=["--model.value_phase.steps=8", "--model.policy_phase.steps=8", *extra])
    cli = cli_main(["fit", *args, "--seed_everything=0"])
    return [p.detach().float().cpu().clone() for p in cli.model.parameters()]


@pytest.fixture(scope="module")
def eager_fit(tmp_path_factory):
    """``eager_fit(extra, epochs)``: the parameters after an eager fit of that configuration, fitted once per
    module and shared by every test that compares with it (a fit is seeded by ``--seed_everything=0``)."""
    fitted: dict[tuple, list[torch.Tensor]] = {}

    def fit(extra: list[str], epochs: int = 2) -> list[torch.Tensor]:
        key = (tuple(extra), epochs)
        if key not in fitted:
            fitted[key] = _fit(tmp_path_factory.mktemp("eager"), "eager", extra, epochs=epochs)
        return [p.clone() for p in fitted[key]]

    return fit


def _spy_on_graphs(monkeypatch) -> list:
    """Record every graph ``CapturedGradients`` hands out."""
    graphs = []
    original = CapturedGradients.__call__

    def spy(self, *args):
        graph = original(self, *args)
        graphs.append(graph)
        return graph

    monkeypatch.setattr(CapturedGradients, "__call__", spy)
    return graphs


def _replace_captured_gradients(monkeypatch, make) -> list:
    """Have every ``CudaGraphs.bind`` (on a CPU: its warning silenced) end with ``make()`` as its graph cache, as
    on a CUDA device; returns the caches given, one per bind."""
    bound = []
    original = CudaGraphs.bind

    def bind(self, *args, **kwargs):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="CudaGraphs: CUDA graphs need a CUDA device")
            original(self, *args, **kwargs)
        self._captured = make()
        bound.append(self._captured)

    monkeypatch.setattr(CudaGraphs, "bind", bind)
    return bound


def test_cudagraphs_on_a_cpu_warns_and_builds_no_graph(tmp_path, monkeypatch, eager_fit):
    """On a CPU ``CudaGraphs`` is refused with a warning: no ``CapturedGradients`` is built or called,
    so the phases run the eager path and train the same parameters as ``Eager``."""
    accelerator = ["--trainer.accelerator=cpu"]
    eager = eager_fit(accelerator)
    graphs = _spy_on_graphs(monkeypatch)
    built = []
    original = CudaGraphs.bind

    def bind(self, *args, **kwargs):
        original(self, *args, **kwargs)
        built.append(self._captured)

    monkeypatch.setattr(CudaGraphs, "bind", bind)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graphed = _fit(tmp_path, "graphed", [*accelerator, *GRAPHS])
    assert any("CUDA graphs need a CUDA device" in str(w.message) for w in caught)
    assert built == [None]  # bound once, at the start of training; nothing to capture with
    assert graphs == []
    for a, b in zip(eager, graphed, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


@pytest.mark.parametrize(("compile", "warmup"), [(False, 2), (True, 3)])
def test_a_single_cuda_device_gets_captured_gradients_with_the_warmup_compile_needs(compile, warmup):
    """The choice made when the module's iteration binds its execution to a CUDA device: no CUDA device is
    touched to build the cache."""
    module = AWRModule(ClassicControl("Pendulum-v1", hidden_sizes=[8]), execution=CudaGraphs(compile=compile))
    module.awr.bind(*_optimizers(module), PlainSteps(), device=torch.device("cuda", 0), world_size=1)
    captured = module.awr.execution._captured
    assert isinstance(captured, CapturedGradients)
    assert captured.warmup == warmup
    assert module.awr.execution.compiles is compile


class _EagerGraphs:
    """Stands in for ``CudaGraphModule`` on a CPU: records each graph built and replays its function eagerly."""

    def __init__(self) -> None:
        self.built: list[dict] = []

    def __call__(self, function, warmup, device):
        record = {"warmup": warmup, "device": torch.device(device), "calls": 0}
        self.built.append(record)

        def replay(*args):
            record["calls"] += 1
            return function(*args)

        return replay


def test_capture_receives_a_detached_step_and_preallocated_gradients(monkeypatch):
    """What ``CapturedGradients`` hands to ``CudaGraphModule``: its warm-up, the stored data's device, and a
    function whose outputs are detached and whose gradients land in tensors allocated before the capture."""
    graphs = _EagerGraphs()
    monkeypatch.setattr("awr_modules.cuda_graphs.CudaGraphModule", graphs)
    stored = TensorDict({"observation": torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.5, 0.0]])}, [2])
    network = torch.nn.Linear(3, 1)

    def step(index):
        network.zero_grad(set_to_none=False)
        loss = network(stored[index]["observation"]).sum()
        loss.backward()
        return TensorDict({"loss": loss}, [])

    captured = CapturedGradients(warmup=5)
    graph = captured("policy", stored, step, network)
    grads = [p.grad for p in network.parameters()]
    assert all(g is not None and not g.any() for g in grads)  # zero gradients exist before the first replay
    out = graph(torch.tensor([0, 1, 1]))
    assert not out["loss"].requires_grad
    # d/dW sum_i (W s_i + b) = sum_i s_i over rows 0, 1, 1; d/db = 3
    torch.testing.assert_close(network.weight.grad, torch.tensor([[-1.0, 3.0, 3.0]]))
    torch.testing.assert_close(network.bias.grad, torch.tensor([3.0]))
    assert all(a is b for a, b in zip(grads, [p.grad for p in network.parameters()], strict=True))  # same tensors
    assert graphs.built == [{"warmup": 5, "device": torch.device("cpu"), "calls": 1}]


@pytest.mark.parametrize(("extra", "epochs", "captures"), [
    ([], 2, 4),  # the buffer grows every iteration: each phase recaptures every iteration
    ([f"--model.data.init_args.buffer_size={FRAMES}", "--trainer.check_val_every_n_epoch=100"], 3, 2),  # full, no eval
], ids=["growing_buffer", "full_buffer"])
def test_the_graphed_path_with_eager_replay_trains_like_eager(tmp_path, monkeypatch, eager_fit, extra, epochs,
                                                              captures):
    """The graphed path of ``CudaGraphs`` (gradients zeroed in place, optimizer step outside the graph, one cache
    of graphs per phase) on a CPU, with ``CudaGraphModule`` replaced by eager replay: it trains exactly the
    parameters of the eager path, and builds a new graph only when what a graph reads moved."""
    cpu = ["--trainer.accelerator=cpu", *extra]
    eager = eager_fit(cpu, epochs=epochs)
    graphs = _EagerGraphs()
    monkeypatch.setattr("awr_modules.cuda_graphs.CudaGraphModule", graphs)
    bound = _replace_captured_gradients(monkeypatch, lambda: CapturedGradients(warmup=2))
    graphed = _fit(tmp_path, "graphed", [*cpu, *GRAPHS], epochs=epochs)
    assert len(bound) == 1
    assert len(graphs.built) == captures
    assert sum(graph["calls"] for graph in graphs.built) == 2 * 8 * epochs  # 8 steps per phase, 2 phases
    for a, b in zip(eager, graphed, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


@needs_cuda
@pytest.mark.parametrize(("precision", "policy", "tolerance"), [
    ("32-true", "fixed_std", 1e-5), ("bf16-mixed", "fixed_std", 1e-3), ("16-mixed", "fixed_std", 1e-3),
    ("32-true", "tanh_normal", 1e-5),
])
def test_cuda_graphs_train_like_eager_on_a_gpu(tmp_path, monkeypatch, precision, policy, tolerance):
    graphs = _spy_on_graphs(monkeypatch)
    gpu = ["--trainer.accelerator=gpu", "--trainer.devices=1", f"--trainer.precision={precision}",
           f"--model.recipe.init_args.policy={policy}"]
    eager = _fit(tmp_path, "eager", gpu)
    assert not graphs
    graphed = _fit(tmp_path, "graphed", [*gpu, *GRAPHS])
    assert graphs and all(hasattr(graph, "graph") for graph in graphs)  # each phase was captured
    for a, b in zip(eager, graphed, strict=True):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(b, a, rtol=tolerance, atol=tolerance)


@needs_cuda
def test_a_full_buffer_replays_one_graph_per_phase_like_eager(tmp_path, monkeypatch):
    """The path of a long run: buffer full, no evaluation between iterations, graphs reused across iterations."""
    graphs = _spy_on_graphs(monkeypatch)
    gpu = ["--trainer.accelerator=gpu", "--trainer.devices=1", f"--model.data.init_args.buffer_size={FRAMES}",
           "--trainer.check_val_every_n_epoch=100"]
    eager = _fit(tmp_path, "eager", gpu, epochs=3)
    graphed = _fit(tmp_path, "graphed", [*gpu, *GRAPHS], epochs=3)
    assert len(graphs) == 6 and len({id(graph) for graph in graphs}) == 2  # 3 iterations x 2 phases, 2 graphs
    for a, b in zip(eager, graphed, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


class _GradientIdentities:
    """Stands in for ``CapturedGradients`` on a CPU: runs the steps and records which tensors hold ``.grad``."""

    def __init__(self) -> None:
        self.runs: list[tuple[str, list[tuple[int, ...]]]] = []

    def __call__(self, phase, stored, step, network):
        seen: list[tuple[int, ...]] = []
        self.runs.append((phase, seen))

        def recorded(index):
            out = step(index)
            seen.append(tuple(id(p.grad) for p in network.parameters()))
            return out

        return recorded


def test_graphed_steps_keep_their_gradient_tensors(tmp_path, monkeypatch):
    """The call that captures a graph computes its gradients eagerly; they must stay in the tensors the
    graph writes (zeroed in place, never reset to None), or that step's optimizer update reads garbage."""
    recorder = _GradientIdentities()
    _replace_captured_gradients(monkeypatch, lambda: recorder)
    _fit(tmp_path, "persist", ["--trainer.accelerator=cpu", *GRAPHS])
    assert [phase for phase, _ in recorder.runs] == ["value", "policy"] * 2
    for phase, identities in recorder.runs:
        assert len(identities) == 8
        assert len(set(identities)) == 1, f"{phase}: .grad was replaced between the steps of a phase"


def test_distribution_tensor_arguments_follow_the_actor_to_its_device():
    """TanhNormal's bounds live in a plain dict that ``.to(device)`` misses; a graph cannot capture their copy."""
    actor = ClassicControl("Pendulum-v1", hidden_sizes=[8], policy="tanh_normal").make_networks(
        ClassicControl("Pendulum-v1").make_env(0), value_scale=100.0)[0]
    move_distribution_kwargs(actor, "meta")
    bounds = [value for module in actor.modules() for value in getattr(module, "distribution_kwargs", {}).values()
              if isinstance(value, torch.Tensor)]
    assert len(bounds) == 2 and all(bound.device.type == "meta" for bound in bounds)
