"""Does `auto` run its drafter only where a drafted round beats the lookup-only round it replaces?

`policy.DrafterWorth` decides per round, from lookup's calibrated first-token chance, whether to
run the drafter pass or verify n-gram drafts alone; it learns from the drafted rounds' net gain
(`policy.drafter_net`) and keeps what it learned beside the cost profile, so a run starts from what
earlier runs taught it. Three arms side by side on one loaded model (arms rotate per prompt and
repeat):
- lookup: n-gram drafts alone (no drafter);
- auto: the shipped rule;
- auto, drafter every round: DrafterWorth off (every round that drafts merges the drafter's tree).
`auto` is right when it is at least as fast as the faster of the other two on every cell. Reports
paired ratios of decode tokens/s, each arm's speedup over plain decoding, tau, and drafter ms per
round. Run it twice to see a warm state: the second run starts from everything the first (its
drafter-every-round arm included) taught the learned state; move
`~/.cache/quanttree/profiles/*.learned.json` aside first for a fresh one.

    python benchmarks/drafter_worth.py --quant nf4,bf16 --prompts 6 --repeats 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import add_paired_args, paired_ratio, paired_runs, write_results  # noqa: E402
from lookup_in_auto import setting  # noqa: E402

import quanttree.decode as decode  # noqa: E402

ARMS = (("lookup", True), ("auto", True), ("auto", False))
NAMES = {("lookup", True): "lookup", ("auto", True): "auto", ("auto", False): "always"}


def main() -> None:
    ap = argparse.ArgumentParser()
    add_paired_args(ap)
    ap.add_argument("--name", default="drafter_worth")
    args = ap.parse_args()

    def run(engine, prompt: str, arm: tuple):
        method, worth = arm
        with setting(decode.LOOKUP_DEPTH, worth):
            return engine.generate(prompt, method=method, max_new_tokens=args.max_new_tokens)

    rows = []
    for quant, suite, i, rep, arm, out, ar in paired_runs(args, ARMS, run):
        s = out.stats
        rows.append({"quant": quant, "suite": suite, "prompt": i, "rep": rep, "arm": NAMES[arm],
                     "speedup": s.decode_tokens_per_s / ar.stats.decode_tokens_per_s, "tau": s.tau,
                     "draft_ms": 1000 * s.times.draft / max(s.rounds, 1), "exact": out.token_ids == ar.token_ids})
    lines = ["| quant | suite | auto vs lookup (paired) | auto vs drafter every round (paired) | "
             "speedup vs plain: lookup / auto / every round | tau: lookup / auto / every round | "
             "drafter ms per round: auto / every round | greedy == plain |",
             "|---|---|---|---|---|---|---|---|"]
    for quant, suite in sorted({(r["quant"], r["suite"]) for r in rows}):
        look, auto, always = ([r for r in rows if (r["quant"], r["suite"], r["arm"]) == (quant, suite, name)]
                              for name in ("lookup", "auto", "always"))
        mean = lambda rs, key: statistics.mean(r[key] for r in rs)  # noqa: E731
        both = look + auto + always
        lines.append(f"| {quant} | {suite} | {paired_ratio(auto, look)} | {paired_ratio(auto, always)} | "
                     f"{mean(look, 'speedup'):.2f}x / {mean(auto, 'speedup'):.2f}x / {mean(always, 'speedup'):.2f}x | "
                     f"{mean(look, 'tau'):.2f} / {mean(auto, 'tau'):.2f} / {mean(always, 'tau'):.2f} | "
                     f"{mean(auto, 'draft_ms'):.2f} / {mean(always, 'draft_ms'):.2f} | "
                     f"{sum(r['exact'] for r in both)}/{len(both)} |")
    print(write_results(args.name, "python " + " ".join(sys.argv), "\n".join(lines), rows))


if __name__ == "__main__":
    main()
