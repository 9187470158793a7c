"""Loss functions against hand-derived values, metadata, modifiers, edge cases and the Hydra YAMLs.

Shared paired example (B = 2), used unless a test says otherwise:

    chosen logps   [-1, -2]   ref [-2, -2]   ->  chosen log-ratios   c = [ 1,  0]
    rejected logps [-3, -1]   ref [-2, -2]   ->  rejected log-ratios r = [-1,  1]
    delta = c - r = [2, -1];  beta = 0.5 -> z = beta * delta = [1, -0.5]
    completion lengths: chosen [2, 4], rejected [1, 2];  chosen token-mean NLL = 0.7

Notation: softplus(t) = log(1 + e^t) = -log sigma(-t), so -log sigma(z) = softplus(-z).
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import pytest
import torch
from helpers import close, pair, ref_free, sp

from dpo_lightning.losses import LOSSES, Loss, LossInputs, get_loss
from dpo_lightning.losses.bco import MEAN
from dpo_lightning.losses.reference_free import log1mexp

CONF = Path(__file__).resolve().parents[1] / "conf" / "loss"
BETA = 0.5
C, R, Z = [1.0, 0.0], [-1.0, 1.0], [1.0, -0.5]


def sig(t: float) -> float:
    return 1 / (1 + math.exp(-t))


def run(name: str, x: LossInputs | None = None, **hp):
    return get_loss(name, **hp)(x if x is not None else pair())


# ------------------------------------------------------------------ paired, reference-based
def test_sigmoid():
    """DPO Eq. 7: -log sigma(z) = softplus(-z): [softplus(-1), softplus(0.5)]; rewards beta*c, beta*r."""
    out = run("sigmoid", beta=BETA)
    close(out.losses, [sp(-1), sp(0.5)])
    close(out.loss, (sp(-1) + sp(0.5)) / 2)
    close(out.chosen_rewards, [0.5, 0.0])
    close(out.rejected_rewards, [-0.5, 0.5])


def test_sigmoid_cdpo_label_smoothing():
    """cDPO, eps = 0.1: 0.9 softplus(-z) + 0.1 softplus(z)."""
    close(run("sigmoid", beta=BETA, label_smoothing=0.1).losses, [0.9 * sp(-z) + 0.1 * sp(z) for z in Z])


def test_sigmoid_norm():
    """Per-token scores: c/lc - r/lr = [1/2 + 1/1, 0/4 - 1/2] = [1.5, -0.5]; loss softplus(-beta * that)."""
    close(run("sigmoid_norm", beta=BETA).losses, [sp(-0.75), sp(0.25)])


def test_hinge():
    """SLiC: relu(1 - z) = [relu(0), relu(1.5)] = [0, 1.5]."""
    close(run("hinge", beta=BETA).losses, [0.0, 1.5])


def test_ipo_is_length_normalized_inside():
    """IPO Eq. 17 with per-token scores [1.5, -0.5] and 1/(2 beta) = 1: [(0.5)^2, (-1.5)^2] = [0.25, 2.25].
    Rewards stay the summed beta * log-ratio; ``ipo`` is not length_normalized metadata."""
    out = run("ipo", beta=BETA)
    close(out.losses, [0.25, 2.25])
    close(out.chosen_rewards, [0.5, 0.0])
    assert not get_loss("ipo").length_normalized


def test_robust():
    """rDPO, eps = 0.1: [(1-eps) softplus(-z) - eps softplus(z)] / (1 - 2 eps)."""
    close(run("robust", beta=BETA, label_smoothing=0.1).losses, [(0.9 * sp(-z) - 0.1 * sp(z)) / 0.8 for z in Z])


def test_exo_pair():
    """EXO Eq. 16: sigma(z)(log sigma(z) - log(1-eps)) + sigma(-z)(log sigma(-z) - log eps), eps = 1e-3."""
    e = 1e-3
    exp = [sig(z) * (math.log(sig(z)) - math.log(1 - e)) + sig(-z) * (math.log(sig(-z)) - math.log(e)) for z in Z]
    close(run("exo_pair", beta=BETA, label_smoothing=e).losses, exp)
    with pytest.raises(ValueError, match="label_smoothing"):
        get_loss("exo_pair", label_smoothing=0.0)


def test_discopop():
    """DiscoPOP Eq. 5: m = sigma(z / tau), (1 - m) softplus(-z) + m exp(-z), tau = 0.05."""
    m = [sig(z / 0.05) for z in Z]
    close(run("discopop", beta=BETA).losses, [(1 - mi) * sp(-z) + mi * math.exp(-z) for mi, z in zip(m, Z)])


def test_nca_pair():
    """NCA: rc = beta c = [0.5, 0], rr = beta r = [-0.5, 0.5];
    softplus(-rc) + 0.5 softplus(rc) + 0.5 softplus(rr)."""
    rc, rr = [0.5, 0.0], [-0.5, 0.5]
    close(run("nca_pair", beta=BETA).losses, [sp(-a) + 0.5 * sp(a) + 0.5 * sp(b) for a, b in zip(rc, rr)])


def test_bco_pair():
    """bco_pair: -log sigma(rc) - log sigma(-rr) = softplus(-rc) + softplus(rr)."""
    close(run("bco_pair", beta=BETA).losses, [sp(-0.5) + sp(-0.5), sp(0.0) + sp(0.5)])


def test_sppo_hard():
    """SPPO: (c - 1/(2 beta))^2 + (r + 1/(2 beta))^2 = (c-1)^2 + (r+1)^2 = [0 + 0, 1 + 4]."""
    close(run("sppo_hard", beta=BETA).losses, [0.0, 5.0])


def test_aot_sorts_gaps():
    """AOT paired: policy gaps chosen - rejected = [2, -1] -> sorted [-1, 2]; reference gaps [0, 0];
    softplus(-beta * [-1, 2]) = [softplus(0.5), softplus(-1)] (ordered by rank, not by pair)."""
    close(run("aot", beta=BETA).losses, [sp(0.5), sp(-1)])


def test_aot_unpaired_sorts_each_side():
    """AOT unpaired: sort(c) = [0, 1], sort(r) = [-1, 1] -> delta [1, 0] -> [softplus(-0.5), log 2]."""
    close(run("aot_unpaired", beta=BETA).losses, [sp(-0.5), math.log(2)])


def test_apo_zero_and_down():
    """APO-zero Eq. 7: 1 - sigma(rc) + sigma(rr). APO-down Eq. 8: sigma(rc) + 1 - sigma(rc - rr)."""
    rc, rr = [0.5, 0.0], [-0.5, 0.5]
    close(run("apo_zero", beta=BETA).losses, [1 - sig(a) + sig(b) for a, b in zip(rc, rr)])
    close(run("apo_down", beta=BETA).losses, [sig(a) + 1 - sig(a - b) for a, b in zip(rc, rr)])


def test_sft():
    """The batch token-mean NLL (0.7) repeated per pair; rewards still beta * log-ratio."""
    out = run("sft", beta=BETA)
    close(out.losses, [0.7, 0.7])
    close(out.chosen_rewards, [0.5, 0.0])


# ------------------------------------------------------------------ modifiers
@pytest.mark.parametrize("kind,f", [
    ("forward_kl", lambda u: 1 - math.exp(-u)),
    ("js_divergence", lambda u: math.log(2) + math.log(sig(u))),
    ("alpha_divergence", lambda u: (math.exp(-0.5 * u) - 1) / -0.5),  # alpha = 0.5: (t^(a-1) - 1)/(a - 1)
])
def test_f_divergences(kind, f):
    """f-DPO: scores f'(pi/pi_ref) replace the log-ratios in delta: z = beta (f'(c) - f'(r))."""
    z = [BETA * (f(c) - f(r)) for c, r in zip(C, R)]
    out = run("sigmoid", beta=BETA, f_divergence_type=kind, f_alpha_divergence_coef=0.5)
    close(out.losses, [sp(-v) for v in z])
    close(out.chosen_rewards, [0.5, 0.0])  # rewards unchanged


