"""What ``AWRLoss`` reports about a batch beside its losses: the AWR weights, advantages and policy.

Summaries over the batch's valid rows (TorchRL's validity masks select them), detached, in the
order of ``AWRLoss.DIAGNOSTICS``. The weights' effective sample size ``(sum w)^2 / (n sum w^2)``
is the fraction of the batch that effectively carries the gradient; ``kl_behaviour`` estimates
``KL(mu || pi) = E_mu[log mu(a|s) - log pi(a|s)]`` from the behaviour log-probs stored at collection.
"""

from __future__ import annotations

import torch

from awr_modules.value_targets import masked_mean, mean_and_std


def batch_diagnostics(weight: torch.Tensor, advantage: torch.Tensor, log_prob: torch.Tensor, entropy: torch.Tensor,
                      behaviour_log_prob: torch.Tensor | None, max_weight: torch.Tensor,
                      valid: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The diagnostics of one batch; ``kl_behaviour`` is nan when no behaviour log-prob was stored."""
    weight, advantage, log_prob = weight.detach(), advantage.detach(), log_prob.detach()
    weight_mean = masked_mean(weight, valid)
    advantage_mean, advantage_std = mean_and_std(advantage, valid)
    if behaviour_log_prob is None:
        kl_behaviour = torch.full_like(weight_mean, float("nan"))
    else:
        kl_behaviour = masked_mean(behaviour_log_prob.reshape(log_prob.shape).float() - log_prob, valid)
    clipped = (weight >= max_weight * (1 - 1e-6)).float()
    return {
        "weight_mean": weight_mean,
        "weight_max": (weight if valid is None else torch.where(valid, weight, torch.zeros_like(weight))).max(),
        "weight_clip_fraction": masked_mean(clipped, valid),
        "weight_ess": weight_mean.pow(2) / masked_mean(weight.pow(2), valid),
        "advantage_mean": advantage_mean,
        "advantage_std": advantage_std,
        "log_prob_mean": masked_mean(log_prob, valid),
        "entropy": masked_mean(entropy.detach(), valid),
        "kl_behaviour": kl_behaviour,
    }
