"""Row-exact attention: the same numbers for a token whether it is decoded alone or verified
inside a tree.

A bf16 `scaled_dot_product_attention` over 16 queries and a tree mask gives a query row that can
differ by one ulp from the same query computed alone (kernels block and vectorise by the query
count and the key count, masked keys sit between visible ones, and transformers packs GQA heads
differently for a single query). One ulp is enough to flip a near-tie, so greedy speculation
leaves plain decoding's path. Every other op of a decoder layer (linears, RMSNorm, rotary, the
MLP, the lm_head) computes each row on its own on the devices we test (tests/test_exact.py checks
it) within a range of row counts: matmuls switch kernels by how many rows they get (a one-row
gemv; fp32 MKL up to 16 rows; bf16 on AMX CPUs again above 32), so `matmul_row_range` measures
the range at load and exact mode keeps every forward after the prompt inside it (padding rows
below, a capped tree above). Attention is the one op to rewrite.

`exact_attention` is registered through transformers' public AttentionInterface. Any forward
that continues a cache computes each query row as one-token decoding would: its visible keys
gathered in order (the prompt, then its ancestors: exactly the cache plain decoding would hold)
and one single-query call of the same kernel. A forward over an empty cache (the prompt's
prefill, training features) is the same for every method and runs batched.

The price is one attention call per verified row and layer: on this CPU ~50 us each for
SmolLM2 (300 keys), 1.5-1.9 ms per row per forward; at 32 rows 48 of the 118 ms an nf4
verify takes (72 ms with exact mode off). It cannot be batched away: the rows of a chain
stacked along the batch dimension, each with a mask that hides the keys after its own,
give other numbers than the row alone in fp32
at every context length tried (5-1,500 keys) and in bf16 at 5, 37, 200 and 1,500 keys (equal
at 511 and 700 only; bool or additive mask alike; `python benchmarks/exact_rows.py`).
Rows of one depth (equal key counts) do batch exactly in bf16 without a mask, but gathering
each row's keys for that costs more than the calls it saves (`benchmarks/results/exact_rows_depths.md`).
"""

from __future__ import annotations

import weakref
from typing import NamedTuple

import torch
import torch.nn.functional as F

NAME = "quanttree_exact"
_registered = False


