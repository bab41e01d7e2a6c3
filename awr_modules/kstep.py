"""The k-step return of the AWR paper as a TorchRL value estimator.

    R_t = sum_{i<k} gamma^i r_{t+i} + gamma^k V(s_{t+k}),     A_t = R_t - V(s_t)

cut at episode ends: if the trajectory ends at step ``t + j`` with ``j < k``, the
sum stops there and bootstraps from ``V(s'_{t+j})`` unless the episode
*terminated* (then the bootstrap is 0). The end of the time axis is a cut as
well (bootstrap from the stored next state).
"""

from __future__ import annotations

import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModule
from torchrl.objectives.value import ValueEstimatorBase


class KStepReturnEstimator(ValueEstimatorBase):
    r"""k-step bootstrapped return ``R_t = sum_{i<k} gamma^i r_{t+i} + gamma^k V(s_{t+k})``.

    Vectorised over the batch and time: the only Python loop runs over the ``k``
    steps of the horizon, not over transitions.

    Keyword Args:
        gamma: discount factor.
        horizon: ``k``, the number of rewards summed before bootstrapping (>= 1).
            ``horizon=1`` is TD(0); a horizon longer than the trajectory is the
            Monte-Carlo return bootstrapped at the cut.
        value_network: the critic (``ValueOperator``) giving ``V(s)``.
        differentiable: let gradients flow through the targets (default ``False``).
        device: where the ``gamma`` buffer lives.

    Input: a trajectory-shaped TensorDict ``[*B, T]`` with the critic's ``in_keys``,
    ``("next", <in_keys>)``, ``("next", "reward")``, ``("next", "done")`` and
    ``("next", "terminated")``. Writes ``state_value``, ``value_target`` and
    ``advantage``, each ``[*B, T, 1]``.

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from torchrl.modules import ValueOperator
        >>> from awr_modules import KStepReturnEstimator
        >>> critic = ValueOperator(torch.nn.Linear(3, 1), in_keys=["observation"])
        >>> estimator = KStepReturnEstimator(gamma=0.99, horizon=3, value_network=critic)
        >>> T = 5
        >>> td = TensorDict({"observation": torch.randn(T, 3), "next": {
        ...     "observation": torch.randn(T, 3), "reward": torch.ones(T, 1),
        ...     "done": torch.zeros(T, 1, dtype=torch.bool),
        ...     "terminated": torch.zeros(T, 1, dtype=torch.bool)}}, [T])
        >>> estimator(td)["advantage"].shape
        torch.Size([5, 1])
    """

    def __init__(
        self,
        *,
        gamma: float,
        horizon: int,
        value_network: TensorDictModule,
        differentiable: bool = False,
        device: torch.device | None = None,
    ) -> None:
        if int(horizon) < 1:
            raise ValueError(f"KStepReturnEstimator: horizon must be >= 1, got {horizon}.")
        if not 0 <= gamma <= 1:
            raise ValueError(f"KStepReturnEstimator: gamma must be in [0, 1], got {gamma}.")
        super().__init__(value_network=value_network, differentiable=differentiable, device=device)
        self.horizon = int(horizon)
        self.register_buffer("gamma", torch.tensor(float(gamma), device=device))

    def _values(self, tensordict: TensorDictBase, params: TensorDictBase | None) -> torch.Tensor:
        network = self.value_network
        data = tensordict.select(*network.in_keys, strict=False).copy()
        if params is None:
            return network(data).get(self.tensor_keys.value)
        with params.to_module(network):
            return network(data).get(self.tensor_keys.value)

    def forward(
        self,
        tensordict: TensorDictBase,
        *,
        params: TensorDictBase | None = None,
        target_params: TensorDictBase | None = None,
    ) -> TensorDictBase:
        """Compute ``V(s)``, the k-step ``value_target`` and ``advantage`` for trajectory-shaped data."""
        if tensordict.batch_dims < 1:
            raise ValueError(
                f"KStepReturnEstimator: expected trajectory-shaped data [*B, T], got batch_size {tensordict.batch_size}."
            )
        with torch.set_grad_enabled(self.differentiable and torch.is_grad_enabled()):
            value = self._values(tensordict, params)
            next_value = self._values(tensordict.get("next"), target_params if target_params is not None else params)
            value_target = self.value_estimate(tensordict, next_value=next_value)
        tensordict.set(self.tensor_keys.value, value)
        tensordict.set(self.tensor_keys.value_target, value_target)
        tensordict.set(self.tensor_keys.advantage, value_target - value)
        return tensordict

    def value_estimate(
        self,
        tensordict: TensorDictBase,
        target_params: TensorDictBase | None = None,
        next_value: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """The k-step return of every step of ``tensordict`` (``[*B, T, 1]``), given ``V(s'_t)``."""
        if next_value is None:
            next_value = self._values(tensordict.get("next"), target_params)
        reward = tensordict.get(("next", self.tensor_keys.reward))
        done = tensordict.get(("next", self.tensor_keys.done))
        terminated = tensordict.get(("next", self.tensor_keys.terminated), default=done)
        reward, done, terminated, next_value = (
            x.reshape(*tensordict.batch_size, -1) for x in (reward, done, terminated, next_value)
        )
        gamma = self.gamma.to(reward.dtype)
        time_steps = reward.shape[-2]
        last_step = torch.zeros_like(done)
        last_step[..., -1, :] = True  # the cut at the end of the time axis
        ends = done | last_step
        bootstrap = gamma * (~terminated).to(reward.dtype) * next_value

        value_target = torch.zeros_like(reward)
        discount = torch.ones_like(reward)
        alive = torch.ones_like(done)
        for i in range(min(self.horizon, time_steps)):
            r_i, end_i, boot_i = (self._shift(x, i) for x in (reward, ends, bootstrap))
            value_target = value_target + alive * discount * r_i
            stop_here = alive & (end_i | (i == self.horizon - 1))
            value_target = value_target + stop_here * discount * boot_i
            alive = alive & ~stop_here
            discount = discount * gamma
        return value_target

    @staticmethod
    def _shift(x: torch.Tensor, steps: int) -> torch.Tensor:
        """``x[..., t + steps, :]`` at position ``t`` (zero past the end of the time axis)."""
        if steps == 0:
            return x
        pad = torch.zeros_like(x[..., :steps, :])
        return torch.cat([x[..., steps:, :], pad], dim=-2)
