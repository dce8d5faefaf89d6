"""The vector quantizer in one process: EMA codebook updates, dead-code restart, k-means initialisation,
straight-through gradients, factorized and cosine codebooks. (Reconstruction metrics and codebook usage:
tests/test_reconstruction.py.)"""

from __future__ import annotations

import pytest
import torch

from gensynth.models.quantizer import VectorQuantizer, kmeans


def as_map(rows: torch.Tensor) -> torch.Tensor:
    """[N, D] rows -> an encoder output [N, D, 1, 1] (one position per 'image')."""
    return rows[:, :, None, None]


def fixed_codebook(codes: torch.Tensor, **kw) -> VectorQuantizer:
    """A quantizer whose codebook is `codes` (already initialised, EMA counts 1 per code)."""
    k, d = codes.shape
    q = VectorQuantizer(d, k, kmeans_iters=0, **kw)
    q.embed.copy_(codes)
    q.cluster_size.fill_(1.0)
    q.embed_sum.copy_(codes)
    q.initialized.fill_(True)
    return q.train()


def test_ema_update_moves_codes_toward_their_assigned_encoder_outputs():
    torch.manual_seed(0)
    codes = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    targets = torch.tensor([[1.0, 1.0], [9.0, -1.0], [-1.0, 11.0]])  # each near one code, offset from it
    x = torch.cat([t + 0.1 * torch.randn(20, 2) for t in targets])
    q = fixed_codebook(codes.clone(), decay=0.9, eps=1e-5, restart_after=0)
    assigned = q.nearest(x)
    assert assigned.tolist() == [0] * 20 + [1] * 20 + [2] * 20
    means = torch.stack([x[assigned == k].mean(0) for k in range(3)])

    before = (q.embed - means).norm(dim=1)
    q(as_map(x))
    after = (q.embed - means).norm(dim=1)
    assert (after < before).all(), (before, after)
    # exactly the update of van den Oord et al. 2017, appendix A.1 (Laplace-smoothed counts)
    n = 0.9 * torch.ones(3) + 0.1 * 20
    m = 0.9 * codes + 0.1 * torch.stack([x[assigned == k].sum(0) for k in range(3)])
    smoothed = (n + 1e-5) / (n.sum() + 3e-5) * n.sum()
    torch.testing.assert_close(q.embed, m / smoothed[:, None])
    for _ in range(200):  # repeated: each code converges to the mean of what is assigned to it
        q(as_map(x))
    torch.testing.assert_close(q.embed, means, atol=1e-3, rtol=0)


def test_outside_training_mode_the_codebook_does_not_change():
    q = fixed_codebook(torch.randn(4, 3), restart_after=1).eval()
    before = {k: v.clone() for k, v in q.state_dict().items()}
    out = q(as_map(torch.randn(16, 3)))
    assert out.stats == {}
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())


def test_dead_code_restart_revives_unused_codes():
    torch.manual_seed(0)
    data = torch.rand(64, 2)  # encoder outputs fill the unit square
    codes = torch.tensor([[0.25, 0.5], [0.75, 0.5]] + [[1000.0 + i, 1000.0] for i in range(6)])
    q = fixed_codebook(codes, restart_after=3, usage_window=2)
    for _ in range(2):
        out = q(as_map(data))
        assert out.stats["restarted"] == 0
    assert float(q.usage()) == 2 / 8 and int(q.dead_codes().sum()) == 0
    out = q(as_map(data))  # third batch without the far codes: they are dead and re-seeded
    assert out.stats["restarted"] == 6 and int(q.restarts) == 6
    reseeded = q.embed[2:]
    # each re-seeded code is one of this batch's encoder outputs
    assert all((data - code).norm(dim=1).min() < 1e-6 for code in reseeded)
    for _ in range(2):
        q(as_map(data))
    assert float(q.usage()) > 0.75, "the revived codes get used"
    assert int((q.last_used[2:] > 3).sum()) >= 5


def test_restart_off_leaves_dead_codes_alone():
    q = fixed_codebook(torch.tensor([[0.5, 0.5], [1000.0, 1000.0]]), restart_after=0)
    for _ in range(5):
        assert q(as_map(torch.rand(32, 2))).stats["restarted"] == 0
    # an unused code stays put (but for the Laplace smoothing of its count)
    assert q.embed[1].tolist() == pytest.approx([1000.0, 1000.0], rel=1e-4) and float(q.usage()) == 0.5


def test_kmeans_initialisation_finds_the_clusters_of_the_first_batch():
    torch.manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [5.0, 5.0], [-5.0, 5.0], [5.0, -5.0]])
    x = torch.cat([c + 0.05 * torch.randn(50, 2) for c in centres])
    q = VectorQuantizer(2, 4, kmeans_iters=10, restart_after=0).train()
    assert not bool(q.initialized)
    q(as_map(x))
    assert bool(q.initialized)
    found = sorted(q.embed.tolist())
    torch.testing.assert_close(torch.tensor(found), torch.tensor(sorted(centres.tolist())), atol=0.05, rtol=0)
    centroids, counts = kmeans(x, 4, 10)
    assert counts.sum() == 200 and sorted(counts.tolist()) == [50.0] * 4


def test_straight_through_gradients_and_commitment():
    q = fixed_codebook(torch.tensor([[0.0, 0.0], [1.0, 1.0]]), commitment=0.25, restart_after=0).eval()
    z = torch.tensor([[0.2, 0.1], [0.9, 0.7]]).requires_grad_(True)
    out = q(as_map(z))
    assert out.codes.flatten().tolist() == [0, 1]
    assert out.quantized.flatten(1).tolist() == [[0.0, 0.0], [1.0, 1.0]]
    g = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    (grad,) = torch.autograd.grad((out.quantized.flatten(1) * g).sum(), z)
    torch.testing.assert_close(grad, g)  # the decoder's gradient passes to the encoder unchanged
    expected = 0.25 * ((z.detach() - torch.tensor([[0.0, 0.0], [1.0, 1.0]])) ** 2).mean()
    torch.testing.assert_close(out.commitment, expected)


def test_factorized_cosine_codebook():
    torch.manual_seed(0)
    q = VectorQuantizer(16, 32, codebook_dim=4, cosine=True, kmeans_iters=3, restart_after=2).train()
    z = torch.randn(8, 16, 3, 3, requires_grad=True)
    for _ in range(4):
        out = q(z)
    assert q.embed.shape == (32, 4)
    torch.testing.assert_close(q.embed.norm(dim=1), torch.ones(32))  # codes stay on the unit sphere
    assert out.quantized.shape == z.shape and out.codes.shape == (8, 3, 3)
    (out.quantized.sum() + out.commitment).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert q.project_in.weight.grad is not None and q.project_out.weight.grad is not None
    torch.testing.assert_close(q.lookup(out.codes), q.eval()(z).quantized)
