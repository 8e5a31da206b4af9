"""Draft baselines that never look at a target hidden state: a drafter's first slot must beat them.

Each predicts the token after an anchor (slot 1) from token ids alone:
- bigram: the most frequent successor of the anchor token in the training responses;
- trigram: the most frequent successor of (token before the anchor, anchor);
- lookup: the token that followed the last earlier occurrence of (token before, anchor) in the
  same sequence (prompt lookup decoding's rule, n = 2).
"""

from __future__ import annotations

import numpy as np


def successor_table(responses: list[np.ndarray], order: int) -> dict[tuple[int, ...], int]:
    """Most frequent next token after each `order`-token context in the responses."""
    counts: dict[tuple[int, ...], dict[int, int]] = {}
    for seq in responses:
        seq = seq.tolist()
        for i in range(order, len(seq)):
            nxt = counts.setdefault(tuple(seq[i - order:i]), {})
            nxt[seq[i]] = nxt.get(seq[i], 0) + 1
    return {ctx: max(nxt.items(), key=lambda kv: (kv[1], -kv[0]))[0] for ctx, nxt in counts.items()}


def lookup_next(tokens: np.ndarray, anchor: int, n: int = 2) -> int | None:
    """The token after the last earlier occurrence of tokens[anchor-n+1..anchor], or None."""
    if anchor + 1 < n:
        return None
    key = tokens[anchor - n + 1:anchor + 1].tolist()
    for j in range(anchor - 1, n - 2, -1):
        if tokens[j - n + 1:j + 1].tolist() == key:
            return int(tokens[j + 1])
    return None


def slot1_baselines(train_responses: list[np.ndarray], held: list[tuple[np.ndarray, list[int]]]) -> dict:
    """Slot-1 accuracy of each baseline on held-out (tokens, anchors) pairs."""
    bigram, trigram = successor_table(train_responses, 1), successor_table(train_responses, 2)
    hits = {"bigram": 0, "trigram": 0, "lookup": 0}
    total = 0
    for tokens, anchors in held:
        for a in anchors:
            truth = int(tokens[a + 1])
            total += 1
            hits["bigram"] += bigram.get((int(tokens[a]),)) == truth
            hits["trigram"] += a >= 1 and trigram.get((int(tokens[a - 1]), int(tokens[a]))) == truth
            hits["lookup"] += lookup_next(tokens, a) == truth
    return {f"{k}_slot1": round(v / max(total, 1), 3) for k, v in hits.items()}
