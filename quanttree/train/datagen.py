"""Target-regenerated training data: batched greedy generation, resumable, stored as token ids.

Layout under the data dir: shard-NNNNN.npz files, each holding for a chunk of prompts the
concatenated token ids (prompt + response), per-sequence offsets, prompt lengths and the
pool indices they came from. A run that is killed resumes at the first missing shard.
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
from ..target import Target


@dataclass(frozen=True)
class GenConfig:
    max_new_tokens: int = 320
    batch_size: int = 64
    chunk: int = 128  # prompts per shard
    max_prompt_tokens: int = 384


def encode_chat(tokenizer, prompt: str) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@torch.inference_mode()
def generate_batch(target: Target, prompts: list[list[int]], max_new_tokens: int, eos: frozenset[int],
                   pad_id: int) -> list[list[int]]:
    """Greedy responses for a batch of prompt ids (left-padded, KV cache, finished rows dropped).
    transformers' own attention: exact mode's per-row path is for speculation, and would make
    batched generation ~10x slower for no benefit to the data."""
    with target.stock_attention():
        return _generate_batch(target, prompts, max_new_tokens, eos, pad_id)


def _generate_batch(target: Target, prompts: list[list[int]], max_new_tokens: int, eos: frozenset[int],
                    pad_id: int) -> list[list[int]]:
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
    nxt = out.logits[:, -1].argmax(-1)
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
        nxt = out.logits[:, -1].argmax(-1)
    return responses


def shard_path(data_dir: Path, index: int) -> Path:
    return data_dir / f"shard-{index:05d}.npz"


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
    """Fill data_dir shard by shard until the pool or the token goal is exhausted; resumable."""
    from tqdm import tqdm

    data_dir.mkdir(parents=True, exist_ok=True)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos)
    shards = range((len(pool) + cfg.chunk - 1) // cfg.chunk)
    total = count_tokens(data_dir)
    bar = tqdm(total=token_goal, initial=total, unit="tok", desc="generating", smoothing=0.05)
    for index in shards:
        if token_goal is not None and total >= token_goal:
            break
        path = shard_path(data_dir, index)
        if path.exists():
            continue
        chunk = list(range(index * cfg.chunk, min((index + 1) * cfg.chunk, len(pool))))
        encoded = [encode_chat(tokenizer, pool[i])[: cfg.max_prompt_tokens] for i in chunk]
        order = sorted(range(len(chunk)), key=lambda j: len(encoded[j]))  # similar lengths batch together
        sequences, prompt_lens, pool_index = [], [], []
        t0 = time.perf_counter()
        for b in range(0, len(order), cfg.batch_size):
            batch = order[b: b + cfg.batch_size]
            responses = generate_batch(target, [encoded[j] for j in batch], cfg.max_new_tokens, eos, pad_id)
            for j, resp in zip(batch, responses):
                sequences.append(encoded[j] + resp)
                prompt_lens.append(len(encoded[j]))
                pool_index.append(chunk[j])
        write_shard(path, sequences, prompt_lens, pool_index)
        made = sum(len(s) - p for s, p in zip(sequences, prompt_lens))
        total += made
        bar.update(made)
        log(f"shard {index}: {len(chunk)} prompts, {made} response tokens in {time.perf_counter() - t0:.0f}s")
    bar.close()
    return total


def load_shards(data_dir: Path) -> list[tuple[np.ndarray, int, int]]:
    """All sequences as (token ids, prompt length, pool index)."""
    out = []
    for path in sorted(data_dir.glob("shard-*.npz")):
        with np.load(path) as z:
            tokens, offsets = z["tokens"], z["offsets"]
            for i, (plen, pidx) in enumerate(zip(z["prompt_lens"], z["pool_index"])):
                out.append((tokens[offsets[i]:offsets[i + 1]], int(plen), int(pidx)))
    return out


def count_tokens(data_dir: Path) -> int:
    """Response tokens already generated in data_dir."""
    return sum(len(t) - p for t, p, _ in load_shards(data_dir)) if data_dir.exists() else 0


def pack_dataset(data_dir: Path, out: Path) -> Path:
    """All shards as one compressed file of token ids (uint16 when the vocabulary allows)."""
    seqs = load_shards(data_dir)
    tokens = np.concatenate([s[0] for s in seqs])
    dtype = np.uint16 if tokens.max() < 65536 else np.int32
    offsets = np.concatenate([[0], np.cumsum([len(s[0]) for s in seqs])])
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, tokens=tokens.astype(dtype), offsets=offsets,
                        prompt_lens=np.array([s[1] for s in seqs]), pool_index=np.array([s[2] for s in seqs]))
    return out


def unpack_dataset(packed: Path, data_dir: Path, chunk: int = 128) -> int:
    """Restore shards from a packed file (a fresh machine skips hours of generation)."""
    with np.load(packed) as z:
        tokens, offsets = z["tokens"].astype(np.int32), z["offsets"]
        plens, pidx = z["prompt_lens"], z["pool_index"]
    data_dir.mkdir(parents=True, exist_ok=True)
    order = np.argsort(pidx, kind="stable")
    by_shard: dict[int, list[int]] = {}
    for i in order:
        by_shard.setdefault(int(pidx[i]) // chunk, []).append(int(i))
    for index, rows in by_shard.items():
        path = shard_path(data_dir, index)
        if not path.exists():
            write_shard(path, [tokens[offsets[i]:offsets[i + 1]].tolist() for i in rows],
                        [int(plens[i]) for i in rows], [int(pidx[i]) for i in rows])
    return len(order)
