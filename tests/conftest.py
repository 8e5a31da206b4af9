from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from helpers import make_tiny_drafter, make_tiny_target

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    """The embedded SmolLM2 model converted to safetensors (done once per cache dir)."""
    from quanttree.models import resolve_target_path

    return Path(resolve_target_path("smollm2-135m", log=lambda *_: None))


@pytest.fixture(scope="session")
def tokenizer(embedded_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_dir)


@pytest.fixture(scope="session")
def embedded_engine():
    import quanttree

    # no corpus either: n-gram drafts from the request alone (tests/test_sources.py adds one)
    return quanttree.load("smollm2-135m", quant="fp32", device="cpu", drafter=None, corpus=None, log=lambda *_: None)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """Llama- and Qwen3-shaped random targets with the SmolLM2 tokenizer, each with a drafter."""
    root = tmp_path_factory.mktemp("tiny")
    dirs = {}
    for kind in ("llama", "qwen3"):
        target = make_tiny_target(root / kind, kind, tokenizer)
        dirs[kind] = target
        dirs[f"{kind}-drafter"] = make_tiny_drafter(root / f"{kind}-drafter", target)
    return dirs
