"""Issue 16: exact mode: greedy speculation returns plain decoding's tokens bit for bit in bf16."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import quanttree
from quanttree.costmodel import CostModel, CostProfile
from quanttree.exact import _plan_rows, exact_attention, row_plan
from quanttree.tree import ancestor_matrix

from helpers import make_tiny_drafter, make_tiny_target

# prompts on which bf16 tree verification left plain decoding's path before exact mode (at a
# near-tie), with the default SDPA attention on this project's CPUs
PROMPTS = ["Write a Python function that checks whether a string is a palindrome.",
           "Explain why the sky is blue in two sentences."]


class Attn(torch.nn.Module):
    def __init__(self, sinks: torch.Tensor | None = None):
        super().__init__()
        if sinks is not None:
            self.sinks = torch.nn.Parameter(sinks)


def random_tree(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.tensor([-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, n)])


def tree_case(past: int, nodes: int, seed: int = 0, dtype=torch.bfloat16, heads=6, kv_heads=2, dim=32):
    """Random q/k/v for a tree of `nodes` after `past` cached keys, and its additive mask."""
    gen = torch.Generator().manual_seed(seed)
    total = past + nodes
    q = torch.randn(1, heads, nodes, dim, generator=gen).to(dtype)
    k = torch.randn(1, kv_heads, total, dim, generator=gen).to(dtype)
    v = torch.randn(1, kv_heads, total, dim, generator=gen).to(dtype)
    vis = ancestor_matrix(random_tree(nodes, seed))
    mask = torch.zeros(nodes, total, dtype=dtype)
    mask[:, past:] = mask[:, past:].masked_fill(~vis, torch.finfo(dtype).min)
    return q, k, v, vis, mask[None, None]


def row_alone(q, k, v, past, vis, i, module):
    """Row i as plain decoding computes it: one query, its visible keys in order as the cache."""
    idx = torch.cat([torch.arange(past), past + vis[i].nonzero().squeeze(1)])
    k_i, v_i = k.index_select(2, idx).contiguous(), v.index_select(2, idx).contiguous()
    out, _ = exact_attention(module, q[:, :, i:i + 1], k_i, v_i, None, scaling=q.shape[-1] ** -0.5)
    return out[:, 0]


@pytest.mark.parametrize("past,nodes,seed", [(5, 9, 0), (37, 16, 1), (130, 24, 2)])
def test_each_row_is_bit_identical_to_the_row_decoded_alone(past, nodes, seed):
    q, k, v, vis, mask = tree_case(past, nodes, seed)
    k0, v0 = k.clone(), v.clone()
    module = Attn()
    out, _ = exact_attention(module, q, k, v, mask, scaling=q.shape[-1] ** -0.5)
    assert torch.equal(k, k0) and torch.equal(v, v0)  # the cache is left as it was
    for i in range(nodes):
        assert torch.equal(out[:, i], row_alone(q, k, v, past, vis, i, module)), i


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float32, 1e-5)])
def test_exact_attention_matches_sdpa(dtype, tol):
    q, k, v, vis, mask = tree_case(50, 12, seed=3, dtype=dtype)
    out, _ = exact_attention(Attn(), q, k, v, mask, scaling=q.shape[-1] ** -0.5)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask.float(),
                                         enable_gqa=True).transpose(1, 2)
    assert (out.float() - ref).abs().max() < tol


def test_sinks_rows_exact_and_match_eager():
    """gpt-oss-style attention sinks: an extra logit per head with no value."""
    q, k, v, vis, mask = tree_case(20, 10, seed=4)
    sinks = torch.randn(q.shape[1]).to(torch.bfloat16)
    module = Attn(sinks)
    out, _ = exact_attention(module, q, k, v, mask, scaling=0.25)
    for i in range(10):
        idx = torch.cat([torch.arange(20), 20 + vis[i].nonzero().squeeze(1)])
        alone, _ = exact_attention(module, q[:, :, i:i + 1], k.index_select(2, idx).contiguous(),
                                   v.index_select(2, idx).contiguous(), None, scaling=0.25)
        assert torch.equal(out[:, i], alone[:, 0])
    kr, vr = k.float().repeat_interleave(3, 1), v.float().repeat_interleave(3, 1)
    scores = q.float() @ kr.transpose(2, 3) * 0.25 + mask.float()
    logits = torch.cat([scores, sinks.float().reshape(1, -1, 1, 1).expand(1, -1, 10, 1)], -1)
    ref = (logits.softmax(-1)[..., :-1] @ vr).transpose(1, 2)
    assert (out.float() - ref).abs().max() < 3e-2


def test_plan_puts_each_rows_keys_first_in_order():
    """The pure plan: after its moves, the first lengths[i] slots hold row i's visible keys."""
    past, nodes = 4, 10
    vis = ancestor_matrix(random_tree(nodes, 7))
    full = torch.cat([torch.ones(nodes, past, dtype=torch.bool), vis], 1)
    plan = _plan_rows(full, torch.device("cpu"))
    slots = list(range(past + nodes))
    original = list(slots)
    for i in range(nodes):
        if plan.moves[i] is not None:
            for s, src in zip(*[t.tolist() for t in plan.moves[i]]):
                slots[s] = original[src]
        assert slots[:plan.lengths[i]] == full[i].nonzero().squeeze(1).tolist(), i
    assert plan.base >= past  # the cached prompt is never moved
    chain = _plan_rows(torch.ones(3, 7, dtype=torch.bool).tril(4), torch.device("cpu"))
    assert chain.moves == [None] * 3 and chain.lengths == [5, 6, 7]  # chains need no moves


