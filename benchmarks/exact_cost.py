"""What exact mode costs, and what it buys: side by side in one run, per quant mode.

Per mode, on chat and HumanEval prompts never used for training (greedy): transformers
`generate` (its stock SDPA attention), our plain decoding with exact mode off and on, and
`dflash` / `ddtree` with exact mode off and on, interleaved prompt by prompt so that machine
drift hits every column alike. Reports decode tokens/s (prefill excluded) as ratios to the
plain decoding run of the same prompt, tau, the verify time per round, and how many greedy
outputs equal plain decoding's (of the same exact setting).

    python benchmarks/exact_cost.py --quant bf16,nf4,fp32 --prompts 3 --max-new-tokens 96
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import suite_prompts, write_results  # noqa: E402

import torch  # noqa: E402

import quanttree  # noqa: E402


def hf_generate(engine, prompt: str, max_new: int) -> dict:
    """transformers generate with its own attention; decode tok/s excludes a measured prefill."""
    ids = torch.tensor([engine.encode(prompt)], device=engine.device)
    pad = engine.tokenizer.eos_token_id
    with engine.target.stock_attention():
        t0 = time.perf_counter()
        engine.target.model.generate(ids, do_sample=False, max_new_tokens=1, pad_token_id=pad)
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = engine.target.model.generate(ids, do_sample=False, max_new_tokens=max_new, pad_token_id=pad)
        total = time.perf_counter() - t0
    new = out.shape[1] - ids.shape[1]
    return {"tps": (new - 1) / max(total - prefill, 1e-6), "ids": out[0, ids.shape[1]:].tolist()}


def ours(engine, prompt: str, method: str, budget: int, max_new: int) -> dict:
    r = engine.generate(prompt, method=method, budget=budget, max_new_tokens=max_new)
    s = r.stats
    return {"tps": s.decode_tokens_per_s, "ids": r.token_ids, "tau": s.tau,
            "verify_ms": 1000 * s.times.verify / max(s.rounds, 1), "rounds": s.rounds}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quant", default="bf16,nf4,fp32")
    ap.add_argument("--prompts", type=int, default=3, help="per suite")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--budget", type=int, default=8)
    ap.add_argument("--name", default="exact_cost")
    args = ap.parse_args()
    prompts = suite_prompts(args.prompts)
    rows = []
    for quant in args.quant.split(","):
        engine = quanttree.load("smollm2-135m", quant=quant, exact=False, log=lambda *_: None)
        engine.generate(prompts[0][1], method="ar", max_new_tokens=8)  # warm-up
        for suite, prompt in prompts:
            row = {"quant": engine.quant, "suite": suite, "prompt": prompt[:60]}
            row["hf"] = hf_generate(engine, prompt, args.max_new_tokens)
            for exact in (False, True):
                engine.set_exact(exact)
                tag = "on" if exact else "off"
                row[f"ar_{tag}"] = ours(engine, prompt, "ar", 1, args.max_new_tokens)
                for method in ("dflash", "ddtree"):
                    row[f"{method}_{tag}"] = ours(engine, prompt, method, args.budget, args.max_new_tokens)
            engine.set_exact(False)
            rows.append(row)
            print(quant, suite, {k: round(v["tps"], 1) for k, v in row.items() if isinstance(v, dict)}, flush=True)
        del engine
    write_results(args.name, " ".join(["python benchmarks/exact_cost.py"] + sys.argv[1:]), table(rows, args), rows)


def table(rows: list[dict], args) -> str:
    def ratio(rs, key, base):
        return statistics.mean(r[key]["tps"] / r[base]["tps"] for r in rs)

    def same(rs, key, base):
        return sum(r[key]["ids"] == r[base]["ids"] for r in rs)

    out = ["Decode tokens/s as the mean per-prompt ratio to plain decoding with exact mode OFF (today's loop), "
           f"{args.max_new_tokens} new tokens, budget {args.budget} for ddtree; 'same as AR' counts greedy outputs "
           "identical to plain decoding of the same exact setting.\n",
           "| mode | prompts | AR off tok/s | transformers generate | AR exact | dflash off | dflash exact | "
           "ddtree off | ddtree exact | ddtree verify ms/round off -> exact | same as AR: off | same as AR: exact |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for quant in dict.fromkeys(r["quant"] for r in rows):
        rs = [r for r in rows if r["quant"] == quant]
        n = len(rs)
        vm_off = statistics.mean(r["ddtree_off"]["verify_ms"] for r in rs)
        vm_on = statistics.mean(r["ddtree_on"]["verify_ms"] for r in rs)
        out.append(
            f"| {quant} | {n} | {statistics.mean(r['ar_off']['tps'] for r in rs):.1f} | "
            f"{ratio(rs, 'hf', 'ar_off'):.2f}x | {ratio(rs, 'ar_on', 'ar_off'):.2f}x | "
            f"{ratio(rs, 'dflash_off', 'ar_off'):.2f}x | {ratio(rs, 'dflash_on', 'ar_off'):.2f}x | "
            f"{ratio(rs, 'ddtree_off', 'ar_off'):.2f}x | {ratio(rs, 'ddtree_on', 'ar_off'):.2f}x | "
            f"{vm_off:.1f} -> {vm_on:.1f} | "
            f"{same(rs, 'dflash_off', 'ar_off') + same(rs, 'ddtree_off', 'ar_off')}/{2 * n} | "
            f"{same(rs, 'dflash_on', 'ar_on') + same(rs, 'ddtree_on', 'ar_on')}/{2 * n} |")
    out.append("\nPlain decoding in exact mode against transformers generate: "
               + ", ".join(f"{q} {statistics.mean(r['ar_on']['tps'] / r['hf']['tps'] for r in rows if r['quant'] == q):.2f}x"
                           for q in dict.fromkeys(r['quant'] for r in rows)))
    return "\n".join(out)


if __name__ == "__main__":
    main()
