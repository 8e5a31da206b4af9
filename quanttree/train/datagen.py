"""Target-regenerated training data: batched greedy generation, resumable, stored as token ids.

Layout under the data dir: shard-NNNNN.npz files, each holding for a chunk of prompts the
concatenated token ids (prompt + response), per-sequence offsets, prompt lengths and the
pool indices they came from. A run that is killed resumes at the first missing shard.

Round 0 is the target's greedy response to each prompt (what greedy decoding will meet). Rounds
1, 2, ... add one sampled response per training prompt (shard-rR-NNNNN.npz, seeded per round and
shard): more text from the target's own distribution on the same prompts, which distillation
turns into labels as well as greedy text. Held-out prompts get no sampled responses, so the
held-out set stays the greedy responses it always was.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import kvcache
from ..errors import QuanttreeError
from ..sampling import SamplingParams, select_tokens
from ..target import Target

HELDOUT_EVERY = 50  # every 50th pool prompt is held out for evaluation (by pool index: stable as data grows)


TEXT_ROUND = -1  # shard-text-NNNNN: scored text (code_text.py)


def is_scored_text(pool_index: int) -> bool:
    """Scored text (code_text.py) carries negative pool indices: not the target's answers, never held out."""
    return int(pool_index) < 0


def is_held_out(pool_index: int) -> bool:
    return not is_scored_text(pool_index) and int(pool_index) % HELDOUT_EVERY == 0


@dataclass(frozen=True)
class GenConfig:
    max_new_tokens: int = 320
    batch_size: int = 64
    chunk: int = 128  # prompts per shard
    max_prompt_tokens: int = 384
    round: int = 0  # 0: greedy responses; r >= 1: the r-th sampled response per training prompt
    temperature: float = 0.8  # sampled rounds only
    top_p: float = 0.95
    prompts: tuple[int, int] | None = None  # pool indices [start, end) to cover (None: the whole pool)
    seed: int = 0

    def __post_init__(self):
        if self.round < 0:
            raise QuanttreeError(f"--round must be >= 0 (0 = greedy responses), got {self.round}")
        if self.round and self.temperature <= 0:
            raise QuanttreeError("a sampled round (--round >= 1) needs --temperature > 0")
        if self.prompts is not None and not 0 <= self.prompts[0] < self.prompts[1]:
            raise QuanttreeError(f"--prompt-range must be START:END with 0 <= START < END, got {self.prompts}")

    def sampling(self, shard: int) -> tuple[SamplingParams, torch.Generator | None]:
        """Greedy for round 0; else a generator seeded by (seed, round, shard): a resumed run
        regenerates a missing shard with the same draws."""
        if self.round == 0:
            return SamplingParams(), None
        gen = torch.Generator()
        gen.manual_seed((self.seed * 1_000_003 + self.round) * 1_000_003 + shard)
        return SamplingParams(temperature=self.temperature, top_p=self.top_p), gen


def encode_chat(tokenizer, prompt: str) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@torch.inference_mode()
def generate_batch(target: Target, prompts: list[list[int]], max_new_tokens: int, eos: frozenset[int],
                   pad_id: int, params: SamplingParams = SamplingParams(),
                   generator: torch.Generator | None = None) -> list[list[int]]:
    """Responses (greedy, or sampled with `params`) for a batch of prompt ids (left-padded, KV
    cache, finished rows dropped). transformers' own attention: exact mode's per-row path is for
    speculation, and would make batched generation ~10x slower for no benefit to the data."""
    with target.stock_attention():
        return _generate_batch(target, prompts, max_new_tokens, eos, pad_id, params, generator)


def _generate_batch(target: Target, prompts: list[list[int]], max_new_tokens: int, eos: frozenset[int],
                    pad_id: int, params: SamplingParams, generator: torch.Generator | None) -> list[list[int]]:
    device = target.device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = kvcache.new_target_cache(target.model)
    out = target.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                       logits_to_keep=1, **{target.cache_arg: cache})
    nxt = select_tokens(out.logits[:, -1], params, generator).to(device)
    responses: list[list[int]] = [[] for _ in prompts]
    rows = torch.arange(len(prompts), device=device)  # which original prompt each batch row is
    last_pos = positions[:, -1]
    eos_t = torch.tensor(sorted(eos), device=device)
    for step in range(max_new_tokens):
        for r, tok in zip(rows.tolist(), nxt.tolist()):
            responses[r].append(tok)
        done = torch.isin(nxt, eos_t)
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        if bool(done.any()):  # drop finished rows from the batch and the cache
            keep = (~done).nonzero().squeeze(-1)
            kvcache.select_rows(cache, keep)
            rows, nxt, mask, last_pos = rows[keep], nxt[keep], mask[keep], last_pos[keep]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
        last_pos = last_pos + 1
        out = target.model(input_ids=nxt[:, None], attention_mask=mask, position_ids=last_pos[:, None],
                           use_cache=True, **{target.cache_arg: cache})
        nxt = select_tokens(out.logits[:, -1], params, generator).to(device)
    return responses