def test_plan_puts_back_a_slot_an_earlier_row_moved():
    vis = torch.zeros(3, 6, dtype=torch.bool)
    vis[:, :3] = True
    vis[0, 4] = True  # a node in slot 4 whose parent is the root: moved into slot 3
    vis[1, 3] = True  # then a node that sees slot 3's own key: it must be put back
    vis[2, [3, 5]] = True
    plan = _plan_rows(vis, torch.device("cpu"))
    slots, original = list(range(6)), list(range(6))
    for i in range(3):
        if plan.moves[i] is not None:
            for s, src in zip(*[t.tolist() for t in plan.moves[i]]):
                slots[s] = original[src]
        assert slots[:plan.lengths[i]] == vis[i].nonzero().squeeze(1).tolist(), i


def test_plans_are_computed_once_per_mask():
    _, _, _, _, mask = tree_case(10, 6, seed=5)
    assert row_plan(mask, 0, 6, 16, torch.device("cpu")) is row_plan(mask, 0, 6, 16, torch.device("cpu"))


def cheap_cost(engine) -> None:
    engine._cost = CostModel(CostProfile(key={}, sizes=[1, 2, 4, 8, 16], contexts=[1, 4096],
                                         verify_ms=[[10.0, 10.1, 10.2, 10.3, 10.4]] * 2, draft_ms=[0.1, 0.1]))


@pytest.fixture(scope="module")
def bf16_engine():
    return quanttree.load("smollm2-135m", quant="bf16", device="cpu", log=lambda *_: None)


def test_bf16_greedy_speculation_is_plain_decoding_on_the_embedded_model(bf16_engine):
    engine = bf16_engine
    assert engine.exact  # on by default in bf16
    cheap_cost(engine)
    for prompt in PROMPTS:
        ar = engine.generate(prompt, method="ar", max_new_tokens=64)
        for method in ("dflash", "ddtree", "d2sd", "auto", "lookup"):
            out = engine.generate(prompt, method=method, budget=16, max_new_tokens=64)
            assert out.token_ids == ar.token_ids, (prompt, method)


def test_bf16_seeded_sampled_speculation_is_seeded_plain_decoding(bf16_engine):
    """Sampling draws the target's token only where the walk goes, one draw per committed token in
    order, so with a seed and exact logits speculation writes what plain sampling writes."""
    engine = bf16_engine
    cheap_cost(engine)
    for seed, prompt in enumerate(PROMPTS):
        params = dict(temperature=0.9, top_p=0.95, seed=seed, max_new_tokens=48)
        ar = engine.generate(prompt, method="ar", **params)
        assert ar.token_ids != engine.generate(prompt, method="ar", **{**params, "seed": seed + 100}).token_ids
        for method in ("ddtree", "auto", "lookup"):
            out = engine.generate(prompt, method=method, budget=16, **params)
            assert out.token_ids == ar.token_ids, (prompt, method)
            if method == "ddtree":
                assert out.stats.tau > 1.2  # drafted tokens were accepted: the walk went past the root


@pytest.mark.parametrize("kind,quant", [("llama", "bf16"), ("gpt_oss", "bf16"), ("llama", "fp16"),
                                        ("llama", "nf4")])
def test_greedy_speculation_is_plain_decoding_on_tiny_models(tmp_path, tokenizer, kind, quant):
    target = make_tiny_target(tmp_path / kind, kind, tokenizer, head_scale=0.2)
    drafter = make_tiny_drafter(tmp_path / "drafter", target)
    engine = quanttree.load(str(target), drafter=str(drafter), quant=quant, device="cpu", log=lambda *_: None)
    assert engine.exact
    cheap_cost(engine)
    prompt = "def add(a, b):\n    return"
    ar = engine.generate(prompt, method="ar", max_new_tokens=48, chat=False)
    for method in ("dflash", "ddtree", "d2sd", "auto"):
        out = engine.generate(prompt, method=method, budget=16, max_new_tokens=48, chat=False)
        assert out.token_ids == ar.token_ids, method


def test_exact_mode_refuses_int8_in_words():
    engine = quanttree.load("smollm2-135m", quant="int8", device="cpu", drafter=None, log=lambda *_: None)
    assert not engine.exact  # default: off where it cannot run
    with pytest.raises(quanttree.QuanttreeError, match="int8.*outlier"):
        engine.set_exact(True)


