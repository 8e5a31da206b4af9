"""Speculative methods vs plain decoding, side by side in one run, per quant mode.

For every prompt the methods run back to back on the same loaded engine (AR first), so the
ratios compare like with like on a shared, noisy machine. Reports decode tokens/s, speedup
vs AR, tau, mean tree size, per-phase time, the per-round overhead outside the two model
forwards as a fraction of verify time, and greedy divergences from AR (with AR's top-2 logit
gap at the divergence, to tell near-ties from bugs).

    python benchmarks/speculative.py --quant bf16 --prompts 20 --methods dflash,ddtree:32
    (method d2sd-dflash: d2sd re-drafting with the DFlash weights, beside d2sd with the VP drafter)
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import humaneval_prompts, write_results  # noqa: E402

import quanttree  # noqa: E402


def parse_methods(text: str) -> list[tuple[str, int]]:
    out = []
    for item in text.split(","):
        name, _, budget = item.partition(":")
        out.append((name, int(budget) if budget else 32))
    return out


def divergence(engine, prompt, ar_ids, ids) -> dict | None:
    where = engine.divergence(prompt, ar_ids, ids)
    if where is not None:
        return {"index": where[0], "ar_top2_gap": where[1]}
    if len(ar_ids) != len(ids):
        return {"index": min(len(ar_ids), len(ids)), "ar_top2_gap": None}
    return None


def run(args) -> list[dict]:
    prompts = humaneval_prompts(args.prompts, args.offset)
    rows = []
    for quant in args.quant.split(","):
        for dq in args.drafter_quant.split(","):
            engine = quanttree.load(args.target, drafter=args.drafter, quant=quant,
                                    drafter_quant=None if dq == "same" else dq, device=args.device,
                                    log=lambda *_: None)
            engines = {"d2sd-dflash": quanttree.Engine(engine.loaded, engine.drafter, engine.drafter_quant)}
            engine.generate(prompts[0], method="ar", max_new_tokens=8)
            engine.generate(prompts[0], method="dflash", max_new_tokens=8)
            for p_index, prompt in enumerate(prompts):
                ar = None
                if not args.skip_ar:
                    ar = engine.generate(prompt, method="ar", max_new_tokens=args.max_new_tokens)
                    rows.append(row_for(quant, dq, "ar", 0, p_index, ar, None))
                for method, budget in parse_methods(args.methods):
                    runner = engines.get(method, engine)  # d2sd-dflash: d2sd without the VP drafter
                    res = runner.generate(prompt, method=method.split("-")[0], budget=budget,
                                          max_new_tokens=args.max_new_tokens)
                    div = divergence(engine, prompt, ar.token_ids, res.token_ids) if ar else None
                    rows.append(row_for(quant, dq, method, budget, p_index, res, div, ar))
                print(f"{quant}/{dq} prompt {p_index + 1}/{len(prompts)}", file=sys.stderr, flush=True)
    return rows


def row_for(quant, dq, method, budget, p_index, res, div, ar=None) -> dict:
    s = res.stats
    ph = s.phase_ms()
    return {"quant": quant, "drafter_quant": dq, "method": method, "budget": budget, "prompt": p_index,
            "tokens": s.new_tokens, "tps": s.decode_tokens_per_s, "tau": s.tau, "tree": s.mean_tree_size,
            "rounds": s.rounds, "phase_ms": ph,
            "speedup": (s.decode_tokens_per_s / ar.stats.decode_tokens_per_s if ar is not None else
                        (1.0 if method == "ar" else None)),
            "diverged": div, "accepted_at_depth": s.accepted_at_depth}


def summarize(rows: list[dict]) -> str:
    keys = sorted({(r["quant"], r["drafter_quant"], r["method"], r["budget"]) for r in rows},
                  key=lambda k: (k[0], k[1], k[2] != "ar", k[2], k[3]))
    out = ["| target | drafter | method | budget | tok/s | speedup vs AR | tau | tree | draft ms | verify ms | "
           "build+walk ms | overhead / verify | diverged (max AR top-2 gap) |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key in keys:
        rs = [r for r in rows if (r["quant"], r["drafter_quant"], r["method"], r["budget"]) == key]
        rounds = sum(r["rounds"] for r in rs) or 1
        per = {k: sum(r["phase_ms"][k] for r in rs) / rounds for k in ("draft", "verify", "build", "walk")}
        over = (per["build"] + per["walk"]) / per["verify"] if per["verify"] else 0.0
        divs = [r["diverged"] for r in rs if r["diverged"]]
        gaps = [d["ar_top2_gap"] for d in divs if d["ar_top2_gap"] is not None]
        div_text = f"{len(divs)}/{len(rs)}" + (f" ({max(gaps):.3f})" if gaps else "")
        tau = sum(r["tokens"] - 1 for r in rs) / rounds
        tps = statistics.mean(r["tps"] for r in rs)
        speed = statistics.mean(r["speedup"] for r in rs) if rs[0]["speedup"] is not None else float("nan")
        out.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3] or '-'} | {tps:.1f} | {speed:.2f}x | {tau:.2f} | "
                   f"{statistics.mean(r['tree'] for r in rs):.1f} | {per['draft']:.1f} | {per['verify']:.1f} | "
                   f"{per['build'] + per['walk']:.2f} | {100 * over:.1f}% | {div_text} |")
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="smollm2-135m")
    parser.add_argument("--drafter", default="auto")
    parser.add_argument("--quant", default="bf16")
    parser.add_argument("--drafter-quant", default="same", help="comma list; 'same' follows the target")
    parser.add_argument("--methods", default="dflash,ddtree:8,ddtree:32,ddtree:64")
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--offset", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--device", default=None)
    parser.add_argument("--name", default="speculative")
    parser.add_argument("--skip-ar", action="store_true", help="tau only: no AR baseline (no speedup, no checks)")
    args = parser.parse_args()
    rows = run(args)
    table = summarize(rows)
    print(table)
    command = "python benchmarks/speculative.py " + " ".join(sys.argv[1:])
    print("wrote", write_results(args.name, command.strip(), table, rows))


if __name__ == "__main__":
    main()