def test_f_divergence_reverse_kl_limits_and_errors():
    """alpha -> 1 is reverse KL; unknown names and losses without an f-DPO form are refused at build time."""
    close(run("sigmoid", beta=BETA, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0).losses,
          [sp(-1), sp(0.5)])
    with pytest.raises(ValueError, match="f_divergence_type"):
        get_loss("sigmoid", f_divergence_type="kl")
    with pytest.raises(TypeError, match="unknown hyperparameter"):
        get_loss("nca_pair", f_divergence_type="forward_kl")


def test_wpo_weights_multiply_per_pair_losses():
    """WPO Eq. 2: per-pair loss times w_chosen * w_rejected = [0.5 * 0.4, 1 * 0.5]."""
    x = pair(chosen_weights=[0.5, 1.0], rejected_weights=[0.4, 0.5])
    close(run("sigmoid", x, beta=BETA, use_weighting=True).losses, [0.2 * sp(-1), 0.5 * sp(0.5)])
    close(run("sft", x, beta=BETA).losses, [0.2 * 0.7, 0.5 * 0.7])
    with pytest.raises(TypeError):
        get_loss("aot", use_weighting=True)  # sorting would misalign weights (TRL refuses it too)


def test_modifiers_are_validated_and_not_passed_to_the_function():
    loss = get_loss("ipo", ld_alpha=0.5, use_weighting=True)
    assert loss.hparams["ld_alpha"] == 0.5 and loss(pair()).loss.isfinite()
    assert get_loss("sigmoid", use_weighting=False, ld_alpha=None) == get_loss("sigmoid")
    with pytest.raises(ValueError, match="ld_alpha"):
        get_loss("sigmoid", ld_alpha=1.5)
    with pytest.raises(TypeError):
        get_loss("kto", ld_alpha=0.5)  # LD-DPO needs pairs
    with pytest.raises(TypeError):
        get_loss("simpo", use_weighting=True)


