"""Issue 4: the drafter shipped for the embedded target loads by default, is lossless and accepts."""

from __future__ import annotations

import json
from pathlib import Path

import quanttree
from quanttree.engine import shipped_drafter

PROMPTS = [  # not in the training pool, not HumanEval
    "Write a Python function that returns the second largest number in a list.",
    "Explain what a binary heap is and how to push an element onto it.",
]


def test_shipped_drafter_files_and_format():
    path = Path(shipped_drafter("smollm2-135m"))
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["DFlashDraftModel"] and config["block_size"] == 8
    assert config["dflash_config"]["target_layer_ids"][-1] == 29  # the last layer feeds it
    assert (path / "model.safetensors").stat().st_size < 40 * 2**20
    assert (path / "README.md").exists() and (path / "draft_vocab.json").exists()


def test_shipped_drafter_is_default_lossless_and_accepts():
    engine = quanttree.load("smollm2-135m", quant="fp32", device="cpu")
    assert engine.drafter is not None and engine.default_method != "ar"
    assert engine.vp_drafter is None  # no VP drafter ships for this drafter yet: d2sd re-drafts with it
    taus = {"dflash": [], "ddtree": [], "d2sd": []}
    for prompt in PROMPTS:
        ar = engine.generate(prompt, method="ar", max_new_tokens=64)
        for method in taus:
            out = engine.generate(prompt, method=method, budget=32, max_new_tokens=64)
            assert out.token_ids == ar.token_ids, (prompt, method)
            taus[method].append(out.stats.tau)
    # a trained drafter, not a random one (a random drafter gives tau ~1.0 here)
    assert min(taus["ddtree"]) > 1.5 and min(taus["dflash"]) > 1.2 and min(taus["d2sd"]) > 1.3, taus


def test_no_stale_vp_drafter_and_own_drafters_get_none(tmp_path):
    # the old VP drafter (block 16, other features) could not pair with the new drafter: none ships
    assert shipped_drafter("smollm2-135m", variable_prefix=True) is None
    # a drafter of the user's own gets no VP drafter unless one is named
    own = quanttree.load("smollm2-135m", drafter=shipped_drafter("smollm2-135m"), quant="bf16", device="cpu")
    assert own.drafter is not None and own.vp_drafter is None
