"""Engine: loaded models reused across calls; generate() collects, stream() yields."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Sequence

import torch

from .decode import DRAFT_METHODS, METHODS, Clock, DecodeConfig, DraftContext, PhaseTimes, Step, decode
from .drafter import DFlashDrafter, build_drafter, check_fits_target, drafter_identity, quantize_linears, \
    read_draft_vocab, read_drafter, resolve_drafter_dir
from .costmodel import CostModel, CostProfile, learned_path, profile_key, profile_path
from .errors import QuanttreeError
from .lookup import CorpusIndex, load_corpus
from .models import BNB_MODES, DEFAULT_TARGET, EMBEDDED_MODELS, LoadedTarget, compute_dtype, load_target, \
    resolve_quant
from .policy import ADAPTIVE_METHODS, TreeSizer
from .sampling import SamplingParams
from .target import Target
from .tree import node_origins

Prompt = str | Sequence[dict]
DEFAULT_BUDGET = 8  # benchmarks/results/speculative_bf16.md: budget 8 beat 4 and 32 on CPU bf16
DEFAULT_CAP = 64
FIRST_USE_SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, DEFAULT_CAP + 1)  # verify tokens profiled on first use
D2SD_UNTRIMMED = 1024
# the calibration warm-up: decoded once after a verify-cost profile is measured, never benchmarked
WARMUP_PROMPTS = ("Write a Python function that merges two sorted lists into one sorted list.",
                  "Give three tips for keeping houseplants alive in winter.",
                  "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n")
WARMUP_TOKENS = 48
LEARNED_VERSION = 11  # the layout of the learned state saved beside a profile; another one is relearned
# (11: calibrators for the corpus sources, learned in the warm-up rather than cold in decoding)
EXACT_DEFAULT_ROWS = 4  # exact mode is on by default where a forward needs at most this many rows


@dataclass
class Stats:
    method: str = "ar"
    prompt_tokens: int = 0
    new_tokens: int = 0
    target_forwards: int = 0  # prefill included
    rounds: int = 0  # decode rounds (target forwards after prefill)
    prefill_ms: float = 0.0
    decode_s: float = 0.0
    tree_nodes: int = 0  # drafted nodes verified, summed over rounds
    accepted: int = 0  # drafted tokens accepted, summed over rounds
    accepted_at_depth: list[int] = field(default_factory=list)  # rounds that accepted >= d tokens
    times: PhaseTimes = field(default_factory=PhaseTimes)
    # per draft origin ('drafter', 'lookup', 'both': proposed by the two): [nodes verified, accepted]
    by_source: dict[str, list[int]] = field(default_factory=dict)
    # per draft origin: accepted nodes at depth 1, 2, ... (how deep each source's drafts go)
    accepted_by_depth: dict[str, list[int]] = field(default_factory=dict)
    # per round: drafted nodes verified (0: a plain round); and for rounds a sizer chose, its
    # expected accepted tokens (raw, calibrated) beside the tokens accepted
    sizes: list[int] = field(default_factory=list)
    predicted_raw: list[float] = field(default_factory=list)
    predicted: list[float] = field(default_factory=list)
    observed: list[int] = field(default_factory=list)

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first (which prefill produces) per second of decoding."""
        return (self.new_tokens - 1) / self.decode_s if self.decode_s > 0 and self.new_tokens > 1 else 0.0

    @property
    def tau(self) -> float:
        """Mean tokens committed per decode-round target forward, bonus included."""
        return (self.new_tokens - 1) / self.rounds if self.rounds else 0.0

    @property
    def mean_tree_size(self) -> float:
        return self.tree_nodes / self.rounds if self.rounds else 0.0

    def phase_ms(self) -> dict[str, float]:
        t = self.times
        other = max(self.decode_s - t.draft - t.lookup - t.build - t.verify - t.walk, 0.0)
        return {k: 1000 * v for k, v in {"draft": t.draft, "lookup": t.lookup, "build": t.build, "verify": t.verify,
                                         "walk": t.walk, "other": other}.items()}

    def add(self, step: Step) -> None:
        self.new_tokens += len(step.tokens)
        self.target_forwards += 1
        if step.prefill:
            self.prefill_ms = 1000 * step.seconds
            return
        self.rounds += 1
        self.decode_s += step.seconds
        self.tree_nodes += step.tree_size
        self.accepted += step.accept_len
        self.times.add(step.times)
        self.sizes.append(step.tree_size)
        if step.predicted is not None:
            self.predicted_raw.append(step.predicted_raw)
            self.predicted.append(step.predicted)
            self.observed.append(step.accept_len)
        if step.tree is not None and step.tree.size:
            origins = node_origins(step.tree)
            accepted = set(step.path.tolist()[1:]) if step.path is not None else set()
            depths = step.tree.depths.tolist()
            for i, origin in enumerate(origins, start=1):
                cell = self.by_source.setdefault(origin, [0, 0])
                cell[0] += 1
                cell[1] += i in accepted
                if i in accepted:
                    per_depth = self.accepted_by_depth.setdefault(origin, [])
                    per_depth.extend([0] * (depths[i] - len(per_depth)))
                    per_depth[depths[i] - 1] += 1
        while len(self.accepted_at_depth) < step.accept_len:
            self.accepted_at_depth.append(0)
        for d in range(step.accept_len):
            self.accepted_at_depth[d] += 1

    def summary(self) -> str:
        line = (f"{self.method}: {self.new_tokens} tokens, {self.decode_tokens_per_s:.1f} tok/s decode, "
                f"prefill {self.prefill_ms:.0f} ms, {self.target_forwards} target forwards")
        if self.method != "ar":
            line += f", tau {self.tau:.2f}, tree {self.mean_tree_size:.1f}"
        if self.by_source:
            line += ", accepted/drafted " + ", ".join(f"{k} {a}/{d}" for k, (d, a) in sorted(self.by_source.items()))
        return line