def register() -> str:
    """Make `NAME` a transformers attention implementation (idempotent); return the name."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(NAME, exact_attention)
        AttentionMaskInterface.register(NAME, sdpa_mask)
        _registered = True
    return NAME


def supports_exact_attention(model) -> bool:
    """Whether the model's attention is pluggable (transformers' AttentionInterface)."""
    return getattr(model.config, "_attn_implementation", None) == NAME or \
        bool(getattr(model, "_supports_attention_backend", False))


def use_exact_attention(model) -> bool:
    """Switch a loaded model to row-exact attention; False when its attention is not pluggable
    (then it keeps its own, and greedy speculation may differ at near-ties)."""
    register()
    if getattr(model.config, "_attn_implementation", None) == NAME:
        return True
    if not getattr(model, "_supports_attention_backend", False):
        return False
    model.set_attn_implementation(NAME)
    return getattr(model.config, "_attn_implementation", None) == NAME


MIN_ROWS_TRIED = (2, 4, 8, 16)
MAX_ROWS_CHECKED = 65  # the default cap of 64 drafted nodes, plus the root


class RowRange(NamedTuple):
    """Row counts over which every matmul of a model gives a row the same numbers: exact mode
    pads a forward of fewer than `least` rows up to `least` and verifies at most `most` rows;
    `why` (and no range) when no range of at least 2 * least + 1 rows holds on this device."""

    least: int | None
    most: int | None
    why: str | None = None


def min_exact_rows(model) -> RowRange:
    """`matmul_row_range` of the model, checked once per loaded model."""
    if model not in _row_checks:
        _row_checks[model] = matmul_row_range(model)
    return _row_checks[model]


_row_checks: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def matmul_row_range(model, limit: int = MAX_ROWS_CHECKED) -> RowRange:
    """The row counts over which every matmul of the model gives a row the same numbers however
    many rows share the call, on this device. A one-row call takes a gemv kernel and fp32 MKL
    switches kernels up to 3 rows (so a range starts at 2, 4, 8 or 16 rows: the fewest that
    works); bf16 on AMX CPUs switches above 32 rows (576 inputs) or 66 (192 outputs), so a range
    can also end. Every count from `least` to `limit` is checked against
    calls of exactly `least` rows. Plain linears are checked on their first 4,096 output rows
    (the head's full width costs seconds on a CPU for large vocabularies); quantized ones whole,
    when not larger than that."""
    import torch.nn.functional as F

    checks = []
    seen = set()
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if weight is None or not hasattr(module, "in_features") or "embed" in name:
            continue
        kind = (type(module).__name__, module.in_features, getattr(module, "out_features", None))
        if kind in seen:
            continue
        seen.add(kind)
        if type(module) is torch.nn.Linear:
            checks.append((name, module, lambda x, w=weight[:4096]: F.linear(x, w), weight.dtype, weight.device))
        elif (getattr(module, "out_features", 0) or 0) <= 4096:
            checks.append((name, module, module, dtype, weight.device))
    gen = torch.Generator().manual_seed(0)
    rows = 2 * limit + 3
    inputs = [torch.randn(rows, m.in_features, generator=gen).to(device=dev, dtype=dt) for _, m, _, dt, dev in checks]
    failed = None
    for least in MIN_ROWS_TRIED:
        most, failed = limit, None
        with torch.inference_mode():
            for (name, module, run, _, _), x in zip(checks, inputs):
                agree = _agreeing_rows(run, x, least, most)
                if agree < most:
                    most, failed = agree, f"{name} ({type(module).__name__}, {agree + 1} rows against {least})"
        if most >= 2 * least + 1:
            return RowRange(least, most)
    return RowRange(None, None, f"{failed} (no range of row counts agrees, from each of "
                                f"{', '.join(map(str, MIN_ROWS_TRIED))} rows up)")


def _agreeing_rows(run, x, least: int, most: int) -> int:
    """The largest m <= most such that calls of least..m rows (placed at rows 0 to 3 in turn) give
    the rows that calls of exactly `least` rows give (least - 1: not even those agree)."""
    ref = torch.cat([run(x[s:s + least]) for s in range(0, x.shape[0] - least + 1, least)])
    for size in range(least, most + 1):
        start = size % 4
        if not torch.equal(run(x[start:start + size]), ref[start:start + size]):
            return size - 1
    return most


def exact_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query [B, Hq, Q, D], key/value [B, Hkv, K, D] (the cache's own tensors), mask None
    (causal) or [B|1, 1, Q, K] (bool: True attends; float: 0 attends). -> ([B, Q, Hq, D], None)."""
    sinks = getattr(module, "sinks", None)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    batch, q_len, kv_len = query.shape[0], query.shape[2], key.shape[2]
    if q_len == kv_len:  # nothing cached before: a prefill, identical for every method
        if attention_mask is None and sinks is None:
            out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling,
                                                 enable_gqa=query.shape[1] != key.shape[1])
        else:
            out = _attend(query, key, value, _causal_or(attention_mask, q_len, kv_len, query.device), scaling, sinks)
        return out.transpose(1, 2).contiguous(), None
    outs = []
    for b in range(batch):
        plan = row_plan(attention_mask, b, q_len, kv_len, query.device)
        outs.append(_rows(query[b:b + 1], key[b:b + 1], value[b:b + 1], plan, scaling, sinks))
    return (outs[0] if batch == 1 else torch.cat(outs)), None


class RowPlan:
    """How to give each query row exactly its visible keys, in order, as a prefix of the cache.

    Row i attends to `lengths[i]` keys. When its visible keys are not already the cache's first
    lengths[i] slots (a tree node sees the prompt, then its ancestors, with other branches in
    between), `moves[i]` = (slots, sources): copy the keys at `sources` into `slots` before
    computing it. Slots at and after `base` are saved first and restored after the last row."""

    def __init__(self, lengths: list[int], moves: list, base: int):
        self.lengths, self.moves, self.base = lengths, moves, base


def row_plan(mask, b: int, q_len: int, kv_len: int, device) -> RowPlan:
    """The RowPlan of batch row b (computed once per mask, shared by every layer using it)."""
    key = (id(mask), b, q_len, kv_len)
    hit = _plans.get(key)
    if hit is not None and hit[0] is mask:
        return hit[1]
    if mask is None:
        offset = kv_len - q_len
        plan = RowPlan([offset + i + 1 for i in range(q_len)], [None] * q_len, kv_len)
    else:
        if mask.dim() != 4 or mask.shape[1] != 1:
            raise ValueError(f"row-exact attention expects a [B, 1, Q, K] mask, got {tuple(mask.shape)}")
        visible = mask if mask.dtype == torch.bool else mask == 0
        plan = _plan_rows(visible[min(b, mask.shape[0] - 1), 0, :, -kv_len:].cpu(), device)
    if len(_plans) >= 8:
        _plans.pop(next(iter(_plans)))
    _plans[key] = (mask, plan)
    return plan


