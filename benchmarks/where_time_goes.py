"""Where one plain decoding step spends its time, per quant mode (and llama.cpp's step beside it).

Profiles our plain decoding of one chat prompt with torch's profiler and groups the operators
into what they are: the quantized or dense matmuls of the decoder layers, the output head (the
vocabulary projection), dtype conversions and copies, attention, and everything else (the
many small per-layer operators and their dispatch). Per-token milliseconds, so the modes and
llama.cpp's plain decoding of the same GGUF file compare directly (wall time per token there).

    python benchmarks/where_time_goes.py --quant nf4,bf16 --tokens 32
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import write_results  # noqa: E402

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import quanttree  # noqa: E402

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
GROUPS = (  # operator name -> group; first match wins
    ("gemv_4bit", "layer matmuls (4-bit kernels)"), ("int8", "layer matmuls (int8 kernels)"),
    ("dequantize", "layer matmuls (4-bit kernels)"), ("scaled_dot_product", "attention"),
    ("aten::mm", "dense matmuls (bf16/fp32 layers, output head)"),
    ("aten::addmm", "dense matmuls (bf16/fp32 layers, output head)"),
    ("aten::bmm", "dense matmuls (bf16/fp32 layers, output head)"),
    ("copy_", "dtype conversions and copies"), ("_to_copy", "dtype conversions and copies"),
)


def group(name: str) -> str:
    return next((g for key, g in GROUPS if key in name), "other operators (norms, rotary, activations, views)")


def profile_mode(quant: str, tokens: int) -> dict:
    engine = quanttree.load("smollm2-135m", quant=quant, drafter=None, log=lambda *_: None)
    engine.generate(PROMPT, method="ar", max_new_tokens=8)  # warm-up
    t0 = time.perf_counter()
    res = engine.generate(PROMPT, method="ar", max_new_tokens=tokens)
    wall = time.perf_counter() - t0
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        engine.generate(PROMPT, method="ar", max_new_tokens=tokens)
    per_group: dict[str, float] = {}
    for ev in prof.key_averages():
        per_group[group(ev.key)] = per_group.get(group(ev.key), 0.0) + ev.self_cpu_time_total / 1e3
    n = len(res.token_ids)
    return {"quant": quant, "ms_per_token": 1e3 / res.stats.decode_tokens_per_s, "wall_s": wall,
            "prompt_ids": engine.encode(PROMPT),
            "groups": {g: ms / n for g, ms in sorted(per_group.items(), key=lambda kv: -kv[1])}}


def llama_cpp_ms(prompt_ids: list[int], tokens: int) -> float | None:
    from quanttree.bench import llama_cpp_model, run_llama_cpp

    llm, why = llama_cpp_model("smollm2-135m")
    if llm is None:
        print(f"llama.cpp row skipped: {why}", file=sys.stderr)
        return None
    run_llama_cpp(llm, prompt_ids, 8)  # the same chat-templated prompt ids as ours
    return 1e3 / run_llama_cpp(llm, prompt_ids, tokens)["tps"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quant", default="nf4,bf16")
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    rows = [profile_mode(q, args.tokens) for q in args.quant.split(",")]
    llama = llama_cpp_ms([r.pop("prompt_ids") for r in rows][0], args.tokens)
    groups = sorted({g for r in rows for g in r["groups"]})
    lines = ["| ms per token | " + " | ".join(r["quant"] for r in rows) + " |", "|---" * (len(rows) + 1) + "|",
             "| **decode step (wall)** | " + " | ".join(f"**{r['ms_per_token']:.1f}**" for r in rows) + " |"]
    for g in groups:
        lines.append(f"| {g} | " + " | ".join(f"{r['groups'].get(g, 0.0):.1f}" for r in rows) + " |")
    table = "\n".join(lines) + "\n"
    if llama is not None:
        table += f"\nllama.cpp plain decoding of the same GGUF file, same threads: {llama:.1f} ms per token.\n"
    table += ("\nGroups are operator self time per token as torch's profiler reports it in a second, profiled run; "
              "the wall step also holds the Python between operators (transformers' modeling code, bitsandbytes' "
              "wrappers, our loop), which is in no group.\n")
    print(table)
    write_results("where_time_goes", "python benchmarks/where_time_goes.py " + " ".join(sys.argv[1:]), table,
                  rows + ([{"llama_cpp_ms_per_token": llama}] if llama else []))


if __name__ == "__main__":
    main()
