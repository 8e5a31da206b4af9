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