_plans: dict = {}


def _plan_rows(visible: torch.Tensor, device) -> RowPlan:
    """visible [Q, K] bool -> the RowPlan. Tracks which original key each moved slot holds; a row
    whose visible keys start with the cache's own first c slots (the prompt) only looks at its
    tail and at slots an earlier row moved, so a plan costs O(tree) Python steps, not O(context)."""
    q_len, kv_len = visible.shape
    moved: dict[int, int] = {}  # slot -> the original key it holds now (absent: its own)
    lengths, moves, base = [], [], kv_len
    positions = torch.arange(kv_len)
    for i in range(q_len):
        idx = visible[i].nonzero().squeeze(1)
        n = idx.numel()
        in_place = int((idx == positions[:n]).int().cumprod(0).sum()) if n else 0  # keys already in their slots
        want = {s: s for s in moved if s < in_place}  # slots an earlier row moved: put their own keys back
        want.update(zip(range(in_place, n), idx[in_place:].tolist()))
        slots = sorted(s for s, k in want.items() if moved.get(s, s) != k)
        lengths.append(n)
        if not slots:
            moves.append(None)
            continue
        sources = [want[s] for s in slots]
        for s, k in zip(slots, sources):
            if s == k:
                moved.pop(s, None)
            else:
                moved[s] = k
        base = min(base, slots[0], min(sources))
        moves.append((torch.tensor(slots, device=device), torch.tensor(sources, device=device)))
    return RowPlan(lengths, moves, base)


def _rows(query, key, value, plan: RowPlan, scaling: float, sinks):
    """Each query row of query [1, Hq, Q, D] against the first lengths[i] slots of key/value
    [1, Hkv, K, D], rearranged per the plan (in place, restored at the end). -> [1, Q, Hq, D]

    A row goes in as one-token decoding runs it in transformers: the query heads sharing a key
    head as that head's queries ([1, Hkv, Hq/Hkv, D]: no repeated keys)."""
    _, heads, q_len, dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    packed = query[0].reshape(kv_heads, heads // kv_heads, q_len, dim).permute(2, 0, 1, 3).contiguous()
    group_sinks = None if sinks is None else sinks.reshape(1, kv_heads, heads // kv_heads, 1)
    saved = None
    if plan.base < kv_len:
        saved = key[:, :, plan.base:].clone(), value[:, :, plan.base:].clone()
    try:
        outs = []
        for i, n in enumerate(plan.lengths):
            if plan.moves[i] is not None:
                slots, sources = plan.moves[i]
                key.index_copy_(2, slots, saved[0].index_select(2, sources - plan.base))
                value.index_copy_(2, slots, saved[1].index_select(2, sources - plan.base))
            if n == 0:  # a padding row that attends to nothing (see Target.forward)
                outs.append(torch.zeros_like(packed[i:i + 1]))
                continue
            k, v = (key, value) if n == kv_len else (key[:, :, :n], value[:, :, :n])
            if group_sinks is None:
                outs.append(F.scaled_dot_product_attention(packed[i:i + 1], k, v, scale=scaling))
            else:
                outs.append(_attend(packed[i:i + 1], k, v, None, scaling, group_sinks))
    finally:
        if saved is not None:
            key[:, :, plan.base:] = saved[0]
            value[:, :, plan.base:] = saved[1]
    return torch.cat(outs).reshape(1, q_len, heads, dim)


def _causal_or(mask, q_len: int, kv_len: int, device):
    if mask is not None:
        return mask
    return torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(kv_len - q_len)[None, None]


def _attend(q, k, v, mask, scaling: float, sinks):
    """Batched attention: SDPA, or the softmax-with-sink eager form where the model has sinks
    (sinks [Hq], or already shaped to broadcast over the scores' [.., Q, 1])."""
    groups = q.shape[1] // k.shape[1]
    if sinks is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=groups > 1)
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(2, 3)) * scaling
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    if sinks.dim() == 1:
        sinks = sinks.reshape(1, -1, 1, 1)
    sink = sinks.to(scores.dtype).expand(*scores.shape[:-1], 1)
    logits = torch.cat([scores, sink], dim=-1)
    probs = F.softmax(logits - logits.max(dim=-1, keepdim=True).values, dim=-1, dtype=logits.dtype)
    return torch.matmul(probs[..., :-1].to(v.dtype), v)
