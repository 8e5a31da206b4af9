"""Target features and soft labels computed once and cached on disk.

Training a drafter needs, for every training token, the target's hidden states at a few layers
(the drafter's context) and the target's own next-token distribution (the distillation label).
Computing them inside every training step ran the 135M target again for every step; here one
pass over the data writes them to memory-mapped files, and a training step costs only the
drafter.

Layout of a cache directory (all arrays row-aligned with the concatenated token ids):
  meta.json            target, quant, layers, top-k, sequence count, token count, `done` (sequences written)
  index.npz            offsets [S+1], prompt_lens [S], pool_index [S]
  features.u16         [N, len(layers) * H] bf16 bit patterns (numpy has no bf16; torch views them)
  topk_ids.i32         [N, K] the target's top-K next-token ids at each position
  topk_logp.f16        [N, K] their log-probabilities (full-vocabulary softmax)
The build is resumable: `done` advances after each window of sequences is flushed, so a killed
build loses at most one window.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..target import Target

FORMAT = 1


@dataclass(frozen=True)
class FeatureCache:
    """A finished (or partly built) cache opened for reading."""

    path: Path
    layers: tuple[int, ...]
    hidden: int
    top_k: int
    offsets: np.ndarray
    prompt_lens: np.ndarray
    pool_index: np.ndarray
    tokens: np.ndarray  # [N] int32, the token ids of every sequence, concatenated
    features: np.ndarray  # memmap [N, len(layers) * hidden] uint16 (bf16 bits)
    topk_ids: np.ndarray  # memmap [N, K] int32
    topk_logp: np.ndarray  # memmap [N, K] float16
    done: int

    def __len__(self) -> int:
        return self.done

    def token_ids(self, i: int) -> torch.Tensor:
        """Token ids (prompt + response) of sequence i. [L] long"""
        return torch.from_numpy(self.tokens[int(self.offsets[i]):int(self.offsets[i + 1])].astype(np.int64))

    def feature_rows(self, i: int, layers: tuple[int, ...] | None = None) -> torch.Tensor:
        """Features of sequence i for `layers` (a subset of the cached ones, default all). [L, k*H] bf16"""
        rows = self.features[int(self.offsets[i]):int(self.offsets[i + 1])]
        feats = torch.from_numpy(np.array(rows)).view(torch.bfloat16)
        if layers is None or tuple(layers) == self.layers:
            return feats
        cols = [self.layers.index(layer) for layer in layers]
        feats = feats.view(feats.shape[0], len(self.layers), self.hidden)[:, cols]
        return feats.reshape(feats.shape[0], -1)

    def soft_labels(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-K next-token ids [L, K] long and log-probabilities [L, K] float of sequence i."""
        sl = slice(int(self.offsets[i]), int(self.offsets[i + 1]))
        ids = torch.from_numpy(np.array(self.topk_ids[sl])).long()
        logp = torch.from_numpy(np.array(self.topk_logp[sl])).float()
        return ids, logp


def _files(path: Path) -> dict[str, Path]:
    return {name: path / name for name in ("meta.json", "index.npz", "features.u16", "topk_ids.i32",
                                             "topk_logp.f16")}


def _memmaps(path: Path, rows: int, width: int, top_k: int, mode: str):
    f = _files(path)
    return (np.memmap(f["features.u16"], dtype=np.uint16, mode=mode, shape=(rows, width)),
            np.memmap(f["topk_ids.i32"], dtype=np.int32, mode=mode, shape=(rows, top_k)),
            np.memmap(f["topk_logp.f16"], dtype=np.float16, mode=mode, shape=(rows, top_k)))