# ------------------------------------------------------------------ reference-free
def test_cpo():
    """CPO Eq. 3 + NLL: policy gap [2, -1] -> softplus(-beta gap) + cpo_alpha * 0.7; rewards beta * logps."""
    out = run("cpo", ref_free(), beta=BETA, cpo_alpha=1.0)
    close(out.losses, [sp(-1) + 0.7, sp(0.5) + 0.7])
    close(out.chosen_rewards, [-0.5, -1.0])
    close(out.metrics["nll_loss"], 0.7)


def test_simpo():
    """SimPO Eq. 6 on (already averaged) logps, beta = 2, gamma = 0.5:
    -log sigma(beta (c - r) - gamma) = softplus(-(2 * [2, -1] - 0.5)) = [softplus(-3.5), softplus(2.5)]."""
    out = run("simpo", ref_free(), beta=2.0, gamma=0.5)
    close(out.losses, [sp(-3.5), sp(2.5)])
    close(out.rejected_rewards, [-6.0, -2.0])
    assert get_loss("simpo").length_normalized and not get_loss("simpo").requires_reference


def test_alphapo():
    """AlphaPO: r(p) = (1 - p^-a)/a with log p = logp, a = 0.25; loss softplus(-(beta (r_c - r_r) - gamma))."""
    a, beta, gamma = 0.25, 2.0, 0.5
    rew = lambda lp: (1 - math.exp(-a * lp)) / a  # noqa: E731
    exp = [sp(-(beta * (rew(c) - rew(r)) - gamma)) for c, r in [(-1, -3), (-2, -1)]]
    out = run("alphapo", ref_free(), beta=beta, gamma=gamma, alpha=a)
    close(out.losses, exp)
    close(out.chosen_rewards, [beta * rew(-1), beta * rew(-2)])


def test_orpo():
    """ORPO: log odds(y) = logp - log(1 - e^logp); loss = NLL - beta log sigma(odds_c - odds_r).
    Metrics: log_odds_ratio = mean log sigma(.), log_odds_chosen = mean (odds_c - odds_r)."""
    lo = lambda lp: lp - math.log(1 - math.exp(lp))  # noqa: E731
    d = [lo(-1) - lo(-3), lo(-2) - lo(-1)]
    out = run("orpo", ref_free(), beta=BETA)
    close(out.losses, [0.7 + BETA * sp(-v) for v in d])
    close(out.metrics["log_odds_chosen"], sum(d) / 2)
    close(out.metrics["log_odds_ratio"], sum(-sp(-v) for v in d) / 2)
    close(out.metrics["nll_loss"], 0.7)


def test_orpo_is_finite_at_logps_near_zero():
    """Certain sequences (mean log-prob 0 or -1e-9) give finite losses and gradients, no NaN."""
    lp = torch.tensor([0.0, -1e-9, -1e-3, -30.0], requires_grad=True)
    x = LossInputs(chosen_logps=lp, rejected_logps=torch.tensor([-1.0, 0.0, -2.0, -1e-12]),
                   chosen_nll=torch.tensor(0.1))
    out = get_loss("orpo")(x)
    out.loss.backward()
    assert torch.isfinite(out.losses).all() and torch.isfinite(lp.grad).all()
    assert torch.isfinite(log1mexp(torch.tensor([0.0, -1e-30, -50.0]))).all()
    close(log1mexp(torch.tensor([-1e-3, -2.0])), [math.log(-math.expm1(-1e-3)), math.log1p(-math.exp(-2.0))])


# ------------------------------------------------------------------ unpaired
def unpaired(labels=(True, False, True), logratio=(1.0, -0.5, 2.0), kl=(0.3, -0.1, 0.4)) -> LossInputs:
    n = len(labels)
    return LossInputs(logps=torch.tensor(logratio) - 1.0, ref_logps=torch.full((n,), -1.0),
                      labels=torch.tensor(labels), kl_logps=torch.tensor(kl) - 2.0, ref_kl_logps=torch.full((n,), -2.0))