@dataclass
class Result:
    text: str
    token_ids: list[int]
    stats: Stats
    finish_reason: str  # "eos", "length" or "stop"


@dataclass
class StreamEvent:
    delta: str  # text new since the previous event
    text: str  # all text so far
    token_ids: list[int]
    stats: Stats
    step: Step
    finish_reason: str | None = None


class Engine:
    """A target (and optional drafter) loaded once and reused across generations."""

    def __init__(self, loaded: LoadedTarget, drafter: DFlashDrafter | None = None, drafter_quant: str | None = None,
                 vp_drafter: DFlashDrafter | None = None, exact: bool | None = None, corpus: CorpusIndex | None = None):
        self.loaded = loaded
        self.vp_drafter = vp_drafter
        self.corpus = corpus  # the target's earlier responses: an n-gram source for lookup and auto
        self.target = Target(loaded.model)
        self.tokenizer = loaded.tokenizer
        self.drafter = drafter
        self.quant = loaded.quant
        self.drafter_quant = drafter_quant
        self.eos_token_ids = _eos_ids(loaded.model, loaded.tokenizer)
        self._cost: CostModel | None = None
        self._learned: dict = {}
        self._learned_path: Path | None = None
        self._sizers: dict[tuple[str, int], TreeSizer] = {}
        self.set_exact(exact)

    @property
    def exact(self) -> bool:
        """Whether greedy speculative output is token for token plain decoding's (see set_exact)."""
        return self.target.exact

    def set_exact(self, exact: bool | None = None) -> None:
        """Exact mode: a token's numbers do not depend on how many tokens its forward holds, so
        greedy speculation returns exactly plain decoding's tokens in every dtype, not only where
        the rounding happens to agree. None = on wherever it runs at plain decoding's cost: not
        int8, not recurrent targets, and not where this device's matmuls need more than
        EXACT_DEFAULT_ROWS rows per forward to agree (fp32 MKL: 16; exact=True still pads to
        them). True where it cannot run raises, saying why. Its verify costs differ, so it has
        its own cost profile."""
        from .exact import min_exact_rows

        reason = exact_unavailable(self)
        if exact and reason:
            raise QuanttreeError(f"exact mode is not available here: {reason}")
        rows = min_exact_rows(self.target.model) if not reason else None
        if exact is None:
            exact = reason is None and rows.least <= EXACT_DEFAULT_ROWS
        if bool(exact) != self.target.exact:
            self.target.set_exact(bool(exact), rows.least if exact else 2, rows.most if exact else None)
            self._cost, self._learned, self._sizers = None, {}, {}

    def cost_model(self, progress: bool = True, remeasure: bool = False) -> CostModel:
        """This engine's measured cost model: cached in memory and on disk (keyed by model, drafter,
        quant modes, device, threads and library versions); measured on first use, followed by
        a short decoding warm-up that learns in-situ costs and the drafter's acceptance."""
        if self._cost is None or remeasure:
            path = profile_path(profile_key(self))
            self._learned_path = learned_path(path)
            if path.exists() and not remeasure:
                self._cost = CostModel.load(path)
                self._learned = _read_json(self._learned_path)
                if self._learned.get("version") != LEARNED_VERSION:
                    self._learned = {}
                self._cost.load_state(self._learned.get("cost", {}))
            else:
                if progress:  # the first adaptive run on this machine and mode: say what the wait is
                    print(f"first use of {self.loaded.source} ({self.quant}{', exact' if self.exact else ''}) "
                          f"on this machine: measuring its verify cost and the drafts' acceptance once "
                          f"(saved in {path.parent})", file=sys.stderr)
                # first use: the sizes a round can verify (up to the default cap), 3 timed repeats
                # each (~12 s on this CPU); `quanttree calibrate` re-measures the full grid, 5 each
                quick = dict(sizes=FIRST_USE_SIZES, repeats=3, warmup=1) if not remeasure else {}
                self._cost = CostModel(measure_profile(self, progress=progress, **quick))
                self._cost.save(path)
                self._learned = {}
            self._sizers = {}
            if not self._learned:
                self.warm_up(progress)
        return self._cost

    def sizer(self, method: str, budget: int) -> TreeSizer:
        """The tree-size policy state for an adaptive method (kept across calls and, through
        `save_learned`, across processes: it learns)."""
        key = (method, budget)
        if key not in self._sizers:
            cost = self.cost_model()
            sizer = TreeSizer(method, cost, cap=budget)
            stored = self._learned.get("sizers", {})
            state = stored.get(f"{method}/{budget}") or stored.get(f"auto/{DEFAULT_CAP}")
            if state:
                sizer.load_state(state)
            self._sizers[key] = sizer
        return self._sizers[key]

    def policy(self, method: str, budget: int) -> TreeSizer | None:
        """The sizer an adaptive method has used with this budget (its per-round records), if any."""
        return self._sizers.get((method, budget))

    @property
    def calibrated(self) -> bool:
        """Whether the cost model is loaded (else the first adaptive run measures it)."""
        return self._cost is not None

    def warm_up(self, progress: bool = True) -> None:
        """Decode the warm-up prompts with every tree size in turn: in-situ verify costs at each
        size and acceptance statistics, so `auto` starts calibrated; saved beside the profile."""
        from tqdm import tqdm

        cap = self.target.max_nodes(DEFAULT_CAP)
        sizer = self.sizer("auto", cap)
        sizer.explore([n - 1 for n in self._cost.profile.sizes if n - 1 <= cap])
        try:
            for prompt in tqdm(WARMUP_PROMPTS, desc="calibrating acceptance", unit="prompt", disable=not progress):
                # as users prompt (chat template when known): a drafter trained on chat answers is
                # calibrated very differently on raw completions
                for _ in self.stream(prompt, method="auto", max_new_tokens=WARMUP_TOKENS):
                    pass
        finally:
            sizer.explore([])
        sizer.chosen = []
        self.save_learned()

    def save_learned(self) -> None:
        """Write the online cost corrections and every sizer's state beside the profile."""
        if self._cost is None or self._learned_path is None:
            return
        sizers = dict(self._learned.get("sizers", {}))
        sizers.update({f"{m}/{b}": s.state() for (m, b), s in self._sizers.items()})
        self._learned = {"version": LEARNED_VERSION, "cost": self._cost.state(), "sizers": sizers}
        part = self._learned_path.with_suffix(".part")
        part.write_text(json.dumps(self._learned))
        part.replace(self._learned_path)  # atomic: another process never reads half a file

    @property
    def device(self) -> torch.device:
        return self.target.device

    @property
    def default_method(self) -> str:
        """`auto`: cost-aware trees of the drafter's and n-gram lookup's drafts merged (lookup's
        alone without a drafter), plain decoding where speculation does not pay; it measures
        the verify cost on first use."""
        return "auto"

    def encode(self, prompt: Prompt, chat: bool | None = None) -> list[int]:
        """Token ids for a prompt string or a list of chat messages (chat template when known)."""
        messages = _as_messages(prompt)
        template = getattr(self.tokenizer, "chat_template", None)
        use_chat = bool(template) if chat is None else chat
        if isinstance(prompt, str) and not use_chat:
            return self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        if not template:
            raise QuanttreeError("this tokenizer has no chat template: pass the prompt as a plain string")
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    def decode_config(self, method: str, max_new_tokens: int, temperature: float, top_p: float, top_k: int,
                      seed: int | None, budget: int | None, branches: int = 4) -> DecodeConfig:
        cfg = request_config(method or self.default_method, max_new_tokens, temperature, top_p, top_k, seed, budget,
                             branches, has_drafter=self.drafter is not None)
        return replace(cfg, eos_token_ids=self.eos_token_ids, budget=self.target.max_nodes(cfg.budget))

    def check_length(self, prompt_ids: list[int], max_new_tokens: int) -> None:
        if not prompt_ids:
            raise QuanttreeError("the prompt is empty: pass some text to continue")
        limit = self.target.max_positions
        if limit and len(prompt_ids) >= limit:
            raise QuanttreeError(f"the prompt has {len(prompt_ids)} tokens but the model's context is {limit}: "
                                 "shorten the prompt")
        if limit and len(prompt_ids) + max_new_tokens > limit:
            raise QuanttreeError(f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                                 f"the model's context of {limit}: lower max_new_tokens to {limit - len(prompt_ids)}")

    def stream(self, prompt: Prompt, method: str | None = None, max_new_tokens: int = 128, temperature: float = 0.0,
               top_p: float = 1.0, top_k: int = 0, seed: int | None = None, stop: str | Sequence[str] | None = None,
               budget: int | None = None, chat: bool | None = None, branches: int = 4) -> Iterator[StreamEvent]:
        """Yield text as it is produced, with live stats, one event per target forward."""
        cfg = self.decode_config(method, max_new_tokens, temperature, top_p, top_k, seed, budget, branches)
        stops = _as_stops(stop)
        prompt_ids = self.encode(prompt, chat)
        self.check_length(prompt_ids, max_new_tokens)
        stats = Stats(method=cfg.method, prompt_tokens=len(prompt_ids))
        sizer = self.sizer(cfg.method, cfg.budget) if cfg.method in ADAPTIVE_METHODS else None
        try:
            yield from self._events(decode(self.target, self.drafter, prompt_ids, cfg, sizer, self.vp_drafter,
                                           self.corpus),
                                    stats, stops)
        finally:
            if sizer is not None:
                self.save_learned()

    def _events(self, steps: Iterator[Step], stats: "Stats", stops: list[str]) -> Iterator[StreamEvent]:
        """Stream events from decode steps: text so far (held back where a stop string may start)."""
        ids: list[int] = []
        shown = ""
        for step in steps:
            stats.add(step)
            ids.extend(step.tokens)
            text = self._text(ids)
            cut = _find_stop(text, stops)
            if cut is not None:
                ids = self._ids_before_stop(ids, stops)
                text = text[:cut]
                yield StreamEvent(text[len(shown):], text, list(ids), stats, step, "stop")
                return
            visible = text if step.finished else _holdback(text, stops)
            yield StreamEvent(visible[len(shown):], visible, list(ids), stats, step, step.finished)
            shown = visible
            if step.finished:
                return

    def generate(self, prompt: Prompt, method: str | None = None, max_new_tokens: int = 128, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int | None = None, stop: str | Sequence[str] | None = None,
                 budget: int | None = None, chat: bool | None = None, branches: int = 4) -> Result:
        """Run to completion and return text, token ids and stats."""
        event = None
        for event in self.stream(prompt, method, max_new_tokens, temperature, top_p, top_k, seed, stop, budget, chat,
                                 branches):
            pass
        return Result(text=event.text, token_ids=event.token_ids, stats=event.stats,
                      finish_reason=event.finish_reason or "length")

    def divergence(self, prompt: Prompt, reference: list[int], other: list[int],
                   chat: bool | None = None) -> tuple[int, float] | None:
        """Where two greedy outputs first differ, and the reference's top-2 logit gap there
        (small = a rounding near-tie of bf16/4/8-bit forwards over different token counts)."""
        from . import kvcache

        for i, (a, b) in enumerate(zip(reference, other)):
            if a != b:
                ids = self.encode(prompt, chat) + reference[:i]
                cache = kvcache.new_target_cache(self.target.model)
                logits = self.target.forward(torch.tensor([ids]), torch.arange(len(ids))[None], cache,
                                             last_only=True).logits[-1]
                top = torch.topk(logits.float(), 2).values
                return i, float(top[0] - top[1])
        return None

    def _text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _ids_before_stop(self, ids: list[int], stops: list[str]) -> list[int]:
        """The shortest prefix of ids whose text contains a stop string, minus that string's tokens."""
        for n in range(1, len(ids) + 1):
            if _find_stop(self._text(ids[:n]), stops) is not None:
                return ids[: n - 1] if n > 1 else []
        return ids


