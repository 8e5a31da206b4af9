"""Prompts the target writes itself (the Magpie recipe): an instruct model given only the text
that opens a user turn continues it with a user request drawn from what it was tuned on.

Why: the built-in pool is templates (prompts.py, chat_pool.py), and the drafter generalises
badly beyond them: teacher-forced slot-1 accuracy 0.57 on held-out pool prompts, 0.40 on the chat
suite's. Self-written requests are varied the way people's are, and they are the target's own.

Generated in chunks, each seeded by (seed, chunk): a killed run resumes at the first missing
chunk, and the same target and quant mode write the same prompts. Kept after filters (complete,
plain text, a real length, no benchmark text), deduplicated, and collected in one JSON-lines
file that the data stage appends to the pool after its built-in sections (so the pool indices of
data generated earlier stay valid).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import QuanttreeError
from ..sampling import SamplingParams

SENTINEL = "\u2063QUANTTREE_USER_TURN\u2063"  # rendered into the template only to find where a user turn starts


@dataclass(frozen=True)
class SelfPromptConfig:
    goal: int = 3000  # prompts to keep
    chunk: int = 128  # samples per chunk file (one seeded batch group)
    batch_size: int = 64
    max_tokens: int = 160  # a request longer than this is dropped (it would be cut)
    temperature: float = 1.0
    top_p: float = 0.95
    seed: int = 0

    def __post_init__(self):
        if self.goal <= 0 or self.chunk <= 0 or self.max_tokens <= 0:
            raise QuanttreeError("--prompt-goal, chunk and max tokens must be positive")
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise QuanttreeError("self-written prompts are sampled: temperature > 0 and top_p in (0, 1]")


def user_turn(tokenizer) -> tuple[list[int], set[int]]:
    """The token ids that open a user turn in this tokenizer's chat template (its default system
    message included), and the ids that may end one (the special token the template writes after
    the user's text). Raises QuanttreeError for a tokenizer without a usable chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise QuanttreeError("self-written prompts need a chat model with a chat template")
    text = tokenizer.apply_chat_template([{"role": "user", "content": SENTINEL}], tokenize=False)
    if SENTINEL not in text:
        raise QuanttreeError("this chat template does not write the user's text verbatim: cannot find where a "
                             "user turn starts")
    before, after = text.split(SENTINEL, 1)
    prefix = tokenizer.encode(before, add_special_tokens=False)
    if not prefix:
        raise QuanttreeError("this chat template writes nothing before the user's text: no turn to continue")
    closing = tokenizer.encode(after, add_special_tokens=False)[:1]
    return prefix, {t for t in closing if t in set(tokenizer.all_special_ids)}


def word_grams(text: str, n: int = 8) -> set[tuple[str, ...]]:
    words = re.findall(r"[a-z0-9']+", text.lower())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def benchmark_text() -> tuple[set[tuple[str, ...]], list[str]]:
    """What training prompts must not contain: 8-word runs of the chat suite's prompts, and
    HumanEval's function signatures and first docstring lines."""
    from ..bench import CHAT_PROMPTS, humaneval

    grams = set().union(*(word_grams(json.loads(line)["prompt"])
                          for line in CHAT_PROMPTS.read_text().splitlines() if line.strip()))
    markers = []
    for prompt in humaneval(164):
        code = prompt.split("```python\n", 1)[1]
        sig = next((line for line in code.splitlines() if line.startswith("def ")), "")
        if sig:
            markers.append(sig[4:].split("(")[0] + "(")
        if '"""' in code:
            doc = code.split('"""')[1].strip().split("\n")[0]
            if len(doc) > 25:
                markers.append(doc)
    return grams, markers


def keep(text: str, banned: tuple[set, list[str]]) -> str | None:
    """The request, cleaned, or None if it is not one to train on."""
    text = text.strip()
    if not 15 <= len(text) <= 1500 or len(text.split()) < 3 or "<|" in text or "|>" in text:
        return None
    grams, markers = banned
    if word_grams(text) & grams or any(m in text for m in markers):
        return None
    return text


def chunk_path(out_dir: Path, index: int) -> Path:
    return out_dir / f"prompts-{index:05d}.json"


@torch.inference_mode()
def write_chunk(target, tokenizer, prefix: list[int], ends: frozenset[int], cfg: SelfPromptConfig, index: int,
                banned, path: Path) -> list[str]:
    """Sample cfg.chunk user turns (seeded by seed and chunk index) and store the kept ones."""
    from .datagen import generate_batch

    gen = torch.Generator()
    gen.manual_seed((cfg.seed * 1_000_003 + 7) * 1_000_003 + index)
    params = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(ends)
    kept = []
    for start in range(0, cfg.chunk, cfg.batch_size):
        n = min(cfg.batch_size, cfg.chunk - start)
        for ids in generate_batch(target, [prefix] * n, cfg.max_tokens, ends, pad, params, gen):
            if not ids or ids[-1] not in ends:  # cut at max_tokens: not a whole request
                continue
            text = keep(tokenizer.decode(ids[:-1], skip_special_tokens=False), banned)
            if text is not None:
                kept.append(text)
    tmp = path.with_suffix(".partial")
    tmp.write_text(json.dumps({"samples": cfg.chunk, "kept": kept}))
    tmp.replace(path)  # atomic: a killed run never leaves half a chunk
    return kept


def pack_prompts(out_dir: Path, out: Path) -> Path:
    """Every chunk as one file (committed beside the packed data: a fresh machine's pool gets the
    same prompts, at the same indices, without generating them)."""
    chunks = [{"index": int(p.stem.split("-")[1]), **json.loads(p.read_text())} for p in sorted(out_dir.glob("prompts-*.json"))]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"chunks": chunks}, indent=0))
    return out


