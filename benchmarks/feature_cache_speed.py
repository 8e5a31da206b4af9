"""How fast the feature cache is built (issue 14: training starts with one target pass over the data).

Times the target pass that fills the cache (`features.target_outputs`: features of the drafter's
layers and top-32 soft labels) over the first sequences of the committed training pack, three
ways, arms interleaved per chunk so the CPU's drift hits each alike:
  before:        batches cut in data order (the build until session 13)
  sorted:        each window of sequences sorted by length before it is cut (the build now)
  sorted+stock:  sorted, and transformers' own attention instead of exact mode's
The target is loaded as training loads it (bf16, exact mode on).
Reported as tokens/s and as the ratio to `before`, measured side by side in one run.

    python benchmarks/feature_cache_speed.py --sequences 384
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time

import numpy as np

from common import write_results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sequences", type=int, default=384, help="sequences of the pack to run (in chunks of 128)")
    ap.add_argument("--tokens-per-batch", type=int, default=4096)
    args = ap.parse_args()

    import torch
    from tqdm import tqdm

    import quanttree
    from quanttree.train.features import cut_batches, target_outputs
    from quanttree.train.pipeline import packed_data_file

    engine = quanttree.load("smollm2-135m", quant="bf16", device="cpu", drafter=None)
    target = engine.target
    layers = (1, 10, 18, 27, 29)  # the shipped drafter's feature layers: what its cache holds
    with np.load(packed_data_file("smollm2-135m", "bf16")) as z:
        offsets, tokens = z["offsets"], z["tokens"]
    seqs = [tokens[offsets[i]:offsets[i + 1]].astype(np.int32) for i in range(args.sequences)]
    lengths = [len(s) for s in seqs]

    def run(arm: str, chunk: range) -> float:
        order = sorted(chunk, key=lambda i: lengths[i]) if arm.startswith("sorted") else list(chunk)
        attention = target.stock_attention() if arm.endswith("stock") else contextlib.nullcontext()
        t0 = time.perf_counter()
        with attention:
            for batch in cut_batches(order, lengths, args.tokens_per_batch):
                target_outputs(target, [seqs[i] for i in batch], layers, 32)
        return time.perf_counter() - t0

    arms = ("before", "sorted", "sorted+stock")
    seconds = {a: 0.0 for a in arms}
    chunks = [range(s, min(s + 128, len(seqs))) for s in range(0, len(seqs), 128)]
    with torch.inference_mode():
        run("sorted", range(0, min(8, len(seqs))))  # warm up kernels and allocations
        for c, chunk in enumerate(tqdm(chunks, desc="chunks")):
            for arm in arms[c % 3:] + arms[:c % 3]:  # rotate which arm goes first
                seconds[arm] += run(arm, chunk)
    total = sum(lengths)
    rows = [{"arm": a, "tokens": total, "seconds": round(seconds[a], 2), "tokens_per_s": round(total / seconds[a], 1),
             "vs_before": round(seconds["before"] / seconds[a], 3)} for a in arms]
    table = ("| build | tokens/s | vs before |\n|---|---|---|\n"
             + "".join(f"| {r['arm']} | {r['tokens_per_s']} | {r['vs_before']:.2f}x |\n" for r in rows)
             + f"\n{len(seqs)} sequences, {total} tokens, bf16 target, layers {list(layers)}, top-32 labels, "
               f"{args.tokens_per_batch} tokens per batch; arms interleaved per chunk of 128 sequences.\n")
    print(table)
    write_results("feature_cache_speed", "python benchmarks/feature_cache_speed.py " + " ".join(sys.argv[1:]),
                  table, rows)


if __name__ == "__main__":
    main()
