"""What a sampled token costs: three implementations of `select_tokens`' draw, side by side.

  sort:        every row's vocabulary sorted for top-p, then torch.multinomial (until session 21);
  multinomial: `sampling.nucleus` (the top 64 tokens, more only while a row's nucleus has not
               closed in them), then torch.multinomial (session 21);
  cdf:         `sampling.nucleus`, then `sampling.draw` (a cumulative sum and a binary search;
               session 22; today's code).

Sampled speculative decoding selects a target token at the nodes its walk reaches (the "walk"
phase), plain sampling one per token and sampled data generation one per row of a batch, so the
cost per row multiplies. Two parts, arms interleaved, measured side by side in one run:
  rows:    select_tokens on the embedded target's own logits (chat prompts, T 0.8, top-p 0.95)
           for 1, 16 and 64 rows at a time: ms per call;
  decode:  engine.generate sampled (T 0.8, top-p 0.95, a fixed seed per prompt) with plain
           decoding and with `auto`, on chat and HumanEval prompts: decode tokens/s, the walk
           phase's ms per round, and the paired ratio last arm / first arm.

    python benchmarks/sampling_speed.py --quant bf16 --prompts 4 --repeats 2 --arms multinomial,cdf
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import chat_prompts, paired_ratio, suite_prompts, warmed_engine, write_results  # noqa: E402

import quanttree.sampling as sampling  # noqa: E402

NUCLEUS, DRAW = sampling.logits_to_probs, sampling.draw
PARAMS = dict(temperature=0.8, top_p=0.95)


def sorted_logits_to_probs(logits: torch.Tensor, params: sampling.SamplingParams) -> torch.Tensor:
    """The implementation until session 21: every row's vocabulary sorted (top-k off here)."""
    scores = logits.float() / params.temperature
    sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
    probs = torch.softmax(sorted_scores, dim=-1)
    drop_sorted = (probs.cumsum(dim=-1) - probs) >= params.top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return torch.softmax(scores.masked_fill(drop, float("-inf")), dim=-1)


def multinomial_draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """The draw until session 22."""
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


ARMS = {"sort": (sorted_logits_to_probs, multinomial_draw), "multinomial": (NUCLEUS, multinomial_draw),
        "cdf": (NUCLEUS, DRAW)}


@contextlib.contextmanager
def arm(name: str):
    sampling.logits_to_probs, sampling.draw = ARMS[name]
    try:
        yield
    finally:
        sampling.logits_to_probs, sampling.draw = NUCLEUS, DRAW


def order(arms: list[str], i: int) -> list[str]:
    """The arms rotated by i: each goes first equally often."""
    return arms[i % len(arms):] + arms[:i % len(arms)]


def target_logits(engine, prompts: list[str]) -> torch.Tensor:
    """The target's logits at every position of the prompts [N, V] (real distributions, not noise)."""
    rows = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([engine.encode(p)])
            rows.append(engine.target.model(input_ids=ids).logits[0].float())
    return torch.cat(rows)


def rows_part(engine, calls: int, arms: list[str]) -> tuple[list[str], list[dict]]:
    logits = target_logits(engine, chat_prompts(8))
    params = sampling.SamplingParams(**PARAMS)
    gen = torch.Generator().manual_seed(0)
    out, lines = [], []
    for n in (1, 16, 64):
        ms = {name: [] for name in arms}
        for c in range(calls):
            batch = logits[(c * n) % (len(logits) - n):][:n]
            for name in order(arms, c):
                with arm(name):
                    t0 = time.perf_counter()
                    sampling.select_tokens(batch, params, gen)
                    ms[name].append(1000 * (time.perf_counter() - t0))
        row = {"part": "rows", "rows": n, **{f"{k}_ms": statistics.mean(v) for k, v in ms.items()}}
        out.append(row)
        lines.append(f"| {n} | " + " | ".join(f"{row[f'{k}_ms']:.2f}" for k in arms)
                     + f" | {row[f'{arms[0]}_ms'] / row[f'{arms[-1]}_ms']:.1f}x |")
    return lines, out


def decode_part(engine, quant: str, args, arms: list[str]) -> list[dict]:
    rows = []
    for rep in range(args.repeats):
        for i, (suite, prompt) in enumerate(suite_prompts(args.prompts)):
            for method in ("ar", "auto"):
                for name in order(arms, i + rep):
                    with arm(name):
                        r = engine.generate(prompt, method=method, max_new_tokens=args.max_new_tokens,
                                            seed=1000 * rep + i, **PARAMS)
                    s = r.stats
                    rows.append({"part": "decode", "quant": quant, "suite": suite, "prompt": i, "rep": rep,
                                 "method": method, "arm": name, "tok_s": s.decode_tokens_per_s,
                                 "walk_ms": 1000 * s.times.walk / max(s.rounds, 1), "tau": s.tau,
                                 "tokens": len(r.token_ids)})
        print(quant, "repeat", rep, "done", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quant", default="bf16")
    ap.add_argument("--prompts", type=int, default=4, help="per suite")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--calls", type=int, default=40, help="select_tokens calls per arm and row count")
    ap.add_argument("--arms", default="multinomial,cdf", help=f"comma list of {', '.join(ARMS)}; "
                    "ratios are last / first")
    ap.add_argument("--name", default="sampling_speed")
    args = ap.parse_args()

    quants, arms = args.quant.split(","), args.arms.split(",")
    unknown = sorted(set(arms) - set(ARMS))
    if unknown or len(arms) < 2:
        ap.error(f"--arms: at least two of {', '.join(ARMS)} (got {args.arms!r})")
    base, new = arms[0], arms[-1]
    engine = warmed_engine(quants[0])
    lines = ["| rows per call | " + " | ".join(f"{a} ms" for a in arms) + f" | {base} / {new} |",
             "|---" * (len(arms) + 2) + "|"]
    more, rows = rows_part(engine, args.calls, arms)
    lines += more
    lines += ["", f"| quant | suite | method | tokens/s {new} / {base} (paired) | tokens/s: {' / '.join(arms)} | "
              f"walk ms per round: {' / '.join(arms)} | tau: {' / '.join(arms)} |", "|---|---|---|---|---|---|---|"]
    for quant in quants:
        engine = engine if quant == quants[0] else warmed_engine(quant)
        rows += decode_part(engine, quant, args, arms)
    mean = lambda rs, key: statistics.mean(r[key] for r in rs)  # noqa: E731
    cells = sorted({(r["quant"], r["suite"], r["method"]) for r in rows if r["part"] == "decode"})
    for quant, suite, method in cells:
        by = {name: [r for r in rows if r["part"] == "decode" and (r["quant"], r["suite"], r["method"], r["arm"])
                     == (quant, suite, method, name)] for name in arms}
        cols = [" / ".join(f"{mean(by[a], key):{fmt}}" for a in arms) for key, fmt in
                (("tok_s", ".1f"), ("walk_ms", ".2f"), ("tau", ".2f"))]
        lines.append(f"| {quant} | {suite} | {method} | {paired_ratio(by[new], by[base], 'tok_s')} | "
                     + " | ".join(cols) + " |")
    print(write_results(args.name, "python " + " ".join(sys.argv), "\n".join(lines), rows))


if __name__ == "__main__":
    main()
