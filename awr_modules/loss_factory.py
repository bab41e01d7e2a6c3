"""The loss part: ``model.loss`` builds :class:`~awr_modules.AWRLoss` on the recipe's networks.

The networks exist only once the recipe has built them, so the config gives a factory (LightningCLI's callable
with a class return: a ``class_path`` and the loss's own ``init_args``) that the module calls on the actor and
the critic. The loss's variants (``weighting``, the penalties) are the loss's business; settings that another
part owns (the temperature, the value scale, the advantages' standardisation) are refused here, naming their home.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import partial

from tensordict.nn import TensorDictModuleBase

from awr_modules.loss import AWRLoss

LossFactory = Callable[[TensorDictModuleBase, TensorDictModuleBase], AWRLoss]
"""Builds the loss on the recipe's actor and critic: in YAML a ``class_path`` (``awr_modules.AWRLoss``) with the
loss's own settings as ``init_args``."""

_SET_BY_THE_MODULE = {"temperature": "model.temperature", "value_scale": "model.targets.init_args.value_scale",
                      "normalize_advantage": "model.targets.init_args.normalize_advantage",
                      "check_inputs": None, "functional": None, "reduction": None}
"""AWRLoss arguments that other parts own (their home in the config), or that the phases fix."""


def build_loss(factory: LossFactory | None, actor: TensorDictModuleBase, critic: TensorDictModuleBase,
                value_scale: float) -> AWRLoss:
    """The loss on ``actor`` and ``critic``, its networks called as they are (no parameter swap per minibatch)
    and its inputs checked once per phase instead of once per step. Settings that other parts own are refused
    in the loss's ``init_args``, naming their home."""
    if factory is None:
        factory = partial(AWRLoss, action_bound_penalty=None)  # the reference's penalty for the recipe's actor
    defaults = inspect.signature(AWRLoss).parameters
    for name, home in _SET_BY_THE_MODULE.items():
        given = getattr(factory, "keywords", {}).get(name, defaults[name].default)
        if given != defaults[name].default:
            where = f"set it in {home}" if home else "the module fixes it"
            raise ValueError(f"model.loss.init_args.{name}={given!r}: {where}, and leave it out of model.loss.")
    return factory(actor, critic, value_scale=value_scale, check_inputs=False, functional=False)


