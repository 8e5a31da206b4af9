"""Pure tree functions: best-first set, prefix closure, ancestor mask, walk."""

from __future__ import annotations

import itertools

import pytest
import torch

from quanttree.tree import ancestor_matrix, build_chain, build_tree, compile_tree, root_only, walk


def brute_force_top(log_probs: torch.Tensor, budget: int) -> set[tuple[int, ...]]:
    """All prefixes of every length, scored by summed per-depth log-probs; the top `budget`."""
    depth, vocab = log_probs.shape
    scored = []
    for d in range(1, depth + 1):
        for seq in itertools.product(range(vocab), repeat=d):
            scored.append((sum(float(log_probs[i, t]) for i, t in enumerate(seq)), seq))
    scored.sort(key=lambda x: -x[0])
    return {seq for _, seq in scored[:budget]}


def node_prefixes(tree) -> list[tuple[int, ...]]:
    seqs = [()]
    for i in range(1, tree.tokens.numel()):
        seqs.append(seqs[int(tree.parents[i])] + (int(tree.tokens[i]),))
    return seqs


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("budget", [1, 3, 7, 16, 40])
def test_build_tree_is_exact_top_budget(seed, budget):
    gen = torch.Generator().manual_seed(seed)
    log_probs = torch.log_softmax(torch.randn(4, 5, generator=gen) * 2, dim=-1)
    tree = build_tree(log_probs, root=99, budget=budget)
    prefixes = node_prefixes(tree)
    assert tree.size == budget and tree.tokens[0] == 99
    assert set(prefixes[1:]) == brute_force_top(log_probs, budget)
    # parents before children, depth = parent depth + 1, scores = path log-prob
    for i in range(1, tree.size + 1):
        p = int(tree.parents[i])
        assert 0 <= p < i and tree.depths[i] == tree.depths[p] + 1
        expected = sum(float(log_probs[d, t]) for d, t in enumerate(prefixes[i]))
        assert abs(float(tree.scores[i]) - expected) < 1e-4
    assert len(set(prefixes)) == len(prefixes)  # siblings distinct


def test_chain_is_top1_per_depth():
    log_probs = torch.log_softmax(torch.randn(6, 9), dim=-1)
    chain = build_chain(log_probs, root=3)
    assert chain.tokens[1:].tolist() == log_probs.argmax(-1).tolist()
    assert chain.parents.tolist() == [-1, 0, 1, 2, 3, 4, 5] and chain.is_chain()


def test_ancestor_matrix_matches_parent_walk():
    gen = torch.Generator().manual_seed(1)
    tree = build_tree(torch.log_softmax(torch.randn(6, 4, generator=gen), -1), root=0, budget=30)
    vis = ancestor_matrix(tree.parents)
    for i in range(tree.size + 1):
        anc, j = set(), i
        while j >= 0:
            anc.add(j)
            j = int(tree.parents[j])
        assert set(vis[i].nonzero().squeeze(-1).tolist()) == anc


def test_compile_positions_and_mask():
    gen = torch.Generator().manual_seed(2)
    tree = build_tree(torch.log_softmax(torch.randn(5, 6, generator=gen), -1), root=11, budget=12)
    inputs = compile_tree(tree, start=7, dtype=torch.float32)
    assert inputs.input_ids.tolist()[0] == tree.tokens.tolist()
    assert inputs.position_ids[0].tolist() == (tree.depths + 7).tolist()
    mask = inputs.attention_mask[0, 0]
    assert mask.shape == (13, 7 + 13)
    assert (mask[:, :7] == 0).all()  # cached prefix fully visible
    assert torch.equal(mask[:, 7:] == 0, ancestor_matrix(tree.parents))
    chain = compile_tree(build_chain(torch.randn(4, 6), 1), start=3, dtype=torch.float32)
    assert chain.attention_mask is None  # a chain is plain causal attention
    assert compile_tree(root_only(5), start=3, dtype=torch.float32).attention_mask is None


def test_walk_follows_target_tokens():
    # root(0) -> a(1: tok 5), b(2: tok 6); a -> c(3: tok 7), d(4: tok 8); c -> e(5: tok 9)
    from quanttree.tree import Tree

    tree = Tree(tokens=torch.tensor([1, 5, 6, 7, 8, 9]), parents=torch.tensor([-1, 0, 0, 1, 1, 3]),
                depths=torch.tensor([0, 1, 1, 2, 2, 3]), scores=torch.zeros(6))
    # target at root says 5 (-> a), at a says 7 (-> c), at c says 4 (no child 4): bonus 4
    acc = walk(tree, torch.tensor([5, 7, 0, 4, 0, 0]))
    assert acc.path.tolist() == [0, 1, 3] and acc.bonus == 4 and acc.accept_len == 2
    acc = walk(tree, torch.tensor([6, 0, 2, 0, 0, 0]))  # root -> b, b has no children: bonus from b
    assert acc.path.tolist() == [0, 2] and acc.bonus == 2
    acc = walk(tree, torch.tensor([3, 7, 0, 9, 0, 0]))  # nothing accepted
    assert acc.path.tolist() == [0] and acc.bonus == 3
    acc = walk(tree, torch.tensor([5, 7, 0, 9, 0, 2]))  # full depth
    assert acc.path.tolist() == [0, 1, 3, 5] and acc.bonus == 2
    assert walk(root_only(4), torch.tensor([8])).bonus == 8
