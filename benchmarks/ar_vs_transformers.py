"""Our autoregressive loop vs transformers `generate` on the same model, per quant mode.

Run side by side in one process, alternating the order per prompt; reports decode tokens/s
(prefill excluded: each side's prefill is timed separately) and whether outputs are identical.

    python benchmarks/ar_vs_transformers.py --quant fp32,bf16,int8,nf4 --prompts 6
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from common import humaneval_prompts, write_results  # noqa: E402

import quanttree  # noqa: E402


def hf_generate(engine, ids: list[int], max_new_tokens: int) -> tuple[list[int], float]:
    t0 = time.perf_counter()
    out = engine.target.model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=max_new_tokens,
                                       pad_token_id=engine.tokenizer.eos_token_id)
    return out[0, len(ids):].tolist(), time.perf_counter() - t0


def hf_prefill(engine, ids: list[int]) -> float:
    return hf_generate(engine, ids, 1)[1]


def bench_mode(quant: str, prompts: list[str], max_new_tokens: int) -> dict:
    engine = quanttree.load("smollm2-135m", quant=quant, device="cpu", drafter=None, log=lambda *_: None)
    engine.generate(prompts[0], method="ar", max_new_tokens=8)  # warm-up both paths
    hf_generate(engine, engine.encode(prompts[0]), 8)
    ours_tps, hf_tps, same = [], [], 0
    for i, prompt in enumerate(prompts):
        ids = engine.encode(prompt)
        runs = {}
        for side in (("ours", "hf") if i % 2 == 0 else ("hf", "ours")):
            if side == "ours":
                result = engine.generate(prompt, method="ar", max_new_tokens=max_new_tokens)
                runs["ours"] = (result.token_ids, result.stats.decode_tokens_per_s)
            else:
                tokens, total = hf_generate(engine, ids, max_new_tokens)
                decode_s = total - hf_prefill(engine, ids)
                runs["hf"] = (tokens, (len(tokens) - 1) / decode_s)
        ours_tps.append(runs["ours"][1])
        hf_tps.append(runs["hf"][1])
        same += runs["ours"][0] == runs["hf"][0]
    ours, hf = statistics.mean(ours_tps), statistics.mean(hf_tps)
    return {"quant": quant, "ours_tps": ours, "hf_tps": hf, "ratio": ours / hf, "identical": same,
            "prompts": len(prompts), "max_new_tokens": max_new_tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quant", default="fp32,bf16,int8,nf4")
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    args = parser.parse_args()
    prompts = humaneval_prompts(args.prompts)
    rows = []
    for quant in args.quant.split(","):
        row = bench_mode(quant, prompts, args.max_new_tokens)
        print(row, flush=True)
        rows.append(row)
    table = "| quant | ours decode tok/s | transformers generate tok/s | ratio | identical outputs |\n"
    table += "|---|---|---|---|---|\n"
    for r in rows:
        table += (f"| {r['quant']} | {r['ours_tps']:.1f} | {r['hf_tps']:.1f} | {r['ratio']:.2f}x | "
                  f"{r['identical']}/{r['prompts']} |\n")
    command = "python benchmarks/ar_vs_transformers.py " + " ".join(sys.argv[1:])
    print(table)
    print("wrote", write_results("ar_vs_transformers", command.strip(), table, rows))


if __name__ == "__main__":
    main()
