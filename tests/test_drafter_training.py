"""Issue 14: the feature cache, the distillation loss and train == decode alignment on tiny models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import quanttree
from quanttree import kvcache
from quanttree.decode import DraftContext
from quanttree.train.baselines import lookup_next, slot1_baselines, successor_table
from quanttree.train.features import build_cache
from quanttree.train.trainer import TrainConfig, Trainer

from helpers import make_tiny_target

LAYERS = (1, 3)


@pytest.fixture(scope="module")
def tiny_engine(tmp_path_factory, tokenizer):
    target = make_tiny_target(tmp_path_factory.mktemp("t") / "t", "llama", tokenizer, num_hidden_layers=4)
    return quanttree.load(str(target), quant="fp32", device="cpu", drafter=None)


def sequences(n: int = 6, length: int = 40, seed: int = 0):
    """Random token sequences (prompt 8 tokens) with pool indices 0..n-1 (index 0 is held out)."""
    gen = np.random.default_rng(seed)
    return [(gen.integers(0, 300, size=length).astype(np.int32), 8, i) for i in range(n)]


def online(engine, tokens: np.ndarray, layers=LAYERS):
    """Features and logits through the decoding path: Target.forward with a KV cache."""
    ids = torch.as_tensor(tokens.astype(np.int64))[None]
    cache = kvcache.new_target_cache(engine.target.model)
    out = engine.target.forward(ids, torch.arange(ids.shape[1])[None], cache, feature_layers=layers)
    return out.features, out.logits


def test_cached_features_equal_online_features(tiny_engine, tmp_path):
    seqs = sequences(3, 30) + sequences(2, 17, seed=1)  # different lengths share a padded batch
    cache = build_cache(tiny_engine.target, seqs, tmp_path / "f", LAYERS, top_k=8, tokens_per_batch=64,
                        log=lambda *_: None)
    assert len(cache) == len(seqs)
    for i, (tokens, _, _) in enumerate(seqs):
        feats, logits = online(tiny_engine, tokens)
        cached = cache.feature_rows(i)
        assert cached.dtype == torch.bfloat16 and cached.shape == feats.shape
        torch.testing.assert_close(cached.float(), feats.bfloat16().float(), atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(cache.feature_rows(i, (3,)).float(), cached.float()[:, 64:])
        ids, logp = cache.soft_labels(i)
        assert torch.equal(ids[:, 0], logits.argmax(-1))
        torch.testing.assert_close(logp, torch.log_softmax(logits, -1).gather(1, ids), atol=2e-3, rtol=1e-3)
        assert torch.equal(cache.token_ids(i), torch.as_tensor(tokens.astype(np.int64)))


def test_cache_build_resumes_and_refuses_another_build(tiny_engine, tmp_path):
    seqs = sequences(4, 20)
    path = tmp_path / "f"
    build_cache(tiny_engine.target, seqs[:4], path, LAYERS, top_k=4, tokens_per_batch=20, log=lambda *_: None)
    again = build_cache(tiny_engine.target, seqs, path, LAYERS, top_k=4, log=lambda *_: None)  # nothing to do
    assert len(again) == 4
    with pytest.raises(ValueError, match="different feature cache"):
        build_cache(tiny_engine.target, seqs, path, (0, 1), top_k=4, log=lambda *_: None)


def test_a_killed_cache_build_resumes_after_its_last_window_and_equals_a_fresh_one(tiny_engine, tmp_path,
                                                                                   monkeypatch):
    import quanttree.train.features as features

    seqs = sequences(3, 30) + sequences(3, 12, seed=2)  # lengths differ: each window is sorted
    fresh = build_cache(tiny_engine.target, seqs, tmp_path / "f", LAYERS, top_k=4, window=4, tokens_per_batch=40,
                        log=lambda *_: None)
    real, calls = features.target_outputs, []

    def dies_in_the_second_window(target, batch, layers, top_k):
        calls.append(len(batch))
        if sum(calls) > 4:
            raise KeyboardInterrupt
        return real(target, batch, layers, top_k)

    monkeypatch.setattr(features, "target_outputs", dies_in_the_second_window)
    with pytest.raises(KeyboardInterrupt):
        build_cache(tiny_engine.target, seqs, tmp_path / "k", LAYERS, top_k=4, window=4, tokens_per_batch=40,
                    log=lambda *_: None)
    assert features.open_cache(tmp_path / "k").done == 4  # the first window is kept
    monkeypatch.setattr(features, "target_outputs", real)
    resumed = build_cache(tiny_engine.target, seqs, tmp_path / "k", LAYERS, top_k=4, window=4, tokens_per_batch=40,
                          log=lambda *_: None)
    for i in range(len(seqs)):
        assert torch.equal(resumed.feature_rows(i), fresh.feature_rows(i))
        assert torch.equal(resumed.soft_labels(i)[0], fresh.soft_labels(i)[0])


def test_cache_grows_with_new_data_and_keeps_what_it_wrote(tiny_engine, tmp_path):
    seqs = sequences(5, 24)
    grown = build_cache(tiny_engine.target, seqs[:3], tmp_path / "g", LAYERS, top_k=4, log=lambda *_: None)
    first = [grown.feature_rows(i).clone() for i in range(3)]
    grown = build_cache(tiny_engine.target, seqs, tmp_path / "g", LAYERS, top_k=4, log=lambda *_: None)
    fresh = build_cache(tiny_engine.target, seqs, tmp_path / "f", LAYERS, top_k=4, log=lambda *_: None)
    assert len(grown) == 5 and list(grown.pool_index) == [0, 1, 2, 3, 4]
    for i in range(5):
        assert torch.equal(grown.feature_rows(i), fresh.feature_rows(i))
        assert torch.equal(grown.soft_labels(i)[1], fresh.soft_labels(i)[1])
    assert all(torch.equal(first[i], grown.feature_rows(i)) for i in range(3))
    changed = [(s[0][::-1].copy(), s[1], s[2]) for s in seqs]  # not an extension of what is cached
    with pytest.raises(ValueError, match="different feature cache"):
        build_cache(tiny_engine.target, changed + changed, tmp_path / "g", LAYERS, top_k=4, log=lambda *_: None)


def test_distillation_loss_is_the_cross_entropy_to_the_targets_top_k(tiny_engine, tmp_path):
    seqs = sequences(4, 30)
    cache = build_cache(tiny_engine.target, seqs, tmp_path / "f", LAYERS, top_k=16, log=lambda *_: None)
    cfg = TrainConfig(num_layers=1, block_size=4, feature_layers=LAYERS, draft_vocab=0, anchors=5, distill=1.0,
                      init="random")
    trainer = Trainer(tiny_engine.target, cache, cfg, tmp_path / "c", log=lambda *_: None)
    i = trainer.train_ids[0]
    loss, weight = trainer.sequence_loss(i, torch.Generator().manual_seed(3))
    # recompute by hand from the online target distribution and the drafter's states
    anchors = torch.tensor([10, 20])
    states, labels, pos = trainer.block_states(i, anchors, None)
    _, logits = online(tiny_engine, seqs[i][0])
    p_full = torch.softmax(logits, -1)
    top = p_full.topk(16, dim=-1)
    logq = torch.log_softmax(states[:, 1:].float() @ trainer.head.float().T, -1)  # [2, 3, V]
    for a in range(2):
        for k in range(1, 4):
            row = int(pos[a, k]) - 1  # slot k's label: the target's distribution at anchor + k - 1
            p = top.values[row] / top.values[row].sum()
            want = -(p * logq[a, k - 1, top.indices[row]]).sum()
            idx, probs = trainer.soft_targets(i, torch.tensor([row]))
            got = -(probs[0] * logq[a, k - 1, idx[0]]).sum()
            torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    assert loss.requires_grad and float(weight) > 0
    # training on it lowers it
    trainer.train()
    after, _ = trainer.sequence_loss(i, torch.Generator().manual_seed(3))
    assert float(after) < float(loss.detach())


def test_one_sequence_is_learned_alike_in_training_and_decoding(tiny_engine, tmp_path):
    """Train on ONE sequence until every slot is right; the decoding path (the drafter's own
    context cache fed by Target.forward features) must then predict the same blocks."""
    tokens = np.random.default_rng(5).integers(0, 300, size=48).astype(np.int32)
    seqs = [(tokens, 4, 1), (tokens, 4, 0)]  # the same sequence as the training and the held-out one
    cache = build_cache(tiny_engine.target, seqs, tmp_path / "f", LAYERS, top_k=4, log=lambda *_: None)
    block = 4
    cfg = TrainConfig(num_layers=1, block_size=block, feature_layers=LAYERS, draft_vocab=0, anchors=64,
                      seqs_per_step=1, steps=220, lr=3e-3, init="random", eval_every=10**6, ckpt_every=10**6,
                      eval_seqs=1, bf16_autocast=False)
    trainer = Trainer(tiny_engine.target, cache, cfg, tmp_path / "c", log=lambda *_: None)
    trainer.train()
    report = trainer.evaluate()
    assert report["slot1"] == 1.0 and report["chain_tau"] == float(block)
    out = trainer.export(tmp_path / "d", dtype=torch.float32)
    engine = quanttree.load(tiny_engine.loaded.path, drafter=str(out), quant="fp32", device="cpu")
    ctx = DraftContext(engine.drafter, engine.target)
    feats, _ = online(engine, tokens)
    ctx.commit(feats[:4], torch.arange(4))
    wrong = 0
    for anchor in range(4, len(tokens) - block):
        drafted = ctx.log_probs(int(tokens[anchor]), anchor).argmax(-1)  # [B-1]
        wrong += int((drafted != torch.as_tensor(tokens[anchor + 1:anchor + block].astype(np.int64))).sum())
        ctx.commit(feats[anchor:anchor + 1], torch.tensor([anchor]))  # the anchor is now committed context
    assert wrong == 0


def test_a_grown_drafter_starts_as_its_source_and_trains_its_new_layer(tiny_engine, tmp_path):
    """--grow-layers: appended layers start as the identity (the grown drafter's loss equals its
    source's), then learn; the export loads with the extra layer."""
    cache = build_cache(tiny_engine.target, sequences(4, 30), tmp_path / "f", LAYERS, top_k=4, log=lambda *_: None)
    base = dict(block_size=4, feature_layers=LAYERS, draft_vocab=0, anchors=5, eval_every=10**6,
                ckpt_every=10**6, bf16_autocast=False)
    source = Trainer(tiny_engine.target, cache, TrainConfig(num_layers=1, steps=3, init="random", **base),
                     tmp_path / "a", log=lambda *_: None)
    source.train()
    src_dir = source.export(tmp_path / "src", dtype=torch.float32)
    grown = Trainer(tiny_engine.target, cache, TrainConfig(steps=6, init_from=str(src_dir), grow_layers=1, **base),
                    tmp_path / "b", log=lambda *_: None)
    assert len(grown.drafter.layers) == 2
    i = grown.train_ids[0]
    want, _ = source.sequence_loss(i, torch.Generator().manual_seed(3))
    got, _ = grown.sequence_loss(i, torch.Generator().manual_seed(3))
    torch.testing.assert_close(got, want)
    grown.train()
    assert grown.drafter.layers[1].self_attn.o_proj.weight.abs().sum() > 0
    out = grown.export(tmp_path / "g", dtype=torch.float32)
    engine = quanttree.load(tiny_engine.loaded.path, drafter=str(out), quant="fp32", device="cpu")
    assert engine.drafter.config.num_hidden_layers == 2
    with pytest.raises(ValueError, match="init-from"):
        Trainer(tiny_engine.target, cache, TrainConfig(num_layers=1, grow_layers=1, **base), tmp_path / "c",
                log=lambda *_: None)


def test_ngram_baselines():
    seq = np.array([5, 6, 7, 5, 6, 8, 5, 6])
    assert lookup_next(seq, 7) == 8 and lookup_next(seq, 4) == 7 and lookup_next(seq, 2) is None
    assert successor_table([seq], 1)[(5,)] == 6
    assert successor_table([np.array([1, 2, 1, 3, 1, 3])], 1)[(1,)] == 3
    held = np.array([1, 5, 6, 9, 5, 6, 9])
    # anchor 4 (5 -> 6): the bigram table knows it, lookup has no earlier (9, 5);
    # anchor 5 (6 -> 9): only the lookup of the earlier (5, 6) finds it
    result = slot1_baselines([seq], [(held, [4, 5])])
    assert result == {"bigram_slot1": 0.5, "trigram_slot1": 0.0, "lookup_slot1": 0.5}


def test_export_for_other_engines(tiny_engine, tmp_path):
    """A vocabulary token as the mask and the draft vocabulary as draft_vocab_size + d2t (+ its
    lm_head rows): the published format other engines load; a learned mask embedding is refused."""
    import json

    from safetensors import safe_open

    from quanttree import QuanttreeError

    cache = build_cache(tiny_engine.target, sequences(4, 30), tmp_path / "f", LAYERS, top_k=4, log=lambda *_: None)
    base = dict(num_layers=1, block_size=4, feature_layers=LAYERS, draft_vocab=128, anchors=4, steps=2,
                eval_every=10**6, ckpt_every=10**6, init="random")
    learned = Trainer(tiny_engine.target, cache, TrainConfig(**base), tmp_path / "a", log=lambda *_: None)
    with pytest.raises(QuanttreeError, match="mask-token-id"):
        learned.export(tmp_path / "x", for_engines=True)
    trainer = Trainer(tiny_engine.target, cache, TrainConfig(**base, mask_token_id=0), tmp_path / "b",
                      log=lambda *_: None)
    trainer.train()
    out = trainer.export(tmp_path / "e", for_engines=True)
    config = json.loads((out / "config.json").read_text())
    assert config["dflash_config"]["mask_token_id"] == 0 and config["draft_vocab_size"] == 128
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        d2t = f.get_tensor("d2t")
    assert "mask_embedding" not in names and {"d2t", "lm_head.weight"} <= names
    assert torch.equal(torch.arange(128) + d2t, trainer.vocab)
    (out / "draft_vocab.json").unlink()  # the d2t tensor alone carries the vocabulary
    engine = quanttree.load(tiny_engine.loaded.path, drafter=str(out), quant="fp32", device="cpu")
    assert torch.equal(engine.drafter.draft_vocab, trainer.vocab) and engine.drafter.lm_head is not None
    ar = engine.generate("hello there", max_new_tokens=12, chat=False)
    assert engine.generate("hello there", method="ddtree", budget=6, max_new_tokens=12, chat=False).token_ids == \
        ar.token_ids



def test_tree_tau_walks_best_first_trees_along_the_truth():
    """Raw marginals put a depth-1 sibling (0.3) above the depth-2 path (0.5 * 0.45): a 2-node
    tree holds both depth-1 tokens; sharpened (T 0.6) it holds the top-1 path instead."""
    from quanttree.train.trainer import tree_tau

    q = torch.tensor([[0.5, 0.3, 0.2], [0.45, 0.35, 0.2]]).log()[None]  # [1 block, 2 depths, 3 tokens]
    path_true, sibling_true = torch.tensor([[0, 0]]), torch.tensor([[1, -1]])
    assert tree_tau(q, path_true, 1.0, budget=2) == 2.0 and tree_tau(q, path_true, 0.6, budget=2) == 3.0
    assert tree_tau(q, sibling_true, 1.0, budget=2) == 2.0 and tree_tau(q, sibling_true, 0.6, budget=2) == 1.0
    third = torch.tensor([[2, 0]])  # the third depth-1 token (0.2) ranks below the top-1 path (0.225)
    assert tree_tau(q, third, 1.0, budget=3) == 1.0 and tree_tau(q, third, 1.0, budget=4) == 2.0


def test_tree_accepts_equals_building_and_walking_each_tree():
    """The batched accepted lengths are those of tree.build_tree (or build_chain) walked along the truth."""
    from quanttree.train.trainer import tree_accepts
    from quanttree.tree import build_chain, build_tree, walk

    gen = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(200, 5, 40, generator=gen)
    truth = torch.where(torch.rand(200, 5, generator=gen) < 0.6, logits.argmax(-1),
                        torch.randint(0, 40, (200, 5), generator=gen))
    truth[torch.rand(200, 5, generator=gen) < 0.05] = -1  # outside the draft vocabulary
    for budget in (1, 2, 5, 16, 40):
        want = []
        for lg, t in zip(logits, truth):
            lp = lg.log_softmax(-1)
            tree = build_chain(lp, 0) if budget == 1 else build_tree(lp, 0, budget)
            want.append(walk(tree, torch.cat([t, torch.tensor([-1])])[tree.depths]).accept_len)
        got = tree_accepts(logits, truth, budget)
        assert got.tolist() == want and got.max() > 1


def test_replay_rounds_start_after_each_rounds_accepted_tokens():
    from quanttree.train.trainer import replay_rounds

    accepts = torch.tensor([2, 0, 0, 1, 0, 3, 0, 0])  # anchors 10..17
    assert replay_rounds(accepts, 10, 18).tolist() == [10, 13, 15]  # 10 +2+1 -> 13 +1+1 -> 15 +3+1 -> 19 (done)


def test_round_start_anchors_are_where_replayed_decoding_starts_and_survive_a_resume(tiny_engine, tmp_path):
    """--round-start-share: a share of each sequence's anchors are the round starts of greedy
    decoding replayed with the drafter; they are computed once per sequence, kept in the checkpoint,
    and a resumed run continues as an uninterrupted one."""
    cache = build_cache(tiny_engine.target, sequences(5, 40), tmp_path / "f", LAYERS, top_k=4, log=lambda *_: None)
    cfg = TrainConfig(num_layers=1, block_size=4, feature_layers=LAYERS, draft_vocab=0, anchors=8, seqs_per_step=2,
                      steps=6, init="random", eval_every=10**6, ckpt_every=3, bf16_autocast=False,
                      round_start_share=0.5, round_start_budget=4)
    probe = Trainer(tiny_engine.target, cache, cfg, tmp_path / "p", log=lambda *_: None)
    real = probe.block_logits

    def oracle(i, anchors, prefix):  # right along the whole block at anchors divisible by 3, wrong elsewhere
        logits, truth = real(i, anchors, prefix)
        sure = 20.0 * torch.nn.functional.one_hot(truth.clamp(min=0), logits.shape[-1])
        return torch.where((anchors % 3 == 0)[:, None, None], sure, -sure), truth

    probe.block_logits = oracle
    i = probe.train_ids[0]
    accepts = probe.response_accepts(i, (4,))[4]
    assert accepts.tolist() == [3 if (8 + k) % 3 == 0 and 8 + k + 3 < 40 else min(max(40 - 9 - k, 0), 3)
                                if (8 + k) % 3 == 0 else 0 for k in range(31)]
    starts = probe.replayed_round_starts(i, 4)
    assert starts.tolist()[:6] == [8, 9, 13, 14, 15, 19]  # 8 misses -> 9, which accepts 3 -> 13, ... 15 -> 19
    anchors = probe.draw_anchors(i, torch.Generator().manual_seed(1))
    assert torch.isin(anchors, starts).sum() >= 4 and anchors.numel() <= 8
    assert list(probe.round_starts) == [i]
    whole = Trainer(tiny_engine.target, cache, cfg, tmp_path / "a", log=lambda *_: None)
    whole.train()
    cut = Trainer(tiny_engine.target, cache, cfg, tmp_path / "b", log=lambda *_: None)
    cut.train(stop_at=3)
    again = Trainer(tiny_engine.target, cache, cfg, tmp_path / "b", log=lambda *_: None)
    again.resume()
    assert again.step == 3 and again.round_starts.keys() == cut.round_starts.keys()
    again.train()
    for name, value in whole.drafter.state_dict().items():
        torch.testing.assert_close(again.drafter.state_dict()[name], value)
    report = whole.evaluate()
    assert 1.0 <= report["replay_chain_tau"] <= report["replay_ddtree16_tau"] <= 4.0
