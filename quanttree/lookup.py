"""n-gram lookup drafts: answers copy from their prompt, from themselves and from the target's
earlier answers.

Per request, an index of every n-gram (n = 1..max_n) of the prompt and the committed tokens;
a round looks up the longest suffix that occurred before and proposes what followed it, as a
trie of the distinct continuations with their counts. A corpus index does the same over a fixed
set of the target's own earlier responses (SuffixDecoding's global tree, as a sorted suffix
table). Pure Python and numpy on token ids: no model.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
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


class CorpusIndex:
    """The longest suffix of a context that occurs in a corpus of token sequences, and what
    followed it there. Sequences are joined by a separator no match crosses; the table is every
    position of the reversed stream sorted by the `max_n` tokens that end there, so a context's
    matches narrow one token at a time (two binary searches per token). Memory: two int32
    arrays of the corpus length."""

    SAMPLE = 64  # at most this many occurrences are read for continuations (evenly spaced)

    def __init__(self, sequences: list, max_n: int = 8):
        self.max_n = max_n
        parts = []
        for seq in sequences:
            parts += [np.asarray(seq, dtype=np.int64), np.array([-1])]
        stream = np.concatenate(parts) if parts else np.array([-1])
        if stream.max(initial=-1) >= 2**31 - 1:
            raise ValueError("CorpusIndex: token ids must fit in int32")
        self.stream = stream.astype(np.int32)
        self.rev = np.concatenate([self.stream[::-1], np.full(max_n, -1, dtype=np.int32)])
        self.order = _sorted_ends(self.rev, len(self.stream), max_n)

    def __len__(self) -> int:
        return int((self.stream >= 0).sum())

    def _narrow(self, lo: int, hi: int, offset: int, tok: int) -> tuple[int, int]:
        """The sub-range of order[lo:hi] whose token `offset` back from the end equals tok."""
        column = lambda k: int(self.rev[int(self.order[k]) + offset])  # noqa: E731
        a, b = lo, hi
        while a < b:  # first >= tok
            m = (a + b) // 2
            if column(m) < tok:
                a = m + 1
            else:
                b = m
        c, b = a, hi
        while c < b:  # first > tok
            m = (c + b) // 2
            if column(m) <= tok:
                c = m + 1
            else:
                b = m
        return a, c

    def continuations(self, context: list[int], depth: int, limit: int = 8) -> list[Continuation]:
        """Distinct continuations (up to `depth` tokens) of the longest suffix of `context` that
        occurs in the corpus, most frequent first; at most `limit`."""
        lo, hi, n = 0, len(self.order), 0
        for k in range(1, min(self.max_n, len(context)) + 1):
            a, b = self._narrow(lo, hi, k - 1, int(context[-k]))
            if a == b:
                break
            lo, hi, n = a, b, k
        if n == 0:
            return []
        picks = self.order[lo:hi] if hi - lo <= self.SAMPLE else \
            self.order[np.linspace(lo, hi - 1, self.SAMPLE).astype(np.int64)]
        ends = len(self.stream) - 1 - picks.astype(np.int64)  # forward position of the match's last token
        counts: dict[tuple[int, ...], int] = {}
        for e in ends.tolist():
            cont = self.stream[e + 1:e + 1 + depth].tolist()
            if -1 in cont:
                cont = cont[:cont.index(-1)]
            if cont:
                key = tuple(cont)
                counts[key] = counts.get(key, 0) + 1
        ranked = sorted(counts.items(), key=lambda kv: -kv[1])
        return [Continuation(c, k, n) for c, k in ranked[:limit]]


def _sorted_ends(rev: np.ndarray, n: int, width: int) -> np.ndarray:
    """Positions 0..n-1 of `rev` sorted by the `width` tokens starting there (-1 first): the
    tokens are packed several to a uint64 key, so a few sort keys cover all `width`."""
    bits = max(1, int(rev.max(initial=0) + 2).bit_length())
    per_key = 63 // bits
    keys = []
    for first in range(0, width, per_key):
        key = np.zeros(n, dtype=np.uint64)
        for j in range(first, min(first + per_key, width)):
            key = (key << np.uint64(bits)) | (rev[j:j + n].astype(np.int64) + 1).astype(np.uint64)
        keys.append(key)
    return np.lexsort(keys[::-1]).astype(np.int32)  # lexsort: the last key is the primary one


def load_corpus(path: str | Path, lead: int = 8) -> CorpusIndex:
    """A CorpusIndex of the responses in a packed data file (`quanttree train-drafter --stage
    data` makes one; keys tokens, offsets, prompt_lens), each with the last `lead` prompt tokens
    before it (the chat template's turn opening, so a response's first tokens match too).
    Built once per file and process (engines of one target share it)."""
    path = Path(path).resolve()
    stat = path.stat()
    return _load_corpus(path, stat.st_mtime_ns, stat.st_size, lead)


@functools.lru_cache(maxsize=4)
def _load_corpus(path: Path, mtime_ns: int, size: int, lead: int) -> CorpusIndex:
    try:
        with np.load(path) as z:
            tokens, offsets, prompt_lens = z["tokens"], z["offsets"], z["prompt_lens"]
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{path} is not a packed corpus (an .npz with tokens, offsets and prompt_lens): {exc}") \
            from exc
    seqs = [tokens[max(offsets[i] + p - lead, offsets[i]):offsets[i + 1]]
            for i, p in enumerate(prompt_lens.tolist())]
    return CorpusIndex(seqs)


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