def open_cache(path: Path) -> FeatureCache:
    f = _files(path)
    meta = json.loads(f["meta.json"].read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: feature cache format {meta.get('format')} != {FORMAT}; delete it and rebuild")
    with np.load(f["index.npz"]) as z:
        offsets, plens, pidx, tokens = z["offsets"], z["prompt_lens"], z["pool_index"], z["tokens"]
    layers = tuple(meta["layers"])
    feats, ids, logp = _memmaps(path, int(offsets[-1]), len(layers) * meta["hidden"], meta["top_k"], "r")
    return FeatureCache(path, layers, meta["hidden"], meta["top_k"], offsets, plens, pidx, tokens, feats, ids,
                        logp, meta["done"])


def _write_index(path: Path, sequences) -> np.ndarray:
    """index.npz for `sequences` (atomically); returns the offsets."""
    lengths = np.array([len(s[0]) for s in sequences], dtype=np.int64)
    offsets = np.concatenate([[0], lengths.cumsum()])
    tmp = path / "index.partial.npz"
    np.savez(tmp, offsets=offsets, prompt_lens=np.array([s[1] for s in sequences]),
             pool_index=np.array([s[2] for s in sequences]),
             tokens=np.concatenate([np.asarray(s[0], dtype=np.int32) for s in sequences]))
    os.replace(tmp, path / "index.npz")
    return offsets


def _holds_prefix(path: Path, sequences, count: int) -> bool:
    """Whether the cache's first `count` sequences are the first `count` of `sequences`."""
    with np.load(path / "index.npz") as z:
        offsets, tokens = z["offsets"], z["tokens"]
    if len(offsets) < count + 1 or len(sequences) < count:
        return False
    return all(np.array_equal(tokens[offsets[i]:offsets[i + 1]], np.asarray(sequences[i][0], dtype=np.int32))
               for i in range(count))


def order_like_cache(path: Path, sequences: list) -> list:
    """`sequences` reordered so the ones an existing cache at `path` holds come first, in its order
    (matched by token ids), then the rest in their given order. New shards can then sort anywhere
    among the old ones (a sampled round, a later greedy shard) and the cache still grows in place."""
    if not (path / "index.npz").exists():
        return list(sequences)
    with np.load(path / "index.npz") as z:
        offsets, tokens = z["offsets"], z["tokens"]
    where: dict[bytes, list[int]] = {}
    for i, seq in enumerate(sequences):
        where.setdefault(np.asarray(seq[0], dtype=np.int32).tobytes(), []).append(i)
    first = []
    for j in range(len(offsets) - 1):
        hits = where.get(tokens[offsets[j]:offsets[j + 1]].astype(np.int32).tobytes())
        if not hits:
            return list(sequences)  # not a subset: _start_cache reports the mismatch
        first.append(hits.pop(0))
    taken = set(first)
    return [sequences[i] for i in first] + [s for i, s in enumerate(sequences) if i not in taken]


def _start_cache(path: Path, sequences, layers, hidden: int, top_k: int, identity: dict) -> dict:
    """Create the files (or check that an existing build is the same build, grown by new data
    appended after it) and return meta."""
    f = _files(path)
    if f["meta.json"].exists():
        meta = json.loads(f["meta.json"].read_text())
        same = {k: meta.get(k) for k in identity} == identity and meta.get("format") == FORMAT \
            and tuple(meta["layers"]) == tuple(layers) and meta["top_k"] == top_k
        if same and meta.get("sequences") == len(sequences):
            return meta
        if same and meta["sequences"] < len(sequences) and _holds_prefix(path, sequences, meta["sequences"]):
            return _grow_cache(path, sequences, meta)
        raise ValueError(f"{path} holds a different feature cache ({meta}); delete it or choose another --work")
    path.mkdir(parents=True, exist_ok=True)
    offsets = _write_index(path, sequences)
    for arr in _memmaps(path, int(offsets[-1]), len(layers) * hidden, top_k, "w+"):
        arr.flush()
    meta = {"format": FORMAT, **identity, "layers": list(layers), "hidden": hidden, "top_k": top_k,
            "sequences": len(sequences), "tokens": int(offsets[-1]), "done": 0}
    _write_meta(path, meta)
    return meta


def _grow_cache(path: Path, sequences, meta: dict) -> dict:
    """The data grew (new shards after the old ones): extend the files, keep every written row.
    Each step can be repeated, so a build killed here resumes."""
    f = _files(path)
    lengths = [len(s[0]) for s in sequences]
    rows = int(sum(lengths))
    width = len(meta["layers"]) * meta["hidden"]
    for name, row_bytes in (("features.u16", 2 * width), ("topk_ids.i32", 4 * meta["top_k"]),
                            ("topk_logp.f16", 2 * meta["top_k"])):
        with open(f[name], "r+b") as fh:
            fh.truncate(rows * row_bytes)  # zero-filled; the old rows stay where they are
    _write_index(path, sequences)
    meta = {**meta, "sequences": len(sequences), "tokens": rows}
    _write_meta(path, meta)
    return meta


def _write_meta(path: Path, meta: dict) -> None:
    tmp = path / "meta.json.partial"
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, path / "meta.json")


