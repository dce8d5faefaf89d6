"""Vector quantizer with an EMA codebook: networks only (it updates its own codebook in training mode,
as batch norm updates its statistics).

- Nearest-code lookup with straight-through gradients and a commitment loss (van den Oord et al.
  2017, "Neural Discrete Representation Learning").
- Codebook learned by exponential moving averages of assignment counts and sums, with Laplace
  smoothing of the counts (van den Oord et al. 2017, appendix A.1): no codebook loss, no optimizer.
- k-means initialisation (k-means++ seeds, Arthur & Vassilvitskii 2007) from the first batch of every
  rank (Lancucki et al. 2020, "Robust training of vector quantized bottleneck models"), and dead-code
  restart: a code unused for `restart_after` batches is re-seeded with a random encoder output of the
  current batch (Lancucki et al. 2020; Dhariwal et al. 2020, Jukebox).
- Optional factorized (lower-dimensional) and cosine-similarity (l2-normalized) codes: the lookup
  happens in a `codebook_dim` projection of the encoder output, on the unit sphere when `cosine`
  (Yu et al. 2022, "Vector-quantized image modeling with improved VQGAN", ViT-VQGAN).

Under torch.distributed every codebook statistic is summed over the ranks (counts and sums of the EMA
update, the k-means data, the vectors that re-seed dead codes come from rank 0), so every rank keeps
the very same codebook without relying on DDP's buffer broadcast. Collectives run only in training
mode, so evaluation and sampling on one rank never wait on the others.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import distributed as dist
from torch import nn

from gensynth.reconstruction import codebook_usage


class Quantized(NamedTuple):
    quantized: torch.Tensor  # [n, dim, h, w], straight-through: gradients flow to the encoder output
    codes: torch.Tensor  # int64 [n, h, w]
    commitment: torch.Tensor  # scalar, already weighted by the commitment cost
    stats: dict[str, torch.Tensor]  # detached scalars of this batch (training mode only)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if _distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _broadcast(t: torch.Tensor) -> torch.Tensor:
    if _distributed():
        dist.broadcast(t, src=0)
    return t


def _all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows of every rank, rank order (ranks may hold different row counts)."""
    if not _distributed():
        return x
    world = dist.get_world_size()
    count = torch.tensor([x.shape[0]], device=x.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    most = int(max(int(c) for c in counts))
    padded = torch.zeros((most, *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[:x.shape[0]] = x
    gathered = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:int(c)] for g, c in zip(gathered, counts)])


