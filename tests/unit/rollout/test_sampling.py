"""The HF engine's token sampler against the distribution it must sample from: softmax of the
logits / temperature, restricted to top-k / top-p, worked out here independently (a plain
per-row loop over sorted probabilities), with each row reproducible from its own generator."""
import math

import torch

from megatron_trapo.rollout.hf_engine import _sample_rows
from megatron_trapo.rollout.types import SamplingParams

VOCAB = 12
LOGITS = torch.tensor([3.0, 2.5, 2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0, -6.0, -20.0, 1.5])


def _reference(logits, p: SamplingParams):
    """Target probabilities, one row, by hand: sort, cut top-k, keep the tokens whose mass
    before them is < top_p, renormalise."""
    probs = torch.softmax(logits.double() / p.temperature, -1).tolist()
    order = sorted(range(len(probs)), key=lambda t: -probs[t])
    keep, mass = [], 0.0
    for rank, t in enumerate(order):
        if p.top_k > 0 and rank >= p.top_k:
            break
        if mass >= p.top_p:
            break
        keep.append(t)
        mass += probs[t]
    total = sum(probs[t] for t in keep)
    return {t: probs[t] / total for t in keep}


def _frequencies(params, draws=20000):
    """Sample ``draws`` times per row, every row in one batch, generators seeded per draw."""
    counts = [[0] * VOCAB for _ in params]
    logits = LOGITS.repeat(len(params), 1)
    for d in range(draws // 100):
        gens = [torch.Generator().manual_seed(1000 * d + r) for r in range(len(params))]
        for _ in range(100):  # each generator advances: 100 draws from one seed
            picked = _sample_rows(logits, params, gens).tolist()
            for r, t in enumerate(picked):
                counts[r][t] += 1
    return [[c / draws for c in row] for row in counts]


def test_samples_follow_temperature_top_k_and_top_p():
    params = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7),
              SamplingParams(temperature=1.3, top_k=4), SamplingParams(temperature=1.0, top_p=0.8),
              SamplingParams(temperature=0)]
    freqs = _frequencies(params)
    for row, (p, freq) in enumerate(zip(params[:-1], freqs)):
        ref = _reference(LOGITS, p)
        for t in range(VOCAB):
            want = ref.get(t, 0.0)
            if want == 0.0:  # outside top-k / top-p: never drawn
                assert freq[t] == 0.0, (row, t, freq[t])
            else:  # 5 standard errors of a binomial over 20000 draws
                bound = 5 * math.sqrt(want * (1 - want) / 20000) + 1e-4
                assert abs(freq[t] - want) < bound, (row, t, freq[t], want)
    assert freqs[-1][0] == 1.0  # greedy: always the argmax


def test_a_row_depends_on_its_own_generator_only():
    params = [SamplingParams(temperature=1.0)] * 3
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    alone = [_sample_rows(logits[r:r + 1], params[:1], [torch.Generator().manual_seed(7 + r)])
             for r in range(3)]
    together = _sample_rows(logits, params, [torch.Generator().manual_seed(7 + r) for r in range(3)])
    assert together.tolist() == [a.item() for a in alone]


def test_a_token_without_mass_is_never_drawn_even_at_the_top_of_the_cdf(monkeypatch):
    """u·total rounding up to the total must not pick a masked or zero-probability token."""
    logits = torch.tensor([[0.0, 0.0, float("-inf"), -1e4]])
    top = torch.tensor([1.0 - 2.0 ** -53], dtype=torch.float64)  # the largest draw below 1
    monkeypatch.setattr(torch, "rand", lambda *a, **k: top)
    picked = _sample_rows(logits, [SamplingParams(temperature=1.0)], [torch.Generator()])
    assert picked.item() == 1
