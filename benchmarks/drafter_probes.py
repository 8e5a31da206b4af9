"""auto's drafter probes: back off while the drafter does not pay, or probe every 8th skipped round.

Next to the corpus the drafter rarely pays (benchmarks/results/study), and every probe of
`policy.DrafterWorth` (a drafter pass on every 8th round it would skip) costs a pass plus
catching up on the features of the rounds it skipped. Three arms side by side on one loaded
model (arms rotate per prompt and repeat):
- lookup: n-gram drafts alone (no drafter);
- auto, back-off (an ablation, defined here): a bin's probe interval doubles, 8 -> 64 skipped
  rounds, while the drafter measures not worth its pass there, and falls back to 8 when it does;
- auto, every 8: the shipped rule.
Session 13 measured the back-off no faster (0.98-1.01x paired; the drafter's time per round
barely fell: most passes run where it pays or is not yet measured), so the shipped rule stayed.
Reports decode tokens/s as a ratio to the plain run of the same prompt, paired ratios, tau, and
the drafter's time per round.

    python benchmarks/drafter_probes.py --quant nf4,bf16 --prompts 4 --repeats 2
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

ARMS = (("lookup", 0), ("auto", 64), ("auto", 8))


def backing_off_worth(self, p: float) -> bool:
    """DrafterWorth.worth with the probe interval doubling per bin (8 -> 64) while the answer is no."""
    b = self.bin(p)
    every = getattr(self, "every", None)
    if every is None:
        every = self.every = np.full(self.EDGES.size + 1, self.probe_every)
    if self.weight[b] < self.min_samples or self.sum[b] / self.weight[b] > 0.0:
        every[b], self.skips[b] = self.probe_every, 0
        return True
    self.skips[b] += 1
    if self.skips[b] < every[b]:
        return False
    self.skips[b] = 0
    every[b] = min(2 * every[b], 64)
    return True


@contextlib.contextmanager
def backing_off():
    """The back-off rule for one run (the shipped rule is restored afterwards)."""
    saved = policy.DrafterWorth.worth
    policy.DrafterWorth.worth = backing_off_worth
    try:
        yield
    finally:
        policy.DrafterWorth.worth = saved


def main() -> None:
    ap = argparse.ArgumentParser()
    add_paired_args(ap)
    args = ap.parse_args()

    def run(engine, prompt: str, arm: tuple):
        method, cap = arm
        with backing_off() if cap == 64 else contextlib.nullcontext():
            return engine.generate(prompt, method=method, max_new_tokens=args.max_new_tokens)

    rows = []
    for quant, suite, i, rep, (method, cap), out, ar in paired_runs(args, ARMS, run):
        s = out.stats
        rows.append({"quant": quant, "suite": suite, "prompt": i, "rep": rep, "method": method, "cap": cap,
                     "speedup": s.decode_tokens_per_s / ar.stats.decode_tokens_per_s, "tau": s.tau,
                     "draft_ms": 1000 * s.times.draft / max(s.rounds, 1), "exact": out.token_ids == ar.token_ids})
    lines = ["| quant | suite | back-off vs every 8 (paired) | back-off vs lookup (paired) | every 8 vs lookup (paired) | "
             "speedup vs plain: lookup / back-off / every 8 | drafter ms per round: back-off / every 8 | greedy == plain |",
             "|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["quant"], r["suite"], r["cap"]), []).append(r)
    for quant, suite in sorted({(r["quant"], r["suite"]) for r in rows}):
        look, back, eight = (groups[(quant, suite, cap)] for cap in (0, 64, 8))
        mean = lambda rs, key: statistics.mean(r[key] for r in rs)  # noqa: E731
        lines.append(f"| {quant} | {suite} | {paired_ratio(back, eight)} | {paired_ratio(back, look)} | {paired_ratio(eight, look)} | "
                     f"{mean(look, 'speedup'):.2f}x / {mean(back, 'speedup'):.2f}x / {mean(eight, 'speedup'):.2f}x | "
                     f"{mean(back, 'draft_ms'):.2f} / {mean(eight, 'draft_ms'):.2f} | "
                     f"{sum(r['exact'] for r in look + back + eight)}/{len(look + back + eight)} |")
    print(write_results("drafter_probes", "python " + " ".join(sys.argv), "\n".join(lines), rows))


if __name__ == "__main__":
    main()