def test_kto():
    """KTO Eq. 7, beta = 0.5, KL z0 = mean([0.3, -0.1, 0.4]) = 0.2;
    desirable 1 - sigma(beta (r - z0)) * lambda_D, undesirable 1 - sigma(beta (z0 - r)) * lambda_U."""
    out = run("kto", unpaired(), beta=BETA, desirable_weight=1.0, undesirable_weight=2.0)
    exp = [1 - sig(0.5 * (1 - 0.2)), 2 * (1 - sig(0.5 * (0.2 + 0.5))), 1 - sig(0.5 * (2 - 0.2))]
    close(out.losses, exp)  # batch order
    close(out.metrics["kl"], 0.2)
    close(out.chosen_rewards, [0.5, 1.0])
    close(out.rejected_rewards, [-0.25])
    close(out.metrics["rewards/margins"], 0.75 - (-0.25))


def test_kto_kl_is_clamped_and_detached():
    """A negative KL estimate is clamped at 0 (TRL); no gradient flows through it."""
    x = unpaired(kl=(-1.0, -2.0, 0.5))
    x.kl_logps.requires_grad_(True)
    out = run("kto", x, beta=BETA)
    close(out.metrics["kl"], 0.0)
    assert not out.loss.requires_grad  # only the KL rows required grad, and the KL is detached
    close(out.losses[0], 1 - sig(0.5))


@pytest.mark.parametrize("n", [3, 5, 7])
def test_kto_odd_batch_sizes(n):
    labels = [i % 2 == 0 for i in range(n)]
    out = run("kto", unpaired(labels, [0.1 * i for i in range(n)], [0.05] * n))
    assert out.losses.shape == (n,) and torch.isfinite(out.loss)
    assert out.chosen_rewards.numel() + out.rejected_rewards.numel() == n


@pytest.mark.parametrize("name", ["kto", "apo_zero_unpaired", "bco"])
def test_unpaired_all_desirable_batch(name):
    """No undesirable rows: finite loss, empty rejected rewards, no margins metric (TRL logs none)."""
    x = unpaired(labels=(True, True, True, True), logratio=(1.0, 2.0, 0.5, 0.0), kl=(0.1, 0.1, 0.1, 0.1))
    out = run(name, x)
    assert torch.isfinite(out.loss) and out.rejected_rewards.numel() == 0 and out.chosen_rewards.numel() == 4
    assert "rewards/margins" not in out.metrics
    assert all(torch.isfinite(v) for v in out.metrics.values())


def test_kto_batch_of_one_and_missing_kl_rows_fail_clearly():
    with pytest.raises(ValueError, match=">= 2"):
        run("kto", unpaired(labels=(True,), logratio=(1.0,), kl=(0.0,)))
    x = unpaired()
    x.kl_logps = None
    with pytest.raises(ValueError, match="kl_pairs=True"):
        run("kto", x)
    assert get_loss("kto").needs_kl_pairs and not get_loss("apo_zero_unpaired").needs_kl_pairs
    assert not get_loss("kto").paired


def test_apo_zero_unpaired():
    """1 - sigma(beta r) desirable, sigma(beta r) undesirable; kl logged as 0."""
    out = run("apo_zero_unpaired", unpaired(), beta=BETA)
    close(out.losses, [1 - sig(0.5), sig(-0.25), 1 - sig(1.0)])
    close(out.metrics["kl"], 0.0)


def test_bco_running_mean():
    """BCO: rewards beta r = [0.5, -0.25, 1.0]; first training step: delta = their mean = 0.41667;
    second step with rewards [1, 1, 1]: count-weighted mean (3 * 0.41667 + 3 * 1) / 6 = 0.70833.
    Losses: -log sigma(r - delta) desirable, -log sigma(delta - r) undesirable. Eval does not update."""
    loss = get_loss("bco", beta=BETA)
    x = unpaired()
    x.logps.requires_grad_(True)
    out = loss(x)
    d = (0.5 - 0.25 + 1.0) / 3
    close(out.metrics["delta"], d)
    close(out.losses, [sp(-(0.5 - d)), sp(-0.25 - d), sp(-(1.0 - d))])
    y = unpaired(logratio=(2.0, 2.0, 2.0))
    y.logps.requires_grad_(True)
    y.state = x.state
    close(loss(y).metrics["delta"], (3 * d + 3 * 1.0) / 6)
    with torch.no_grad():  # validation: reads the mean, never updates it
        z = unpaired()
        z.state = x.state
        before = x.state[MEAN]
        loss(z)
        assert x.state[MEAN] == before


