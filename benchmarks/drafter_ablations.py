"""Drafter recipe ablations: learning curves at equal training time on the cached target features.

Each arm changes one thing from the base recipe (the one that trained the first shipped drafter)
and trains for --minutes of training time (evaluation excluded), logging held-out slot-1
accuracy and teacher-forced chain tau every --eval-minutes. Arms run in --workers processes of
one thread each (arms that share the machine are then timed alike). Resumable: a finished arm is
skipped, an unfinished one resumes from its checkpoint.

    python benchmarks/drafter_ablations.py --minutes 8 --workers 2
    python benchmarks/drafter_ablations.py --study data --minutes 20 --cache WORK/features

Writes benchmarks/results/drafter_ablations.{jsonl,md,png} (--study data:
drafter_data_study.*). Needs the feature cache (`quanttree train-drafter --stage features`;
for the data study, with `--stage text` run before it).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, machine  # noqa: E402

BASE = dict(feature_layers=(1, 10, 18, 27), init="target", distill=0.0, lr=6e-4, anchors=64, seqs_per_step=4,
            gamma=7.0, block_size=16)
ARMS = {
    "base (shipped recipe)": {},
    "+ last target layer (29)": {"feature_layers": (1, 10, 18, 27, 29)},
    "random init": {"init": "random"},
    "fc init scaled per feature dim": {"fc_init": "scaled"},
    "distillation (top-32 soft labels)": {"distill": 1.0},
    "lr 2e-3": {"lr": 2e-3},
    "256 anchors x 1 sequence": {"anchors": 256, "seqs_per_step": 1},
    "block 8": {"block_size": 8, "gamma": 4.0},
}
# --study data: what the training data adds, continuing the shipped drafter with its own recipe
DATA_BASE = dict(init_from="quanttree/drafters/smollm2-135m", distill=1.0, lr=3e-4, anchors=64, seqs_per_step=4,
                 gamma=4.0, block_size=8)
DATA_ARMS = {
    "the target's answers only": {"scored_text": False},
    "+ scored standard-library source": {},
}
STUDIES = {"recipe": (BASE, ARMS), "data": (DATA_BASE, DATA_ARMS)}


def run_arm(name: str, change: dict, minutes: float, eval_minutes: float, work: Path, out: Path,
            base: dict, cache_dir: Path) -> None:
    import torch

    import quanttree
    from quanttree.train.features import open_cache
    from quanttree.train.trainer import TrainConfig, Trainer

    torch.set_num_threads(1)
    engine = quanttree.load("smollm2-135m", quant="bf16", drafter=None)
    cache = open_cache(cache_dir)
    # constant lr after a 50-step warm-up (the cosine is far from its end): arms compare at equal time
    cfg = TrainConfig(**{**base, **change, "steps": 100_000, "warmup": 0.0005, "eval_every": 10**9,
                         "eval_minutes": eval_minutes, "ckpt_every": 25, "eval_seqs": 40})
    slug = "".join(c if c.isalnum() else "-" for c in name).strip("-")
    log_lines = []

    def log(msg: str) -> None:
        log_lines.append(msg)
        if msg.startswith("eval "):
            with open(out, "a") as f:
                f.write(json.dumps({"arm": name, **json.loads(msg[5:])}) + "\n")

    trainer = Trainer(engine.target, cache, cfg, work / slug, log, engine.eos_token_ids)
    trainer.resume()
    if trainer.minutes >= minutes:
        return
    if trainer.step == 0:
        trainer.report(trainer.evaluate())
    trainer.train(minutes=minutes - trainer.minutes)
    trainer.report(trainer.evaluate())


def summarize(out: Path, about: str) -> None:
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    arms: dict[str, list[dict]] = {}
    for r in rows:
        arms.setdefault(r["arm"], []).append(r)
    lines = ["# Drafter ablations: equal training time, held-out teacher-forced", "",
             f"`python benchmarks/drafter_ablations.py {' '.join(sys.argv[1:])}` on {machine()['date']}, one thread "
             f"per arm, SmolLM2-135M-Instruct bf16 features (cached); {about}", "",
             "| arm | steps | minutes | slot-1 accuracy | chain tau | slot-1 bigram / trigram / lookup |",
             "|---|---|---|---|---|---|"]
    for name, curve in arms.items():
        last = max(curve, key=lambda r: r["minutes"])
        lines.append(f"| {name} | {last['step']} | {last['minutes']:.1f} | {last['slot1']:.3f} | "
                     f"{last['chain_tau']:.3f} | {last.get('bigram_slot1')} / {last.get('trigram_slot1')} / "
                     f"{last.get('lookup_slot1')} |")
    (out.with_suffix(".md")).write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, curve in arms.items():
        curve = sorted(curve, key=lambda r: r["minutes"])
        for ax, key in zip(axes, ("slot1", "chain_tau")):
            ax.plot([r["minutes"] for r in curve], [r[key] for r in curve], marker=".", label=name)
    for ax, title in zip(axes, ("held-out slot-1 accuracy", "held-out teacher-forced chain tau")):
        ax.set_xlabel("training minutes (1 thread)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    any_curve = next(iter(arms.values()))
    axes[0].axhline(any_curve[0].get("bigram_slot1", 0), color="gray", ls="--", lw=1, label="bigram table")
    axes[0].axhline(any_curve[0].get("lookup_slot1", 0), color="gray", ls=":", lw=1, label="2-token lookup")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=8.0)
    ap.add_argument("--eval-minutes", type=float, default=2.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--study", default="recipe", choices=sorted(STUDIES),
                    help="recipe: one change each from the first drafter's recipe; data: the shipped drafter "
                         "continued on its answers alone or with scored text too")
    ap.add_argument("--arms", default=None, help="comma-separated arm names (default all)")
    ap.add_argument("--cache", default=None, help="feature cache dir (default: the train-drafter work dir's)")
    ap.add_argument("--work", default=str(Path.home() / ".cache/quanttree/train/ablations"))
    args = ap.parse_args()
    from quanttree.train.pipeline import default_work_dir

    base, arms = STUDIES[args.study]
    cache_dir = Path(args.cache) if args.cache else default_work_dir("smollm2-135m", "bf16") / "features"
    out = RESULTS / ("drafter_ablations.jsonl" if args.study == "recipe" else f"drafter_{args.study}_study.jsonl")
    names = args.arms.split(",") if args.arms else list(arms)
    jobs = [(n, arms[n], args.minutes, args.eval_minutes, Path(args.work) / args.study, out, base, cache_dir)
            for n in names]
    with mp.get_context("spawn").Pool(args.workers) as pool:
        pool.starmap(run_arm, jobs, chunksize=1)
    summarize(out, "each arm changes one thing from the first drafter's recipe." if args.study == "recipe" else
              "each arm continues the shipped drafter with its recipe (block 8, distillation, lr 3e-4) on other data; "
              "held-out blocks are the target's answers in both.")


if __name__ == "__main__":
    main()
