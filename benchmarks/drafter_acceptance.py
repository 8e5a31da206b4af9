"""How often a drafter's drafts are accepted in real decoding, drafters side by side.

On prompts never used for training or tuning (the chat suite and HumanEval as chat requests),
greedy, the target in --quant: per drafter and suite, the first drafted token's acceptance rate
and tau (tokens per target forward) of the DFlash chain, and tau of DDTree at --budget nodes.
Acceptance only: no timing (so it may run beside other work).

    python benchmarks/drafter_acceptance.py --drafters quanttree/drafters/smollm2-135m,NEW_DIR --prompts 16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import chat_prompts, humaneval_prompts, write_results  # noqa: E402

import quanttree  # noqa: E402


def measure(engine, prompts: list[str], method: str, budget: int, max_new_tokens: int) -> dict:
    rounds = first = tokens = nodes = 0
    for prompt in prompts:
        stats = engine.generate(prompt, method=method, budget=budget, max_new_tokens=max_new_tokens).stats
        rounds += stats.rounds
        tokens += stats.new_tokens - 1
        nodes += stats.tree_nodes
        first += stats.accepted_at_depth[0] if stats.accepted_at_depth else 0
    return {"rounds": rounds, "tau": tokens / max(rounds, 1), "first_accept": first / max(rounds, 1),
            "nodes_per_round": nodes / max(rounds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--drafters", required=True, help="comma-separated drafter dirs")
    ap.add_argument("--quant", default="bf16")
    ap.add_argument("--prompts", type=int, default=16, help="per suite")
    ap.add_argument("--budget", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--name", default="drafter_acceptance")
    args = ap.parse_args()
    suites = {"chat": chat_prompts(args.prompts), "humaneval": humaneval_prompts(args.prompts)}
    rows = []
    for drafter in args.drafters.split(","):
        engine = quanttree.load("smollm2-135m", drafter=drafter, quant=args.quant, log=lambda *_: None)
        for suite, prompts in suites.items():
            for method, budget in (("dflash", 1), ("ddtree", args.budget)):
                r = measure(engine, prompts, method, budget, args.max_new_tokens)
                rows.append({"drafter": drafter, "suite": suite, "method": method, "budget": budget, **r})
                print(rows[-1], flush=True)
    lines = ["| drafter | suite | first-token acceptance (chain) | chain tau | "
             f"DDTree@{args.budget} tau | DDTree first-token acceptance |", "|---|---|---|---|---|---|"]
    for drafter in args.drafters.split(","):
        for suite in suites:
            chain = next(r for r in rows if r["drafter"] == drafter and r["suite"] == suite and r["method"] == "dflash")
            tree = next(r for r in rows if r["drafter"] == drafter and r["suite"] == suite and r["method"] == "ddtree")
            lines.append(f"| {Path(drafter).name} | {suite} | {chain['first_accept']:.3f} | {chain['tau']:.2f} | "
                         f"{tree['tau']:.2f} | {tree['first_accept']:.3f} |")
    command = "python benchmarks/drafter_acceptance.py " + " ".join(sys.argv[1:])
    note = (f"\n\n{args.prompts} prompts per suite (never used for training), {args.quant} target, greedy, "
            f"{args.max_new_tokens} new tokens; acceptance counted per drafted round.\n")
    print(write_results(args.name, command, "\n".join(lines) + note, rows))


if __name__ == "__main__":
    main()
