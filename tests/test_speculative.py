"""Issue 3: DFlash drafter loading, KV compaction, lossless chain and tree decoding."""

from __future__ import annotations

import json

import pytest
import torch

import quanttree
from quanttree import QuanttreeError, kvcache
from quanttree.decode import DecodeConfig, DraftContext, decode
from quanttree.sampling import SamplingParams
from quanttree.target import Target
from quanttree.tree import build_tree, compile_tree

from helpers import Oracle, make_tiny_drafter, make_tiny_target

PROMPT = "Explain in two sentences why the sky is blue."


def spec_engine(tiny_dirs, kind, quant="fp32", drafter_quant=None):
    return quanttree.load(str(tiny_dirs[kind]), drafter=str(tiny_dirs[f"{kind}-drafter"]), quant=quant,
                          drafter_quant=drafter_quant, device="cpu")


# ---------------------------------------------------------------- drafter format and checks

def test_drafter_saved_in_published_format(tiny_dirs):
    from safetensors import safe_open

    cfg = json.loads((tiny_dirs["qwen3-drafter"] / "config.json").read_text())
    assert cfg["architectures"] == ["DFlashDraftModel"]
    assert set(cfg["dflash_config"]) == {"mask_token_id", "target_layer_ids"} and cfg["block_size"] == 8
    with safe_open(str(tiny_dirs["qwen3-drafter"] / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    layers = cfg["num_hidden_layers"]
    assert len(names) == 3 + 11 * layers + 1  # + mask_embedding
    assert {"fc.weight", "hidden_norm.weight", "norm.weight", "mask_embedding",
            "layers.0.self_attn.q_norm.weight", "layers.0.mlp.gate_proj.weight"} <= names


def test_drafter_that_does_not_fit_is_refused(tiny_dirs, tokenizer, tmp_path):
    wide = make_tiny_target(tmp_path / "wide", "qwen3", tokenizer, hidden_size=96, num_attention_heads=6)
    wide_drafter = make_tiny_drafter(tmp_path / "wide-drafter", wide)
    with pytest.raises(QuanttreeError, match="hidden size 96 != target's 64"):
        quanttree.load(str(tiny_dirs["qwen3"]), drafter=str(wide_drafter), quant="fp32", device="cpu")
    deep = make_tiny_target(tmp_path / "deep", "qwen3", tokenizer, num_hidden_layers=6)
    deep_drafter = make_tiny_drafter(tmp_path / "deep-drafter", deep)
    with pytest.raises(QuanttreeError, match="6-layer target"):
        quanttree.load(str(tiny_dirs["qwen3"]), drafter=str(deep_drafter), quant="fp32", device="cpu")
    with pytest.raises(QuanttreeError, match="not found"):
        quanttree.load(str(tiny_dirs["qwen3"]), drafter=str(tmp_path / "nothing"), quant="fp32", device="cpu")
    (tmp_path / "notdflash").mkdir()
    (tmp_path / "notdflash" / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(QuanttreeError, match="not a DFlash drafter"):
        quanttree.load(str(tiny_dirs["qwen3"]), drafter=str(tmp_path / "notdflash"), quant="fp32", device="cpu")


# ---------------------------------------------------------------- KV compaction

@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_features_are_the_chosen_hidden_states(tiny_dirs, kind):
    """Target.forward's features (forward hooks on the chosen layers only) equal transformers'
    hidden_states[i + 1], the last layer's included (taken after the final norm)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dirs[kind]).eval()
    target = Target(model)
    layers = (0, target.num_layers - 1)
    ids = torch.tensor([[5, 17, 42, 9]])
    out = target.forward(ids, torch.arange(4)[None], kvcache.new_target_cache(model), feature_layers=layers)
    with torch.inference_mode():
        reference = model(input_ids=ids, output_hidden_states=True).hidden_states
    expected = torch.cat([reference[i + 1][0] for i in layers], dim=-1)
    torch.testing.assert_close(out.features, expected, rtol=0, atol=0)
    plain = target.forward(ids[:, :1], torch.zeros(1, 1, dtype=torch.long), kvcache.new_target_cache(model))
    assert plain.features is None


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_compacted_cache_equals_recompute(tiny_dirs, kind):
    engine = quanttree.load(str(tiny_dirs[kind]), quant="fp32", device="cpu")
    target = engine.target
    prompt = torch.tensor([[5, 17, 300, 42, 9, 77]])
    cache = kvcache.new_target_cache(target.model)
    target.forward(prompt, torch.arange(6)[None], cache)
    gen = torch.Generator().manual_seed(0)
    tree = build_tree(torch.log_softmax(torch.randn(5, target.vocab_size, generator=gen) * 3, -1), root=123, budget=20)
    inputs = compile_tree(tree, 6, target.dtype)
    target.forward(inputs.input_ids, inputs.position_ids, cache, inputs.attention_mask)
    deepest = int(tree.depths.argmax())
    path = [deepest]
    while path[-1] != 0:
        path.append(int(tree.parents[path[-1]]))
    path = torch.tensor(path[::-1])
    assert path.tolist() != list(range(len(path)))  # a non-contiguous path exercises the move
    kvcache.compact(cache, 6, path)
    assert kvcache.cache_length(cache) == 6 + len(path)
    nxt = torch.tensor([[999]])
    after = target.forward(nxt, torch.tensor([[6 + len(path)]]), cache).logits[-1]
    full = torch.cat([prompt, tree.tokens[path][None], nxt], dim=1)
    fresh = kvcache.new_target_cache(target.model)
    ref = target.forward(full, torch.arange(full.shape[1])[None], fresh).logits[-1]
    torch.testing.assert_close(after, ref, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- greedy equality

@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_greedy_chain_and_tree_equal_ar_tiny(tiny_dirs, kind):
    engine = spec_engine(tiny_dirs, kind)
    ar = engine.generate("the cat sat on", max_new_tokens=40, chat=False)
    for method, budget in [("dflash", 32), ("ddtree", 1), ("ddtree", 4), ("ddtree", 16), ("ddtree", 48)]:
        out = engine.generate("the cat sat on", method=method, budget=budget, max_new_tokens=40, chat=False)
        assert out.token_ids == ar.token_ids, (method, budget)
        assert out.stats.rounds >= 1 and out.stats.tau >= 1.0


@pytest.mark.parametrize("method, budget", [("dflash", 0), ("ddtree", 8), ("ddtree", 32)])
def test_greedy_equal_with_high_acceptance(tiny_dirs, monkeypatch, method, budget):
    engine = spec_engine(tiny_dirs, "qwen3")
    ids = engine.encode("once upon a time", chat=False)
    ar = engine.generate("once upon a time", max_new_tokens=60, chat=False)
    oracle = Oracle(ids + ar.token_ids, engine.target.vocab_size)
    monkeypatch.setattr(DraftContext, "log_probs", lambda self, root, start: oracle.log_probs(self, root, start))
    out = engine.generate("once upon a time", method=method, budget=max(budget, 1), max_new_tokens=60, chat=False)
    assert out.token_ids == ar.token_ids
    assert out.stats.tau > 2.0  # deep acceptance really happened
    assert sum(out.stats.accepted_at_depth) == out.stats.accepted


@pytest.mark.slow
def test_greedy_equal_on_embedded_model(embedded_engine, tmp_path):
    drafter_dir = make_tiny_drafter(tmp_path / "smol-drafter", embedded_engine.loaded.path, num_layers=1,
                                    block_size=16)
    engine = quanttree.load("smollm2-135m", drafter=str(drafter_dir), quant="fp32", device="cpu")
    ar = engine.generate(PROMPT, max_new_tokens=32)
    for method in ("dflash", "ddtree"):
        out = engine.generate(PROMPT, method=method, budget=24, max_new_tokens=32)
        assert out.token_ids == ar.token_ids, method
        phases = out.stats.phase_ms()
        assert phases["draft"] > 0 and phases["verify"] > 0 and out.stats.mean_tree_size > 0


# ---------------------------------------------------------------- quantized targets and drafters

def first_divergence_gap(engine, prompt_ids, ar_ids, other_ids) -> tuple[int, float] | None:
    """Where two greedy runs first differ, and AR's top-2 logit gap there (a near tie or not)."""
    for i, (a, b) in enumerate(zip(ar_ids, other_ids)):
        if a != b:
            cache = kvcache.new_target_cache(engine.target.model)
            seq = torch.tensor([prompt_ids + ar_ids[:i]])
            logits = engine.target.forward(seq, torch.arange(seq.shape[1])[None], cache, last_only=True).logits[-1]
            top2 = torch.topk(logits.float(), 2).values
            return i, float(top2[0] - top2[1])
    return None


NEAR_TIE = 0.5  # logits: a larger gap cannot flip from rounding in one forward vs another


@pytest.mark.parametrize("quant, drafter_quant", [("int8", "int8"), ("nf4", "nf4"), ("bf16", "nf4"),
                                                  ("nf4", "fp32")])
def test_quantized_target_and_drafter_match_ar(tiny_dirs, quant, drafter_quant):
    engine = spec_engine(tiny_dirs, "llama", quant=quant, drafter_quant=drafter_quant)
    assert engine.drafter_quant == drafter_quant
    prompt_ids = engine.encode("the cat sat on", chat=False)
    ar = engine.generate("the cat sat on", max_new_tokens=30, chat=False)
    for method in ("dflash", "ddtree"):
        out = engine.generate("the cat sat on", method=method, budget=16, max_new_tokens=30, chat=False)
        diverged = first_divergence_gap(engine, prompt_ids, ar.token_ids, out.token_ids)
        if diverged is not None:
            index, gap = diverged
            assert gap < NEAR_TIE, f"{method} diverged at {index} where AR's top-2 gap is {gap:.3f}"


# ---------------------------------------------------------------- losslessness at T > 0

@torch.no_grad()
def exact_joint(target: Target, prompt: list[int], params: SamplingParams) -> torch.Tensor:
    """P(t1, t2, t3 | prompt) under the processed target distribution, [V, V, V]."""
    from quanttree.sampling import logits_to_probs

    vocab = target.vocab_size
    def probs(seqs):
        ids = torch.tensor(seqs)
        out = target.model(input_ids=ids).logits[:, -1]
        return logits_to_probs(out, params)
    p1 = probs([prompt])[0]
    p2 = probs([prompt + [a] for a in range(vocab)])  # [V, V]
    p3 = probs([prompt + [a, b] for a in range(vocab) for b in range(vocab)]).view(vocab, vocab, vocab)
    return p1[:, None, None] * p2[:, :, None] * p3


@pytest.fixture(scope="module")
def small_vocab_engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("smallvocab")
    target = make_tiny_target(root / "t", "qwen3", vocab_size=6, head_scale=8.0, seed=3)
    drafter = make_tiny_drafter(root / "d", target, block_size=4, seed=5)
    from quanttree.models import LoadedTarget
    from quanttree.engine import load_drafter
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(target).eval()
    loaded = LoadedTarget(model=model, tokenizer=None, quant="fp32", source=str(target), path=str(target))
    drafter_model, mode = load_drafter(str(drafter), Target(model), None)
    return quanttree.Engine.__new__(quanttree.Engine), loaded, drafter_model


@pytest.mark.slow
@pytest.mark.parametrize("method, params", [
    ("ar", SamplingParams(temperature=1.0, seed=10)),  # the control: plain sampling passes the same test
    ("ddtree", SamplingParams(temperature=1.0, seed=11)),
    ("dflash", SamplingParams(temperature=0.7, seed=12)),
    ("d2sd", SamplingParams(temperature=1.0, seed=14)),
    ("lookup", SamplingParams(temperature=1.0, seed=15)),
    ("lookup+corpus", SamplingParams(temperature=1.0, seed=16)),  # branches from earlier "responses" too
    ("ddtree", SamplingParams(temperature=1.0, top_k=4, top_p=0.9, seed=13)),
])
def test_sampling_is_lossless(small_vocab_engine, method, params):
    _, loaded, drafter = small_vocab_engine
    target = Target(loaded.model)
    prompt = [1, 4, 2]
    exact = exact_joint(target, prompt, params).flatten()
    draws = 3000
    counts = torch.zeros_like(exact)
    gen_seed = params.seed
    sizer, corpus = None, None
    if method == "lookup+corpus":
        from quanttree.lookup import CorpusIndex

        method, corpus = "lookup", CorpusIndex([[1, 4, 2, 3, 5, 0], [4, 2, 1, 1, 3], [2, 5, 5, 4], [2, 0, 1]])
    if method == "lookup":  # sized on a cost model: told to verify every node it drafts
        from quanttree.costmodel import CostModel, CostProfile
        from quanttree.policy import TreeSizer

        flat = CostProfile(key={}, sizes=[1, 8], contexts=[128], verify_ms=[[20.0, 20.0]], draft_ms=[0.0])
        sizer = TreeSizer(method, CostModel(flat), cap=5)
        sizer.explore([5])
    for i in range(draws):
        cfg = DecodeConfig(method=method, budget=5, max_new_tokens=3,
                           sampling=SamplingParams(params.temperature, params.top_p, params.top_k, gen_seed * 100003 + i))
        toks = [t for step in decode(target, drafter, prompt, cfg, sizer, corpus=corpus) for t in step.tokens]
        counts[(toks[0] * 6 + toks[1]) * 6 + toks[2]] += 1
    chi2, limit, tv = chi_square(counts, exact)
    assert limit > 20, "the distribution is too peaked for a meaningful test"
    assert chi2 < limit, f"chi2 {chi2:.1f} over limit {limit:.1f}, TV {tv:.3f}"
    # the test has power: the same draws are rejected against a slightly different temperature
    wrong = exact_joint(target, prompt, SamplingParams(params.temperature * 1.25, params.top_p, params.top_k)).flatten()
    assert chi_square(counts, wrong)[0] > chi_square(counts, wrong)[1]


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, float, float]:
    """Pearson chi-square over cells expecting >= 5 (the rest pooled), a ~0.999 limit, and TV."""
    draws = counts.sum()
    expected = probs * draws
    big = expected >= 5
    chi2 = float((((counts[big] - expected[big]) ** 2) / expected[big]).sum())
    pooled_e, pooled_o = float(expected[~big].sum()), float(counts[~big].sum())
    if pooled_e > 0:
        chi2 += (pooled_o - pooled_e) ** 2 / pooled_e
    dof = int(big.sum()) + (1 if pooled_e > 0 else 0) - 1
    limit = dof + 4.0 * (2 * dof) ** 0.5  # mean + ~3.1 sd: about the 0.999 quantile for these dof
    tv = 0.5 * float((counts / draws - probs).abs().sum())
    return chi2, limit, tv


def test_lookup_on_embedded_model_copies_and_stays_exact(embedded_engine):
    """n-gram lookup with no drafter at all, on the real model: an answer that copies its prompt
    is drafted from it (tokens accepted), and the output is plain greedy decoding's."""
    prompt = ("Repeat this Python function exactly, then stop.\n"
              "def add_numbers(first_value, second_value):\n    return first_value + second_value\n")
    ar = embedded_engine.generate(prompt, method="ar", max_new_tokens=40)
    out = embedded_engine.generate(prompt, method="lookup", budget=8, max_new_tokens=40)
    assert out.token_ids == ar.token_ids
    assert out.stats.accepted > 0 and out.stats.tau > 1.2


def test_rounds_carry_the_policys_telemetry(tiny_dirs):
    """Each Step says what the sizer expected of the tree it chose; Stats keeps the records
    (the bench reads them there, not inside the sizer)."""
    from quanttree.costmodel import CostModel, CostProfile
    from quanttree.engine import Stats
    from quanttree.policy import TreeSizer

    engine = spec_engine(tiny_dirs, "llama")
    sizes = [1, 2, 4, 8, 16]
    flat = CostProfile(key={}, sizes=sizes, contexts=[128], verify_ms=[[20.0] * len(sizes)], draft_ms=[1.0])
    sizer = TreeSizer("caddtree", CostModel(flat), cap=8)
    ids = engine.tokenizer("the cat sat on")["input_ids"]
    cfg = DecodeConfig(method="caddtree", budget=8, max_new_tokens=24)
    stats = Stats(method="caddtree")
    steps = list(decode(engine.target, engine.drafter, ids, cfg, sizer=sizer))
    for step in steps:
        stats.add(step)
    rounds = [s for s in steps if not s.prefill]
    assert rounds and all(s.predicted is not None and s.predicted_raw is not None for s in rounds)
    assert stats.sizes == [s.tree_size for s in rounds]
    assert stats.observed == [s.accept_len for s in rounds]
    assert all(0.0 <= p <= n for p, n in zip(stats.predicted, stats.sizes))
    plain = list(decode(engine.target, engine.drafter, ids, DecodeConfig(method="ddtree", max_new_tokens=8)))
    assert all(s.predicted is None for s in plain)  # a fixed budget predicts nothing
