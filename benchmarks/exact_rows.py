"""What exact mode's per-row attention costs per verified row, and why rows are not batched.

Part 1 (timed): one verify forward of Q chain rows after a --context-token prompt, exact mode
on and off, per quant mode; the time spent in exact mode's per-row attention (`exact._rows`)
per forward. Part 2 (numbers only): the rows of a chain stacked along the batch dimension in
ONE `scaled_dot_product_attention` call, each row's later keys masked out, against each row
computed alone (what plain decoding computes): equal or not, per dtype, context and mask kind.
Part 3 (numbers only): rows that see the SAME number of keys (tree nodes of one depth: siblings
and cousins), each with its own gathered keys, stacked along the batch dimension in one unmasked
call, against each row alone: whether exact mode could verify one depth per call.

    python benchmarks/exact_rows.py --quant nf4,bf16
    python benchmarks/exact_rows.py --parts 3 --name exact_rows_depths
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import write_results  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import quanttree  # noqa: E402
from quanttree import exact, kvcache  # noqa: E402


class RowClock:
    """Wraps exact._rows and sums the time spent in it."""

    def __init__(self):
        self.seconds, self.inner = 0.0, exact._rows

    def __call__(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return self.inner(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t0


def time_verify(engine, context: int, rows: int, repeats: int, clock: RowClock) -> tuple[float, float]:
    """Median ms of a verify forward of `rows` chain tokens, and mean ms inside exact._rows."""
    target = engine.target
    gen = torch.Generator().manual_seed(0)
    cache = kvcache.new_target_cache(target.model)
    target.forward(torch.randint(100, 20000, (1, context), generator=gen), torch.arange(context)[None], cache)
    ids = torch.randint(100, 20000, (1, rows), generator=gen)
    pos = torch.arange(context, context + rows)[None]
    times = []
    clock.seconds = 0.0
    for _ in range(repeats + 2):
        t0 = time.perf_counter()
        target.forward(ids, pos, cache)
        times.append(time.perf_counter() - t0)
        kvcache.crop(cache, context)
    return statistics.median(times[2:]) * 1e3, clock.seconds / (repeats + 2) * 1e3


def batched_equals_alone(dtype, context: int, rows: int, mask_kind: str) -> tuple[bool, float]:
    """SmolLM2's attention shapes (3 kv heads x 3 queries, head dim 64)."""
    gen = torch.Generator().manual_seed(context)
    kv, group, dim, n = 3, 3, 64, context + rows
    k = (torch.randn(1, kv, n, dim, generator=gen) * 2).to(dtype)
    v = torch.randn(1, kv, n, dim, generator=gen).to(dtype)
    q = (torch.randn(rows, kv, group, dim, generator=gen) * 2).to(dtype)
    alone = torch.cat([F.scaled_dot_product_attention(q[i:i + 1], k[:, :, :context + i + 1], v[:, :, :context + i + 1],
                                                      scale=0.125) for i in range(rows)])
    visible = torch.arange(n)[None, :] <= (torch.arange(rows) + context)[:, None]
    mask = visible[:, None, None, :].expand(rows, 1, group, n)
    if mask_kind == "additive":
        mask = torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, float("-inf"))
    batched = F.scaled_dot_product_attention(q, k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1),
                                             attn_mask=mask, scale=0.125)
    return torch.equal(batched, alone), float((batched.float() - alone.float()).abs().max())


def depth_rows_equal_alone(dtype, context: int, rows: int) -> tuple[bool, float]:
    """`rows` rows with `context` keys each (their own keys: siblings share the prompt, not the
    last ancestors), SmolLM2's GQA-packed shapes, one batched unmasked call vs one call per row
    on a slice of a longer cache (how exact mode computes a row today)."""
    gen = torch.Generator().manual_seed(context + 1)
    kv, group, dim = 3, 3, 64
    q = (torch.randn(rows, kv, group, dim, generator=gen) * 2).to(dtype)
    k = (torch.randn(rows, kv, context + 8, dim, generator=gen) * 2).to(dtype)
    v = torch.randn(rows, kv, context + 8, dim, generator=gen).to(dtype)
    alone = torch.cat([F.scaled_dot_product_attention(q[i:i + 1], k[i:i + 1, :, :context], v[i:i + 1, :, :context],
                                                      scale=0.125) for i in range(rows)])
    batched = F.scaled_dot_product_attention(q, k[:, :, :context].contiguous(), v[:, :, :context].contiguous(),
                                             scale=0.125)
    return torch.equal(batched, alone), float((batched.float() - alone.float()).abs().max())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quant", default="nf4,bf16")
    ap.add_argument("--context", type=int, default=300)
    ap.add_argument("--rows", default="1,8,16,32")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--parts", default="1,2,3", help="which parts to run (1 is timed: nothing else may run)")
    ap.add_argument("--name", default="exact_rows", help="results file name under benchmarks/results")
    args = ap.parse_args()
    parts = {int(p) for p in args.parts.split(",")}
    clock = RowClock()
    exact._rows = clock
    rows_list = [int(r) for r in args.rows.split(",")]
    lines, results = [], []
    if 1 in parts:
        lines += ["| mode | rows | verify ms, exact off | verify ms, exact on | of which per-row attention ms | "
                  "per row ms |", "|---|---|---|---|---|---|"]
    for quant in args.quant.split(",") if 1 in parts else []:
        engine = quanttree.load(quant=quant, drafter=None, device="cpu", log=lambda *_: None)
        min_rows = engine.target.min_rows
        for rows in rows_list:
            engine.target.set_exact(False)
            off, _ = time_verify(engine, args.context, rows, args.repeats, clock)
            engine.target.set_exact(True, min_rows)
            on, attn = time_verify(engine, args.context, rows, args.repeats, clock)
            lines.append(f"| {quant} | {rows} | {off:.1f} | {on:.1f} | {attn:.1f} | {attn / rows:.2f} |")
            results.append({"quant": quant, "rows": rows, "off_ms": off, "on_ms": on, "rows_attention_ms": attn})
            print(lines[-1], flush=True)
    if 2 in parts:
        lines += ["", "Rows stacked in one masked call vs each row alone (16 rows):", "",
                  "| dtype | context | mask | equal | max abs diff |", "|---|---|---|---|---|"]
    for dtype in (torch.bfloat16, torch.float32) if 2 in parts else ():
        for context in (5, 37, 200, 511, 700, 1500):
            for kind in ("bool", "additive"):
                same, diff = batched_equals_alone(dtype, context, 16, kind)
                lines.append(f"| {str(dtype).removeprefix('torch.')} | {context} | {kind} | {same} | {diff:.2g} |")
                results.append({"dtype": str(dtype), "context": context, "mask": kind, "equal": same, "diff": diff})
    if 3 in parts:
        lines += ["", "Rows of equal key count, own keys, stacked along the batch in one unmasked call vs each "
                  "row alone (8 rows):", "", "| dtype | keys | equal | max abs diff |", "|---|---|---|---|"]
        for dtype in (torch.bfloat16, torch.float32):
            for context in (5, 37, 200, 511, 700, 1500):
                same, diff = depth_rows_equal_alone(dtype, context, 8)
                lines.append(f"| {str(dtype).removeprefix('torch.')} | {context} | {same} | {diff:.2g} |")
                results.append({"part": 3, "dtype": str(dtype), "keys": context, "equal": same, "diff": diff})
    command = "python benchmarks/exact_rows.py " + " ".join(sys.argv[1:])
    print(write_results(args.name, command.strip(), "\n".join(lines), results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