@torch.inference_mode()
def target_outputs(target: Target, batch: list[np.ndarray], layers: tuple[int, ...], top_k: int):
    """One batched forward over right-padded sequences (causal: padding after a sequence never
    reaches it). Returns per sequence (features [L, k*H] bf16, top-k ids [L, K], log-probs [L, K])."""
    width = max(len(t) for t in batch)
    ids = torch.zeros((len(batch), width), dtype=torch.long)
    for r, t in enumerate(batch):
        ids[r, :len(t)] = torch.as_tensor(t.astype(np.int64))
    logits, feats = target.hidden_and_logits(ids, layers)
    out = []
    for r, t in enumerate(batch):
        n = len(t)
        row = logits[r, :n].float()
        top = row.topk(top_k, dim=-1)  # log-softmax keeps the order: take the top-k first
        logp = top.values - row.logsumexp(-1, keepdim=True)
        out.append((feats[r, :n].to(torch.bfloat16), top.indices.int(), logp.half()))
    return out


def cut_batches(order: list[int], lengths: list[int], tokens_per_batch: int) -> list[list[int]]:
    """Consecutive runs of `order` holding at most `tokens_per_batch` tokens (at least one sequence)."""
    batches: list[list[int]] = []
    tokens = 0
    for i in order:
        if not batches or tokens + lengths[i] > tokens_per_batch:
            batches.append([])
            tokens = 0
        batches[-1].append(i)
        tokens += lengths[i]
    return batches


def build_cache(target: Target, sequences, path: Path, layers: tuple[int, ...], top_k: int = 32,
                identity: dict | None = None, tokens_per_batch: int = 4096, window: int = 256,
                log=print) -> FeatureCache:
    """Write features and soft labels of every sequence; resumes at the first unwritten sequence.
    sequences: (token ids, prompt length, pool index) as load_shards returns them.

    `window` sequences at a time are sorted by length before they are cut into batches (right
    padding then wastes ~14% of a batch's rows instead of ~35% in data order: 1.29x tokens/s,
    benchmarks/feature_cache_speed.py); `done` advances after each window, so a killed build
    loses at most one window. The target runs as it decodes (exact mode's attention, if on:
    transformers' own measured no faster here)."""
    from tqdm import tqdm

    meta = _start_cache(path, sequences, layers, target.config.hidden_size, top_k, identity or {})
    feats, ids, logp = _memmaps(path, meta["tokens"], len(layers) * meta["hidden"], top_k, "r+")
    lengths = [len(s[0]) for s in sequences]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    done = meta["done"]
    bar = tqdm(total=int(offsets[-1]), initial=int(offsets[done]), unit="tok", desc="target features",
               smoothing=0.05)
    while done < len(sequences):
        end = min(done + window, len(sequences))
        order = sorted(range(done, end), key=lambda i: lengths[i])
        for batch in cut_batches(order, lengths, tokens_per_batch):
            outputs = target_outputs(target, [sequences[i][0] for i in batch], layers, top_k)
            for i, (f, ti, tl) in zip(batch, outputs):
                sl = slice(int(offsets[i]), int(offsets[i + 1]))
                feats[sl] = f.view(torch.int16).numpy().view(np.uint16)
                ids[sl] = ti.numpy()
                logp[sl] = tl.numpy()
            bar.update(sum(lengths[i] for i in batch))
        for arr in (feats, ids, logp):
            arr.flush()
        done = end
        meta["done"] = done
        _write_meta(path, meta)
    bar.close()
    log(f"feature cache complete: {len(sequences)} sequences, {meta['tokens']} tokens in {path}")
    return open_cache(path)
