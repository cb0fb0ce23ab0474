"""Preference losses as pure functions of summed sequence log-probs (ROPO_SPEC section 3).

Tensors in, tensors out: every loss takes a `PreferenceLogps` (shape [B] each) and the
`LossConfig`, and returns per-pair losses plus detached rewards for metrics. Reducing over the
batch is the caller's job, so gradient accumulation and distributed averaging stay in the trainer.
RoPO itself is `dpo_loss` on the rotated policy: its constraint lives in the parametrization.

Torch only on purpose (no ray, deepspeed, vllm, transformers), so the math imports and tests alone.
Deviations from the papers: SPO's penalty is our reconstruction (see `spo_loss`), and label
smoothing, when set, also applies to the DPO term inside RPO and SPO.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # typing only: keeps this module free of the YAML loader behind ropo_ray.config
    from ropo_ray.config.schema import LossConfig


@dataclass(frozen=True)
class PreferenceLogps:
    """Summed completion log-probs of a batch of preference pairs (chosen y_w, rejected y_l)."""

    policy_chosen_logps: torch.Tensor  # [B], sum over completion tokens
    policy_rejected_logps: torch.Tensor  # [B]
    chosen_lengths: torch.Tensor  # [B], completion token counts (int or float)
    rejected_lengths: torch.Tensor  # [B]
    ref_chosen_logps: torch.Tensor | None = None  # [B], None for reference-free losses
    ref_rejected_logps: torch.Tensor | None = None  # [B]


@dataclass(frozen=True)
class LossOutput:
    """Per-pair losses (differentiable) and implicit rewards (detached, for metrics only)."""

    losses: torch.Tensor  # [B]
    chosen_rewards: torch.Tensor  # [B], detached
    rejected_rewards: torch.Tensor  # [B], detached


def _average(logps: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    # An empty completion sums to logp 0; clamping its length to 1 keeps 0/0 out of the loss.
    return logps / lengths.to(logps.dtype).clamp_min(1.0)  # [B]


def _require_ref(logps: PreferenceLogps, loss: str) -> tuple[torch.Tensor, torch.Tensor]:
    if logps.ref_chosen_logps is None or logps.ref_rejected_logps is None:
        raise ValueError(f"loss {loss!r} needs reference log-probs (ref_chosen_logps, ref_rejected_logps), got None")
    return logps.ref_chosen_logps, logps.ref_rejected_logps


def _reference_rewards(logps: PreferenceLogps, beta: float, loss: str) -> tuple[torch.Tensor, torch.Tensor]:
    ref_chosen, ref_rejected = _require_ref(logps, loss)
    chosen = beta * (logps.policy_chosen_logps - ref_chosen)  # [B]
    rejected = beta * (logps.policy_rejected_logps - ref_rejected)  # [B]
    return chosen.detach(), rejected.detach()


def _average_rewards(logps: PreferenceLogps, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    # SimPO's implicit reward: no reference, length-normalised so long answers are not favoured.
    chosen = beta * _average(logps.policy_chosen_logps, logps.chosen_lengths)  # [B]
    rejected = beta * _average(logps.policy_rejected_logps, logps.rejected_lengths)  # [B]
    return chosen.detach(), rejected.detach()


def _dpo_terms(logps: PreferenceLogps, cfg: LossConfig, loss: str) -> torch.Tensor:
    ref_chosen, ref_rejected = _require_ref(logps, loss)
    h = (logps.policy_chosen_logps - logps.policy_rejected_logps) - (ref_chosen - ref_rejected)  # [B]
    eps = cfg.label_smoothing
    # logsigmoid, not log(sigmoid(.)): stays finite for large |beta * h|.
    return -(1 - eps) * F.logsigmoid(cfg.beta * h) - eps * F.logsigmoid(-cfg.beta * h)  # [B]


def dpo_loss(logps: PreferenceLogps, cfg: LossConfig) -> LossOutput:
    """DPO (Rafailov et al., arXiv 2305.18290, Eq. 7), with conservative-DPO label smoothing.

    h = (logp_pi(y_w) - logp_pi(y_l)) - (logp_ref(y_w) - logp_ref(y_l))
    L = -(1 - eps) log sigma(beta h) - eps log sigma(-beta h),   eps = cfg.label_smoothing
    eps = 0 gives Eq. 7. RoPO trains exactly this loss on the rotated policy.
    """
    chosen, rejected = _reference_rewards(logps, cfg.beta, "dpo")
    return LossOutput(_dpo_terms(logps, cfg, "dpo"), chosen, rejected)


def ipo_loss(logps: PreferenceLogps, cfg: LossConfig) -> LossOutput:
    """IPO (Azar et al., arXiv 2310.12036, Eq. 17) on per-token-averaged log-probs.

    h_avg = (logp_pi(y_w)/|y_w| - logp_pi(y_l)/|y_l|) - (logp_ref(y_w)/|y_w| - logp_ref(y_l)/|y_l|)
    L = (h_avg - 1 / (2 beta))^2
    Averaging keeps the squared target 1/(2 beta) on a scale independent of response length.
    """
    ref_chosen, ref_rejected = _require_ref(logps, "ipo")
    lc, lr = logps.chosen_lengths, logps.rejected_lengths
    pi_logratio = _average(logps.policy_chosen_logps, lc) - _average(logps.policy_rejected_logps, lr)  # [B]
    ref_logratio = _average(ref_chosen, lc) - _average(ref_rejected, lr)  # [B]
    losses = (pi_logratio - ref_logratio - 1 / (2 * cfg.beta)) ** 2  # [B]
    chosen, rejected = _reference_rewards(logps, cfg.beta, "ipo")
    return LossOutput(losses, chosen, rejected)


def _nll_sum_scaled(logps: PreferenceLogps, beta: float) -> torch.Tensor:
    return beta * -logps.policy_chosen_logps  # [B], the official code's scaling


def _nll_mean(logps: PreferenceLogps, beta: float) -> torch.Tensor:
    return -_average(logps.policy_chosen_logps, logps.chosen_lengths)  # [B]


# RPO's NLL term, keyed by LossConfig.rpo_nll: a table rather than a branch per variant.
_RPO_NLL: dict[str, Callable[[PreferenceLogps, float], torch.Tensor]] = {
    "sum": _nll_sum_scaled,
    "mean": _nll_mean,
}


def rpo_loss(logps: PreferenceLogps, cfg: LossConfig) -> LossOutput:
    """RPO (Pang et al., arXiv 2405.16436): DPO plus an NLL term on the chosen response.

    rpo_nll = "sum"  (official code): L = L_DPO + alpha * beta * (-logp_pi(y_w))
    rpo_nll = "mean" (token-averaged): L = L_DPO + alpha * (-logp_pi(y_w) / |y_w|)
    alpha = cfg.rpo_alpha. The NLL term stops DPO from lowering the chosen likelihood.
    """
    nll = _RPO_NLL[cfg.rpo_nll](logps, cfg.beta)  # [B]
    losses = _dpo_terms(logps, cfg, "rpo") + cfg.rpo_alpha * nll  # [B]
    chosen, rejected = _reference_rewards(logps, cfg.beta, "rpo")
    return LossOutput(losses, chosen, rejected)


def spo_loss(logps: PreferenceLogps, cfg: LossConfig) -> LossOutput:
    """SPO (arXiv 2507.07723): DPO kept inside a "safe region" where logp(y_w) does not fall.

    OUR RECONSTRUCTION, not the paper's equation (which could not be read): the paper poses a
    bilevel problem with SFT solved by a penalty; we implement that penalty as
    L = L_DPO + lambda * max(0, logp_ref(y_w) - logp_pi(y_w)) / |y_w|,   lambda = cfg.spo_lambda
    The penalty is zero while the policy's chosen log-prob stays at or above the reference's.
    """
    ref_chosen, _ = _require_ref(logps, "spo")
    drop = (ref_chosen - logps.policy_chosen_logps).clamp_min(0.0)  # [B]
    penalty = cfg.spo_lambda * _average(drop, logps.chosen_lengths)  # [B]
    losses = _dpo_terms(logps, cfg, "spo") + penalty  # [B]
    chosen, rejected = _reference_rewards(logps, cfg.beta, "spo")
    return LossOutput(losses, chosen, rejected)


def simpo_loss(logps: PreferenceLogps, cfg: LossConfig) -> LossOutput:
    """SimPO (Meng et al., arXiv 2405.14734, Eq. 6), reference-free.

    L = -log sigma(beta/|y_w| logp_pi(y_w) - beta/|y_l| logp_pi(y_l) - gamma),   gamma = cfg.simpo_gamma
    Rewards are the implicit reward beta * logp_pi / |y| (no reference model).
    """
    chosen_avg = _average(logps.policy_chosen_logps, logps.chosen_lengths)  # [B]
    rejected_avg = _average(logps.policy_rejected_logps, logps.rejected_lengths)  # [B]
    losses = -F.logsigmoid(cfg.beta * chosen_avg - cfg.beta * rejected_avg - cfg.simpo_gamma)  # [B]
    chosen, rejected = _average_rewards(logps, cfg.beta)
    return LossOutput(losses, chosen, rejected)


def sft_loss(logps: PreferenceLogps, cfg: LossConfig) -> LossOutput:
    """SFT: token-averaged negative log-likelihood of the chosen response, L = -logp_pi(y_w) / |y_w|.

    Used to build the reference model; the rejected response is ignored except in the
    (SimPO-style, reference-free) rewards reported for metrics.
    """
    losses = -_average(logps.policy_chosen_logps, logps.chosen_lengths)  # [B]
    chosen, rejected = _average_rewards(logps, cfg.beta)
    return LossOutput(losses, chosen, rejected)


def preference_metrics(out: LossOutput, logps: PreferenceLogps) -> dict[str, float]:
    """Batch means for logging: loss, rewards/{chosen,rejected,accuracies,margins}, logps/*."""
    chosen, rejected = out.chosen_rewards, out.rejected_rewards  # [B], detached
    return {
        "loss": out.losses.detach().mean().item(),
        "rewards/chosen": chosen.mean().item(),
        "rewards/rejected": rejected.mean().item(),
        "rewards/accuracies": (chosen > rejected).float().mean().item(),
        "rewards/margins": (chosen - rejected).mean().item(),
        "logps/chosen": logps.policy_chosen_logps.detach().mean().item(),
        "logps/rejected": logps.policy_rejected_logps.detach().mean().item(),
    }
