"""Issue 15: the n-gram index, the tree merge and per-source calibration as pure functions, no model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from quanttree.lookup import Continuation, CorpusIndex, NgramIndex, load_corpus, lookup_tree
from quanttree.policy import AcceptanceCalibrator
from quanttree.tree import SOURCES, build_chain, corpus_source, merge_trees, node_origins, with_source


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


def test_corpus_index_finds_the_longest_earlier_context_and_counts_what_followed():
    corpus = CorpusIndex([[5, 1, 2, 3, 4], [9, 2, 3, 4, 7], [1, 2, 3, 8], [6, 6]], max_n=4)
    assert len(corpus) == 16
    # (1, 2, 3) occurs twice: followed by 4 then the end of its sequence, and by 8
    conts = corpus.continuations([0, 1, 2, 3], depth=3)
    assert {(c.tokens, c.count, c.match_len) for c in conts} == {((4,), 1, 3), ((8,), 1, 3)} and len(conts) == 2
    # (7, 2, 3): 7 never precedes (2, 3), so the match backs off to (2, 3), seen three times
    conts = corpus.continuations([7, 2, 3], depth=2)
    assert {(c.tokens, c.count) for c in conts} == {((4,), 1), ((4, 7), 1), ((8,), 1)}
    assert {c.match_len for c in conts} == {2}
    # a match never crosses from one sequence into the next
    assert [c.tokens for c in corpus.continuations([3, 4], depth=4)] == [(7,)]
    assert corpus.continuations([4, 6], depth=2)[0].tokens == (6,)  # (6,) matches; (4, 6) does not
    assert corpus.continuations([42], depth=2) == [] and corpus.continuations([], depth=2) == []
    # frequent first; longer contexts than max_n use the last max_n tokens
    many = CorpusIndex([[1, 2, 3]] * 5 + [[1, 2, 9]] + [[0, 1, 2, 4]] * 2, max_n=2)
    conts = many.continuations([7, 7, 7, 1, 2], depth=1)
    assert [(c.tokens, c.count) for c in conts] == [((3,), 5), ((4,), 2), ((9,), 1)]


def test_corpus_index_reads_a_bounded_sample_of_frequent_contexts():
    seqs = [[1, 2, 3 + (i % 3)] for i in range(1000)]
    conts = CorpusIndex(seqs, max_n=2).continuations([1, 2], depth=1)
    assert sum(c.count for c in conts) == CorpusIndex.SAMPLE and len(conts) == 3
    assert {c.tokens for c in conts} == {(3,), (4,), (5,)}


def test_corpus_from_a_packed_data_file_keeps_responses_and_the_turn_opening(tmp_path):
    path = tmp_path / "pack.npz"
    tokens = np.array([11, 12, 13, 14, 1, 2, 3, 21, 22, 1, 2, 4], dtype=np.uint16)
    np.savez(path, tokens=tokens, offsets=np.array([0, 7, 12]), prompt_lens=np.array([4, 2]))
    corpus = load_corpus(path, lead=1)
    assert len(corpus) == 2 * 1 + 3 + 3  # each response and the prompt token before it
    assert corpus.continuations([14], depth=2)[0].tokens == (1, 2)
    assert corpus.continuations([13], depth=2) == []  # prompts are not the target's writing
    assert load_corpus(path, lead=1) is corpus  # built once per file
    bad = tmp_path / "bad.npz"
    np.savez(bad, other=np.zeros(3))
    with pytest.raises(ValueError, match="not a packed corpus"):
        load_corpus(bad)


def test_corpus_nodes_are_their_own_source():
    root = 8
    lookup = with_source(lookup_tree([Continuation((1, 2), 1, 2)], root, 4), 2)
    corpus = with_source(lookup_tree([Continuation((1, 3), 2, 5)], root, 4), corpus_source(5))
    merged, _ = merge_trees(lookup, corpus)
    assert merged.tokens.tolist() == [8, 1, 2, 3]
    assert node_origins(merged) == ["lookup", "lookup", "corpus"]  # 1: both n-gram sources, one node
    assert [corpus_source(n) for n in (1, 3, 4, 7, 8)] == [4, 4, 5, 5, 6]
    assert SOURCES[4:] == ("corpus-1-3", "corpus-4-7", "corpus-8+")
    drafted = with_source(build_chain(torch.log_softmax(torch.randn(2, 10), -1), root), 0)
    both, _ = merge_trees(drafted, corpus)
    assert "corpus" in node_origins(both) or "both" in node_origins(both)


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


@pytest.mark.parametrize("method", ["lookup", "auto"])
def test_lookup_rounds_sized_to_nothing_are_probed_so_a_wrong_never_gets_corrected(method):
    """A calibration that says lookup's nodes are never accepted would never be tested again (no
    drafter pass to gate): every 8th round that leaves nodes out verifies 4 more anyway, and what
    they show moves the sizer back to speculating, down to the chain's end."""
    from quanttree.costmodel import CostModel, CostProfile
    from quanttree.policy import TreeSizer
    from quanttree.tree import with_source

    profile = CostProfile(key={}, sizes=[1, 2, 4, 8], contexts=[1, 4096],
                          verify_ms=[[10.0, 10.5, 11.0, 12.0]] * 2, draft_ms=[0.1, 0.1])
    sizer = TreeSizer(method, CostModel(profile), cap=8)
    look = with_source(lookup_tree([Continuation((5, 6, 7, 8, 9, 10), 2, 2)], root=0, budget=6), 2)
    cal = sizer.lookup_calibrators[1]
    cal.hits[:] = 0.0  # learned elsewhere: never accepted
    cal.trials[:] = 50.0
    sizes = []
    for _ in range(64):
        chosen = sizer.choose(look, 100, drafted=False)
        sizes.append(chosen.size)
        sizer.observe(chosen, torch.arange(chosen.size + 1), chosen.size + 1, 100, 11.0, 0.1)  # all accepted
    assert sizes[:7] == [0] * 7 and sizes[7] == 4  # the probe
    assert sizes[-1] == 6, sizes  # the probes taught it: the whole chain goes


