"""Token losses against hand-worked values and autograd gradients."""
import math

import pytest
import torch

from megatron_trapo.algorithms.losses import (aggregation_weights, clipped_mask,
                                              group_advantages, luffy_shaping_loss,
                                              policy_gradient_loss, sft_loss, tis_weights,
                                              trsft_loss)


def grad_wrt_logprob(fn, p, *args, **kw):
    lp = torch.tensor([math.log(p)], dtype=torch.float64, requires_grad=True)
    out = fn(lp, *args, **kw)
    out.sum().backward()
    return float(out), float(lp.grad)


@pytest.mark.parametrize("p, value, grad", [
    (0.5, -1.0, -1.0),            # inside the trust region: NLL gradient
    (0.05, -0.5, -0.5),           # outside: value −p/α, gradient −p/α
    (0.1 + 1e-6, -1.0, -1.0),     # just above α
    (0.1 - 1e-6, -(0.1 - 1e-6) / 0.1, -(0.1 - 1e-6) / 0.1),  # just below α
])
def test_trsft_trust_region(p, value, grad):
    v, g = grad_wrt_logprob(trsft_loss, p, alpha=0.1)
    assert v == pytest.approx(value, rel=1e-9) and g == pytest.approx(grad, rel=1e-9)


@pytest.mark.parametrize("p", [1e-30, 1e-4, 0.3, 0.99])
def test_trsft_alpha_zero_is_sft_gradient(p):
    _, g = grad_wrt_logprob(trsft_loss, p, alpha=0.0)
    _, g_sft = grad_wrt_logprob(sft_loss, p)
    assert g == g_sft == -1.0


@pytest.mark.parametrize("p", [1e-3, 0.3, 0.99])
def test_trsft_alpha_one_is_minus_p(p):
    v, g = grad_wrt_logprob(trsft_loss, p, alpha=1.0)
    assert v == pytest.approx(-p) and g == pytest.approx(-p)  # d(−p)/d log p = −p


def test_trsft_on_logits_equals_capped_sft_gradient():
    # Through a softmax: weight 1/max(p, α) on ∇p, i.e. (p/max(p, α)) × the NLL gradient.
    logits = torch.tensor([[2.0, 0.0, -3.0]], dtype=torch.float64, requires_grad=True)
    target = 2
    lp = torch.log_softmax(logits, -1)[0, target]
    trsft_loss(lp.unsqueeze(0), alpha=0.1).sum().backward()
    p = float(lp.exp())
    assert p < 0.1
    probs = torch.softmax(logits.detach(), -1)[0]
    nll_grad = probs.clone()
    nll_grad[target] -= 1.0
    assert torch.allclose(logits.grad[0], nll_grad * p / 0.1)


def test_trsft_rejects_bad_alpha():
    with pytest.raises(ValueError, match="trust_region_alpha"):
        trsft_loss(torch.zeros(1), alpha=1.5)


def test_policy_gradient_unclipped_and_clipped():
    lp, old = torch.tensor([math.log(0.6)]), torch.tensor([math.log(0.5)])
    for adv, clip, value, grad in [
        (2.0, None, -2.4, -2.4),     # −A·ratio, ratio 1.2
        (2.0, 0.1, -2.2, 0.0),       # A > 0, ratio > 1+ε: clipped, no gradient
        (-1.0, 0.1, 1.2, 1.2),       # A < 0, ratio > 1+ε: the unclipped term is larger
    ]:
        x = lp.clone().double().requires_grad_()
        out = policy_gradient_loss(x, old.double(), torch.tensor([adv]).double(), clip, clip)
        out.sum().backward()
        assert float(out) == pytest.approx(value) and float(x.grad) == pytest.approx(grad)
    # Lower side: A < 0 and ratio 0.8 < 1 − 0.1 is clipped.
    x = torch.tensor([math.log(0.4)], dtype=torch.float64, requires_grad=True)
    out = policy_gradient_loss(x, torch.tensor([math.log(0.5)]).double(),
                               torch.tensor([-1.0]).double(), clip_low=0.1, clip_high=None)
    out.sum().backward()
    assert float(out) == pytest.approx(0.9) and float(x.grad) == 0.0
    assert clipped_mask(x.detach(), torch.tensor([math.log(0.5)]).double(),
                        torch.tensor([-1.0]).double(), 0.1, None).tolist() == [True]


def test_luffy_shaping():
    v, g = grad_wrt_logprob(lambda lp: luffy_shaping_loss(lp, torch.tensor([1.0]).double(), 0.1), 0.3)
    assert v == pytest.approx(-0.75)
    assert g == pytest.approx(-0.1 * 0.3 / 0.4**2)  # −A·γp/(p+γ)²


def test_group_advantages():
    r = torch.tensor([1.0, 0, 0, 1, 1, 1, 1, 1])
    assert group_advantages(r, 4).tolist() == [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]
    std = group_advantages(r, 4, normalize_std=True)
    assert std[0] == pytest.approx(0.5 / (math.sqrt(1 / 3) + 1e-6))
    assert std[4:].tolist() == [0, 0, 0, 0]  # all-correct group: zero, kept
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(r, 3)


def test_tis_weights():
    w = tis_weights(torch.tensor([math.log(3.0), math.log(0.5)]), torch.zeros(2), cap=2.0)
    assert w.tolist() == pytest.approx([2.0, 0.5])


def test_aggregation_weights():
    ids = torch.tensor([0, 0, 0, 1, 1])
    mask = torch.tensor([1.0, 1, 0, 1, 1])
    w, c = aggregation_weights(ids, mask, "token_mean")
    assert w.tolist() == c.tolist() == [1, 1, 0, 1, 1]
    w, c = aggregation_weights(ids, mask, "seq_mean_token_mean")
    assert w.tolist() == c.tolist() == [0.5, 0.5, 0, 0.5, 0.5]
    w, c = aggregation_weights(ids, mask, "constant", max_response_length=4)
    assert w.tolist() == [0.25, 0.25, 0, 0.25, 0.25] and c.tolist() == [0.5, 0.5, 0, 0.5, 0.5]
    # Step loss Σwℓ/Σc for constant mode = mean over sequences of (token sum / L_max).
    loss = torch.tensor([1.0, 3.0, 100.0, 2.0, 2.0])
    assert float((w * loss).sum() / c.sum()) == pytest.approx(((1 + 3) / 4 + (2 + 2) / 4) / 2)
    with pytest.raises(ValueError, match="max_response_length"):
        aggregation_weights(ids, mask, "constant")
