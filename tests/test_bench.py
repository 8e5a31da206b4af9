"""Issue 8: `quanttree bench --quick` runs end to end and writes its table, rows and plots."""

from __future__ import annotations

import json

from quanttree.cli import main


def test_bench_quick(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "--quick", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    methods = {r["method"] for r in rows}
    assert {"ar", "ddtree", "auto", "hf_generate"} <= methods
    assert all(r["matches_ar"] is not False or r["quant"] != "fp32" for r in rows)
    for name in ("summary.md", "speedup.png", "tau_vs_budget.png", "tradeoff.png", "verify_cost.png"):
        assert (out / name).stat().st_size > 500, name
    assert "speedup vs our AR" in capsys.readouterr().out


def test_bench_resumes_and_refuses_a_different_configuration(tmp_path):
    import pytest

    from quanttree.bench import BenchConfig, resume_rows
    from quanttree.errors import QuanttreeError

    cfg = BenchConfig(quants=("bf16",), prompts=2, out=tmp_path / "b")
    assert resume_rows(cfg) == ([], set())
    row = {"quant": "bf16", "index": 0, "method": "ar"}
    (cfg.out / "rows.jsonl").write_text(json.dumps(row) + "\n")
    rows, done = resume_rows(cfg)
    assert rows == [row] and done == {("bf16", 0)}
    with pytest.raises(QuanttreeError, match="another bench configuration"):
        resume_rows(BenchConfig(quants=("nf4",), prompts=2, out=tmp_path / "b"))


def test_summary_counts_prompts_not_repeats_and_gives_an_interval():
    from quanttree.bench import policy_report, sources_report, summarize

    def row(index, rep, method, budget, speedup, matches=True):
        return {"quant": "nf4", "suite": "humaneval", "index": index, "rep": rep, "method": method, "budget": budget,
                "tps": 50.0 * speedup, "speedup": speedup, "tau": 1.0, "tree": 0.0, "rounds": 10,
                "phase_ms": {"verify": 100.0}, "peak_mb": 1.0, "matches_ar": matches, "chosen_sizes": [0, 4],
                "observed": [1], "predicted": [0.5], "predicted_raw": [0.6]}

    rows = [row(i, r, "ar", 0, 1.0) for i in range(2) for r in range(2)]
    rows += [row(i, r, "ddtree", 4, s) for i in range(2) for r, s in enumerate((0.9, 0.94))]
    rows += [row(i, r, "auto", 64, s, matches=i == 0) for i in range(2) for r, s in enumerate((1.0, 1.04))]
    for r in rows[-4:]:
        r["by_source"] = {"lookup": [6, 3], "drafter": [4, 1]}
        r["accepted_by_depth"] = {"lookup": [1, 1, 0, 0, 0, 0, 0, 0, 0, 1], "drafter": [1]}
    summary = {s["method"]: s for s in summarize(rows)}
    auto = summary["auto"]
    assert auto["prompts"] == 2 and auto["mismatches"] == 1
    assert auto["speedup"] == 1.02 and 0.0 < auto["speedup_ci"] < 0.05
    report = policy_report(rows, list(summary.values()))
    assert "| nf4 | 4 | 0.920x | auto | 1.020x ±" in report and "| 1.109x |" in report
    # without a ddtree row there is no oracle, but the policy's own columns stay; no policy: no table
    no_oracle = [r for r in rows if r["method"] != "ddtree"]
    report = policy_report(no_oracle, [s for s in summary.values() if s["method"] != "ddtree"])
    assert "| nf4 | - | - | auto | 1.020x ±" in report and "| 0 / 4 / 4, 50% | 0.60 / 0.50 / 1.00 |" in report
    assert policy_report(rows[:4], [summary["ar"]]) == ""
    sources = sources_report(list(summary.values()))  # summed over the 4 auto rows
    assert "| nf4 | auto | lookup | 24 | 12 | 0.50 | 4 / 4 / 0 / 0 / 0 / 4 |" in sources
    assert "| nf4 | auto | drafter | 16 | 4 | 0.25 | 4 / 0 / 0 / 0 / 0 / 0 |" in sources


def test_headline_pairs_each_run_with_the_plain_run_of_its_own_repeat():
    from quanttree.bench import headline_report, paired_ratio, summarize, versus_report

    def row(suite, index, rep, method, tps, matches=True, weights=100.0, peak=1.0):
        return {"quant": "nf4", "suite": suite, "index": index, "rep": rep, "method": method, "budget": None,
                "tps": tps, "speedup": tps / (50.0 if rep == 0 else 25.0), "tau": 2.0 if method == "auto" else None, "tree": 0.0, "rounds": 1,
                "phase_ms": {}, "peak_mb": peak, "weights_mb": weights, "matches_ar": matches}

    # the machine halves its speed between repeats: paired ratios stay 2.0 and 0.5, means of tok/s would not
    rows = []
    for rep, speed in ((0, 1.0), (1, 0.5)):
        rows += [row("chat", 0, rep, "ar", 50 * speed), row("chat", 0, rep, "auto", 100 * speed, matches=rep == 0),
                 row("chat", 0, rep, "hf_prompt_lookup", 80 * speed, matches=False),
                 row("chat", 0, rep, "llama_cpp", 200 * speed, matches=None, weights=30.0, peak=None)]
    assert paired_ratio(rows, "auto", "ar") == (2.0, 0.0, 2)
    assert paired_ratio(rows, "auto", "llama_cpp")[0] == 0.5
    assert paired_ratio(rows, "lookup", "ar") is None
    report = headline_report(rows)
    assert "| nf4 | chat | 37.5 | - | **2.00x** | 2.00 | llama_cpp (4.00x) | **0.50x** | 1/2 / n/a |" in report
    assert "| nf4 | chat | - | 1.25x | 1.60x |" in versus_report(rows)
    summary = {s["method"]: s for s in summarize(rows, by_suite=True)}
    assert summary["llama_cpp"]["peak_mb"] is None and summary["llama_cpp"]["weights_mb"] == 30.0
    assert summary["auto"]["suite"] == "chat"


def test_chat_prompts_take_the_categories_in_turns():
    from quanttree.bench import CHAT_PROMPTS, by_category_turns, chat

    rows = [json.loads(line) for line in CHAT_PROMPTS.read_text().splitlines() if line.strip()]
    categories = list(dict.fromkeys(r["category"] for r in rows))
    assert len(categories) == 7
    first = chat(7)
    assert [next(r["category"] for r in rows if r["prompt"] == p) for p in first] == categories
    assert sorted(chat()) == sorted(r["prompt"] for r in rows)  # all of them, each once
    toy = [{"category": c, "prompt": p} for c, p in (("a", 1), ("a", 2), ("a", 3), ("b", 4), ("c", 5), ("c", 6))]
    assert [r["prompt"] for r in by_category_turns(toy)] == [1, 4, 5, 2, 6, 3]
