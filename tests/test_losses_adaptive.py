"""beta-DPO, DPO-Positive and SimPER against hand-derived values (the shared example of test_losses.py:
chosen log-ratios c = [1, 0], rejected r = [-1, 1], gap delta = c - r = [2, -1])."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import close, pair, ref_free, sp

from dpo_lightning.losses import LossInputs, get_loss
from dpo_lightning.losses.adaptive import GAP_MEAN, GAP_STD


def gaps(values, requires_grad=True) -> LossInputs:
    """Pairs whose gap is exactly ``values``: chosen log-prob = gap, everything else 0."""
    c = torch.tensor(values, dtype=torch.float32, requires_grad=requires_grad)
    z = torch.zeros(len(values))
    return LossInputs(chosen_logps=c, rejected_logps=z, ref_chosen_logps=z, ref_rejected_logps=z,
                      chosen_lengths=torch.ones(len(values), dtype=torch.long),
                      rejected_lengths=torch.ones(len(values), dtype=torch.long))


def test_beta_dpo_validation_is_dpo_at_the_running_mean():
    """No gradients, no state: M_0 = mean(delta) = 0.5, nothing dropped, beta_b = beta (1 + a (0.5 - 0.5)) = beta,
    so the loss is DPO's softplus(-beta delta) = [softplus(-1), softplus(0.5)] at beta = 0.5."""
    with torch.no_grad():
        out = get_loss("beta_dpo", beta=0.5)(pair())
    close(out.losses, [sp(-1), sp(0.5)])
    close(out.metrics["beta"], 0.5)
    close(out.chosen_rewards, [0.5, 0.0])


def test_beta_dpo_training_updates_statistics_drops_the_outlier_and_moves_beta():
    """State M_0 = 0, sigma = 1, momentum 0.9; gaps [0.1, -0.1, 8] (B = 3, filter_ratio 1/3 keeps 2).
    Batch mean 8/3, unbiased std s = sqrt(sum (g - 8/3)^2 / 2); M_0 <- 0.1 * 8/3, sigma <- 0.9 + 0.1 s.
    The outlier's weight exp(-(8 - M_0)^2 / (2 sigma^2)) ~ 1e-7, so the kept pairs are [0.1, -0.1] with mean 0:
    beta_b = beta (1 + 0.6 (0 - M_0)); loss = mean over kept of softplus(-beta_b g)."""
    torch.manual_seed(0)
    g = [0.1, -0.1, 8.0]
    x = gaps(g)
    x.state = {GAP_MEAN: 0.0, GAP_STD: 1.0}
    out = get_loss("beta_dpo", beta=0.5, alpha=0.6, filter_ratio=1 / 3, momentum=0.9)(x)
    mean = sum(g) / 3
    s = math.sqrt(sum((v - mean) ** 2 for v in g) / 2)
    m0, sigma = 0.1 * mean, 0.9 + 0.1 * s
    assert x.state[GAP_MEAN] == pytest.approx(m0) and x.state[GAP_STD] == pytest.approx(sigma)
    beta_b = 0.5 * (1 + 0.6 * (0.0 - m0))
    close(out.metrics["beta"], beta_b)
    close(out.metrics["kept_fraction"], 2 / 3)
    close(out.losses, [sp(-beta_b * 0.1), sp(beta_b * 0.1), 0.0])
    close(out.loss, (sp(-beta_b * 0.1) + sp(beta_b * 0.1)) / 2)
    out.loss.backward()
    assert x.chosen_logps.grad[2] == 0 and x.chosen_logps.grad[0] != 0  # the dropped pair gets no gradient


def test_beta_dpo_first_batch_initializes_statistics_and_validates_settings():
    x = gaps([2.0, -1.0])
    get_loss("beta_dpo", filter_ratio=0.0)(x)
    assert x.state[GAP_MEAN] == pytest.approx(0.5) and x.state[GAP_STD] == pytest.approx(math.sqrt(4.5))
    with pytest.raises(ValueError, match="filter_ratio"):
        get_loss("beta_dpo", filter_ratio=1.0)
    with pytest.raises(ValueError, match="momentum"):
        get_loss("beta_dpo", momentum=1.0)


def test_dpop_penalizes_a_falling_chosen_log_prob():
    """chosen logps [-3, -2] vs ref [-2, -2]: c = [-1, 0], r = [-1, 1]; penalty max(0, -c) = [1, 0].
    beta 0.5, lambda 2: z = 0.5 ([0, -1] - 2 [1, 0]) = [-1, -0.5] -> losses [softplus(1), softplus(0.5)]."""
    out = get_loss("dpop", beta=0.5, dpop_lambda=2.0)(pair(chosen_logps=[-3.0, -2.0]))
    close(out.losses, [sp(1), sp(0.5)])
    close(out.metrics["positive_penalty"], 0.5)
    # no penalty when the chosen log-ratio is >= 0: the shared example is DPO's [softplus(-1), softplus(0.5)]
    close(get_loss("dpop", beta=0.5)(pair()).losses, [sp(-1), sp(0.5)])


def test_simper_inverse_perplexities():
    """Averaged logps chosen [-1, -2], rejected [-3, -1]: losses -e^-1 + e^-3 and -e^-2 + e^-1; rewards e^logp."""
    loss = get_loss("simper")
    assert loss.hparams == {} and not loss.requires_reference and loss.length_normalized
    out = loss(ref_free())
    e = math.exp
    close(out.losses, [-e(-1) + e(-3), -e(-2) + e(-1)])
    close(out.chosen_rewards, [e(-1), e(-2)])
    with pytest.raises(TypeError, match="unknown hyperparameter"):
        get_loss("simper", beta=0.1)
