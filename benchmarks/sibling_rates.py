"""Sibling rates: calibrated estimates of exclusive siblings capped to sum to at most 1.

Several draft sources (request lookup, corpus, drafter) each propose a next token with its own
calibrated rate; the target takes one token, so the siblings' rates can promise more accepted
tokens than a round can give, and the sizer then verifies too many nodes. Three rules, side by
side on one loaded model (arms rotate per prompt and repeat), for `lookup` and `auto`:
- best first (shipped since session 20, `policy.exclusive_rates`): the best-rated child keeps
  its rate, each next one gets at most what the better ones leave;
- proportional (shipped until session 20, defined here): every child's rate divided by the
  children's sum where that exceeds 1;
- none: the rates as calibrated (the previous rule).
An earlier run (2026-11-26, 2 repeats of 4 + 4 writing-only prompts, the drafter mostly skipped) found the rules
within noise. Session 20 (`--prompts 7 --repeats 1`, one chat prompt per category, with
`DrafterWorth` judging drafted rounds against lookup's own tree; results/session20/) measured best
first / proportional 1.08x, 1.07x (nf4 lookup chat, HumanEval), 1.04x, 1.06x (nf4 auto), 1.02x,
0.99x (bf16 lookup), 1.01x, 1.01x (bf16 auto), and with the drafter run every round a merged tree's
tau on two HumanEval prompts 3.10 -> 7.06 and 2.31 -> 5.08: proportional scaling let the drafter's
sibling cut lookup's sure chains. So best first ships.
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

RULES = ("best first", "proportional", "none")
ARMS = tuple((method, rule) for method in ("lookup", "auto") for rule in RULES)


def proportional(parents: np.ndarray, rate: np.ndarray) -> np.ndarray:
    """Every child's rate divided by its siblings' sum where that exceeds 1 (shipped until session 20)."""
    total = np.zeros(rate.size)
    np.add.at(total, parents[1:], rate[1:])
    out = rate.copy()
    out[1:] /= np.maximum(total[parents[1:]], 1.0)
    return out


@contextlib.contextmanager
def sibling_rule(rule: str):
    """The sibling rule for one run (an ablation: the shipped rule is restored afterwards)."""
    saved = policy.exclusive_rates
    if rule == "proportional":
        policy.exclusive_rates = proportional
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