def test_exact_mode_switches_off_and_on(bf16_engine):
    engine = bf16_engine
    ar = engine.generate(PROMPTS[0], method="ar", max_new_tokens=24).token_ids
    engine.set_exact(False)
    try:
        assert not engine.exact and engine.target.model.config._attn_implementation != "quanttree_exact"
        assert engine.generate(PROMPTS[0], method="ar", max_new_tokens=24).token_ids[:4] == ar[:4]
    finally:
        engine.set_exact(True)
    assert engine.exact and engine.target.model.config._attn_implementation == "quanttree_exact"


class RowCountLinear(torch.nn.Module):
    """A matmul whose rows depend on how many rows it gets: below `least` rows or above `most`
    (kernel switches), or at every count (least=None)."""

    def __init__(self, least: int | None, most: int = 10 ** 6, width: int = 8):
        super().__init__()
        self.in_features, self.out_features, self.least, self.most = width, 4, least, most
        self.weight = torch.nn.Parameter(torch.randn(4, width))

    def forward(self, x):
        y = (x[:, None, :] * self.weight[None]).sum(-1)  # row by row (a real matmul may switch kernels here)
        if self.least is None:
            return y + 1e-3 * x.shape[0]
        return y + (1e-3 if x.shape[0] < self.least or x.shape[0] > self.most else 0.0)


def test_row_range_check_finds_kernel_switches():
    from quanttree.exact import MAX_ROWS_CHECKED, RowRange, matmul_row_range

    assert matmul_row_range(torch.nn.Sequential(RowCountLinear(4))) == RowRange(4, MAX_ROWS_CHECKED)
    assert matmul_row_range(torch.nn.Sequential(RowCountLinear(2))).least == 2
    assert matmul_row_range(torch.nn.Sequential(RowCountLinear(2, most=32), RowCountLinear(3, width=6))) == RowRange(4, 32)
    assert matmul_row_range(torch.nn.Sequential(RowCountLinear(1, most=6))) == RowRange(2, 6)
    rows = matmul_row_range(torch.nn.Sequential(RowCountLinear(2, width=6), RowCountLinear(None)))
    assert rows.least is None and rows.why.startswith("1 (RowCountLinear")
    assert matmul_row_range(torch.nn.Sequential(RowCountLinear(8, most=12))) == RowRange(2, 7)  # below 8: one kernel


def test_exact_caps_the_tree_where_matmuls_switch_kernels_above_a_row_count(monkeypatch):
    import quanttree.exact as exact_module
    from quanttree.exact import RowRange

    monkeypatch.setattr(exact_module, "min_exact_rows", lambda model: RowRange(2, 9))
    engine = quanttree.load("smollm2-135m", quant="bf16", device="cpu", log=lambda *_: None)
    assert engine.exact and engine.target.max_rows == 9
    cheap_cost(engine)
    seen = []
    hook = engine.target.model.model.layers[0].register_forward_hook(lambda m, a, o: seen.append(a[0].shape[1]))
    try:
        ar = engine.generate(PROMPTS[0], method="ar", max_new_tokens=24)
        for method in ("ddtree", "auto"):
            seen.clear()
            out = engine.generate(PROMPTS[0], method=method, budget=16, max_new_tokens=24)
            assert out.token_ids == ar.token_ids and max(seen[1:]) <= 9, method  # 8 nodes + the root
            assert method != "ddtree" or max(seen[1:]) == 9
    finally:
        hook.remove()
    assert engine.decode_config("ddtree", 8, 0.0, 1.0, 0, None, 16).budget == 8


def test_exact_pads_short_forwards_to_the_measured_rows(monkeypatch):
    import quanttree.exact as exact_module

    monkeypatch.setattr(exact_module, "min_exact_rows", lambda model: exact_module.RowRange(4, 65))
    engine = quanttree.load("smollm2-135m", quant="bf16", device="cpu", drafter=None, log=lambda *_: None)
    assert engine.exact and engine.target.min_rows == 4
    seen = []
    hook = engine.target.model.model.layers[0].register_forward_hook(lambda m, a, o: seen.append(a[0].shape[1]))
    try:
        ar = engine.generate(PROMPTS[0], method="ar", max_new_tokens=6)
    finally:
        hook.remove()
    assert seen[0] > 4 and set(seen[1:]) == {4}  # the prompt, then every one-token step as 4 rows
    engine.set_exact(False)
    assert engine.generate(PROMPTS[0], method="ar", max_new_tokens=6).token_ids[:3] == ar.token_ids[:3]


def test_exact_refuses_where_matmuls_depend_on_row_count(monkeypatch):
    import quanttree.exact as exact_module

    monkeypatch.setattr(exact_module, "min_exact_rows",
                        lambda model: exact_module.RowRange(None, None, "mlp.down_proj (17 rows against 16)"))
    engine = quanttree.load("smollm2-135m", quant="fp32", device="cpu", drafter=None, log=lambda *_: None)
    assert not engine.exact
    with pytest.raises(quanttree.QuanttreeError, match="rounds a row differently.*down_proj"):
        engine.set_exact(True)
