"""Sibling rates: calibrated estimates of exclusive siblings capped to sum to at most 1.

Several draft sources (request lookup, corpus, drafter) each propose a next token with its own
calibrated rate; the target takes one token, so the siblings' rates can promise more accepted
tokens than a round can give, and the sizer then verifies too many nodes. Three rules, side by
side on one loaded model (arms rotate per prompt and repeat), for `lookup` and `auto`:
- proportional (shipped, `policy.exclusive_rates`): every child's rate divided by the children's
  sum where that exceeds 1;
- best first: the best-rated child keeps its rate, each next one gets at most what the better
  ones leave;
- none: the rates as calibrated (the previous rule).
Reports decode tokens/s as a ratio to the plain run of the same prompt, the paired ratio to
`none`, tau, nodes verified per round, and the sizer's calibrated prediction of accepted tokens
per round against what was accepted.

    python benchmarks/sibling_rates.py --quant nf4,bf16 --prompts 4 --repeats 2
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import add_paired_args, paired_ratio, paired_runs, write_results  # noqa: E402

import quanttree.policy as policy  # noqa: E402

RULES = ("proportional", "best first", "none")
ARMS = tuple((method, rule) for method in ("lookup", "auto") for rule in RULES)


def best_first(parents: np.ndarray, rate: np.ndarray) -> np.ndarray:
    out = rate.copy()
    order = np.lexsort((-rate[1:], parents[1:])) + 1  # by parent, best rate first within it
    left: dict[int, float] = {}
    for i in order.tolist():
        p = int(parents[i])
        out[i] = min(rate[i], left.get(p, 1.0))
        left[p] = left.get(p, 1.0) - out[i]
    return out


@contextlib.contextmanager
def sibling_rule(rule: str):
    """The sibling rule for one run (an ablation: the shipped rule is restored afterwards)."""
    saved = policy.exclusive_rates
    if rule == "best first":
        policy.exclusive_rates = best_first
    elif rule == "none":
        policy.exclusive_rates = lambda parents, rate: rate
    try:
        yield
    finally:
        policy.exclusive_rates = saved


def main() -> None:
    ap = argparse.ArgumentParser()
    add_paired_args(ap)
    ap.add_argument("--name", default="sibling_rates")
    args = ap.parse_args()

    def run(engine, prompt: str, arm: tuple):
        method, rule = arm
        with sibling_rule(rule):
            return engine.generate(prompt, method=method, max_new_tokens=args.max_new_tokens)

    rows = []
    for quant, suite, i, rep, (method, rule), out, ar in paired_runs(args, ARMS, run):
        s = out.stats
        rows.append({"quant": quant, "suite": suite, "prompt": i, "rep": rep, "method": method,
                     "rule": rule, "speedup": s.decode_tokens_per_s / ar.stats.decode_tokens_per_s,
                     "tau": s.tau, "nodes": s.mean_tree_size,
                     "predicted": statistics.mean(s.predicted) if s.predicted else 0.0,
                     "observed": statistics.mean(s.observed) if s.observed else 0.0,
                     "exact": out.token_ids == ar.token_ids})
    lines = ["| quant | suite | method | sibling rule | speedup vs plain | vs rule none (paired) | tau | "
             "nodes per round | predicted / observed accepted per round | greedy == plain |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["quant"], r["suite"], r["method"], r["rule"]), []).append(r)
    for (quant, suite, method, rule), rs in sorted(groups.items()):
        base = groups[(quant, suite, method, "none")]
        paired = paired_ratio(rs, base) if rule != "none" and len(rs) > 1 else ""
        lines.append(f"| {quant} | {suite} | {method} | {rule} | "
                     f"{statistics.mean(r['speedup'] for r in rs):.2f}x | {paired} | "
                     f"{statistics.mean(r['tau'] for r in rs):.2f} | {statistics.mean(r['nodes'] for r in rs):.1f} | "
                     f"{statistics.mean(r['predicted'] for r in rs):.2f} / {statistics.mean(r['observed'] for r in rs):.2f} | "
                     f"{sum(r['exact'] for r in rs)}/{len(rs)} |")
    print(write_results(args.name, "python " + " ".join(sys.argv), "\n".join(lines), rows))


if __name__ == "__main__":
    main()
