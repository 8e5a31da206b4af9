"""`quanttree train-drafter`: data generation, then training, then export; each stage resumable."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import QuanttreeError
from ..models import cache_dir


@dataclass(frozen=True)
class TrainPaths:
    work: Path

    @property
    def data(self) -> Path:
        return self.work / "data"

    @property
    def checkpoints(self) -> Path:
        return self.work / "checkpoints"

    @property
    def log(self) -> Path:
        return self.work / "train.log"


def default_work_dir(target: str, quant: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in target.strip("/"))[-60:]
    return cache_dir() / "train" / f"{safe}-{quant}"


def logger(paths: TrainPaths):
    paths.work.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        from tqdm import tqdm

        tqdm.write(msg)
        with open(paths.log, "a") as f:
            f.write(msg + "\n")
    return log


REPO_DATA = Path(__file__).resolve().parents[2] / "data"  # packed training sets committed to the repo


def packed_data_file(target: str, quant: str) -> Path:
    return REPO_DATA / f"{target}-{quant}.npz"


def run_data_stage(engine, paths: TrainPaths, token_goal: int, gen_cfg=None, seed: int = 0) -> int:
    """Generate target responses for the prompt pool until token_goal response tokens exist.

    A packed copy committed under data/ for this target and quant mode is unpacked first, so a
    fresh machine continues from it instead of regenerating."""
    from .datagen import GenConfig, generate_dataset, unpack_dataset
    from .prompts import build_pool

    packed = packed_data_file(engine.loaded.source, engine.quant)
    if packed.exists() and not any(paths.data.glob("shard-*.npz")):
        logger(paths)(f"data: unpacking {unpack_dataset(packed, paths.data)} sequences from {packed}")

    if engine.tokenizer is None or not getattr(engine.tokenizer, "chat_template", None):
        raise QuanttreeError("train-drafter needs a chat model with a chat template to regenerate responses")
    pool = build_pool(seed)
    log = logger(paths)
    meta = paths.work / "data.json"
    if not meta.exists():
        meta.write_text(json.dumps({"target": engine.loaded.source, "quant": engine.quant, "pool": len(pool),
                                    "seed": seed}, indent=2))
    log(f"data: {len(pool)} prompts in the pool, goal {token_goal} response tokens, into {paths.data}")
    return generate_dataset(engine.target, engine.tokenizer, pool, paths.data, gen_cfg or GenConfig(),
                            engine.eos_token_ids, token_goal, log)


def run_train_stage(engine, paths: TrainPaths, cfg, out: Path, minutes: float | None = None,
                    checkpoints: str = "checkpoints") -> Path:
    """Train (resuming from the last checkpoint) and export the drafter to `out`."""
    from .datagen import load_shards
    from .trainer import Trainer

    sequences = load_shards(paths.data)
    if not sequences:
        raise QuanttreeError(f"no training data in {paths.data}: run `quanttree train-drafter --stage data` first")
    log = logger(paths)
    log(f"train: {len(sequences)} sequences from {paths.data}")
    trainer = Trainer(engine.target, sequences, cfg, paths.work / checkpoints, log, engine.eos_token_ids)
    trainer.train(minutes)
    exported = trainer.export(out)
    (Path(out) / "training.json").write_text(json.dumps(
        {"step": trainer.step, "sequences": len(sequences), "last_eval": trainer.evaluate()}, indent=2))
    log(f"exported drafter at step {trainer.step} to {out}")
    return exported
