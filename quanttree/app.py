"""quanttree web app: plain autoregressive decoding and tree speculation side by side.

    quanttree app [--host 127.0.0.1] [--port 7860] [--target smollm2-135m]

Fairness: the two runs share one device, so they run one after the other (plain decoding
first, then speculation), each with the whole machine; the page says so. Tokens/s counts
decode time only (prefill excluded), as in `quanttree generate --compare`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import quanttree
from quanttree import QuanttreeError
from quanttree.decode import DRAFT_METHODS, METHODS
from quanttree.engine import default_budget, exact_unavailable
from quanttree.models import DEFAULT_TARGET, QUANT_MODES

MAX_NEW_TOKENS_CAP = 512
UI_INTERVAL = 0.15  # seconds between streamed page updates
SPEC_METHODS = [m for m in METHODS if m != "ar"]
FAIRNESS = ("Both runs use the same model on the same device, **one after the other** (plain decoding "
            "first, then speculation), so neither slows the other down. Tokens/s excludes the prompt's prefill.")


class EngineCache:
    """Engines loaded once per (target quant, drafter quant) and reused."""

    def __init__(self, target: str = DEFAULT_TARGET, drafter: str | None = "auto", device: str | None = None):
        self.target, self.drafter, self.device = target, drafter, device
        self.engines: dict[tuple[str, str], quanttree.Engine] = {}

    def get(self, quant: str, drafter_quant: str, log=print) -> quanttree.Engine:
        key = (quant, drafter_quant)
        if key not in self.engines:
            self.engines[key] = quanttree.load(self.target, drafter=self.drafter, quant=quant,
                                               drafter_quant=None if drafter_quant == "same" else drafter_quant,
                                               device=self.device, log=log)
        return self.engines[key]


@dataclass
class PaneState:
    text: str = ""
    tokens: int = 0
    elapsed: float = 0.0
    tps: float = 0.0
    tau: float = 0.0
    tree: int = 0
    token_ids: list[int] = field(default_factory=list)
    done: bool = False
    history: list[tuple[float, float]] = field(default_factory=list)  # (elapsed s, tokens/s)
    by_source: dict[str, list[int]] = field(default_factory=dict)  # origin -> [drafted, accepted]

    def stats_line(self, speculative: bool, baseline: float | None = None) -> str:
        line = f"**{self.tps:.1f} tok/s** · {self.tokens} tokens · {self.elapsed:.1f} s"
        if speculative:
            line += f" · tau {self.tau:.2f} · tree {self.tree} nodes"
            if self.by_source:  # which source proposed the accepted tokens
                line += " · accepted " + ", ".join(f"{k} {a}/{d}" for k, (d, a) in sorted(self.by_source.items()))
            if baseline:
                line += f" · **speedup {self.tps / baseline:.2f}x**"
        return line


def run_pane(engine, prompt: str, method: str, budget: int, max_new_tokens: int, temperature: float,
             seed: int | None) -> Iterator[tuple[PaneState, object]]:
    """Stream one method, yielding its pane state (and the latest step) after every round."""
    state = PaneState()
    start = time.perf_counter()
    for event in engine.stream(prompt, method=method, budget=budget, max_new_tokens=max_new_tokens,
                               temperature=temperature, seed=seed):
        stats = event.stats
        state.text, state.token_ids = event.text, event.token_ids
        state.tokens, state.elapsed = stats.new_tokens, time.perf_counter() - start
        state.tps, state.tau = stats.decode_tokens_per_s, stats.tau
        state.tree = event.step.tree_size
        state.by_source = {k: list(v) for k, v in stats.by_source.items()}
        state.done = event.finish_reason is not None
        state.history.append((state.elapsed, state.tps))
        yield state, event.step


def badge(ar: PaneState, spec: PaneState, temperature: float, exact: bool = True) -> str:
    if not (ar.done and spec.done):
        return "⏳ running…"
    if temperature > 0:
        return "🎲 sampling (temperature > 0): outputs differ by design; both follow the model's distribution"
    if ar.token_ids == spec.token_ids:
        return "✅ **identical** outputs: speculation changed the speed, not the answer"
    if exact:  # exact mode promises identical outputs: a difference is a bug to report
        return "❌ outputs differ in exact mode: please report this prompt (it is a bug)"
    return ("⚠️ outputs differ: exact mode is off, so a near-tie rounded differently in a many-token forward "
            "(see the README on exact mode)")


def tree_figure(step, tokenizer):
    """The latest draft tree: tokens as nodes by depth, the accepted path highlighted."""
    from matplotlib.figure import Figure  # not pyplot: no global figure registry to leak into

    fig = Figure(figsize=(7, 3.6))
    ax = fig.subplots()
    ax.axis("off")
    if step is None or step.tree is None or step.tree.size == 0:
        ax.text(0.5, 0.5, "no draft tree this round (plain decoding)", ha="center", va="center")
        return fig
    tree, path = step.tree, set(step.path.tolist()) if step.path is not None else set()
    depths = tree.depths.tolist()
    counts: dict[int, int] = {}
    for d in depths:
        counts[d] = counts.get(d, 0) + 1
    seen: dict[int, int] = {}
    pos = []  # x = depth, y = rank within the depth, centred
    for d in depths:
        pos.append((d, (counts[d] - 1) / 2 - seen.get(d, 0)))
        seen[d] = seen.get(d, 0) + 1
    for i, parent in enumerate(tree.parents.tolist()):
        if parent >= 0:
            on = i in path and parent in path
            ax.plot([pos[parent][0], pos[i][0]], [pos[parent][1], pos[i][1]], "-",
                    color="#2e7d32" if on else "#bbbbbb", lw=2.5 if on else 0.8, zorder=1)
    for i, tok in enumerate(tree.tokens.tolist()):
        label = tokenizer.decode([tok]).replace("\n", "⏎")[:8] or "·"
        on = i in path
        ax.text(pos[i][0], pos[i][1], label, ha="center", va="center", fontsize=7, zorder=2,
                bbox={"boxstyle": "round,pad=0.2", "fc": "#c8e6c9" if on else "white",
                      "ec": "#2e7d32" if on else "#999999"})
    ax.set_xlim(-0.5, max(depths) + 0.5)
    ax.set_ylim(min(p[1] for p in pos) - 1, max(p[1] for p in pos) + 1)
    ax.set_title(f"latest draft tree: {tree.size} nodes, accepted {len(path) - 1} (green)", fontsize=9)
    fig.tight_layout()
    return fig


def speed_figure(ar: PaneState, spec: PaneState, spec_label: str):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 2.6))
    ax = fig.subplots()
    for state, label in ((ar, "plain decoding"), (spec, spec_label)):
        if state.history:
            xs, ys = zip(*state.history)
            ax.plot(xs, ys, label=label)
    ax.set_xlabel("seconds since the run started")
    ax.set_ylabel("decode tokens/s")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def compare(cache: EngineCache, prompt: str, max_new_tokens: int, temperature: float, method: str, budget: int,
            quant: str, drafter_quant: str, seed: int | None = 0, progress=None, exact: bool = True) -> Iterator[tuple]:
    """The whole comparison as a stream of UI updates:
    (ar_text, ar_stats, spec_text, spec_stats, badge, tree_fig, speed_fig, status).
    exact: greedy speculation bit-identical to plain decoding (where the mode allows it)."""
    if not prompt or not prompt.strip():
        raise QuanttreeError("the prompt is empty: type a question or an instruction")
    max_new_tokens = int(min(max(int(max_new_tokens), 1), MAX_NEW_TOKENS_CAP))
    log = (lambda msg: progress(0.5, desc=msg)) if progress is not None else (lambda msg: None)
    if progress is not None:
        progress(0.1, desc=f"loading the model in {quant} (first time only)…")
    engine = cache.get(quant, drafter_quant, log)
    why_not = exact_unavailable(engine) if exact else None
    engine.set_exact(bool(exact) and why_not is None)
    if engine.drafter is None and method in DRAFT_METHODS:
        raise QuanttreeError(f"no drafter is loaded for this target: {method} needs one; 'lookup' (n-gram drafts "
                             "from the prompt and the answer) needs none")
    if method in ("caddtree", "bastion", "auto") and not engine.calibrated and progress is not None:
        progress(0.6, desc="measuring this machine's verify cost and the drafter's acceptance once (cached)…")
        engine.cost_model(progress=False)
    ar, spec = PaneState(), PaneState()
    tree_fig = tree_figure(None, engine.tokenizer)
    status = f"running plain decoding, then **{method}** · {FAIRNESS}"
    if why_not:
        status += f" · exact mode is off in {engine.quant}: {why_not}"
    elif engine.exact and engine.target.min_rows > 2:
        status += (f" · exact mode runs every forward as at least {engine.target.min_rows} rows in {engine.quant} "
                   "here (the matmul kernels switch up to that count): untick it for speed")
    elif engine.exact and engine.target.max_nodes(budget) < budget:
        status += (f" · exact mode verifies at most {engine.target.max_nodes(budget)} drafted tokens per round in "
                   f"{engine.quant} here (the matmul kernels switch above that count)")
    last_plot = last_ui = 0.0
    for ar, _ in run_pane(engine, prompt, "ar", budget, max_new_tokens, temperature, seed):
        if not ar.done and time.perf_counter() - last_ui < UI_INTERVAL:
            continue  # the browser redrawing every round would steal CPU from the run it shows
        last_ui = time.perf_counter()
        yield (ar.text, ar.stats_line(False), "", "waiting for plain decoding to finish…", badge(ar, spec, temperature),
               tree_fig, None, status)
    for spec, step in run_pane(engine, prompt, method, budget, max_new_tokens, temperature, seed):
        now = time.perf_counter()
        if not spec.done and now - last_ui < UI_INTERVAL:
            continue
        last_ui = now
        if spec.done or now - last_plot > 0.7:  # redrawing every round would cost more than a round
            tree_fig, last_plot = tree_figure(step, engine.tokenizer), now
        yield (ar.text, ar.stats_line(False), spec.text, spec.stats_line(True, ar.tps),
               badge(ar, spec, temperature, engine.exact), tree_fig,
               speed_figure(ar, spec, method) if spec.done else None, status)
    done = f"done · plain {ar.tps:.1f} tok/s vs {method} {spec.tps:.1f} tok/s · {FAIRNESS}"
    if why_not:
        done += f" · exact mode is off in {engine.quant}: {why_not}"
    yield (ar.text, ar.stats_line(False), spec.text, spec.stats_line(True, ar.tps), badge(ar, spec, temperature, engine.exact),
           tree_fig, speed_figure(ar, spec, method), done)


def build_app(cache: EngineCache, concurrency: int = 1):
    import gradio as gr

    def handler(prompt, max_new_tokens, temperature, method, budget, quant, drafter_quant, exact,
                progress=gr.Progress()):
        try:
            yield from compare(cache, prompt, max_new_tokens, temperature, method, int(budget), quant,
                               drafter_quant, 0, progress, exact=bool(exact))
        except QuanttreeError as exc:
            raise gr.Error(str(exc)) from exc

    with gr.Blocks(title="quanttree: plain vs tree speculation") as demo:
        gr.Markdown("# quanttree · plain decoding vs lossless tree speculation\n" + FAIRNESS)
        with gr.Row():
            prompt = gr.Textbox(label="Prompt", lines=3, scale=4,
                                value="Write a Python function that checks whether a number is prime.")
            with gr.Column(scale=1):
                run = gr.Button("Run both", variant="primary")
                stop = gr.Button("Stop")
        with gr.Row():
            max_new = gr.Slider(1, MAX_NEW_TOKENS_CAP, value=128, step=1, label="max new tokens")
            temperature = gr.Slider(0.0, 1.5, value=0.0, step=0.05, label="temperature (0 = greedy)")
            method = gr.Dropdown(SPEC_METHODS, value="auto", label="speculative method")
            budget = gr.Slider(1, 128, value=default_budget("auto"), step=1, label="tree budget / cap")
            quant = gr.Dropdown([q for q in QUANT_MODES], value="auto", label="target quant")
            drafter_quant = gr.Dropdown(["same"] + [q for q in QUANT_MODES if q != "auto"], value="same",
                                        label="drafter quant")
            exact = gr.Checkbox(value=True, label="exact (greedy output bit-identical to plain decoding)")
        status = gr.Markdown()
        badge_box = gr.Markdown()
        with gr.Row():
            with gr.Column():
                gr.Markdown("### Plain autoregressive decoding")
                ar_stats = gr.Markdown()
                ar_text = gr.Textbox(label="output", lines=14, interactive=False)
            with gr.Column():
                gr.Markdown("### Tree speculation")
                spec_stats = gr.Markdown()
                spec_text = gr.Textbox(label="output", lines=14, interactive=False)
        with gr.Row():
            tree_plot = gr.Plot(label="latest draft tree")
            speed_plot = gr.Plot(label="tokens/s over time")
        outputs = [ar_text, ar_stats, spec_text, spec_stats, badge_box, tree_plot, speed_plot, status]
        event = run.click(handler, [prompt, max_new, temperature, method, budget, quant, drafter_quant, exact], outputs,
                          concurrency_limit=concurrency, api_name="compare")
        stop.click(lambda: "stopped", None, status, cancels=[event])
        # a fixed method's budget is its tree size, an adaptive one's the cap it sizes under
        method.change(lambda m: gr.update(value=default_budget(m)), method, budget)
    demo.queue(default_concurrency_limit=concurrency, max_size=16)
    return demo


def main(host: str = "127.0.0.1", port: int = 7860, target: str = DEFAULT_TARGET, drafter: str | None = "auto",
         device: str | None = None) -> None:
    demo = build_app(EngineCache(target, drafter, device))
    demo.launch(server_name=host, server_port=port, show_error=True)