def shard_path(data_dir: Path, index: int, round: int = 0) -> Path:
    return data_dir / (f"shard-{index:05d}.npz" if round == 0 else f"shard-r{round}-{index:05d}.npz")


def shard_prompts(index: int, pool_size: int, cfg: GenConfig) -> list[int]:
    """Pool indices shard `index` of round cfg.round covers (sampled rounds skip held-out prompts)."""
    lo, hi = cfg.prompts or (0, pool_size)
    return [i for i in range(index * cfg.chunk, min((index + 1) * cfg.chunk, pool_size))
            if lo <= i < hi and not (cfg.round and is_held_out(i))]


def write_shard(path: Path, sequences: list[list[int]], prompt_lens: list[int], pool_index: list[int]) -> None:
    lengths = np.array([len(s) for s in sequences], dtype=np.int64)
    offsets = np.concatenate([[0], lengths.cumsum()])
    tokens = np.concatenate([np.asarray(s, dtype=np.int32) for s in sequences])
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.partial")
    os.close(fd)
    with open(tmp, "wb") as f:
        np.savez_compressed(f, tokens=tokens, offsets=offsets, prompt_lens=np.array(prompt_lens),
                            pool_index=np.array(pool_index))
    os.replace(tmp, path)  # atomic: a killed run never leaves a broken shard


