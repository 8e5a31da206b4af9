"""Issue 15: `auto` merges the drafter's and n-gram lookup's drafts in one tree, and speculates
without a drafter; exact, with per-source counts."""

from __future__ import annotations

import pytest
import torch

import quanttree
from quanttree.costmodel import CostModel, CostProfile

# answers that copy: a list the prompt spells out, asked back
COPY_PROMPT = ("Here is a list: alpha beta gamma delta epsilon zeta eta theta iota kappa. "
               "Write the list again, exactly as given, then once more.")


def cheap_cost(engine) -> None:
    """A verify cost that makes every sure node pay, so the test sees both sources used."""
    engine._cost = CostModel(CostProfile(key={}, sizes=[1, 2, 4, 8, 16, 32], contexts=[1, 4096],
                                         verify_ms=[[10.0, 10.1, 10.2, 10.3, 10.4, 10.5]] * 2,
                                         draft_ms=[0.1, 0.1]))


def test_auto_without_a_drafter_speculates_with_lookup_and_stays_exact(embedded_engine):
    engine = embedded_engine  # fp32, no drafter
    assert engine.default_method == "auto"
    cheap_cost(engine)
    ar = engine.generate(COPY_PROMPT, method="ar", max_new_tokens=64)
    out = engine.generate(COPY_PROMPT, max_new_tokens=64)
    assert out.token_ids == ar.token_ids
    assert out.stats.method == "auto" and set(out.stats.by_source) == {"lookup"}
    drafted, accepted = out.stats.by_source["lookup"]
    assert accepted >= 10 and out.stats.rounds < len(ar.token_ids) - 10  # copied tokens came in groups
    phases = out.stats.phase_ms()  # each source's time is its own phase
    assert phases["lookup"] > 0 and phases["draft"] == 0


def test_auto_merges_drafter_and_lookup():
    engine = quanttree.load("smollm2-135m", quant="fp32", device="cpu", log=lambda *_: None)
    cheap_cost(engine)
    ar = engine.generate(COPY_PROMPT, method="ar", max_new_tokens=64)
    out = engine.generate(COPY_PROMPT, method="auto", max_new_tokens=64)
    assert out.token_ids == ar.token_ids
    sources = out.stats.by_source
    assert sources.get("drafter", [0, 0])[0] > 0 and sources.get("lookup", [0, 0])[0] + sources.get("both", [0, 0])[0] > 0
    accepted_copy = sources.get("lookup", [0, 0])[1] + sources.get("both", [0, 0])[1]
    assert accepted_copy >= 10, sources
    by_depth = out.stats.accepted_by_depth  # per source, accepted nodes per depth: they add up
    assert {k: sum(v) for k, v in by_depth.items()} == {k: a for k, (_, a) in sources.items() if a}
    assert sum(map(sum, by_depth.values())) == out.stats.accepted
    assert "accepted/drafted" in out.stats.summary()
    phases = out.stats.phase_ms()
    assert phases["lookup"] > 0 and phases["draft"] > 0 and phases["build"] > 0


def test_a_corpus_of_earlier_answers_drafts_the_answer_again_and_stays_exact(embedded_engine):
    from quanttree.engine import Engine
    from quanttree.lookup import CorpusIndex

    prompt = "Write a Python function that reverses a string, with a docstring."
    ar = embedded_engine.generate(prompt, method="ar", max_new_tokens=48)
    # the same request answered before: its answer is in the corpus, so lookup drafts it back
    engine = Engine(embedded_engine.loaded, corpus=CorpusIndex([ar.token_ids]))
    cheap_cost(engine)
    out = engine.generate(prompt, method="lookup", max_new_tokens=48)
    assert out.token_ids == ar.token_ids
    drafted, accepted = out.stats.by_source["corpus"]
    assert accepted >= 24 and out.stats.tau > 3.0, out.stats.by_source
    # a corpus of unrelated sequences only changes which nodes are verified
    noise = torch.Generator().manual_seed(0)
    wrong = Engine(embedded_engine.loaded, corpus=CorpusIndex(
        [torch.randint(0, 1000, (64,), generator=noise).tolist() for _ in range(50)] + [ar.token_ids[5::2]]))
    cheap_cost(wrong)
    assert wrong.generate(prompt, method="lookup", max_new_tokens=48).token_ids == ar.token_ids
    assert wrong.generate(prompt, method="auto", max_new_tokens=48).token_ids == ar.token_ids


def test_the_embedded_target_ships_its_corpus_and_a_bad_one_is_refused_in_words(tmp_path):
    from quanttree.engine import load_corpus_index, shipped_corpus
    from quanttree.errors import QuanttreeError

    assert shipped_corpus("smollm2-135m") and shipped_corpus("/some/local/model") is None
    index = load_corpus_index("auto", "smollm2-135m", log=lambda *_: None)
    assert len(index) > 2_000_000
    assert load_corpus_index(None, "smollm2-135m") is None
    assert load_corpus_index("auto", "/some/local/model") is None
    with pytest.raises(QuanttreeError, match="tokenized for another model"):
        load_corpus_index("auto", "smollm2-135m", vocab_size=1000)
    with pytest.raises(QuanttreeError, match="is not a file"):
        load_corpus_index(str(tmp_path / "missing.npz"), "smollm2-135m")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(QuanttreeError, match="not a packed corpus"):
        load_corpus_index(str(bad), "smollm2-135m")
