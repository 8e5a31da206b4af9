"""Issue 15: the n-gram index, the tree merge and per-source calibration as pure functions, no model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from quanttree.lookup import Continuation, NgramIndex, lookup_tree
from quanttree.policy import AcceptanceCalibrator
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


def test_merge_carries_each_sources_own_probabilities():
    from quanttree.tree import SOURCES, node_origins, with_source

    chain = with_source(build_chain(torch.log(torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]])), root=0), 0)
    idx = NgramIndex()
    idx.extend([5, 0, 1, 2, 7, 0, 1, 3, 0])  # the root 0 came before: followed by 1 2 and 1 3
    found = idx.continuations(depth=2)
    look = with_source(lookup_tree(found, root=0, budget=4), 1)
    merged, from_b = merge_trees(chain, look)
    assert merged.own.shape == (merged.size + 1, len(SOURCES))
    origins = node_origins(merged)
    # the chain's first node (token 1) is also the lookup's: one node, both estimates kept
    assert origins[0] == "both" and merged.own[1, 0] == pytest.approx(0.6) and merged.own[1, 1] == 1.0
    assert origins.count("drafter") == 1 and origins.count("lookup") == 2  # 0 after 1; 2 and 3 after 1
    assert torch.isnan(merged.own[2:, 0]).sum() == 2 and torch.isnan(merged.own[2:, 1]).sum() == 1
    assert all(int(merged.parents[i]) < i for i in range(1, merged.size + 1))


def test_sizer_rates_a_node_by_its_best_source_and_learns_per_source():
    from quanttree.costmodel import CostModel, CostProfile
    from quanttree.policy import TreeSizer
    from quanttree.tree import with_source

    profile = CostProfile(key={}, sizes=[1, 2, 4, 8], contexts=[1, 4096],
                          verify_ms=[[10.0, 10.1, 10.2, 10.3]] * 2, draft_ms=[0.1, 0.1])
    sizer = TreeSizer("auto", CostModel(profile), cap=8)
    look = with_source(lookup_tree([Continuation((5, 6), 3, 3)], root=0, budget=4), 3)  # 3-token match
    for _ in range(200):  # a 3-token match's continuation is always accepted
        sizer.observe(look, torch.tensor([0, 1, 2]), 3, 100, 10.0, 0.1)
    rates = sizer.lookup_calibrators[2].rates()
    assert rates[0, -1] > 0.95  # learned: depth 1, own probability 1.0
    assert np.allclose(sizer.calibrator.trials, AcceptanceCalibrator().trials)  # the drafter's map: untouched
    path = sizer.calibrate_sources(look)
    assert path[1] > 0.9 and path[2] > 0.8
    chosen = sizer.choose(look, 100, drafted=False)
    assert chosen.size == 2  # cheap verification and sure nodes: both go
