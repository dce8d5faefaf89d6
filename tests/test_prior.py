"""The prior over codes: on a toy code distribution with known structure, trained samples match it.

Toy distribution over 3x3 grids of 6 codes, 3 classes, read in raster order:
- code 0 is drawn from a class-dependent distribution FIRST[c];
- each next code is (previous + c + 1) mod 6 with probability 0.7 ("step"), else the previous one
  again ("repeat"); nothing else ever follows.
The sampled statistics are compared with the truth within MODEL_SLACK (the prior is a fitted model: it
may put up to 2% of its probability on wrong codes) plus 4 binomial standard errors for the number of
samples drawn (for a model within the slack, each comparison fails with probability < 1e-4). An
untrained prior fails the same check.
"""

from __future__ import annotations

import math

import pytest
import torch

from gensynth.models.prior import CodePrior, pick_codes, sample_codes

K, LENGTH, CLASSES, STEP_P = 6, 9, 3, 0.7
MODEL_SLACK = 0.02
FIRST = torch.tensor([[0.5, 0.3, 0.2, 0.0, 0.0, 0.0],
                      [0.0, 0.0, 0.6, 0.4, 0.0, 0.0],
                      [0.1, 0.1, 0.1, 0.1, 0.35, 0.25]])


def toy_codes(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    n = len(labels)
    codes = torch.empty(n, LENGTH, dtype=torch.long)
    codes[:, 0] = torch.multinomial(FIRST[labels], 1, generator=generator).squeeze(1)
    for i in range(1, LENGTH):
        step = torch.rand(n, generator=generator) < STEP_P
        codes[:, i] = torch.where(step, (codes[:, i - 1] + labels + 1) % K, codes[:, i - 1])
    return codes


def train_toy_prior(steps: int = 400) -> CodePrior:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is faster than two on a busy machine
    try:
        torch.manual_seed(0)
        prior = CodePrior(K, LENGTH, CLASSES, width=32, layers=2, heads=2, dropout=0.0)
        opt = torch.optim.AdamW(prior.parameters(), lr=1e-2, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=steps, pct_start=0.1)
        data = torch.Generator().manual_seed(1)
        for _ in range(steps):
            labels = torch.randint(CLASSES, (128,), generator=data)
            codes = toy_codes(labels, data)  # fresh samples every step: the prior learns the distribution
            logits = prior(labels, codes[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, K), codes.reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
    finally:
        torch.set_num_threads(threads)
    return prior.eval()


@pytest.fixture(scope="module")
def prior() -> CodePrior:
    return train_toy_prior()


def tolerance(p: float, n: int) -> float:
    """MODEL_SLACK plus 4 binomial standard errors of a frequency of n draws from a model within that slack."""
    q = min(max(p, MODEL_SLACK), 1 - MODEL_SLACK)
    return MODEL_SLACK + 4 * math.sqrt(q * (1 - q) / n)


def test_samples_match_the_toy_distribution_per_class(prior):
    per_class = 600
    labels = torch.arange(CLASSES).repeat_interleave(per_class)
    codes = sample_codes(prior, labels, torch.Generator().manual_seed(0))
    assert codes.shape == (len(labels), LENGTH) and codes.dtype == torch.int64
    for c in range(CLASSES):
        mine = codes[labels == c]
        first = torch.bincount(mine[:, 0], minlength=K).double() / per_class
        for k in range(K):
            p = float(FIRST[c, k])
            assert abs(float(first[k]) - p) <= tolerance(p, per_class), (c, k, first.tolist())
        prev, nxt = mine[:, :-1], mine[:, 1:]
        transitions = prev.numel()
        step = float(((nxt == (prev + c + 1) % K)).double().mean())
        repeat = float((nxt == prev).double().mean())
        assert abs(step - STEP_P) <= tolerance(STEP_P, transitions), (c, step)
        assert abs(repeat - (1 - STEP_P)) <= tolerance(1 - STEP_P, transitions), (c, repeat)
        assert 1 - step - repeat <= tolerance(0.0, transitions), (c, 1 - step - repeat)  # nothing else follows


def test_top_k_1_draws_the_most_likely_code_at_every_position(prior):
    labels = torch.arange(CLASSES).repeat_interleave(50)
    codes = sample_codes(prior, labels, torch.Generator().manual_seed(0), top_k=1)
    for c in range(CLASSES):
        mine = codes[labels == c]
        assert (mine[:, 0] == int(FIRST[c].argmax())).all()
        assert (mine[:, 1:] == (mine[:, :-1] + c + 1) % K).all()  # "step" (0.7) beats "repeat" (0.3)


def test_temperature_flattens_or_sharpens_the_draws(prior):
    labels = torch.zeros(800, dtype=torch.long)

    def step_share(temperature: float) -> float:
        codes = sample_codes(prior, labels, torch.Generator().manual_seed(0), temperature=temperature)
        return float((codes[:, 1:] == (codes[:, :-1] + 1) % K).double().mean())

    cold, normal, hot = step_share(0.5), step_share(1.0), step_share(3.0)
    assert cold > normal + 0.05 and hot < normal - 0.05


def test_draws_come_only_from_the_given_generator(prior):
    labels = torch.arange(CLASSES).repeat(10)
    a = sample_codes(prior, labels, torch.Generator().manual_seed(3))
    torch.manual_seed(123)  # the global RNG plays no part
    b = sample_codes(prior, labels, torch.Generator().manual_seed(3))
    c = sample_codes(prior, labels, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_pick_codes_top_k_never_draws_outside_the_top_k():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).repeat(500, 1)
    drawn = pick_codes(logits, torch.Generator().manual_seed(0), temperature=5.0, top_k=2)
    assert set(drawn.tolist()) == {2, 3}


def test_untrained_prior_does_not_pass_the_toy_check():
    """The check above can fail: an untrained prior's samples are far from the toy distribution."""
    torch.manual_seed(0)
    untrained = CodePrior(K, LENGTH, CLASSES, width=32, layers=2, heads=2, dropout=0.0).eval()
    labels = torch.ones(600, dtype=torch.long)
    codes = sample_codes(untrained, labels, torch.Generator().manual_seed(0))
    step = float((codes[:, 1:] == (codes[:, :-1] + 2) % K).double().mean())
    assert abs(step - STEP_P) > tolerance(STEP_P, codes[:, 1:].numel())


def test_guidance_draws_from_the_guided_logits_at_every_position():
    # greedy draws (top_k 1) make the guided logits visible: each code must be the argmax of
    # u + s * (c - u), recomputed here without the key/value cache from the prefix drawn so far
    torch.manual_seed(0)
    prior = CodePrior(K, LENGTH, CLASSES, width=16, layers=2, heads=2, dropout=0.0, null_class=True).eval()
    for p in prior.parameters():
        torch.nn.init.normal_(p, std=0.5)  # random but far from uniform: no ties among the logits
    labels = torch.tensor([0, 1, 2, 1])
    none = torch.full_like(labels, CLASSES)
    for s in (1.0, 3.0):
        codes = sample_codes(prior, labels, torch.Generator().manual_seed(0), top_k=1, guidance=s)
        for i in range(LENGTH):
            with torch.no_grad():
                c, u = prior(labels, codes[:, :i])[:, -1], prior(none, codes[:, :i])[:, -1]
            assert torch.equal(codes[:, i], (u + s * (c - u)).argmax(1)), (s, i)
    plain = sample_codes(prior, labels, torch.Generator().manual_seed(0), top_k=1)
    assert torch.equal(plain, sample_codes(prior, labels, torch.Generator().manual_seed(0), top_k=1, guidance=1.0))
    assert not torch.equal(plain, sample_codes(prior, labels, torch.Generator().manual_seed(0), top_k=1, guidance=3.0))
    without = CodePrior(K, LENGTH, CLASSES, width=16, layers=1, heads=2)
    with pytest.raises(ValueError, match="needs a prior trained with a null class"):
        sample_codes(without, labels, torch.Generator().manual_seed(0), guidance=2.0)
