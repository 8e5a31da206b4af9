"""What bf16 arithmetic costs training on a CPU without native bf16 (issue 14: make training fast on a CPU).

CPUs with AVX2 alone (no AVX512-BF16, no AMX: most desktop CPUs) emulate bf16 matmuls. Training a
drafter for a bf16 target runs two kinds of them: the target's pass that fills the feature cache,
and the drafter's forward/backward in bf16 autocast. This times both ways on the same data, arms
interleaved per chunk so the CPU's drift hits each alike:
  features: `features.target_outputs` over the committed pack's first sequences, the target in bf16
            arithmetic vs the same bf16 weights computed in fp32 (`Target.computed_in`), plus how
            far apart the two are (features, the target's top-1 next token);
  training: one sequence's loss + backward (the shipped drafter's recipe: block 8, distillation),
            bf16 autocast vs fp32, on a feature cache built from those sequences.
What `train-drafter` does by itself: fp32 arithmetic wherever `models.native_bf16` is false.
Reported as tokens/s or sequences/s and as ratios, measured side by side in one run.

    python benchmarks/cpu_bf16.py --sequences 48 --name session25/cpu_bf16
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import write_results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sequences", type=int, default=48, help="sequences of the committed pack (chunks of 8)")
    ap.add_argument("--name", default="cpu_bf16", help="results name under benchmarks/results/")
    args = ap.parse_args()

    import torch
    from tqdm import tqdm

    import quanttree
    from quanttree.models import native_bf16
    from quanttree.train.features import build_cache, target_outputs
    from quanttree.train.pipeline import packed_data_file
    from quanttree.train.trainer import TrainConfig, Trainer

    engine = quanttree.load("smollm2-135m", quant="bf16", device="cpu", drafter=None, corpus=None)
    target = engine.target
    shipped = Path(quanttree.__file__).parent / "drafters" / "smollm2-135m"
    layers = tuple(json.loads((shipped / "config.json").read_text())["dflash_config"]["target_layer_ids"])
    with np.load(packed_data_file("smollm2-135m", "bf16")) as z:
        offsets, tokens, plens, pidx = z["offsets"], z["tokens"], z["prompt_lens"], z["pool_index"]
    seqs = [(tokens[offsets[i]:offsets[i + 1]].astype(np.int32), int(plens[i]), int(pidx[i]))
            for i in range(args.sequences)]
    chunks = [list(range(s, min(s + 8, len(seqs)))) for s in range(0, len(seqs), 8)]
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    arms = ("bf16", "fp32")

    # features: the target's pass, bf16 arithmetic vs fp32 arithmetic on the same weights
    seconds = {a: 0.0 for a in arms}
    outputs: dict[str, list] = {a: [] for a in arms}
    with torch.inference_mode():
        with target.computed_in(torch.float32):
            target_outputs(target, [seqs[0][0][:64]], layers, 32)  # warm up both
        target_outputs(target, [seqs[0][0][:64]], layers, 32)
        for c, chunk in enumerate(tqdm(chunks, desc="features")):
            for arm in arms[c % 2:] + arms[:c % 2]:
                with target.computed_in(dtypes[arm]):
                    t0 = time.perf_counter()
                    out = target_outputs(target, [seqs[i][0] for i in chunk], layers, 32)
                    seconds[arm] += time.perf_counter() - t0
                outputs[arm] += out
    total = sum(len(s[0]) for s in seqs)
    f16 = torch.cat([o[0] for o in outputs["bf16"]]).float()
    f32 = torch.cat([o[0] for o in outputs["fp32"]]).float()
    top1 = float((torch.cat([o[1][:, 0] for o in outputs["bf16"]]) ==
                  torch.cat([o[1][:, 0] for o in outputs["fp32"]])).float().mean())
    rel = float((f16 - f32).norm() / f32.norm())
    rows = [{"stage": "features", "arm": a, "tokens": total, "seconds": round(seconds[a], 2),
             "per_s": round(total / seconds[a], 1), "vs_bf16": round(seconds["bf16"] / seconds[a], 2)} for a in arms]

    # training: one sequence's loss + backward, bf16 autocast vs fp32
    with tempfile.TemporaryDirectory() as tmp:
        with target.computed_in(torch.float32):
            cache = build_cache(target, seqs, Path(tmp) / "features", layers, 32, log=lambda *_: None)
        trainers = {a: Trainer(target, cache, TrainConfig(init_from=str(shipped), block_size=8, gamma=4.0,
                                                          distill=1.0, bf16_autocast=(a == "bf16")),
                               Path(tmp) / a, log=lambda *_: None) for a in arms}
        seconds = {a: 0.0 for a in arms}
        ids = trainers["bf16"].train_ids
        for c, chunk in enumerate(tqdm([ids[s:s + 4] for s in range(0, len(ids), 4)], desc="training")):
            for arm in arms[c % 2:] + arms[:c % 2]:
                trainer = trainers[arm]
                t0 = time.perf_counter()
                for i in chunk:
                    part = trainer.sequence_loss(i, torch.Generator().manual_seed(i))
                    if part is not None:
                        (part[0] / part[1]).backward()
                seconds[arm] += time.perf_counter() - t0
        rows += [{"stage": "training", "arm": a, "sequences": len(ids), "seconds": round(seconds[a], 2),
                  "per_s": round(len(ids) / seconds[a], 2), "vs_bf16": round(seconds["bf16"] / seconds[a], 2)}
                 for a in arms]

    table = ("| stage | arithmetic | rate | vs bf16 |\n|---|---|---|---|\n"
             + "".join(f"| {r['stage']} | {r['arm']} | {r['per_s']} "
                       f"{'tokens/s' if r['stage'] == 'features' else 'sequences/s (loss + backward)'} | "
                       f"{r['vs_bf16']:.2f}x |\n" for r in rows)
             + f"\nThis CPU computes bf16 natively: {native_bf16(torch.device('cpu'))}. {len(seqs)} sequences "
               f"({total} tokens) of the committed pack, SmolLM2-135M bf16 weights, layers {list(layers)}, "
               f"top-32 labels; training: the shipped drafter, block 8, distillation, 64 anchors per sequence. "
               f"fp32 vs bf16 arithmetic: features differ by {rel:.4f} (relative norm), the target's top-1 "
               f"next token agrees at {top1:.4f} of positions.\n")
    rows.append({"features_relative_difference": rel, "top1_agreement": top1})
    print(table)
    write_results(args.name, "python benchmarks/cpu_bf16.py " + " ".join(sys.argv[1:]), table, rows)


if __name__ == "__main__":
    main()
