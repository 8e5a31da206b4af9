"""Issue 18: every target architecture a published drafter exists for decodes exactly or refuses in words.

Tiny random targets of each architecture, saved in the HF on-disk format, and a random drafter in
the published DFlash layout; an oracle drafter (the known AR continuation ranked first or second)
makes chains and trees accept deep, non-contiguous paths, so cache cropping, compaction, the
sliding-window tree masks and the recurrent-state rollback are all exercised."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import quanttree
from quanttree import QuanttreeError, kvcache
from quanttree.costmodel import CostModel, CostProfile
from quanttree.decode import DraftContext
from quanttree.engine import measure_profile
from quanttree.lookup import Continuation, NgramIndex
from quanttree.tree import sliding_window_mask

from helpers import ARCHITECTURES, Oracle, make_tiny_drafter, make_tiny_target

PROMPT = "the quick brown fox jumps over the lazy dog and runs far away into the dark green forest"
EXACT = {  # method -> allowed on the architecture (False: refused with a QuanttreeError)
    "llama": {"dflash": True, "ddtree": True, "d2sd": True, "lookup": True},
    "qwen3": {"dflash": True, "ddtree": True, "d2sd": True, "lookup": True},
    "qwen3_moe": {"dflash": True, "ddtree": True, "d2sd": True, "lookup": True},
    "gpt_oss": {"dflash": True, "ddtree": True, "d2sd": True, "lookup": True},
    "qwen3_5": {"dflash": True, "ddtree": False, "d2sd": False, "lookup": True},  # lookup: chains
}


@pytest.fixture(scope="module")
def arch_dirs(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("arch")
    out = {}
    for kind in ARCHITECTURES:
        target = make_tiny_target(root / kind, kind, tokenizer)
        out[kind] = (target, make_tiny_drafter(root / f"{kind}-drafter", target))
    return out


def engine_for(arch_dirs, kind):
    target, drafter = arch_dirs[kind]
    return quanttree.load(str(target), drafter=str(drafter), quant="fp32", device="cpu")


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_plain_decoding_equals_transformers_generate(arch_dirs, kind):
    engine = engine_for(arch_dirs, kind)
    ids = engine.encode(PROMPT, chat=False)
    assert len(ids) > 8  # longer than gpt_oss's window: sliding layers really slide
    ours = engine.generate(PROMPT, method="ar", max_new_tokens=24, chat=False).token_ids
    ref = engine.target.model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids):]
    assert ours == ref.tolist()[:len(ours)]


@pytest.mark.parametrize("kind", ARCHITECTURES)
@pytest.mark.parametrize("method", ["dflash", "ddtree", "d2sd", "lookup"])
def test_speculation_is_exact_or_refused(arch_dirs, kind, method, monkeypatch):
    engine = engine_for(arch_dirs, kind)
    ar = engine.generate(PROMPT, method="ar", max_new_tokens=40, chat=False)
    if not EXACT[kind][method]:
        with pytest.raises(QuanttreeError, match="recurrent"):
            engine.generate(PROMPT, method=method, budget=16, max_new_tokens=40, chat=False)
        return
    # a random drafter (nothing accepted) first, then an oracle (deep acceptance)
    assert engine.generate(PROMPT, method=method, budget=16, max_new_tokens=40, chat=False).token_ids == \
        ar.token_ids
    if method == "lookup":  # n-gram drafts need no drafter: a target without one speculates too
        plain = quanttree.load(str(arch_dirs[kind][0]), drafter=None, quant="fp32", device="cpu")
        reference = engine.encode(PROMPT, chat=False) + ar.token_ids

        def oracle_continuations(index, depth, limit=8):  # the true continuation, and a wrong branch
            nxt = tuple(reference[len(index.tokens):len(index.tokens) + depth])
            wrong = tuple((t + 1) % 1000 for t in nxt[:3])
            return [Continuation(nxt, 2, 2), Continuation(wrong, 1, 2)] if nxt else []

        monkeypatch.setattr(NgramIndex, "continuations", oracle_continuations)
        plain.sizer("lookup", 8).explore([8])  # verify 8 nodes every round, whatever the cost model says
        try:
            out = plain.generate(PROMPT, method="lookup", budget=8, max_new_tokens=40, chat=False)
        finally:
            plain.sizer("lookup", 8).explore([])
        assert out.token_ids == ar.token_ids and out.stats.tau > 2.0
        return
    oracle = Oracle(engine.encode(PROMPT, chat=False) + ar.token_ids, engine.target.vocab_size)
    monkeypatch.setattr(DraftContext, "log_probs", lambda self, root, start: oracle.log_probs(self, root, start))
    out = engine.generate(PROMPT, method=method, budget=16, max_new_tokens=40, chat=False)
    assert out.token_ids == ar.token_ids
    assert out.stats.tau > 2.0  # deep acceptance really happened


def test_auto_runs_chains_on_a_recurrent_target(arch_dirs, monkeypatch):
    """auto picks what the target allows: on a hybrid recurrent target it sizes chains, and its
    first use measures the cost of the chains it will verify (a tree-shaped forward is refused)."""
    engine = engine_for(arch_dirs, "qwen3_5")
    ar = engine.generate(PROMPT, method="ar", max_new_tokens=40, chat=False)
    measured = measure_profile(engine, sizes=[1, 4, 16], contexts=[16, 32], repeats=1, warmup=0, progress=False)
    assert np.isfinite(measured.verify_ms).all()
    after = engine.generate(PROMPT, method="ar", max_new_tokens=40, chat=False)
    assert after.token_ids == ar.token_ids
    cheap = CostProfile(key={}, sizes=[1, 2, 4, 8, 16], contexts=[1, 4096],
                        verify_ms=[[10.0, 10.1, 10.2, 10.3, 10.4]] * 2, draft_ms=[0.1, 0.1])
    engine._cost = CostModel(cheap)
    oracle = Oracle(engine.encode(PROMPT, chat=False) + ar.token_ids, engine.target.vocab_size)
    monkeypatch.setattr(DraftContext, "log_probs", lambda self, root, start: oracle.log_probs(self, root, start))
    out = engine.generate(PROMPT, method="auto", budget=16, max_new_tokens=40, chat=False)
    assert out.token_ids == ar.token_ids
    assert out.stats.tree_nodes > 0  # it drafted (chains), and stayed exact


def test_rollback_restores_the_recurrent_state(arch_dirs):
    """After a rejected chain, restore + replay leaves the cache as a plain forward would."""
    engine = engine_for(arch_dirs, "qwen3_5")
    target = engine.target
    ids = torch.tensor([engine.encode(PROMPT, chat=False)])
    n = ids.shape[1]
    cache = kvcache.new_target_cache(target.model)
    target.forward(ids, torch.arange(n)[None], cache)
    saved = kvcache.snapshot(cache)
    chain = torch.tensor([[11, 12, 13, 14]])
    target.forward(chain, (n + torch.arange(4))[None], cache)  # verify 4, accept the first 2
    from quanttree.decode import replay

    replay(target, cache, saved, chain[0, :2], n)
    nxt = torch.tensor([[99]])
    after = target.forward(nxt, torch.tensor([[n + 2]]), cache).logits[-1]
    fresh = kvcache.new_target_cache(target.model)
    full = torch.cat([ids, chain[:, :2], nxt], dim=1)
    ref = target.forward(full, torch.arange(full.shape[1])[None], fresh).logits[-1]
    torch.testing.assert_close(after, ref, atol=1e-4, rtol=1e-4)


def test_sliding_window_mask_hides_keys_outside_the_window():
    mask = torch.zeros(1, 1, 3, 7)  # 4 cached positions, 3 tree nodes at depths 0, 1, 1
    positions = torch.tensor([[4, 5, 5]])
    out = sliding_window_mask(mask, positions, window=3)[0, 0]
    visible = out == 0
    # the window hides keys at positions <= p - 3; which tree columns a node sees is the ancestor
    # mask's business (all visible in this hand-made mask)
    assert visible[0].tolist() == [False, False, True, True, True, True, True]
    assert visible[1].tolist() == [False, False, False, True, True, True, True]
    ancestors = torch.zeros(1, 1, 3, 7)
    ancestors[0, 0, 0, 5:] = float("-inf")  # node 0 (position 4) does not see its two children
    assert (sliding_window_mask(ancestors, positions, 3)[0, 0, 0] == 0).tolist() == \
        [False, False, True, True, True, False, False]
