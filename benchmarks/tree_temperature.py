"""Teacher-forced DDTree tau by tree temperature and budget, on a training run's held-out blocks.

A drafter's per-depth marginals each estimate one position alone, while acceptance along a path
is correlated, so a best-first tree over the raw marginals might come out too wide and too
shallow: this builds trees from softmax(logits / T) for several T and walks them along the
held-out target responses (`trainer.tree_tau`). Session 23 found +1-2% tau at T 0.8 here that
did NOT carry over to decoding (`benchmarks/results/session23/README.md`): decoding's rounds
start right after a rejection, where the width at depth 1 the sharpened tree gives up is worth
more than at the uniformly spread positions scored here. So nothing ships a temperature; this
stays to check an idea of the kind before building it. Needs the work dir of a training run
(its feature cache); no timing, but it takes both cores: pause a training job while it runs.

    python benchmarks/tree_temperature.py --drafters quanttree/drafters/smollm2-135m \
        --work WORK --name session23/tree_temperature
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import write_results  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--drafters", required=True, help="comma-separated drafter directories")
    ap.add_argument("--work", required=True, help="the training work dir (holds features/)")
    ap.add_argument("--target", default="smollm2-135m")
    ap.add_argument("--quant", default="bf16", help="the target mode the cache was built in")
    ap.add_argument("--sequences", type=int, default=300, help="held-out sequences (16 blocks each)")
    ap.add_argument("--budgets", default="4,8,16,32")
    ap.add_argument("--temperatures", default="0.6,0.7,0.8,0.9,1.0,1.1")
    ap.add_argument("--name", default="tree_temperature")
    args = ap.parse_args()

    from tqdm import tqdm

    import quanttree
    from quanttree.train.features import open_cache
    from quanttree.train.trainer import TrainConfig, Trainer, tree_tau

    budgets = [int(b) for b in args.budgets.split(",")]
    temps = [float(t) for t in args.temperatures.split(",")]
    engine = quanttree.load(args.target, quant=args.quant, drafter=None)
    cache = open_cache(Path(args.work) / "features")
    rows = []
    for drafter in args.drafters.split(","):
        config = json.loads((Path(drafter) / "config.json").read_text())
        cfg = TrainConfig(block_size=config["block_size"], init_from=drafter, distill=1.0)  # the cache may hold scored text
        trainer = Trainer(engine.target, cache, cfg, Path(args.work) / "tree-temperature-scratch", lambda *_: None,
                          engine.eos_token_ids)
        logits, truth = trainer.held_out_logits(args.sequences)
        for budget in tqdm(budgets, desc=Path(drafter).name, unit="budget"):
            taus = {t: tree_tau(logits, truth, t, budget) for t in temps}
            rows.append({"drafter": Path(drafter).name, "blocks": len(logits), "budget": budget, "tau": taus})
    head = "| drafter | blocks | budget | " + " | ".join(f"T {t}" for t in temps) + " |"
    lines = [head, "|" + "---|" * (3 + len(temps))]
    for r in rows:
        best = max(r["tau"].values())
        cells = [f"**{v:.3f}**" if v == best else f"{v:.3f}" for v in r["tau"].values()]
        lines.append(f"| {r['drafter']} | {r['blocks']} | {r['budget']} | "
                     + " | ".join(cells) + " |")
    table = "\n".join(lines) + ("\n\nTeacher-forced tau (1 + accepted drafted tokens per block) of best-first "
                                "trees built from softmax(logits / T), walked along the held-out target "
                                "responses; bold: the best temperature per row.")
    print(table)
    print(write_results(args.name, "python benchmarks/tree_temperature.py " + " ".join(sys.argv[1:]), table,
                        [{**r, "tau": {str(k): v for k, v in r["tau"].items()}} for r in rows]))


if __name__ == "__main__":
    main()
