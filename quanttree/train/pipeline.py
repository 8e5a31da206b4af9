"""`quanttree train-drafter`: data generation, then training, then export; each stage resumable."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
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
    def self_prompts(self) -> Path:
        return self.work / "self_prompts"

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


PACKED_DATA = Path(__file__).resolve().parents[1] / "data" / "train"  # packed training sets (package data)


def packed_data_file(target: str, quant: str) -> Path:
    return PACKED_DATA / f"{target}-{quant}.npz"


def packed_prompts_file(target: str, quant: str) -> Path:
    return PACKED_DATA / f"{target}-{quant}-prompts.json"


def self_written_prompts(engine, paths: TrainPaths) -> list[str]:
    """The target's self-written prompts so far (a committed pack is unpacked first); [] if none."""
    from .self_prompts import collect, unpack_prompts

    packed = packed_prompts_file(engine.loaded.source, engine.quant)
    if packed.exists() and not any(paths.self_prompts.glob("prompts-*.json")):
        logger(paths)(f"prompts: unpacking {unpack_prompts(packed, paths.self_prompts)} chunks from {packed}")
    return collect(paths.self_prompts) if paths.self_prompts.exists() else []


def run_prompts_stage(engine, paths: TrainPaths, cfg=None) -> list[str]:
    """The target writes user requests itself (self_prompts.py) until cfg.goal are kept; resumable."""
    from .self_prompts import SelfPromptConfig, generate_self_prompts

    self_written_prompts(engine, paths)  # continue after a committed pack's chunks
    return generate_self_prompts(engine.target, engine.tokenizer, engine.eos_token_ids, paths.self_prompts,
                                 cfg or SelfPromptConfig(), logger(paths))


def run_text_stage(engine, paths: TrainPaths, token_goal: int) -> int:
    """Scored text (code_text.py): documented functions of the standard library, then of the
    installed packages in code_text.PACKAGES, as answered requests, written as data shards in
    minutes; the feature stage then scores them with the target."""
    from .code_text import write_text_shards

    unpack_committed_data(engine, paths)
    if engine.tokenizer is None or not getattr(engine.tokenizer, "chat_template", None):
        raise QuanttreeError("scored text needs a chat model with a chat template")
    return write_text_shards(engine.tokenizer, paths.data, engine.eos_token_ids, token_goal, log=logger(paths))


def unpack_committed_data(engine, paths: TrainPaths) -> None:
    """Restore the data set packed under quanttree/data/train/ for this target and quant mode into an empty work dir,
    so a fresh machine continues from it (whichever stage it runs first) instead of regenerating."""
    from .datagen import unpack_dataset

    packed = packed_data_file(engine.loaded.source, engine.quant)
    if packed.exists() and not any(paths.data.glob("shard-*.npz")):
        logger(paths)(f"data: unpacking {unpack_dataset(packed, paths.data)} sequences from {packed}")


def run_data_stage(engine, paths: TrainPaths, token_goal: int, gen_cfg=None, seed: int = 0) -> int:
    """Generate target responses for the prompt pool until token_goal response tokens exist
    (after unpacking the committed copy, if there is one)."""
    from .code_text import completion_requests, text_sources
    from .datagen import GenConfig, generate_dataset
    from .prompts import build_pool, with_self_written

    unpack_committed_data(engine, paths)
    if engine.tokenizer is None or not getattr(engine.tokenizer, "chat_template", None):
        raise QuanttreeError("train-drafter needs a chat model with a chat template to regenerate responses")
    built_in = build_pool(seed)
    pool = with_self_written(built_in, self_written_prompts(engine, paths))
    log = logger(paths)
    if len(pool) > len(built_in):
        log(f"data: pool indices {len(built_in)}:{len(pool)} hold the target's self-written prompts "
            "(--prompt-range START:END to generate for them alone)")
    chunk = (gen_cfg or GenConfig()).chunk
    for kind, section in zip(("public", "private"), completion_requests(tuple(text_sources())), strict=True):
        written = len(pool)
        pool = with_self_written(pool, list(section))
        first = -(-written // chunk) * chunk  # its first shard of its own
        log(f"data: pool indices {written}:{len(pool)} hold requests to complete documented {kind} Python "
            f"functions (--prompt-range {first}:{len(pool)}: the shards they do not share with earlier prompts)")
    meta = paths.work / "data.json"
    if not meta.exists():
        meta.write_text(json.dumps({"target": engine.loaded.source, "quant": engine.quant, "pool": len(pool),
                                    "seed": seed}, indent=2))
    log(f"data: {len(pool)} prompts in the pool, goal {token_goal} response tokens, into {paths.data}")
    return generate_dataset(engine.target, engine.tokenizer, pool, paths.data, gen_cfg or GenConfig(),
                            engine.eos_token_ids, token_goal, log)


def training_layers(target, cfg) -> tuple[int, ...]:
    """The target layers a drafter trained with `cfg` reads (what the feature cache must hold)."""
    import json as _json

    from ..drafter import default_target_layer_ids

    if cfg.init_from:
        return tuple(_json.loads((Path(cfg.init_from) / "config.json").read_text())["dflash_config"]
                     ["target_layer_ids"])
    if cfg.feature_layers:
        return tuple(cfg.feature_layers)
    return default_target_layer_ids(target.num_layers, cfg.num_features)


def shard_selection(where: Path, shards: str | None) -> str | None:
    """The --shards selection a feature cache is built from: the one given (then recorded beside
    the cache), else the one recorded when it was built, else None (every data shard)."""
    record = where / "shards.json"
    if shards:
        where.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps({"shards": shards}))
        return shards
    return json.loads(record.read_text())["shards"] if record.exists() else None


