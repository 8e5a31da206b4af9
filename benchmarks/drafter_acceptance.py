"""How often a drafter's drafts are accepted in real decoding, drafters side by side.

On prompts never used for training or tuning (the chat suite and HumanEval as chat requests),
greedy, the target in --quant: per drafter and suite, the first drafted token's acceptance rate
and tau (tokens per target forward) of the DFlash chain, and tau of DDTree at --budget nodes
(--d2sd adds D2SD's chain plus re-drafted branches trimmed to the same budget, re-drafted by
the same drafter: whether a variable-prefix drafter would have anything to gain).
Acceptance only: no timing (so it may run beside other work).

Beside it, the same drafter's teacher-forced accuracy on the target's own (batched greedy)
responses to the same prompts, as the trainer scores held-out data: slot-1 accuracy and chain
tau at random positions. The two differ because decoding starts every round right after a
rejection (harder positions) and the trainer's held-out prompts come from the training pool.

    python benchmarks/drafter_acceptance.py --drafters quanttree/drafters/smollm2-135m,NEW_DIR --prompts 16
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import chat_prompts, humaneval_prompts, ratio_se, write_results  # noqa: E402

import quanttree  # noqa: E402


def measure(engine, prompts: list[str], method: str, budget: int, max_new_tokens: int) -> dict:
    rounds, tokens, first, nodes = [], [], [], []
    for prompt in prompts:
        stats = engine.generate(prompt, method=method, budget=budget, max_new_tokens=max_new_tokens).stats
        rounds.append(stats.rounds)
        tokens.append(stats.new_tokens - 1)
        nodes.append(stats.tree_nodes)
        first.append(stats.accepted_at_depth[0] if stats.accepted_at_depth else 0)
    total = max(sum(rounds), 1)
    return {"rounds": sum(rounds), "tau": sum(tokens) / total, "tau_se": ratio_se(tokens, rounds),
            "first_accept": sum(first) / total, "first_accept_se": ratio_se(first, rounds),
            "nodes_per_round": sum(nodes) / total, "tokens_per_prompt": tokens, "rounds_per_prompt": rounds}


def paired_lines(drafters: list[str], suites, by: dict) -> list[str]:
    """Each later drafter's tau minus the first's on the same prompts, with the paired standard error."""
    out = []
    for drafter in drafters[1:]:
        for suite in suites:
            cells = []
            for method in ("dflash", "ddtree"):
                a, b = by[drafter, suite, method], by[drafters[0], suite, method]
                se = ratio_se(a["tokens_per_prompt"], a["rounds_per_prompt"],
                              b["tokens_per_prompt"], b["rounds_per_prompt"])
                cells.append(f"{a['tau'] - b['tau']:+.3f} ± {se:.3f}")
            out.append(f"| {Path(drafter).name} - {Path(drafters[0]).name} | {suite} | | {cells[0]} | {cells[1]} |")
    return out


def target_responses(engine, prompts: list[str], max_new_tokens: int) -> list[tuple[np.ndarray, int, int]]:
    """(prompt + greedy response ids, prompt length, index) per prompt, as the feature cache takes them."""
    from quanttree.train.datagen import encode_chat, generate_batch

    encoded = [encode_chat(engine.tokenizer, p) for p in prompts]
    pad = engine.tokenizer.pad_token_id if engine.tokenizer.pad_token_id is not None else min(engine.eos_token_ids)
    responses = generate_batch(engine.target, encoded, max_new_tokens, engine.eos_token_ids, pad)
    held = [(np.array(e + r), len(e), 50 * (k + 1)) for k, (e, r) in enumerate(zip(encoded, responses))]
    return held + [(held[0][0], held[0][1], 1)]  # the trainer wants one training sequence: a copy, not scored


def teacher_forced(engine, drafter: str, sequences, work: Path) -> dict:
    """The trainer's held-out evaluation of `drafter` on these sequences."""
    from quanttree.train.features import build_cache
    from quanttree.train.trainer import TrainConfig, Trainer

    config = json.loads((Path(drafter) / "config.json").read_text())
    layers = tuple(config["dflash_config"]["target_layer_ids"])
    cache = build_cache(engine.target, sequences, work / "-".join(map(str, layers)), layers, 32, log=lambda *_: None)
    cfg = TrainConfig(block_size=config["block_size"], init_from=drafter, eval_seqs=len(sequences) - 1)
    result = Trainer(engine.target, cache, cfg, work / "unused", log=lambda *_: None).evaluate()
    return {"tf_slot1": result["slot1"], "tf_chain_tau": result["chain_tau"], "tf_blocks": result["blocks"],
            "bigram_slot1": result["bigram_slot1"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--drafters", required=True, help="comma-separated drafter dirs")
    ap.add_argument("--quant", default="bf16")
    ap.add_argument("--prompts", type=int, default=16, help="per suite")
    ap.add_argument("--offset", type=int, default=0,
                    help="skip each suite's first OFFSET prompts (more unseen prompts, for a smaller standard error)")
    ap.add_argument("--budget", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--name", default="drafter_acceptance")
    ap.add_argument("--d2sd", action="store_true", help="also D2SD at --budget nodes")
    ap.add_argument("--suites", default="chat,humaneval",
                    help="comma-separated: chat, humaneval (one suite alone where the target is slow, e.g. "
                         "bf16 on a CPU without native bf16)")
    args = ap.parse_args()
    loaders = {"chat": lambda n: chat_prompts(args.offset + n)[args.offset:],
               "humaneval": lambda n: humaneval_prompts(n, args.offset)}
    names = [s.strip() for s in args.suites.split(",") if s.strip()]
    unknown = [s for s in names if s not in loaders]
    if unknown or not names:
        ap.error(f"--suites {args.suites!r}: choose from {', '.join(loaders)}")
    suites = {s: loaders[s](args.prompts) for s in names}
    empty = [s for s, p in suites.items() if not p]
    if empty:
        ap.error(f"--offset {args.offset}: no {', '.join(empty)} prompts left past it")
    rows, forced = [], {}
    work = Path(tempfile.mkdtemp(prefix="drafter-acceptance-"))
    responses = None
    for drafter in args.drafters.split(","):
        engine = quanttree.load("smollm2-135m", drafter=drafter, quant=args.quant, log=lambda *_: None)
        if responses is None:  # the same target text for every drafter
            responses = {s: target_responses(engine, p, args.max_new_tokens) for s, p in suites.items()}
        for suite, prompts in suites.items():
            forced[drafter, suite] = teacher_forced(engine, drafter, responses[suite], work / suite)
            methods = (("dflash", 1), ("ddtree", args.budget)) + ((("d2sd", args.budget),) if args.d2sd else ())
            for method, budget in methods:
                r = measure(engine, prompts, method, budget, args.max_new_tokens)
                rows.append({"drafter": drafter, "suite": suite, "method": method, "budget": budget, **r,
                             **forced[drafter, suite]})
                print(rows[-1], flush=True)
    d2sd = f" D2SD@{args.budget} tau | D2SD nodes per round |" if args.d2sd else ""
    lines = ["| drafter | suite | first-token acceptance (chain) | chain tau (± SE) | "
             f"DDTree@{args.budget} tau (± SE) | DDTree first-token acceptance |{d2sd} teacher-forced slot 1 | "
             "teacher-forced chain tau |", "|---|---|---|---|---|---|---|---|" + "---|---|" * args.d2sd]
    by = {(r["drafter"], r["suite"], r["method"]): r for r in rows}
    for drafter in args.drafters.split(","):
        for suite in suites:
            chain, tree, tf = by[drafter, suite, "dflash"], by[drafter, suite, "ddtree"], forced[drafter, suite]
            branches = by.get((drafter, suite, "d2sd"))
            d2sd = f" {branches['tau']:.2f} | {branches['nodes_per_round']:.1f} |" if branches else ""
            lines.append(f"| {Path(drafter).name} | {suite} | {chain['first_accept']:.3f} | "
                         f"{chain['tau']:.2f} ± {chain['tau_se']:.2f} | {tree['tau']:.2f} ± {tree['tau_se']:.2f} | "
                         f"{tree['first_accept']:.3f} |{d2sd} {tf['tf_slot1']:.3f} | {tf['tf_chain_tau']:.2f} |")
    lines += paired_lines(args.drafters.split(","), suites, by)
    command = "python benchmarks/drafter_acceptance.py " + " ".join(sys.argv[1:])
    note = (f"\n\n{args.prompts} prompts per suite (never used for training; from prompt {args.offset}), {args.quant} "
            f"target, greedy, {args.max_new_tokens} new tokens; acceptance counted per drafted round; SE: standard "
            "error with the prompts as independent units.\n")
    print(write_results(args.name, command, "\n".join(lines) + note, rows))


if __name__ == "__main__":
    main()
