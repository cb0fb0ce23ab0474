"""Preference losses against values worked out by hand (in each docstring) or by a closed form.

Notation: pc, pr = policy chosen / rejected summed log-probs; rc, rr = reference ones; lc, lr =
completion lengths; sp(x) = -log sigma(x) = log(1 + e^-x). Hand values are checked with `math`.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ropo_ray.config.schema import LossConfig
from ropo_ray.losses import (
    LOSSES,
    LossType,
    PreferenceLogps,
    compute_loss,
    dpo_loss,
    get_loss,
    ipo_loss,
    preference_metrics,
    rpo_loss,
    sft_loss,
    simpo_loss,
    spo_loss,
)

TOL = 1e-6
# log(1 + e^-0.2) by hand: e^-0.2 = 0.8187307531, log(1.8187307531) = 0.5981388694.
DPO_HAND = 0.5981388693815918


def _t(values: list[float], grad: bool = False) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, requires_grad=grad)


def _logps(pc: float, pr: float, rc: float | None = None, rr: float | None = None,
           lc: float = 1.0, lr: float = 1.0, grad: bool = False) -> PreferenceLogps:
    """A one-pair batch; reference log-probs only when given."""
    return PreferenceLogps(
        policy_chosen_logps=_t([pc], grad), policy_rejected_logps=_t([pr], grad),
        chosen_lengths=_t([lc]), rejected_lengths=_t([lr]),
        ref_chosen_logps=None if rc is None else _t([rc]),
        ref_rejected_logps=None if rr is None else _t([rr]),
    )


def _value(t: torch.Tensor) -> float:
    return float(t.reshape(-1)[0])


def test_dpo_hand_case() -> None:
    """beta=0.1, pc=-10, pr=-14, rc=-11, rr=-13.

    h = (pc - pr) - (rc - rr) = 4 - 2 = 2, beta*h = 0.2,
    L = -log sigma(0.2) = log(1 + e^-0.2) = log(1.8187307531) = 0.5981388694.
    rewards: chosen = 0.1 * (-10 + 11) = 0.1, rejected = 0.1 * (-14 + 13) = -0.1.
    """
    out = dpo_loss(_logps(-10, -14, -11, -13), LossConfig(type="dpo", beta=0.1))
    assert _value(out.losses) == pytest.approx(DPO_HAND, abs=TOL)
    assert _value(out.chosen_rewards) == pytest.approx(0.1, abs=TOL)
    assert _value(out.rejected_rewards) == pytest.approx(-0.1, abs=TOL)


@pytest.mark.parametrize("beta", [0.01, 0.1, 1.0, 10.0])
def test_dpo_at_zero_margin_is_ln2(beta: float) -> None:
    """h = (-5 - -7) - (-6 - -8) = 2 - 2 = 0, so L = -log sigma(0) = -log(1/2) = ln 2 for any beta."""
    out = dpo_loss(_logps(-5, -7, -6, -8), LossConfig(beta=beta))
    assert _value(out.losses) == pytest.approx(math.log(2), abs=TOL)


def test_dpo_label_smoothing() -> None:
    """The DPO hand case with eps = 0.1: beta*h = 0.2.

    L = 0.9 * sp(0.2) + 0.1 * sp(-0.2); since sp(-x) = sp(x) + x, L = sp(0.2) + 0.1 * 0.2
      = 0.5981388694 + 0.02 = 0.6181388694.
    """
    out = dpo_loss(_logps(-10, -14, -11, -13), LossConfig(beta=0.1, label_smoothing=0.1))
    assert _value(out.losses) == pytest.approx(0.6181388694, abs=TOL)


def test_rewards_detached_losses_differentiable() -> None:
    """Rewards are for metrics only: no graph, while the losses keep theirs."""
    cfg = LossConfig()
    for loss_type in LossType:
        out = LOSSES[loss_type].fn(_logps(-10, -14, -11, -13, lc=4, lr=5, grad=True), cfg)
        assert out.losses.requires_grad, loss_type
        assert not out.chosen_rewards.requires_grad, loss_type
        assert not out.rejected_rewards.requires_grad, loss_type


def test_dpo_gradient_matches_closed_form() -> None:
    """dL/dpc = -beta * sigma(-beta h). Hand case beta=0.1, h=2:
    sigma(-0.2) = 1 / (1 + e^0.2) = 1 / 2.2214027582 = 0.4501660027, so dL/dpc = -0.0450166003 < 0:
    raising the chosen log-prob lowers the loss. dL/dpr is its negative.
    """
    logps = _logps(-10, -14, -11, -13, grad=True)
    dpo_loss(logps, LossConfig(beta=0.1)).losses.sum().backward()
    assert _value(logps.policy_chosen_logps.grad) == pytest.approx(-0.0450166003, abs=TOL)
    assert _value(logps.policy_rejected_logps.grad) == pytest.approx(0.0450166003, abs=TOL)


def test_ipo_uses_token_averages() -> None:
    """beta=1 (target 1/(2 beta) = 0.5); pc=-6, lc=3; pr=-12, lr=4; rc=-9; rr=-20.

    averages: pc/lc = -2, pr/lr = -3, rc/lc = -3, rr/lr = -5.
    h_avg = (-2 + 3) - (-3 + 5) = 1 - 2 = -1, L = (-1 - 0.5)^2 = 2.25.
    With sums instead: h = (-6 + 12) - (-9 + 20) = 6 - 11 = -5, (-5.5)^2 = 30.25; averaging only the
    policy side gives (1 - 11 - 0.5)^2 = 110.25, only the reference side (6 - 2 - 0.5)^2 = 12.25.
    rewards (summed): chosen = 1 * (-6 + 9) = 3, rejected = 1 * (-12 + 20) = 8.
    """
    out = ipo_loss(_logps(-6, -12, -9, -20, lc=3, lr=4), LossConfig(type="ipo", beta=1.0))
    assert _value(out.losses) == pytest.approx(2.25, abs=TOL)
    assert _value(out.chosen_rewards) == pytest.approx(3.0, abs=TOL)
    assert _value(out.rejected_rewards) == pytest.approx(8.0, abs=TOL)


def test_simpo_hand_case() -> None:
    """beta=2, gamma=0.5; pc=-6, lc=3 (avg -2); pr=-12, lr=4 (avg -3); no reference at all.

    logit = 2 * -2 - 2 * -3 - 0.5 = -4 + 6 - 0.5 = 1.5,
    L = log(1 + e^-1.5) = log(1.2231301601) = 0.2014132780.
    rewards: chosen = 2 * -2 = -4, rejected = 2 * -3 = -6.
    """
    out = simpo_loss(_logps(-6, -12, lc=3, lr=4), LossConfig(type="simpo", beta=2.0, simpo_gamma=0.5))
    assert _value(out.losses) == pytest.approx(0.2014132780, abs=TOL)
    assert _value(out.chosen_rewards) == pytest.approx(-4.0, abs=TOL)
    assert _value(out.rejected_rewards) == pytest.approx(-6.0, abs=TOL)


def test_rpo_sum_nll() -> None:
    """DPO hand case (L_DPO = 0.5981388694), alpha=0.005, beta=0.1, pc=-10:
    NLL term = alpha * beta * (-pc) = 0.005 * 0.1 * 10 = 0.005, L = 0.6031388694.
    """
    cfg = LossConfig(type="rpo", beta=0.1, rpo_alpha=0.005, rpo_nll="sum")
    out = rpo_loss(_logps(-10, -14, -11, -13, lc=5), cfg)
    assert _value(out.losses) == pytest.approx(0.6031388694, abs=TOL)


def test_rpo_mean_nll() -> None:
    """DPO hand case, alpha=0.2, pc=-10, lc=5: NLL term = 0.2 * 10 / 5 = 0.4, L = 0.5981388694 + 0.4
    = 0.9981388694 (no beta in the averaged variant).
    """
    cfg = LossConfig(type="rpo", beta=0.1, rpo_alpha=0.2, rpo_nll="mean")
    out = rpo_loss(_logps(-10, -14, -11, -13, lc=5), cfg)
    assert _value(out.losses) == pytest.approx(0.9981388694, abs=TOL)


@pytest.mark.parametrize("pc", [-10.0, -11.0])
def test_spo_no_penalty_when_chosen_holds(pc: float) -> None:
    """rc = -11 and pc >= rc: max(0, rc - pc) = 0, so SPO equals DPO on the same inputs."""
    cfg = LossConfig(type="spo", beta=0.1, spo_lambda=1.0)
    logps = _logps(pc, -14, -11, -13, lc=4)
    assert _value(spo_loss(logps, cfg).losses) == pytest.approx(_value(dpo_loss(logps, cfg).losses), abs=TOL)


def test_spo_penalty_when_chosen_falls() -> None:
    """beta=0.1, lambda=1; pc=-12, pr=-14, rc=-11, rr=-13, lc=4.

    h = (-12 + 14) - (-11 + 13) = 2 - 2 = 0, L_DPO = ln 2 = 0.6931471806;
    penalty = 1 * max(0, -11 + 12) / 4 = 0.25 > 0, L = 0.9431471806.
    """
    out = spo_loss(_logps(-12, -14, -11, -13, lc=4), LossConfig(type="spo", beta=0.1, spo_lambda=1.0))
    assert _value(out.losses) == pytest.approx(0.9431471806, abs=TOL)


def test_sft_hand_case() -> None:
    """pc=-6, lc=4: L = 6 / 4 = 1.5. beta=0.1, pr=-9, lr=3: rewards 0.1 * -1.5 = -0.15, 0.1 * -3 = -0.3."""
    out = sft_loss(_logps(-6, -9, lc=4, lr=3), LossConfig(type="sft", beta=0.1))
    assert _value(out.losses) == pytest.approx(1.5, abs=TOL)
    assert _value(out.chosen_rewards) == pytest.approx(-0.15, abs=TOL)
    assert _value(out.rejected_rewards) == pytest.approx(-0.3, abs=TOL)


def test_registry_covers_every_loss_type() -> None:
    assert set(LOSSES) == set(LossType)
    assert {t.value for t in LossType if not t.needs_reference} == {"simpo", "sft"}
    for t in LossType:
        assert get_loss(t.value) is LOSSES[t]


def test_compute_loss_dispatches_on_cfg_type() -> None:
    """compute_loss with type=dpo reproduces the DPO hand value 0.5981388694."""
    out = compute_loss(_logps(-10, -14, -11, -13), LossConfig(type="dpo", beta=0.1))
    assert _value(out.losses) == pytest.approx(DPO_HAND, abs=TOL)


def test_unknown_loss_suggests_nearest() -> None:
    with pytest.raises(ValueError, match=r"unknown loss 'dpoo'.*did you mean 'dpo'"):
        get_loss("dpoo")


@pytest.mark.parametrize("loss_type", [t for t in LossType if t.needs_reference])
def test_missing_reference_raises(loss_type: LossType) -> None:
    with pytest.raises(ValueError, match=rf"loss '{loss_type.value}' needs reference"):
        LOSSES[loss_type].fn(_logps(-10, -14), LossConfig(type=loss_type.value))


def test_preference_metrics_hand_case() -> None:
    """beta=0.1, two pairs.

    pair 1: pc=-10, pr=-14, rc=-11, rr=-13: rewards 0.1, -0.1 (ranks right), L = sp(0.2) = 0.5981388694.
    pair 2: pc=-12, pr=-10, rc=-11, rr=-13: rewards 0.1 * -1 = -0.1, 0.1 * 3 = 0.3 (ranks wrong);
      h = (-12 + 10) - (-11 + 13) = -4, L = sp(-0.4) = log(1 + e^0.4) = 0.9130152524.
    loss = (0.5981388694 + 0.9130152524) / 2 = 0.7555770609; rewards/chosen = (0.1 - 0.1) / 2 = 0;
    rewards/rejected = (-0.1 + 0.3) / 2 = 0.1; accuracies = 1/2; margins = (0.2 - 0.4) / 2 = -0.1;
    logps/chosen = (-10 - 12) / 2 = -11; logps/rejected = (-14 - 10) / 2 = -12.
    """
    logps = PreferenceLogps(_t([-10, -12]), _t([-14, -10]), _t([3, 3]), _t([3, 3]), _t([-11, -11]), _t([-13, -13]))
    metrics = preference_metrics(dpo_loss(logps, LossConfig(beta=0.1)), logps)
    expected = {
        "loss": 0.7555770609, "rewards/chosen": 0.0, "rewards/rejected": 0.1, "rewards/accuracies": 0.5,
        "rewards/margins": -0.1, "logps/chosen": -11.0, "logps/rejected": -12.0,
    }
    assert set(metrics) == set(expected)
    for key, value in expected.items():
        assert type(metrics[key]) is float, key
        assert metrics[key] == pytest.approx(value, abs=TOL), key


def test_losses_import_without_heavy_deps() -> None:
    """The math must import on its own: a fresh interpreter loads ropo_ray.losses without these."""
    code = (
        "import sys, ropo_ray.losses; "
        "print(','.join(m for m in ('ray', 'deepspeed', 'vllm', 'transformers') if m in sys.modules))"
    )
    repo_root = Path(__file__).resolve().parents[2]  # `python -c` puts its cwd on sys.path
    result = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""