def squared_distances(x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """[n, K] squared euclidean distances (for unit vectors: 2 - 2 cos)."""
    return x.pow(2).sum(1, keepdim=True) - 2 * x @ codes.t() + codes.pow(2).sum(1)[None, :]


def kmeans_plus_plus(x: torch.Tensor, k: int) -> torch.Tensor:
    """k seeds, each drawn with probability proportional to its squared distance from the seeds so far
    (Arthur & Vassilvitskii 2007), from the global torch RNG."""
    n = x.shape[0]
    seeds = [int(torch.randint(n, (1,)))]
    nearest = (x - x[seeds[0]]).pow(2).sum(1)
    for _ in range(k - 1):
        cumulative = nearest.double().cumsum(0)
        if cumulative[-1] > 0:
            i = int(torch.searchsorted(cumulative, torch.rand(1, dtype=torch.float64).to(x.device) * cumulative[-1]))
        else:  # fewer distinct points than codes
            i = int(torch.randint(n, (1,)))
        i = min(i, n - 1)
        seeds.append(i)
        torch.minimum(nearest, (x - x[i]).pow(2).sum(1), out=nearest)
    return x[seeds].clone()


def kmeans(x: torch.Tensor, k: int, iters: int, cosine: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(centroids [k, d], counts [k]) by Lloyd's algorithm from k-means++ seeds; spherical when `cosine`.
    An empty cluster keeps its centroid (dead-code restart deals with it later)."""
    centroids = kmeans_plus_plus(x, k)
    counts = torch.zeros(k, device=x.device)
    for _ in range(max(iters, 1)):
        assign = torch.cat([squared_distances(chunk, centroids).argmin(1) for chunk in x.split(16384)])
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None]
        if cosine:
            centroids = F.normalize(centroids, dim=1)
    return centroids, counts


class VectorQuantizer(nn.Module):
    def __init__(self, dim: int, codebook_size: int = 512, codebook_dim: int = 0, cosine: bool = False,
                 commitment: float = 0.25, decay: float = 0.99, eps: float = 1e-5, kmeans_iters: int = 10,
                 restart_after: int = 100, usage_window: int = 100):
        super().__init__()
        self.dim, self.codebook_size = dim, codebook_size
        self.codebook_dim = codebook_dim or dim
        self.cosine, self.commitment_cost, self.decay, self.eps = cosine, commitment, decay, eps
        self.kmeans_iters, self.restart_after, self.usage_window = kmeans_iters, restart_after, usage_window
        factorized = self.codebook_dim != dim
        self.project_in = nn.Linear(dim, self.codebook_dim) if factorized else nn.Identity()
        self.project_out = nn.Linear(self.codebook_dim, dim) if factorized else nn.Identity()
        embed = torch.randn(codebook_size, self.codebook_dim)
        self.register_buffer("embed", F.normalize(embed, dim=1) if cosine else embed)
        self.register_buffer("cluster_size", torch.zeros(codebook_size))  # EMA of assignment counts
        self.register_buffer("embed_sum", self.embed.clone())  # EMA of assigned vector sums
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("batches", torch.tensor(0))  # training batches seen (all ranks together)
        self.register_buffer("last_used", torch.zeros(codebook_size, dtype=torch.long))  # batch index; 0 = never
        self.register_buffer("born", torch.zeros(codebook_size, dtype=torch.long))  # batch of (re)seeding
        self.register_buffer("restarts", torch.tensor(0))  # dead codes re-seeded so far

    # -- lookup

    def _to_codebook_space(self, z: torch.Tensor) -> torch.Tensor:
        """[n, dim, h, w] -> float32 rows [n*h*w, codebook_dim] (unit length when cosine)."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, self.dim).float()
        x = self.project_in(flat)
        return F.normalize(x, dim=1) if self.cosine else x

    def nearest(self, x: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code of each row (chunked, so big batches don't build one huge matrix)."""
        return torch.cat([squared_distances(chunk, self.embed).argmin(1) for chunk in x.split(16384)])

    def forward(self, z: torch.Tensor) -> Quantized:
        n, _, h, w = z.shape
        with torch.autocast(z.device.type, enabled=False):
            x = self._to_codebook_space(z)
            stats: dict[str, torch.Tensor] = {}
            if self.training and not bool(self.initialized):
                self._initialize(x.detach())
            codes = self.nearest(x.detach())
            if self.training:
                stats = self._update(x.detach(), codes)
            quantized = F.embedding(codes, self.embed)
            commitment = self.commitment_cost * F.mse_loss(x, quantized)
            quantized = x + (quantized - x).detach()  # straight-through estimator
            out = self.project_out(quantized).view(n, h, w, self.dim).permute(0, 3, 1, 2)
        return Quantized(out.contiguous(), codes.view(n, h, w), commitment, stats)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """int [n, h, w] -> quantized vectors [n, dim, h, w] (what the decoder takes)."""
        n, h, w = codes.shape
        out = self.project_out(F.embedding(codes.long().reshape(-1), self.embed))
        return out.view(n, h, w, self.dim).permute(0, 3, 1, 2).contiguous()

    # -- codebook learning (training mode only; every rank takes the same steps)

    @torch.no_grad()
    def _initialize(self, x: torch.Tensor) -> None:
        data = _all_gather_rows(x)
        if not _distributed() or dist.get_rank() == 0:
            if self.kmeans_iters > 0:
                centroids, counts = kmeans(data, self.codebook_size, self.kmeans_iters, self.cosine)
            else:  # random encoder outputs
                pick = torch.randint(data.shape[0], (self.codebook_size,), device=data.device)
                centroids, counts = data[pick].clone(), torch.ones(self.codebook_size, device=data.device)
        else:  # rank 0 computes, the others receive
            centroids, counts = torch.empty_like(self.embed), torch.empty_like(self.cluster_size)
        _broadcast(centroids)
        _broadcast(counts)
        self.embed.copy_(centroids)
        self.cluster_size.copy_(counts)
        self.embed_sum.copy_(centroids * counts[:, None])
        self.born.fill_(int(self.batches))
        self.initialized.fill_(True)

    @torch.no_grad()
    def _update(self, x: torch.Tensor, codes: torch.Tensor) -> dict[str, torch.Tensor]:
        """EMA codebook step with the counts and sums of all ranks; usage bookkeeping; dead-code restart."""
        counts = torch.bincount(codes, minlength=self.codebook_size).float()
        sums = torch.zeros_like(self.embed).index_add_(0, codes, x)
        _all_reduce(counts)
        _all_reduce(sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (total + self.codebook_size * self.eps) * total
        embed = self.embed_sum / smoothed[:, None]
        self.embed.copy_(F.normalize(embed, dim=1) if self.cosine else embed)
        self.batches.add_(1)
        self.last_used[counts > 0] = self.batches
        restarted = self._restart_dead(x)
        batch_usage, perplexity = codebook_usage(counts)  # of all ranks' codes in this batch
        return {"perplexity": perplexity, "usage": self.usage(), "batch_usage": batch_usage,
                "restarted": torch.tensor(float(restarted)), "restarts_total": self.restarts.float().clone()}

    def dead_codes(self) -> torch.Tensor:
        """Mask of codes neither used nor (re)seeded in the last `restart_after` batches."""
        return (self.batches - torch.maximum(self.last_used, self.born)) >= self.restart_after

    @torch.no_grad()
    def _restart_dead(self, x: torch.Tensor) -> int:
        if self.restart_after <= 0:
            return 0
        dead = self.dead_codes()
        count = int(dead.sum())  # the same on every rank: the buffers are identical
        if count == 0:
            return 0
        fresh = x[torch.randint(x.shape[0], (count,), device=x.device)]
        _broadcast(fresh)  # rank 0's picks, so every rank re-seeds with the same vectors
        self.embed[dead] = fresh
        self.cluster_size[dead] = 1.0
        self.embed_sum[dead] = fresh
        self.born[dead] = self.batches
        self.restarts.add_(count)
        return count

    def usage(self) -> torch.Tensor:
        """Fraction of codes used at least once in the last `usage_window` training batches."""
        recent = (self.last_used > 0) & (self.batches - self.last_used < self.usage_window)
        return recent.float().mean()

