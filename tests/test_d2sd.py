"""Issue 6: D2SD rejection points, branch trees, lossless decoding with and without a VP drafter."""

from __future__ import annotations

import pytest
import torch

import quanttree
from quanttree import QuanttreeError
from quanttree.tree import build_branch_tree, rejection_boundaries

from helpers import make_tiny_drafter


def test_rejection_boundaries_follow_confidence():
    # confidences 0.99, 0.98, 0.3, 0.9: the third slot is the likely rejection point
    conf = torch.tensor([0.99, 0.98, 0.3, 0.9])
    lp = torch.log(torch.stack([torch.tensor([c, 1 - c]) for c in conf]))
    assert rejection_boundaries(lp, 1).tolist() == [2]
    r = [float(conf[:i].prod() * (1 - conf[i])) for i in range(4)]
    assert rejection_boundaries(lp, 4).tolist() == sorted(range(4), key=lambda i: -r[i])


def test_branch_tree_is_a_trie_of_chain_and_branches():
    gen = torch.Generator().manual_seed(0)
    chain_lp = torch.log_softmax(torch.randn(6, 10, generator=gen) * 3, -1)
    branch_lp = torch.log_softmax(torch.randn(3, 6, 10, generator=gen) * 3, -1)
    prefixes = torch.tensor([0, 2, 4])
    tree = build_branch_tree(chain_lp, branch_lp, prefixes, root=7)
    seqs = set()
    for i in range(1, tree.size + 1):
        assert 0 <= int(tree.parents[i]) < i and tree.depths[i] == tree.depths[tree.parents[i]] + 1
        if not (tree.parents[1:] == i).any():  # a leaf: its root path is one proposed sequence
            path, j = [], i
            while j > 0:
                path.append(int(tree.tokens[j]))
                j = int(tree.parents[j])
            seqs.add(tuple(path[::-1]))
    chain = tuple(chain_lp.argmax(-1).tolist())
    assert chain in seqs and len(seqs) == 4
    for seq in seqs - {chain}:
        cut = next(i for i, (a, b) in enumerate(zip(seq, chain)) if a != b)
        assert cut in prefixes.tolist()  # branches leave the chain exactly at their rejection point
    assert tree.size <= 6 + 6 + 4 + 2  # shared prefixes are shared nodes


@pytest.fixture(scope="module")
def d2sd_dirs(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("vp")
    return make_tiny_drafter(root / "vp", tiny_dirs["qwen3"], seed=9)


def test_d2sd_greedy_equals_ar_with_and_without_vp(tiny_dirs, d2sd_dirs):
    plain = quanttree.load(str(tiny_dirs["qwen3"]), drafter=str(tiny_dirs["qwen3-drafter"]), quant="fp32",
                           device="cpu", vp_drafter=None)
    with_vp = quanttree.load(str(tiny_dirs["qwen3"]), drafter=str(tiny_dirs["qwen3-drafter"]), quant="fp32",
                             device="cpu", vp_drafter=str(d2sd_dirs))
    assert plain.vp_drafter is None and with_vp.vp_drafter is not None
    ar = plain.generate("the cat sat on", method="ar", max_new_tokens=30, chat=False)
    for engine in (plain, with_vp):
        for branches in (1, 4):
            out = engine.generate("the cat sat on", method="d2sd", branches=branches, max_new_tokens=30, chat=False)
            assert out.token_ids == ar.token_ids
            assert out.stats.mean_tree_size > 7  # the chain plus branches were verified together
        trimmed = [event.step.tree_size for event in engine.stream("the cat sat on", method="d2sd", budget=5,
                                                               max_new_tokens=30, chat=False) if event.step.tree_size]
        assert trimmed and max(trimmed) <= 5  # the merged tree trimmed to its 5 most probable nodes
        assert engine.generate("the cat sat on", method="d2sd", budget=5, max_new_tokens=30,
                               chat=False).token_ids == ar.token_ids


def test_vp_drafter_must_match(tiny_dirs, tmp_path):
    other = make_tiny_drafter(tmp_path / "vp8", tiny_dirs["qwen3"], block_size=4)
    with pytest.raises(QuanttreeError, match="same target_layer_ids, block_size"):
        quanttree.load(str(tiny_dirs["qwen3"]), drafter=str(tiny_dirs["qwen3-drafter"]), quant="fp32",
                       device="cpu", vp_drafter=str(other))
