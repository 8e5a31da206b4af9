"""Issue 15 (first part): the n-gram index and the tree merge as pure functions, no model."""

from __future__ import annotations

import torch

from quanttree.lookup import NgramIndex, lookup_tree
from quanttree.tree import build_chain, merge_trees


def test_longest_match_first_with_counts():
    idx = NgramIndex(max_n=3)
    idx.extend([1, 2, 3, 9, 1, 2, 3, 9, 5, 2, 3, 7, 1, 2, 3])
    conts = idx.continuations(depth=2)
    # suffix (1, 2, 3) occurred twice before, followed by (9, 1) and (9, 5)
    assert [c.match_len for c in conts] == [3, 3]
    assert {c.tokens for c in conts} == {(9, 1), (9, 5)} and all(c.count == 1 for c in conts)
    assert conts[0].tokens == (9, 5)  # equal counts: the most recent first
    idx.extend([4])
    assert idx.continuations(depth=2) == []  # 4 never occurred before
    idx2 = NgramIndex(max_n=2)
    idx2.extend([5, 6, 5, 6, 5, 7, 5])  # (7, 5) is new: falls back to (5,), seen 3 times
    conts = idx2.continuations(depth=1)
    assert [(c.tokens, c.count, c.match_len) for c in conts] == [((6,), 2, 1), ((7,), 1, 1)]


def test_lookup_tree_shares_prefixes_and_keeps_the_frequent_ones():
    idx = NgramIndex(max_n=1)
    idx.extend([8, 1, 2, 8, 1, 3, 8, 1, 2, 8])
    tree = lookup_tree(idx.continuations(depth=2), root=8, budget=8)
    assert tree.tokens.tolist() == [8, 1, 2, 3]  # 1 is shared; 2 seen twice, 3 once
    assert tree.parents.tolist() == [-1, 0, 1, 1]
    assert tree.depths.tolist() == [0, 1, 2, 2]
    assert torch.allclose(tree.scores.exp(), torch.tensor([1.0, 1.0, 2 / 3, 1 / 3]))
    small = lookup_tree(idx.continuations(depth=2), root=8, budget=2)
    assert small.tokens.tolist() == [8, 1, 2]
    assert lookup_tree([], root=8, budget=4).size == 0


def test_merge_trees_shares_nodes_keeps_order_and_scores():
    lp = torch.full((3, 10), -9.0)
    lp[0, 4], lp[1, 5], lp[2, 6] = -0.1, -0.2, -0.3
    chain = build_chain(lp, root=1)  # 1 -> 4 -> 5 -> 6
    idx = NgramIndex(max_n=1)
    idx.extend([1, 4, 7, 1])
    look = lookup_tree(idx.continuations(depth=2), root=1, budget=4)  # 1 -> 4 -> 7
    merged, from_b = merge_trees(chain, look)
    assert merged.tokens.tolist() == [1, 4, 5, 6, 7]
    assert merged.parents.tolist() == [-1, 0, 1, 2, 1]
    assert merged.depths.tolist() == [0, 1, 2, 3, 2]
    assert (merged.parents[1:] < torch.arange(1, 5)).all()  # parents first
    assert from_b.tolist() == [True, True, False, False, True]
    assert float(merged.scores[1]) == max(float(chain.scores[1]), float(look.scores[1]))
    same, _ = merge_trees(chain, chain)
    assert same.tokens.tolist() == chain.tokens.tolist()