def test_drafter_worth_skips_the_pass_only_where_it_measured_no_net_gain():
    from quanttree.policy import DrafterWorth

    worth = DrafterWorth(probe_every=4)
    assert worth.worth(0.99)  # nothing measured yet: draft
    for _ in range(5):
        worth.observe(0.99, net=-0.25)  # lookup sure: drafted rounds decoded less than lookup's alone
        worth.observe(0.3, net=0.6)  # lookup unsure: the drafter's nodes carried the round
    decisions = [worth.worth(0.99) for _ in range(8)]
    assert decisions.count(True) == 2 and decisions[3] and decisions[7]  # only the probes draft
    assert all(worth.worth(0.3) for _ in range(8))  # measured worth its time
    assert worth.worth(0.75)  # another bin: not measured yet


def _merged_example():
    from quanttree.tree import lookup_source

    look = with_source(lookup_tree([Continuation((5, 6), 2, 2)], root=0, budget=4), lookup_source(2))
    drafted = with_source(build_chain(torch.log_softmax(torch.tensor([[0.0, 0, 0, 0, 0, 9, 0, 0],
                                                                     [0.0, 0, 0, 0, 0, 0, 0, 9],
                                                                     [0.0, 0, 9, 0, 0, 0, 0, 0]]), -1), root=0), 0)
    merged, _ = merge_trees(drafted, look)  # 5 (both), then 7 -> 2 (drafter) beside 6 (lookup)
    return look, merged, {int(t): i for i, t in enumerate(merged.tokens.tolist())}


def test_counterfactual_follows_lookups_tree_into_later_rounds():
    from quanttree.policy import Counterfactual, prune, ranked_by

    look, merged, node = _merged_example()
    # the target took the drafter's 5 7 2, then 3: two tokens more than lookup's 5 6 would have
    # given, less the drafted round's extra time (0.5 tokens at the current rate)
    c = Counterfactual(0.9, look, accepted=3, cost=0.5)
    assert c.follow([5, 7, 2, 3]) and c.net() == pytest.approx(3 - 1 - 0.5)
    # the target took lookup's path, which ends there: the drafter added nothing and cost its time
    c = Counterfactual(0.9, look, accepted=2, cost=0.5)
    assert c.follow([5, 6, 9]) and c.net() == pytest.approx(-0.5)
    # the merged tree was pruned to 5 7 (the drafter's 7 displaced lookup's 6), the target took 5
    # then wanted 6: lookup alone would have had both; judged when its tree stops matching
    scores = torch.tensor([0.0, -0.1, -0.5, -3.0, -3.0])
    scores[node[6]], scores[node[7]] = -3.0, -0.5
    pruned = prune(ranked_by(merged, scores.exp().numpy()), 2)
    assert sorted(pruned.tokens.tolist()[1:]) == [5, 7]
    c = Counterfactual(0.9, look, accepted=1, cost=-0.1)
    assert c.follow([5, 6]) and c.net() == pytest.approx(1 - 2 + 0.1)
    # a longer lookup chain cut after its first token: the next rounds' tokens decide
    chain = with_source(lookup_tree([Continuation((5, 6, 7, 8), 4, 3)], root=0, budget=8), 2)
    c = Counterfactual(0.9, chain, accepted=0, cost=0.0)
    assert not c.follow([5]) and not c.follow([6, 7])  # still matching after two rounds
    assert c.follow([8, 1]) and c.net() == pytest.approx(0 - 4)  # lookup alone: all four at once


