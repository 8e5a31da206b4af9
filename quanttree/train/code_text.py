"""Scored text: Python source the target did not write, as training data for distillation.

Generating responses costs the target one forward per token (~165 tokens/s batched on this
CPU); scoring text it did not write costs one forward per sequence in the feature stage, which
stores the target's own next-token distribution at every position. With `--distill 1.0` those
distributions are the labels, so the drafter learns what the *target* would write next in that
context, whatever the text says. The source here: documented functions of the Python standard
library, then of the installed packages of each group in PACKAGES (read with `ast`, never imported),
each as a chat turn that asks for the function from its signature and docstring and answers
with its source. Deterministic for a given Python installation, so a fresh machine regenerates
the same sequences in minutes (they are not packed with the target's responses and are never
lookup corpus: they are not the target's answers).

Text sequences carry negative pool indices: they are training data only, never held out. Each
source block starts at a shard boundary, so a larger token goal appends shards and leaves the
ones already written (and their cached features) as they are.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import re
import sysconfig
import textwrap
from pathlib import Path
from typing import NamedTuple

from ..errors import QuanttreeError

TEXT_CHUNK = 128  # sequences per shard
MIN_CHARS, MAX_CHARS = 100, 2400  # a function's source, docstring included
MAX_STUB_CHARS = 1200  # a completion request's stub: well inside the data stage's prompt limit
SKIP_DIRS = {"test", "tests", "testing", "idlelib", "tkinter", "turtledemo", "lib2to3", "site-packages",
             "ensurepip", "pydoc_data", "__pycache__", "_vendor", "vendored", "externals", "benchmarks"}
# after the standard library, in this order, one block per group (a group added later appends
# shards and leaves the earlier blocks' text as it was): packages quanttree's own requirements install
PACKAGES = (
    # session 15: mostly documented algorithms (torch brings sympy, networkx and mpmath; gradio brings pandas)
    ("numpy", "sympy", "networkx", "mpmath", "pandas", "matplotlib"),
    # session 24: the libraries quanttree runs on, and what they bring
    ("torch", "transformers", "accelerate", "PIL", "fontTools", "jinja2", "pyparsing", "dateutil", "huggingface_hub"),
)
# The same stubs as requests the target answers itself (the data stage's completion section): what
# users paste when they ask for a function, answered the way the target answers it (its own text,
# not the library's source).
COMPLETIONS = (
    "Complete this Python function.\n```python\n{stub}\n```",
    "Finish this function so that it does what its docstring says.\n```python\n{stub}\n```",
    "Fill in the body of this Python function, then explain briefly how it works.\n```python\n{stub}\n```",
)
REQUESTS = (
    "Implement this function from Python's `{module}` module.\n```python\n{stub}\n```",
    "Write the body of this Python function.\n```python\n{stub}\n```",
    "Here is a function signature with its docstring. Write the implementation.\n```python\n{stub}\n```",
)


class TextSource(NamedTuple):
    name: str  # "stdlib" or a package's import name
    version: str
    root: Path  # the directory read (a package's own directory)
    group: int = -1  # its group in PACKAGES (-1: the standard library)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def text_sources() -> list[TextSource]:
    """The standard library, then each package of PACKAGES installed here, group by group
    (found, never imported)."""
    import importlib.metadata
    import importlib.util
    import platform

    sources = [TextSource("stdlib", platform.python_version(), stdlib_root())]
    for group, name in ((g, name) for g, names in enumerate(PACKAGES) for name in names):
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            continue
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
        sources.append(TextSource(name, version, Path(next(iter(spec.submodule_search_locations))), group))
    return sources


def documented_sources(root: Path, package: str = "") -> list[tuple[str, str, str]]:
    """(module, stub, source) of every documented function or method under `root` (a fixed
    shuffle, so a token cap still spans many modules): stub = its `def` line(s) and docstring,
    source = the whole function (dedented). package: the import name `root` is (module names
    start with it; "" for the standard library's root)."""
    from tqdm import tqdm

    found = []
    files = [p for p in sorted(root.rglob("*.py")) if not (SKIP_DIRS & set(p.relative_to(root).parts[:-1])
                                                           or p.name.startswith("test_"))]
    for path in tqdm(files, desc=f"reading {package or 'the standard library'}", unit="file", leave=False,
                     disable=len(files) < 500):
        rel = path.relative_to(root)
        try:
            text = path.read_text(encoding="utf-8")
            tree = ast.parse(text)
        except (UnicodeDecodeError, SyntaxError, ValueError):
            continue
        lines = text.splitlines()
        module = ".".join(((package,) if package else ()) + rel.with_suffix("").parts).removesuffix(".__init__")
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


def text_conversations(found: list[tuple[str, str, str]]) -> list[tuple[str, str]]:
    """(request, answer) pairs of documented_sources' functions, benchmark text filtered out (the
    filter self-written prompts pass)."""
    from .self_prompts import benchmark_text

    grams, markers = benchmark_text()
    pairs = []
    for module, stub, source in found:
        if any(m in source for m in markers):
            continue  # e.g. a HumanEval function name or docstring line
        pick = int(hashlib.sha1(source.encode()).hexdigest(), 16) % len(REQUESTS)
        pairs.append((REQUESTS[pick].format(module=module, stub=stub), f"```python\n{source}\n```"))
    return pairs


FUNCTION_STUB = re.compile(r"(async )?def (?P<name>\w+)\((?!self\b|cls\b)")  # a function, not a method
PUBLIC, PRIVATE = re.compile(r"[A-Za-z]"), re.compile(r"_+[A-Za-z]")


def _requests(found: list[tuple[str, str, str]], names: re.Pattern) -> list[str]:
    """One phrasing of COMPLETIONS per function (not method) whose name `names` matches, over-long
    stubs and benchmark text left out, in one fixed shuffle."""
    from .self_prompts import benchmark_text

    _, markers = benchmark_text()
    found = sorted(found, key=lambda f: hashlib.sha1(f[1].encode()).hexdigest())
    requests = []
    for _, stub, source in found:
        match = FUNCTION_STUB.match(stub)
        if match and names.match(match["name"]) and len(stub) <= MAX_STUB_CHARS \
                and not any(m in source for m in markers):
            pick = int(hashlib.sha1(stub.encode()).hexdigest(), 16) % len(COMPLETIONS)
            requests.append(COMPLETIONS[pick].format(stub=stub))
    return requests


@functools.lru_cache(maxsize=4)  # reading the sources takes ~1 minute; every data stage builds the pool
def completion_requests(sources: tuple[TextSource, ...]) -> tuple[tuple[str, ...], ...]:
    """Requests to complete a documented function from its stub (its `def` line(s) and docstring),
    prompts for the target to answer itself, in sections the pool appends in this order: the
    public functions (not methods) of the standard library and of the first group of PACKAGES
    (session 30), then the private functions of those (session 32). Each section is one fixed
    shuffle; benchmark text is left out, and so are a later section's repeats of a request
    (packages copy functions between modules)."""
    found = [f for s in sources if s.group <= 0
             for f in documented_sources(s.root, "" if s.group < 0 else s.name)]
    first = tuple(_requests(found, PUBLIC))  # as session 30 built it, repeats included
    earlier = set(first)
    return first, tuple(r for r in dict.fromkeys(_requests(found, PRIVATE)) if r not in earlier)


def text_blocks(sources: list[TextSource]) -> list[list[tuple[str, str]]]:
    """Pairs in blocks: the standard library's, then one per group of PACKAGES, each group's
    packages together (one fixed shuffle over them, so a token cap spans the packages)."""
    blocks = [text_conversations(documented_sources(s.root)) for s in sources if s.group < 0]
    for group in sorted({s.group for s in sources if s.group >= 0}):
        found = [f for s in sources if s.group == group for f in documented_sources(s.root, s.name)]
        found.sort(key=lambda f: hashlib.sha1(f[2].encode()).hexdigest())
        blocks.append(text_conversations(found))
    return blocks


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


def write_text_shards(tokenizer, data_dir: Path, ends: frozenset[int], token_goal: int, log=print) -> int:
    """Shards of scored text until `token_goal` answer tokens exist, block after block (resumable:
    a shard is rewritten identically); returns the answer tokens they hold."""
    from .datagen import write_shard

    sources = text_sources()
    blocks = text_blocks(sources)
    if not any(blocks):
        raise QuanttreeError("no documented Python functions found in " + ", ".join(str(s.root) for s in sources))
    data_dir.mkdir(parents=True, exist_ok=True)
    total = shards = used = first = 0
    for pairs in blocks:
        for index in range((len(pairs) + TEXT_CHUNK - 1) // TEXT_CHUNK):
            if total >= token_goal:
                break
            sequences, prompt_lens, pool_index = [], [], []
            for k in range(index * TEXT_CHUNK, min((index + 1) * TEXT_CHUNK, len(pairs))):
                ids, plen = encode_answer(tokenizer, *pairs[k], ends)
                sequences.append(ids)
                prompt_lens.append(plen)
                pool_index.append(-1 - first * TEXT_CHUNK - k)  # negative: scored text (datagen.is_scored_text)
            path = text_shard_path(data_dir, first + index)
            if not path.exists():
                write_shard(path, sequences, prompt_lens, pool_index)
            total += sum(len(s) - p for s, p in zip(sequences, prompt_lens))
            shards, used = shards + 1, used + len(sequences)
        first += (len(pairs) + TEXT_CHUNK - 1) // TEXT_CHUNK  # the next block starts on a shard of its own
    read = ", ".join(f"{s.name} {s.version}" for s in sources)
    log(f"text: {total:,} answer tokens of scored Python source in {shards} shards "
        f"({used} of {sum(map(len, blocks))} documented functions; read: {read})")
    return total