def feature_dtype(target, free_bytes: int | None = None):
    """The arithmetic the feature stage runs the target in: a 16-bit target on a CPU without native
    bf16 (emulated there: the forward is 5.6x slower than fp32 on an AVX2 Zen 3) computes in fp32
    from the same weights, when the fp32 copy fits in free memory with room to spare; otherwise as
    loaded."""
    import torch

    from ..models import native_bf16

    if target.device.type != "cpu" or target.dtype not in (torch.bfloat16, torch.float16) \
            or native_bf16(target.device):
        return target.dtype
    if free_bytes is None:
        import psutil

        free_bytes = psutil.virtual_memory().available
    extra = sum(p.numel() for p in target.model.parameters() if p.dtype == target.dtype) * 2  # 2 -> 4 bytes
    return torch.float32 if 2 * extra < free_bytes else target.dtype


def run_features_stage(engine, paths: TrainPaths, layers: tuple[int, ...], top_k: int = 32,
                       shards: str | None = None):
    """Target features + top-k soft labels of the training sequences of the selected data shards
    (`datagen.select_shards`; a cache remembers its selection), cached once (resumable).
    A finished cache that holds these layers (and maybe more) is reused as it is."""
    from .datagen import load_shards
    from .features import build_cache, open_cache, order_like_cache

    where = paths.work / "features"
    unpack_committed_data(engine, paths)  # a fresh work dir starts from the committed data pack
    spec = shard_selection(where, shards)
    if spec:
        logger(paths)(f"features: data shards {spec}")
    sequences = order_like_cache(where, load_shards(paths.data, spec))
    if (where / "meta.json").exists():
        cache = open_cache(where)
        if len(cache) == len(cache.pool_index) == (len(sequences) or len(cache)) and set(layers) <= set(cache.layers):
            return cache
        missing = sorted(set(layers) - set(cache.layers))
        if missing:
            raise QuanttreeError(
                f"{where} caches target layers {list(cache.layers)}, but the drafter trained here reads "
                f"{sorted(layers)} (layers {missing} are not cached). Every stage takes the drafter's layers from "
                f"--init-from or --feature-layers (else the default spread): give the features stage the same "
                f"options as the train stage, or delete {where} to rebuild it")
        layers = tuple(cache.layers)
    if not sequences:
        raise QuanttreeError(f"no training data in {paths.data}: run `quanttree train-drafter --stage data` first")
    identity = {"target": engine.loaded.source, "quant": engine.quant}
    dtype = feature_dtype(engine.target)
    if dtype != engine.target.dtype:
        logger(paths)(f"features: {engine.quant} weights computed in {str(dtype).split('.')[-1]}: this CPU has no "
                      "native bf16 (same weights, ~5x faster on an AVX2 CPU)")
    try:
        with engine.target.computed_in(dtype):
            return build_cache(engine.target, sequences, where, tuple(layers), top_k, identity, log=logger(paths))
    except ValueError as exc:
        raise QuanttreeError(str(exc)) from exc


def run_train_stage(engine, paths: TrainPaths, cfg, out: Path, minutes: float | None = None,
                    checkpoints: str = "checkpoints", for_engines: bool = False, shards: str | None = None) -> Path:
    """Train (resuming from the last checkpoint) on the cached features and export the drafter to `out`."""
    from .trainer import Trainer

    cache = run_features_stage(engine, paths, training_layers(engine.target, cfg), shards=shards)
    log = logger(paths)
    log(f"train: {len(cache)} sequences, features of target layers {list(cache.layers)}")
    try:
        trainer = Trainer(engine.target, cache, cfg, paths.work / checkpoints, log, engine.eos_token_ids)
    except ValueError as exc:
        raise QuanttreeError(str(exc)) from exc
    if for_engines and cfg.mask_token_id is None and not cfg.init_from:
        raise QuanttreeError("--for-engines needs --mask-token-id: other engines take the mask as a vocabulary "
                             "token, not a learned embedding")
    trainer.train(minutes)
    exported = trainer.export(out, for_engines=for_engines)
    (Path(out) / "training.json").write_text(json.dumps(
        {"step": trainer.step, "minutes": round(trainer.minutes, 1), "sequences": len(cache),
         "config": asdict(cfg), "last_eval": trainer.evaluate(), "history": trainer.history}, indent=2))
    from ..plots import plot_learning_curve

    plot_learning_curve(trainer.history, Path(out) / "learning_curve.png")  # beside the weights
    log(f"exported drafter at step {trainer.step} to {out}")
    return exported