def test_sizer_learns_whether_the_drafter_beats_a_sure_lookup_draft():
    from quanttree.costmodel import CostModel, CostProfile
    from quanttree.policy import TreeSizer
    from quanttree.tree import lookup_source

    def sizer_after(drafter_tokens: list[int], accepted: int) -> tuple[list[bool], dict]:
        profile = CostProfile(key={}, sizes=[1, 2, 4, 8, 16], contexts=[1, 4096],
                              verify_ms=[[10.0, 10.5, 11.0, 12.0, 14.0]] * 2, draft_ms=[6.0, 6.0])
        sizer = TreeSizer("auto", CostModel(profile), cap=16)
        sizer.recent = [50.0, 500.0]  # decoding at 0.1 tokens/ms: a 6 ms drafter pass costs 0.6 tokens
        look = with_source(lookup_tree([Continuation((5, 6, 7, 8), 4, 3)], root=0, budget=8), lookup_source(3))
        for _ in range(100):  # the lookup chain is always accepted
            sizer.choose(look, 100, drafted=False)
            sizer.observe(look, torch.tensor([0, 1, 2, 3, 4]), 5, 100, 12.0, 0.5, bonus=9)
        logits = torch.full((len(drafter_tokens), 32), -9.0)
        logits[torch.arange(len(drafter_tokens)), torch.tensor(drafter_tokens)] = 9.0
        chain = with_source(build_chain(torch.log_softmax(logits, -1), root=0), 0)
        runs = []
        for _ in range(12):
            runs.append(sizer.drafter_worth(look, 100))
            if runs[-1]:
                merged, _ = merge_trees(chain, look)
                tree = sizer.choose(merged, 100)
                path = [0]
                for tok in (5, 6, 7, 8, 1, 2, 3)[:accepted]:  # the target's tokens, walked through the tree
                    nxt = [i for i in range(1, tree.size + 1) if tree.parents[i] == path[-1] and tree.tokens[i] == tok]
                    if not nxt:
                        break
                    path.append(nxt[0])
                sizer.observe(tree, torch.tensor(path), tree.size + 1, 100, 13.0, 1.0, draft_ms=6.0, bonus=4)
        return runs, sizer.state()

    # a drafter that only repeats lookup's tokens adds nothing for its 6 ms: skipped but for probes
    runs, state = sizer_after([5, 6, 7, 8], accepted=4)
    # one whose own first token displaces lookup's sure chain: lookup alone does better
    runs_wrong, _ = sizer_after([9, 1, 2, 3], accepted=4)
    assert runs_wrong[:3] == [True] * 3 and runs_wrong.count(False) >= 7
    assert runs[:3] == [True] * 3 and runs.count(False) >= 7
    assert state["drafter_net"]["weight"][-1] > 0 and "drafter_worth" not in state
    # one whose chain the target follows three tokens past lookup's: worth its pass every round
    runs, _ = sizer_after([5, 6, 7, 8, 1, 2, 3], accepted=7)
    assert all(runs)


def test_exclusive_rates_cap_siblings_that_promise_more_than_one_token_best_first():
    from quanttree.policy import exclusive_rates

    parents = np.array([-1, 0, 0, 0, 1, 4, 4, 3, 3])
    rate = np.array([1.0, 0.5, 0.9, 0.6, 0.8, 0.2, 0.3, 0.7, 0.7])  # root's children sum to 2.0; node 4's to 0.5
    # the root's best child keeps 0.9, the next gets the 0.1 left, the third nothing; node 4's
    # children fit; node 3's tie: the first keeps 0.7, the second gets 0.3
    np.testing.assert_allclose(exclusive_rates(parents, rate), [1.0, 0.0, 0.9, 0.1, 0.8, 0.2, 0.3, 0.7, 0.3])
    # a drafter's sibling beside a sure lookup token leaves the lookup chain its rate
    np.testing.assert_allclose(exclusive_rates(np.array([-1, 0, 0, 1]), np.array([1.0, 0.95, 0.6, 0.9])),
                               [1.0, 0.95, 0.05, 0.9])


def test_sibling_rates_from_several_sources_never_promise_more_than_one_token():
    """Three sources each sure of a different next token: at most one can be accepted, so the
    calibrated path probabilities of the siblings sum to 1, not 2.7; a lone chain keeps its rates."""
    from quanttree.policy import path_probs

    look = with_source(lookup_tree([Continuation((5, 6), 1, 3)], root=0, budget=4), SOURCES.index("lookup-3+"))
    corpus = with_source(lookup_tree([Continuation((7,), 1, 5)], root=0, budget=4), corpus_source(5))
    other = with_source(lookup_tree([Continuation((8,), 1, 1)], root=0, budget=4), SOURCES.index("lookup-1"))
    merged, _ = merge_trees(look, corpus)
    merged, _ = merge_trees(merged, other)
    rate = np.full(merged.size, 0.9)
    path = path_probs(merged, rate)
    depth1 = merged.depths.numpy() == 1
    assert depth1.sum() == 3
    assert path[depth1].sum() == pytest.approx(1.0)
    second = int(np.nonzero(merged.tokens.numpy() == 6)[0][0])  # only child of token 5: rate kept
    assert path[second] == pytest.approx(path[int(merged.parents[second])] * 0.9)
    chain = look
    np.testing.assert_allclose(path_probs(chain, np.array([0.9, 0.5])), [1.0, 0.9, 0.45])
