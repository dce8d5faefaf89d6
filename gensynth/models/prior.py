"""Class-conditional autoregressive prior over VQ-VAE code grids: a small GPT-style transformer.
Networks and sampling only, no training logic.

A code grid is read in raster order; the sequence starts with a class token, so position i predicts
code i from the class and codes 0..i-1 (the VQ-VAE paper's PixelCNN prior, van den Oord et al. 2017,
as a transformer, as in VQGAN, Esser et al. 2021). Pre-LayerNorm blocks (GPT-2, Radford et al. 2019),
causal self-attention through scaled_dot_product_attention, learned position embeddings.

Sampling draws one code at a time with a key/value cache; temperature and top-k (Fan et al. 2018)
shape each step's distribution, and every draw comes from a torch.Generator on the CPU, so the same
(weights, labels, seed, options) give the same codes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

KVCache = list[list[torch.Tensor]]  # per block: [] or [keys, values]


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        if width % heads:
            raise ValueError(f"prior width {width} is not divisible by heads {heads}")
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cache: list[torch.Tensor] | None = None) -> torch.Tensor:
        n, t, c = x.shape
        q, k, v = (part.view(n, t, self.heads, c // self.heads).transpose(1, 2) for part in self.qkv(x).split(c, 2))
        if cache is not None:  # decoding: one new position at a time attends to everything before it
            if cache:
                k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
            cache[:] = [k, v]
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=cache is None)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(n, t, c)))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads, dropout)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width),
                                 nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, cache: list[torch.Tensor] | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cache)
        return x + self.mlp(self.norm2(x))


class CodePrior(nn.Module):
    def __init__(self, num_codes: int, length: int, num_classes: int, width: int = 128, layers: int = 4,
                 heads: int = 4, dropout: float = 0.1, null_class: bool = False):
        super().__init__()
        self.num_codes, self.length, self.num_classes = num_codes, length, num_classes
        # with null_class, label num_classes means "no class": what classifier-free guidance contrasts with
        self.null_class = null_class
        self.class_embed = nn.Embedding(num_classes + int(null_class), width)  # the first token: which class
        self.code_embed = nn.Embedding(num_codes, width)
        self.pos = nn.Parameter(torch.zeros(length, width))
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(width, heads, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_codes, bias=False)
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2: scale the residual projections by depth
            if name.endswith(("attn.proj.weight", "mlp.2.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * layers))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        if isinstance(m, CodePrior):
            nn.init.normal_(m.pos, std=0.02)

    def forward(self, labels: torch.Tensor, codes: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Logits [n, t, num_codes]. Without a cache: codes are the first t-1 codes of each grid (training:
        a grid minus its last code), and output i predicts code i. With a cache: the positions after the
        cached ones (the first call, empty codes, predicts code 0 from the class alone)."""
        start = cache[0][0].shape[2] if cache is not None and cache[0] else 0  # cached positions
        x = self.code_embed(codes)
        if start == 0:
            x = torch.cat([self.class_embed(labels)[:, None], x], 1)
        if start + x.shape[1] > self.length:
            raise ValueError(f"sequence of {start + x.shape[1]} positions, the prior models {self.length}")
        x = self.drop(x + self.pos[start:start + x.shape[1]])
        for i, block in enumerate(self.blocks):
            x = block(x, cache[i] if cache is not None else None)
        return self.head(self.norm(x))

    def decay_groups(self, weight_decay: float) -> list[dict]:
        """AdamW parameter groups: weight decay on matrices only (not biases, norms, embeddings)."""
        decay, rest = [], []
        for name, p in self.named_parameters():
            is_matrix = p.dim() >= 2 and "embed" not in name and name != "pos"
            (decay if is_matrix else rest).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def pick_codes(logits: torch.Tensor, generator: torch.Generator, temperature: float = 1.0,
               top_k: int = 0) -> torch.Tensor:
    """One draw per row from softmax(logits / temperature), restricted to the top_k most likely (0 = all).
    The draw happens on the CPU with `generator`."""
    logits = logits.float().cpu() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(1)


@torch.no_grad()
def sample_codes(prior: CodePrior, labels: torch.Tensor, generator: torch.Generator, temperature: float = 1.0,
                 top_k: int = 0, guidance: float = 1.0) -> torch.Tensor:
    """int64 codes [n, length] for the given class labels, drawn position by position (eval mode). With
    `guidance` s != 1 (a prior with a null class), each draw uses the logits u + s * (c - u) of the class c and
    of no class u (classifier-free guidance, Ho & Salimans 2022), both rows fed the code drawn."""
    device = prior.pos.device
    was_training = prior.training
    prior.eval()
    n = len(labels)
    labels = labels.to(device)
    guided = guidance != 1.0
    if guided:
        if not prior.null_class:
            raise ValueError("classifier-free guidance needs a prior trained with a null class (label dropout)")
        labels = torch.cat([labels, torch.full_like(labels, prior.num_classes)])

    def guide(logits: torch.Tensor) -> torch.Tensor:
        return logits[n:] + guidance * (logits[:n] - logits[n:]) if guided else logits

    cache: KVCache = [[] for _ in prior.blocks]
    out = []
    logits = guide(prior(labels, torch.empty((len(labels), 0), dtype=torch.long, device=device), cache)[:, -1])
    for i in range(prior.length):
        codes = pick_codes(logits, generator, temperature, top_k)
        out.append(codes)
        if i + 1 < prior.length:
            fed = torch.cat([codes, codes]) if guided else codes
            logits = guide(prior(labels, fed[:, None].to(device), cache)[:, -1])
    prior.train(was_training)
    return torch.stack(out, 1) if out else torch.empty((n, 0), dtype=torch.long)