def unpack_prompts(packed: Path, out_dir: Path) -> int:
    """Restore chunk files from a packed file; returns how many chunks."""
    chunks = json.loads(packed.read_text())["chunks"]
    out_dir.mkdir(parents=True, exist_ok=True)
    for c in chunks:
        path = chunk_path(out_dir, c["index"])
        if not path.exists():
            path.write_text(json.dumps({"samples": c["samples"], "kept": c["kept"]}))
    return len(chunks)


def collect(out_dir: Path) -> list[str]:
    """Every kept prompt of every chunk, in chunk order, each once."""
    seen, out = set(), []
    for path in sorted(out_dir.glob("prompts-*.json")):
        for text in json.loads(path.read_text())["kept"]:
            key = " ".join(text.lower().split())
            if key not in seen:
                seen.add(key)
                out.append(text)
    return out


def generate_self_prompts(target, tokenizer, eos: frozenset[int], out_dir: Path, cfg: SelfPromptConfig,
                          log=print) -> list[str]:
    """Fill out_dir chunk by chunk until cfg.goal distinct prompts are kept (resumable)."""
    from tqdm import tqdm

    prefix, closing = user_turn(tokenizer)
    ends = frozenset(eos | closing)
    out_dir.mkdir(parents=True, exist_ok=True)
    banned = benchmark_text()
    prompts = collect(out_dir)
    bar = tqdm(total=cfg.goal, initial=min(len(prompts), cfg.goal), unit="prompt", desc="self-written prompts")
    index = 0
    while len(prompts) < cfg.goal:
        path = chunk_path(out_dir, index)
        if not path.exists():
            kept = write_chunk(target, tokenizer, prefix, ends, cfg, index, banned, path)
            before = len(prompts)
            prompts = collect(out_dir)
            bar.update(min(len(prompts), cfg.goal) - min(before, cfg.goal))
            log(f"{path.name}: kept {len(kept)} of {cfg.chunk} samples ({len(prompts)} distinct so far)")
            if index >= 4 and len(prompts) < index:  # under one in 128 kept: this target does not write requests
                raise QuanttreeError(f"only {len(prompts)} usable prompts from {index + 1} chunks: this model does not "
                                     "continue a user turn with requests; use the built-in pool")
        index += 1
    bar.close()
    return prompts[:cfg.goal]
