"""Token selection shared by AR, chain and tree decoding.

Naming, stated once: p is the target's distribution after temperature / top-k / top-p;
every committed token is drawn from p given the committed prefix, which is what keeps
speculative decoding lossless. Draft distributions (q) are used only to shape trees.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import QuanttreeError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None

    def __post_init__(self):
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise QuanttreeError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise QuanttreeError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise QuanttreeError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A seeded generator for reproducible sampling (None: torch's global RNG)."""
    if params.greedy or params.seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(params.seed)
    return gen


def logits_to_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """p for each row of logits [n, V] -> probs [n, V] (float32)."""
    scores = logits.float() / params.temperature
    if params.top_k > 0 and params.top_k < scores.shape[-1]:
        kth = torch.topk(scores, params.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        scores = scores.masked_fill(~nucleus(torch.softmax(scores, dim=-1), params.top_p), float("-inf"))
    return torch.softmax(scores, dim=-1)


def nucleus(probs: torch.Tensor, top_p: float, first: int = 64) -> torch.Tensor:
    """Top-p's kept tokens per row [n, V] bool: the most probable tokens, in descending order, up to
    and including the one that brings their mass to top_p (always at least one), and every token
    as probable as that last one (bf16 logits tie often; which of two equal tokens a sort puts
    first is arbitrary, so ties at the edge are kept together).

    Sorting the whole vocabulary per row cost ~4 ms a row on a CPU (more than a 135M target's
    forward for a 16-node tree); a nucleus is almost always a few dozen tokens, so the top `first`
    are taken, and more (x16 at a time) only for the rows whose nucleus has not closed within them."""
    vocab = probs.shape[-1]
    edge = torch.empty(probs.shape[0], 1, dtype=probs.dtype, device=probs.device)
    rows = torch.arange(probs.shape[0], device=probs.device)  # rows still open
    k = min(first, vocab)
    while rows.numel():
        top = probs[rows].topk(k, dim=-1).values  # descending
        cum = top.cumsum(dim=-1)
        closed = (cum[:, -1] >= top_p) | (k == vocab)
        count = ((cum - top) < top_p).sum(dim=-1, keepdim=True)  # the mass before a token is below top_p
        edge[rows[closed]] = top.gather(-1, count - 1)[closed]
        rows, k = rows[~closed], min(k * 16, vocab)
    return probs >= edge


def select_tokens(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One target token per row: argmax when greedy, else an independent draw from p. [n, V] -> [n]"""
    if params.greedy:
        return logits.float().argmax(dim=-1)  # the same index; CPU argmax on bf16 is 5x slower
    probs = logits_to_probs(logits, params)
    if generator is not None and probs.device != generator.device:  # logits on an offloaded layer's device
        probs = probs.to(generator.device)
    return draw(probs, generator)


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One index per row of probs [n, V] (>= 0, any positive sum), index i with probability
    probs[i] / sum: the first index whose cumulative sum exceeds a uniform draw over the sum.
    Never an index of probability 0 (its cumulative sum equals its predecessor's).

    torch.multinomial took ~1.1 ms per 49k-token row on a CPU, as much as a small target's
    forward per committed token; a cumulative sum and a binary search take ~0.02 ms."""
    cdf = probs.float().cumsum(dim=-1)
    total = cdf[:, -1:]
    u = torch.rand(total.shape, generator=generator, device=cdf.device) * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))  # strictly below the sum
    return torch.searchsorted(cdf, u, right=True).squeeze(-1)