def _read_json(path: Path) -> dict:
    """A JSON file's object, or {} when it is missing or unreadable (learned state is relearned)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _eos_ids(model, tokenizer) -> frozenset[int]:
    ids = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return frozenset(ids)


def default_budget(method: str) -> int:
    """ddtree and lookup: the best fixed budget measured on CPU bf16; adaptive methods: their cap;
    d2sd: the whole merged tree (at most (branches + 1) x (block - 1) nodes)."""
    return {"d2sd": D2SD_UNTRIMMED}.get(method, DEFAULT_CAP if method in ADAPTIVE_METHODS else DEFAULT_BUDGET)


def request_config(method: str | None, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                   top_k: int = 0, seed: int | None = None, budget: int | None = None, branches: int = 4,
                   has_drafter: bool | None = True) -> DecodeConfig:
    """A generation request checked without any model (the CLI checks it before loading one);
    has_drafter None: not known yet. One QuanttreeError sentence per bad value."""
    method = method or "auto"
    if budget is None:
        budget = default_budget(method)
    if method not in METHODS:
        raise QuanttreeError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    if method in DRAFT_METHODS and has_drafter is False:
        raise QuanttreeError(f"method {method!r} needs a drafter: quanttree.load(..., drafter=PATH), or use "
                             "'auto' or 'lookup' (n-gram drafts, no drafter)")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens <= 0:
        raise QuanttreeError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not isinstance(budget, int) or budget < 1:
        raise QuanttreeError(f"budget must be a positive integer (tree nodes), got {budget!r}")
    if not isinstance(branches, int) or branches < 1:
        raise QuanttreeError(f"branches must be a positive integer (d2sd re-drafted points), got {branches!r}")
    return DecodeConfig(method=method, max_new_tokens=max_new_tokens, budget=budget, branches=branches,
                        sampling=SamplingParams(temperature, top_p, top_k, seed))


def check_prompt(prompt: Prompt) -> None:
    """A prompt string with some text, or a non-empty list of chat messages."""
    _as_messages(prompt)


def _as_messages(prompt: Prompt) -> list[dict]:
    if isinstance(prompt, str):
        if not prompt.strip():
            raise QuanttreeError("the prompt is empty: pass some text to continue")
        return [{"role": "user", "content": prompt}]
    messages = list(prompt or [])
    if not messages or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        raise QuanttreeError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    return messages


def _as_stops(stop) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    if not all(isinstance(s, str) and s for s in stops):
        raise QuanttreeError("stop must be a non-empty string or a list of non-empty strings")
    return stops


def _find_stop(text: str, stops: list[str]) -> int | None:
    hits = [text.find(s) for s in stops if s in text]
    return min(hits) if hits else None


def _holdback(text: str, stops: list[str]) -> str:
    """Text safe to show: withhold an incomplete UTF-8 tail and a tail that may begin a stop string."""
    text = text.rstrip("\ufffd")
    keep = len(text)
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                keep = min(keep, len(text) - n)
                break
    return text[:keep]


def load_drafter(path: str, target: Target, quant: str | None) -> tuple[DFlashDrafter, str]:
    """Load a DFlash drafter for `target`, checked to fit it, in its own quant mode."""
    directory = resolve_drafter_dir(path)
    cfg, tensors = read_drafter(directory)
    check_fits_target(cfg, target.config, "mask_embedding" in tensors)
    drafter = build_drafter(cfg, tensors)
    vocab = read_draft_vocab(directory, cfg.vocab_size)
    if drafter.draft_vocab is not None:  # from a d2t tensor
        if vocab is not None and not torch.equal(vocab, drafter.draft_vocab):
            raise QuanttreeError(f"{directory}: draft_vocab.json and the d2t tensor name different vocabularies")
        vocab = drafter.draft_vocab
    mode = resolve_quant(quant or "auto", target.device)
    if quant is None or quant == "auto":  # follow the target's activation dtype
        dtype, mode = target.dtype, {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(target.dtype, "fp16")
    else:
        dtype = compute_dtype(mode, target.device)
    drafter = drafter.to(device=target.device, dtype=dtype)
    if mode in BNB_MODES:
        quantize_linears(drafter.layers, mode, dtype)
    drafter.eval().requires_grad_(False)
    drafter.draft_vocab = vocab.to(target.device) if vocab is not None else None
    drafter.identity = drafter_identity(directory)
    return drafter, mode


def shipped_drafter(target: str, variable_prefix: bool = False) -> str | None:
    """The drafter (or D2SD variable-prefix drafter) quanttree ships for an embedded target, if any."""
    path = Path(__file__).parent / "drafters" / (f"{target}-vp" if variable_prefix else target)
    return str(path) if target in EMBEDDED_MODELS and (path / "config.json").is_file() else None


def shipped_corpus(target: str) -> str | None:
    """The packed responses of an embedded target that quanttree ships (its drafter's training
    data), if any: the corpus `load(corpus="auto")` indexes."""
    path = Path(__file__).parent / "data" / "train" / f"{target}-bf16.npz"
    return str(path) if target in EMBEDDED_MODELS and path.is_file() else None


def load_corpus_index(corpus: str | None, target: str, log=print, vocab_size: int | None = None) -> CorpusIndex | None:
    """corpus: "auto" (the shipped one for an embedded target, else none), None, or a packed
    data file (`quanttree train-drafter --stage data` writes the target's responses; pack them
    with `quanttree.train.datagen.pack_dataset`). vocab_size: the target's, to refuse a corpus
    tokenized for another model."""
    path = shipped_corpus(target) if corpus == "auto" else corpus
    if path is None:
        return None
    if not Path(path).is_file():
        raise QuanttreeError(f"corpus {path!r} is not a file: pass a packed data file (.npz), 'auto' or None")
    try:
        index = load_corpus(path)
    except ValueError as exc:
        raise QuanttreeError(f"{exc}; pass 'auto' or None instead") from exc
    top = int(index.stream.max(initial=-1))
    if vocab_size is not None and top >= vocab_size:
        raise QuanttreeError(f"corpus {Path(path).name} holds token id {top}, but the target's vocabulary has "
                             f"{vocab_size} tokens: it was tokenized for another model; pack answers of this one")
    log(f"corpus: {len(index):,} tokens of earlier responses indexed for lookup drafts ({Path(path).name})")
    return index


def load(target: str = DEFAULT_TARGET, drafter: str | None = "auto", quant: str = "auto",
         drafter_quant: str | None = None, device: str | None = None, device_map: str | dict | None = None,
         vp_drafter: str | None = "auto", exact: bool | None = None, corpus: str | None = "auto",
         log=print) -> Engine:
    """Load a target (and DFlash drafters) once; reuse the Engine across calls.

    drafter: a drafter dir or hub id; "auto" = the drafter shipped for an embedded target (none
    otherwise); None = no drafter (plain decoding only). vp_drafter: D2SD's variable-prefix
    drafter, same forms ("auto" = the shipped one, only beside the shipped drafter); without one,
    d2sd re-drafts its branches with `drafter`. exact: greedy speculation returns exactly plain
    decoding's tokens (None = wherever possible: every mode but int8, targets without recurrent
    layers; see Engine.set_exact). corpus: earlier responses of this target, looked up for
    drafts by `lookup` and `auto` besides the request itself: "auto" = the shipped one for an
    embedded target (its drafter's training responses), None, or a packed data file.
    """
    loaded = load_target(target, quant, device, device_map, log)
    target_view = Target(loaded.model)
    index = load_corpus_index(corpus, target, log, target_view.vocab_size)
    if vp_drafter == "auto":  # the shipped VP drafter pairs with the shipped DFlash drafter only
        vp_drafter = shipped_drafter(target, variable_prefix=True) if drafter == "auto" else None
    if drafter == "auto":
        drafter = shipped_drafter(target)
    if drafter is None:
        return Engine(loaded, exact=exact, corpus=index)
    model, mode = load_drafter(drafter, target_view, drafter_quant)
    vp_model = None
    if vp_drafter is not None:
        vp_model, _ = load_drafter(vp_drafter, target_view, drafter_quant)
        check_same_features(model, vp_model)
    return Engine(loaded, model, mode, vp_model, exact=exact, corpus=index)


def measure_profile(engine, sizes=None, contexts=None, repeats: int = 5, warmup: int = 2,
                    progress: bool = True) -> CostProfile:
    """Time verify forwards of tree-shaped inputs (ancestor masks, as in decoding) over a grid of
    sizes and context lengths, and one drafter pass per context; medians after warm-ups."""
    from tqdm import tqdm

    from . import kvcache
    from .costmodel import DEFAULT_CONTEXTS, DEFAULT_SIZES, median_ms, model_shape
    from .tree import build_chain, build_tree, compile_tree

    target, clock = engine.target, Clock(engine.device)
    sizes = [s for s in sizes or DEFAULT_SIZES if target.max_rows is None or s <= target.max_rows]  # exact mode's range
    contexts = contexts or DEFAULT_CONTEXTS
    gen = torch.Generator().manual_seed(0)
    limit = target.max_positions or 4096
    contexts = [c for c in contexts if c + max(sizes) < limit] or [min(contexts)]
    verify, draft = [], []
    bar = tqdm(total=len(contexts) * len(sizes), desc="calibrating verify cost", unit="size", disable=not progress)
    for context in contexts:
        cache = kvcache.new_target_cache(target.model)
        prompt = torch.randint(0, target.vocab_size, (1, context), generator=gen)
        out = target.forward(prompt, torch.arange(context)[None], cache, last_only=True,
                             feature_layers=tuple(engine.drafter.config.target_layer_ids) if engine.drafter else ())
        recurrent = kvcache.has_recurrent_state(cache)  # verifies chains only (see decode): time chains
        saved = kvcache.snapshot(cache) if recurrent else None
        row = []
        for size in sizes:
            lp = torch.log_softmax(torch.randn(max(size - 1, 15), 64, generator=gen) * 2, -1)
            tree = build_chain(lp[:size - 1], 1) if recurrent else build_tree(lp[:15], 1, size - 1)
            inputs = compile_tree(tree, context, target.dtype)
            samples = []
            for rep in range(warmup + repeats):
                t0 = clock()
                target.forward(inputs.input_ids, inputs.position_ids, cache, inputs.attention_mask)
                if rep >= warmup:
                    samples.append(clock() - t0)
                if saved is not None:  # restore hands the saved tensors back: copy them again
                    kvcache.restore(cache, saved)
                    saved = kvcache.snapshot(cache)
                kvcache.crop(cache, context)
            row.append(median_ms(samples))
            bar.update(1)
        verify.append(row)
        if engine.drafter is not None:
            ctx = DraftContext(engine.drafter, target)
            ctx.commit(out.features, torch.arange(context))
            ctx.log_probs(1, context)  # absorbs the context
            samples = []
            for rep in range(warmup + repeats):
                t0 = clock()
                ctx.log_probs(1, context)
                if rep >= warmup:
                    samples.append(clock() - t0)
            draft.append(median_ms(samples))
        else:
            draft.append(0.0)
    bar.close()
    return CostProfile(key=profile_key(engine), sizes=list(sizes), contexts=list(contexts), verify_ms=verify,
                       draft_ms=draft, overhead_ms=1.0, shape=model_shape(target.model, engine.quant))


def exact_unavailable(engine: Engine) -> str | None:
    """Why exact mode cannot run on this engine's target, or None."""
    from . import kvcache
    from .exact import min_exact_rows, supports_exact_attention

    if engine.quant == "int8":
        return ("int8 (LLM.int8) picks its outlier columns from all the rows of a forward, so a token's numbers "
                "depend on the tree verified with it; use nf4, fp4, bf16 or fp32")
    if kvcache.has_recurrent_state(kvcache.new_target_cache(engine.target.model)):
        return ("this target has recurrent (linear-attention) layers, whose chunked kernels sum differently by "
                "token count")
    if not supports_exact_attention(engine.target.model):
        return (f"{type(engine.target.model).__name__} does not take a pluggable attention function "
                "(transformers' AttentionInterface)")
    rows = min_exact_rows(engine.target.model)
    if rows.least is None:
        return f"on this device a matmul rounds a row differently by how many rows share it: {rows.why}"
    return None


def check_same_features(drafter: DFlashDrafter, vp_drafter: DFlashDrafter) -> None:
    """The two D2SD drafters read the same target features, blocks and draft vocabulary."""
    a, b = drafter, vp_drafter
    same_vocab = (a.draft_vocab is None and b.draft_vocab is None) or (
        a.draft_vocab is not None and b.draft_vocab is not None and torch.equal(a.draft_vocab, b.draft_vocab))
    if a.config.target_layer_ids != b.config.target_layer_ids or a.config.block_size != b.config.block_size \
            or not same_vocab:
        raise QuanttreeError("the variable-prefix drafter must use the same target_layer_ids, block_size and "
                             "draft vocabulary as the DFlash drafter: train both from the same data and settings")