# ------------------------------------------------------------------ combinations
def test_combination_weights_and_metadata():
    """0.8 sigmoid + 0.2 bco_pair + 1.0 sft (= MPO) at beta = 0.5; rewards from the first member."""
    exp = [0.8 * sp(-1) + 0.2 * (2 * sp(-0.5)) + 0.7, 0.8 * sp(0.5) + 0.2 * (sp(0) + sp(0.5)) + 0.7]
    combo = get_loss("combination", losses=[{"name": "sigmoid", "weight": 0.8}, "bco_pair", "sft"],
                     weights=None, beta=BETA)
    combo.hparams["losses"][1]["weight"] = 0.2
    close(combo(pair()).losses, exp)
    close(run("mpo", beta=BETA).losses, exp)
    close(get_loss("combination", losses=["sigmoid", "bco_pair", "sft"], weights=[0.8, 0.2, 1.0],
                   beta=BETA)(pair()).losses, exp)
    out = run("rpo", beta=BETA, rpo_alpha=0.5)
    close(out.losses, [sp(-1) + 0.35, sp(0.5) + 0.35])
    close(out.chosen_rewards, [0.5, 0.0])
    assert pickle.loads(pickle.dumps(combo)) == combo


def test_combination_metadata_checks():
    mixed = get_loss("combination", losses=["cpo", "sigmoid"])
    assert mixed.requires_reference and mixed.paired
    assert not get_loss("combination", losses=["cpo", {"name": "cpo", "beta": 0.2}]).requires_reference
    with pytest.raises(ValueError, match="paired"):
        get_loss("combination", losses=["sigmoid", "kto"])
    with pytest.raises(ValueError, match="length_normalized"):
        get_loss("combination", losses=["sigmoid", "simpo"])
    with pytest.raises(ValueError, match="not defined"):
        get_loss("combination", losses=["sigmoid", "nca_pair"], f_divergence_type="forward_kl")
    assert get_loss("combination", losses=["sigmoid", "sft"], f_divergence_type="forward_kl")
    with pytest.raises(ValueError, match="use_weighting"):
        get_loss("combination", losses=["sigmoid", "aot"], use_weighting=True)
    with pytest.raises(ValueError, match="modifiers"):
        get_loss("combination", losses=[{"name": "sigmoid", "ld_alpha": 0.5}])
    with pytest.raises(TypeError, match="losses"):
        get_loss("combination")
    kto_mix = get_loss("combination", losses=["kto", "apo_zero_unpaired"])
    assert not kto_mix.paired and kto_mix.needs_kl_pairs


# ------------------------------------------------------------------ properties over the whole registry
def _build(name: str) -> Loss:
    return get_loss(name, **({"losses": ["sigmoid", "sft"]} if name == "combination" else {}))


PAIRED = sorted(n for n in LOSSES if LOSSES[n].paired)
UNPAIRED = sorted(n for n in LOSSES if not LOSSES[n].paired)


@pytest.mark.parametrize("name", PAIRED)
def test_swapping_chosen_and_rejected_flips_reward_margins(name):
    x = pair()
    if not _build(name).requires_reference:
        x = ref_free()
    y = LossInputs(chosen_logps=x.rejected_logps, rejected_logps=x.chosen_logps,
                   ref_chosen_logps=x.ref_rejected_logps, ref_rejected_logps=x.ref_chosen_logps,
                   chosen_lengths=x.rejected_lengths, rejected_lengths=x.chosen_lengths, chosen_nll=x.chosen_nll)
    a, b = _build(name)(x), _build(name)(y)
    torch.testing.assert_close(b.chosen_rewards - b.rejected_rewards, -(a.chosen_rewards - a.rejected_rewards))
    torch.testing.assert_close(b.chosen_rewards, a.rejected_rewards)


@pytest.mark.parametrize("name", UNPAIRED)
def test_flipping_labels_swaps_reward_groups(name):
    x, y = unpaired(), unpaired(labels=(False, True, False))
    a, b = _build(name)(x), _build(name)(y)
    torch.testing.assert_close(torch.sort(a.chosen_rewards)[0], torch.sort(b.rejected_rewards)[0])
    # beta = 0.1: desirable mean 0.1 * (1 + 2) / 2 = 0.15, undesirable 0.1 * -0.5 -> margin 0.2, flipped -0.2
    close(a.metrics["rewards/margins"], 0.2)
    close(b.metrics["rewards/margins"], -0.2)
