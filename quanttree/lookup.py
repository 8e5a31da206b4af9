"""n-gram lookup drafts: answers copy from their prompt and from themselves.

Per request, an index of every n-gram (n = 1..max_n) of the prompt and the committed tokens;
a round looks up the longest suffix that occurred before and proposes what followed it, as a
trie of the distinct continuations with their counts. Pure Python on token ids: no model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .tree import Tree, root_only


@dataclass(frozen=True)
class Continuation:
    tokens: tuple[int, ...]  # what followed an earlier occurrence of the matched suffix
    count: int  # how many earlier occurrences were followed by exactly these tokens
    match_len: int  # length of the matched suffix (n)


class NgramIndex:
    """n-gram -> end positions of its earlier occurrences, over prompt + committed tokens."""

    def __init__(self, max_n: int = 4):
        self.max_n = max_n
        self.tokens: list[int] = []
        self.ends: dict[tuple[int, ...], list[int]] = {}

    def extend(self, tokens: list[int]) -> None:
        """Append committed tokens and index the n-grams that end at each of them."""
        for tok in tokens:
            self.tokens.append(int(tok))
            p = len(self.tokens) - 1
            for n in range(1, min(self.max_n, p + 1) + 1):
                self.ends.setdefault(tuple(self.tokens[p - n + 1:p + 1]), []).append(p)

    def continuations(self, depth: int, limit: int = 8) -> list[Continuation]:
        """Distinct continuations (up to `depth` tokens) of the longest suffix with an earlier
        occurrence, most frequent first, then most recent; at most `limit`."""
        last = len(self.tokens) - 1
        for n in range(min(self.max_n, last), 0, -1):
            ends = [p for p in self.ends.get(tuple(self.tokens[last - n + 1:]), ()) if p < last]
            if not ends:
                continue
            counts: dict[tuple[int, ...], list[int]] = {}
            for p in ends:
                cont = tuple(self.tokens[p + 1:p + 1 + depth])
                counts.setdefault(cont, []).append(p)
            ranked = sorted(counts.items(), key=lambda kv: (-len(kv[1]), -max(kv[1])))
            return [Continuation(c, len(ps), n) for c, ps in ranked[:limit]]
        return []


def lookup_tree(continuations: list[Continuation], root: int, budget: int) -> Tree:
    """The continuations as one draft tree (shared prefixes share nodes), at most `budget`
    drafted nodes, the most often seen prefixes kept. A node's score is the log of the share of
    continuations through its parent that also pass through it (SuffixDecoding's estimate),
    summed along the path; node order is parents first."""
    if budget <= 0 or not continuations:
        return root_only(root)
    children: dict[tuple[int, ...], int] = {}  # prefix -> count
    for c in continuations:
        for d in range(1, len(c.tokens) + 1):
            children[c.tokens[:d]] = children.get(c.tokens[:d], 0) + c.count
    total = sum(c.count for c in continuations)
    scored = []
    for prefix, count in children.items():
        parent = children.get(prefix[:-1], total)
        scored.append((prefix, math.log(count / parent)))
    path = {}
    for prefix, s in sorted(scored, key=lambda x: len(x[0])):  # parents first: path score is cumulative
        path[prefix] = path.get(prefix[:-1], 0.0) + s
    keep = sorted(path, key=lambda p: (-path[p], len(p)))[:budget]
    keep = sorted(keep, key=lambda p: (len(p), -path[p]))  # prefix-closed (a child never outscores its parent)
    index = {(): 0}
    tokens, parents, depths, scores = [root], [-1], [0], [0.0]
    for prefix in keep:
        if prefix[:-1] not in index:
            continue
        index[prefix] = len(tokens)
        tokens.append(prefix[-1])
        parents.append(index[prefix[:-1]])
        depths.append(len(prefix))
        scores.append(path[prefix])
    return Tree(torch.tensor(tokens), torch.tensor(parents), torch.tensor(depths), torch.tensor(scores))