def generate_dataset(target: Target, tokenizer, pool: list[str], data_dir: Path, cfg: GenConfig,
                     eos: frozenset[int], token_goal: int | None = None, log=print) -> int:
    """Fill data_dir shard by shard (of round cfg.round, within cfg.prompts) until the pool or the
    token goal is exhausted; resumable."""
    from tqdm import tqdm

    data_dir.mkdir(parents=True, exist_ok=True)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos)
    shards = range((len(pool) + cfg.chunk - 1) // cfg.chunk)
    total = count_tokens(data_dir)
    bar = tqdm(total=token_goal, initial=total, unit="tok", desc="generating", smoothing=0.05)
    for index in shards:
        if token_goal is not None and total >= token_goal:
            break
        path = shard_path(data_dir, index, cfg.round)
        chunk = shard_prompts(index, len(pool), cfg)
        if path.exists() or not chunk:
            continue
        params, generator = cfg.sampling(index)
        encoded = [encode_chat(tokenizer, pool[i])[: cfg.max_prompt_tokens] for i in chunk]
        order = sorted(range(len(chunk)), key=lambda j: len(encoded[j]))  # similar lengths batch together
        sequences, prompt_lens, pool_index = [], [], []
        t0 = time.perf_counter()
        for b in range(0, len(order), cfg.batch_size):
            batch = order[b: b + cfg.batch_size]
            responses = generate_batch(target, [encoded[j] for j in batch], cfg.max_new_tokens, eos, pad_id,
                                       params, generator)
            for j, resp in zip(batch, responses):
                sequences.append(encoded[j] + resp)
                prompt_lens.append(len(encoded[j]))
                pool_index.append(chunk[j])
        write_shard(path, sequences, prompt_lens, pool_index)
        made = sum(len(s) - p for s, p in zip(sequences, prompt_lens))
        total += made
        bar.update(made)
        log(f"{path.name}: {len(chunk)} prompts, {made} response tokens in {time.perf_counter() - t0:.0f}s")
    bar.close()
    return total


def shard_round(path: Path) -> int:
    """The round a shard file belongs to (shard-NNNNN: 0, shard-rR-NNNNN: R, shard-text-NNNNN: TEXT_ROUND)."""
    parts = path.stem.split("-")
    if len(parts) == 2:
        return 0
    return TEXT_ROUND if parts[1] == "text" else int(parts[1][1:])


def select_shards(files: list[Path], spec: str | None) -> list[Path]:
    """The shard files a selection names, in name order. `spec` is comma-separated terms
    NAME or NAME[START:STOP:STEP]: NAME is `answers` (the target's responses, every round),
    `text` (scored text) or a glob on file names; the slice counts positions among the files
    NAME matches, in name order (`answers[1::3]`: every third answer shard from the second;
    `text[154:176]`: scored-text shards 154-175). None or "" selects every file."""
    from fnmatch import fnmatch

    files = sorted(files)
    if not spec:
        return files
    chosen = set()
    for term in (t.strip() for t in spec.split(",") if t.strip()):
        name, _, rest = term.partition("[")
        if rest and not rest.endswith("]"):
            raise QuanttreeError(f"--shards term {term!r}: write NAME or NAME[START:STOP:STEP], e.g. answers[0::3]")
        if name == "answers":
            matched = [f for f in files if shard_round(f) != TEXT_ROUND]
        elif name == "text":
            matched = [f for f in files if shard_round(f) == TEXT_ROUND]
        else:
            matched = [f for f in files if fnmatch(f.name, name)]
        try:
            picked = matched[slice(*[int(b) if b.strip() else None for b in rest[:-1].split(":")])] \
                if rest else matched
        except (ValueError, TypeError) as exc:
            raise QuanttreeError(f"--shards term {term!r}: the slice must be START:STOP:STEP integers "
                                 f"(any may be empty), e.g. text[154:176] ({exc})") from None
        if not picked:
            raise QuanttreeError(f"--shards term {term!r} selects no shard file (of {len(matched)} that "
                                 f"{name!r} matches): check the name and the range")
        chosen.update(picked)
    return sorted(chosen)


def _read_shards(data_dir: Path, spec: str | None = None) -> list[tuple[np.ndarray, int, int, int]]:
    """(token ids, prompt length, pool index, round) of every sequence of the selected shards
    (`select_shards`; all by default), shards in name order."""
    out = []
    for path in select_shards(list(data_dir.glob("shard-*.npz")), spec):
        rnd = shard_round(path)
        with np.load(path) as z:
            tokens, offsets = z["tokens"], z["offsets"]
            for i, (plen, pidx) in enumerate(zip(z["prompt_lens"], z["pool_index"])):
                out.append((tokens[offsets[i]:offsets[i + 1]], int(plen), int(pidx), rnd))
    return out


def load_shards(data_dir: Path, spec: str | None = None) -> list[tuple[np.ndarray, int, int]]:
    """The sequences of the selected shards (all by default) as (token ids, prompt length, pool index)."""
    return [s[:3] for s in _read_shards(data_dir, spec)]


def count_tokens(data_dir: Path) -> int:
    """Response tokens the target generated in data_dir (scored text not counted)."""
    if not data_dir.exists():
        return 0
    return sum(len(t) - p for t, p, i in load_shards(data_dir) if not is_scored_text(i))


def pack_dataset(data_dir: Path, out: Path) -> Path:
    """The target's responses (every round's shards, not scored text, which the text stage
    regenerates) as one compressed file of token ids (uint16 when the vocabulary allows)."""
    seqs = [s for s in _read_shards(data_dir) if not is_scored_text(s[2])]
    tokens = np.concatenate([s[0] for s in seqs])
    dtype = np.uint16 if tokens.max() < 65536 else np.int32
    offsets = np.concatenate([[0], np.cumsum([len(s[0]) for s in seqs])])
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, tokens=tokens.astype(dtype), offsets=offsets,
                        prompt_lens=np.array([s[1] for s in seqs]), pool_index=np.array([s[2] for s in seqs]),
                        rounds=np.array([s[3] for s in seqs]))
    return out


def unpack_dataset(packed: Path, data_dir: Path, chunk: int = 128) -> int:
    """Restore shards from a packed file (a fresh machine skips hours of generation)."""
    with np.load(packed) as z:
        tokens, offsets = z["tokens"].astype(np.int32), z["offsets"]
        plens, pidx = z["prompt_lens"], z["pool_index"]
        rounds = z["rounds"] if "rounds" in z.files else np.zeros(len(pidx), dtype=np.int64)
    data_dir.mkdir(parents=True, exist_ok=True)
    order = np.lexsort((pidx, rounds))  # by round, then pool index (stable)
    by_shard: dict[tuple[int, int], list[int]] = {}
    for i in order:
        by_shard.setdefault((int(rounds[i]), int(pidx[i]) // chunk), []).append(int(i))
    for (rnd, index), rows in by_shard.items():
        path = shard_path(data_dir, index, rnd)
        if not path.exists():
            write_shard(path, [tokens[offsets[i]:offsets[i + 1]].tolist() for i in rows],
                        [int(plens[i]) for i in rows], [int(pidx[i]) for i in rows])
    return len(order)
