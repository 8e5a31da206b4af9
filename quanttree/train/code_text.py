"""Scored text: Python source the target did not write, as training data for distillation.

Generating responses costs the target one forward per token (~165 tokens/s batched on this
CPU); scoring text it did not write costs one forward per sequence in the feature stage, which
stores the target's own next-token distribution at every position. With `--distill 1.0` those
distributions are the labels, so the drafter learns what the *target* would write next in that
context, whatever the text says. The source here: documented functions of the Python standard
library (read with `ast`, never imported), each as a chat turn that asks for the function from
its signature and docstring and answers with its source. Deterministic for a given Python
installation, so a fresh machine regenerates the same sequences in seconds (they are not packed
with the target's responses and are never lookup corpus: they are not the target's answers).

Text sequences carry negative pool indices: they are training data only, never held out.
"""

from __future__ import annotations

import ast
import hashlib
import sysconfig
import textwrap
from pathlib import Path

from ..errors import QuanttreeError

TEXT_CHUNK = 128  # sequences per shard
MIN_CHARS, MAX_CHARS = 100, 2400  # a function's source, docstring included
SKIP_DIRS = {"test", "tests", "idlelib", "tkinter", "turtledemo", "lib2to3", "site-packages", "ensurepip",
             "pydoc_data", "__pycache__"}
REQUESTS = (
    "Implement this function from Python's `{module}` module.\n```python\n{stub}\n```",
    "Write the body of this Python function.\n```python\n{stub}\n```",
    "Here is a function signature with its docstring. Write the implementation.\n```python\n{stub}\n```",
)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def documented_sources(root: Path) -> list[tuple[str, str, str]]:
    """(module, stub, source) of every documented function or method under `root` (a fixed
    shuffle, so a token cap still spans many modules): stub = its `def` line(s) and docstring,
    source = the whole function (dedented)."""
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if SKIP_DIRS & set(rel.parts[:-1]) or rel.name.startswith("test_"):
            continue
        try:
            text = path.read_text(encoding="utf-8")
            tree = ast.parse(text)
        except (UnicodeDecodeError, SyntaxError, ValueError):
            continue
        lines = text.splitlines()
        module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or not ast.get_docstring(node):
                continue
            source = textwrap.dedent("\n".join(lines[node.lineno - 1:node.end_lineno]))
            if not MIN_CHARS <= len(source) <= MAX_CHARS or len(node.body) < 2:
                continue  # a docstring alone has nothing to implement
            stub = textwrap.dedent("\n".join(lines[node.lineno - 1:node.body[0].end_lineno]))
            found.append((module, stub, source))
    found.sort(key=lambda f: hashlib.sha1(f[2].encode()).hexdigest())  # spread over modules, os-independent
    return found


def text_conversations(root: Path | None = None) -> list[tuple[str, str]]:
    """(request, answer) pairs, benchmark text filtered out (the filter self-written prompts pass)."""
    from .self_prompts import benchmark_text

    grams, markers = benchmark_text()
    pairs = []
    for module, stub, source in documented_sources(root or stdlib_root()):
        if any(m in source for m in markers):
            continue  # e.g. a HumanEval function name or docstring line
        pick = int(hashlib.sha1(source.encode()).hexdigest(), 16) % len(REQUESTS)
        pairs.append((REQUESTS[pick].format(module=module, stub=stub), f"```python\n{source}\n```"))
    return pairs


def encode_answer(tokenizer, request: str, answer: str, ends: frozenset[int]) -> tuple[list[int], int]:
    """(prompt + answer ids ending with the end-of-turn token, prompt length) in the target's chat template."""
    from .datagen import encode_chat

    prompt = encode_chat(tokenizer, request)
    full = tokenizer.apply_chat_template([{"role": "user", "content": request},
                                          {"role": "assistant", "content": answer}], tokenize=True)
    full = list(full["input_ids"] if hasattr(full, "keys") else full)
    if full[:len(prompt)] != prompt:
        raise QuanttreeError("this chat template renders an answered turn differently from a generation prompt: "
                             "scored text cannot be aligned with it; use the data stage alone")
    stop = next((i for i in range(len(prompt), len(full)) if full[i] in ends), None)
    if stop is None:
        raise QuanttreeError("this chat template closes an assistant turn with no end-of-turn token the target "
                             "stops at: scored text would teach the drafter to never stop")
    return full[:stop + 1], len(prompt)


def text_shard_path(data_dir: Path, index: int) -> Path:
    return data_dir / f"shard-text-{index:05d}.npz"


def write_text_shards(tokenizer, data_dir: Path, ends: frozenset[int], token_goal: int,
                      root: Path | None = None, log=print) -> int:
    """Shards of scored text until `token_goal` answer tokens exist (resumable: a shard is
    rewritten identically); returns the answer tokens they hold."""
    from .datagen import write_shard

    pairs = text_conversations(root)
    if not pairs:
        raise QuanttreeError(f"no documented Python functions found under {root or stdlib_root()}")
    data_dir.mkdir(parents=True, exist_ok=True)
    total = shards = used = 0
    for index in range((len(pairs) + TEXT_CHUNK - 1) // TEXT_CHUNK):
        if total >= token_goal:
            break
        sequences, prompt_lens, pool_index = [], [], []
        for k in range(index * TEXT_CHUNK, min((index + 1) * TEXT_CHUNK, len(pairs))):
            ids, plen = encode_answer(tokenizer, *pairs[k], ends)
            sequences.append(ids)
            prompt_lens.append(plen)
            pool_index.append(-1 - k)  # negative: scored text (datagen.is_scored_text), training only
        path = text_shard_path(data_dir, index)
        if not path.exists():
            write_shard(path, sequences, prompt_lens, pool_index)
        total += sum(len(s) - p for s, p in zip(sequences, prompt_lens))
        shards, used = shards + 1, used + len(sequences)
    log(f"text: {total:,} answer tokens of scored Python source in {shards} shards "
        f"({used} of {len(pairs)} documented functions)")
    return total
