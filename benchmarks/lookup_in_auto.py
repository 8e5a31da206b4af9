"""What `auto` gets from n-gram lookup: continuation depth and skipping the drafter pass.

Per prompt (chat and HumanEval, never training data, greedy), side by side on one loaded model:
plain decoding, `lookup` alone (fixed budget 8), and `auto` (drafter + lookup in one tree) in
three settings: lookup continuations 8 deep with the drafter run every drafted round (the
previous default), 16 deep, and 16 deep with DrafterWorth (the current default: the drafter pass
is skipped where lookup is sure enough that it would not pay). Reports decode tokens/s as a
ratio to the plain run of the same prompt, tau, drafter ms per round and exact matches.

    python benchmarks/lookup_in_auto.py --quant nf4,bf16 --prompts 4
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import suite_prompts, warmed_engine, write_results  # noqa: E402

import quanttree.decode as decode  # noqa: E402
from quanttree.policy import DrafterWorth  # noqa: E402

ARMS = (("lookup", 8, 8, True), ("auto", None, 8, False), ("auto", None, 16, False), ("auto", None, 16, True))


@contextlib.contextmanager
def setting(depth: int, worth: bool):
    """Lookup depth and DrafterWorth on/off for one run (an ablation: restored afterwards)."""
    saved_depth, saved_worth = decode.LOOKUP_DEPTH, DrafterWorth.worth
    decode.LOOKUP_DEPTH = depth
    if not worth:
        DrafterWorth.worth = lambda self, p: True
    try:
        yield
    finally:
        decode.LOOKUP_DEPTH, DrafterWorth.worth = saved_depth, saved_worth


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quant", default="nf4,bf16")
    ap.add_argument("--prompts", type=int, default=4, help="per suite")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--name", default="lookup_in_auto")
    args = ap.parse_args()
    prompts = suite_prompts(args.prompts)
    rows = []
    for quant in args.quant.split(","):
        engine = warmed_engine(quant)
        for suite, prompt in prompts:
            ar = engine.generate(prompt, method="ar", max_new_tokens=args.max_new_tokens)
            for method, budget, depth, worth in ARMS:
                with setting(depth, worth):
                    out = engine.generate(prompt, method=method, budget=budget, max_new_tokens=args.max_new_tokens)
                s = out.stats
                rows.append({"quant": quant, "suite": suite, "arm": f"{method} depth {depth}"
                             + ("" if method == "lookup" else (" + DrafterWorth" if worth else ", drafter every round")),
                             "speedup": s.decode_tokens_per_s / ar.stats.decode_tokens_per_s, "tau": s.tau,
                             "draft_ms": s.phase_ms()["draft"] / max(s.rounds, 1), "exact": out.token_ids == ar.token_ids})
            print(quant, suite, "done", flush=True)
    lines = ["| quant | suite | arm | speedup vs plain | tau | drafter ms per round | greedy == plain |",
             "|---|---|---|---|---|---|---|"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["quant"], r["suite"], r["arm"]), []).append(r)
    for (quant, suite, arm), rs in groups.items():
        lines.append(f"| {quant} | {suite} | {arm} | {statistics.mean(r['speedup'] for r in rs):.2f}x | "
                     f"{statistics.mean(r['tau'] for r in rs):.2f} | {statistics.mean(r['draft_ms'] for r in rs):.1f} | "
                     f"{sum(r['exact'] for r in rs)}/{len(rs)} |")
    print(write_results(args.name, "python " + " ".join(sys.argv), "\n".join(lines), rows))


if __name__ == "__main__":
    main()
