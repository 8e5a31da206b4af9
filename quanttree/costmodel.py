"""The measured cost of a speculation round: verify latency C_v(n, l) and draft latency C_d.

Measured per (target, quant modes, device, library versions), kept as the raw table AND a
monotone convex least-squares fit; bitsandbytes kernels switch paths by token count, so the raw
curve may jump, and `violations()` names where. An EMA ratio corrects the prediction online from
measured verify times, so a profile that drifts (thermal, other load) heals itself.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

DEFAULT_SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)
DEFAULT_CONTEXTS = (128, 512)


@dataclass
class CostProfile:
    key: dict  # model, quant, drafter_quant, device, library versions
    sizes: list[int]  # tokens per verify forward (root + drafted nodes)
    contexts: list[int]  # cached context lengths
    verify_ms: list[list[float]]  # [context][size], medians
    draft_ms: list[float]  # [context], one drafter pass
    overhead_ms: float = 0.0  # per round outside the two forwards (tree build, walk, compaction)
    fitted_ms: list[list[float]] = field(default_factory=list)  # monotone convex fit of verify_ms
    shape: dict = field(default_factory=dict)  # model shape and weight bytes, for the roofline estimate
    roofline: list[float] = field(default_factory=list)  # a_c, b_c, a_m, b_m fitted on the grid

    def __post_init__(self):
        if not self.fitted_ms:
            self.fitted_ms = [convex_monotone_fit(self.sizes, row) for row in self.verify_ms]
        if not self.roofline and self.shape:
            self.roofline = fit_roofline(self)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "CostProfile":
        return cls(**data)


def nnls(a: np.ndarray, b: np.ndarray, iters: int = 500) -> np.ndarray:
    """Non-negative least squares (Lawson-Hanson active set): argmin ||a x - b|| s.t. x >= 0."""
    m, n = a.shape
    x = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    w = a.T @ (b - a @ x)
    for _ in range(iters):
        if passive.all() or (w[~passive] <= 1e-12).all():
            break
        j = int(np.argmax(np.where(~passive, w, -np.inf)))
        passive[j] = True
        while True:
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
            if (z[passive] > 0).all():
                x = z
                break
            bad = passive & (z <= 0)
            alpha = np.min(x[bad] / (x[bad] - z[bad] + 1e-300))
            x = x + alpha * (z - x)
            passive &= x > 1e-12
        w = a.T @ (b - a @ x)
    return x


def convex_monotone_fit(sizes: list[int], values: list[float]) -> list[float]:
    """Least-squares fit of values at sizes by a non-decreasing, convex piecewise-linear curve.

    Parametrised as y = y0 + sum_j slope_j * gap_j with slopes 0 <= s_1 <= s_2 <= ...,
    i.e. slope_j = sum_{k<=j} d_k with y0, d_k >= 0, solved exactly with NNLS.
    """
    x = np.asarray(sizes, dtype=float)
    y = np.asarray(values, dtype=float)
    n = len(x)
    if n < 3:
        return list(np.maximum.accumulate(y))
    gaps = np.diff(x)  # [n-1]
    # y_i = y0 + sum_{j < i} gap_j * sum_{k <= j} d_k
    design = np.zeros((n, n))
    design[:, 0] = 1.0
    for i in range(1, n):
        for k in range(i):
            design[i, 1 + k] = gaps[k:i].sum()
    coef = nnls(design, y)
    return list(design @ coef)


def violations(sizes: list[int], values: list[float], tolerance: float = 0.05) -> list[dict]:
    """Where a measured curve is not monotone or not convex, beyond a relative tolerance."""
    out = []
    scale = max(values)
    for i in range(1, len(values)):
        if values[i] < values[i - 1] - tolerance * scale:
            out.append({"kind": "drop", "from_size": sizes[i - 1], "to_size": sizes[i],
                        "ms": [round(values[i - 1], 2), round(values[i], 2)]})
    slopes = [(values[i + 1] - values[i]) / (sizes[i + 1] - sizes[i]) for i in range(len(values) - 1)]
    slope_scale = max(abs(s) for s in slopes) or 1.0
    for i in range(1, len(slopes)):
        if slopes[i] < slopes[i - 1] - tolerance * slope_scale:
            out.append({"kind": "concave", "at_size": sizes[i], "slope_before": round(slopes[i - 1], 3),
                        "slope_after": round(slopes[i], 3)})
    return out


BYTES_PER_PARAM = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "int8": 1.0, "nf4": 0.53, "fp4": 0.53}


def model_shape(model, quant: str) -> dict:
    """What the roofline estimate needs from a target: sizes and weight bytes per parameter."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    embed = model.get_input_embeddings().weight.numel()
    params = sum(p.numel() for p in model.parameters())
    return {"layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size, "vocab": cfg.vocab_size,
            "kv_dim": (getattr(cfg, "num_key_value_heads", heads) or heads) * head_dim, "q_dim": heads * head_dim,
            "params": params - embed, "bytes_per_param": BYTES_PER_PARAM.get(quant, 2.0),
            "act_bytes": 4.0 if quant == "fp32" else 2.0}


def roofline_terms(shape: dict, tokens: int, context: int) -> tuple[float, float]:
    """(FLOPs, bytes) of one forward over `tokens` new tokens after `context` cached ones."""
    s, c, h = tokens, context, shape["hidden"]
    flops = 2.0 * shape["params"] * s  # weight matmuls
    flops += 2.0 * shape["vocab"] * h * s  # lm_head over every verified token
    flops += 4.0 * shape["layers"] * shape["q_dim"] * s * (c + s)  # scores + weighted values
    weights = shape["params"] * shape["bytes_per_param"] + shape["vocab"] * h * shape["act_bytes"]
    kv = 2.0 * shape["layers"] * shape["kv_dim"] * (c + s) * shape["act_bytes"]
    acts = 8.0 * shape["layers"] * h * s * shape["act_bytes"]
    return flops, weights + kv + acts


def fit_roofline(profile: "CostProfile") -> list[float]:
    """BASTION's calibration: C_hat = max(a_c t_compute + b_c, a_m t_memory + b_m), each branch
    fitted by least squares on the measured (size, context) grid (t in nominal units)."""
    rows = [(roofline_terms(profile.shape, n, c), ms) for c, row in zip(profile.contexts, profile.verify_ms)
            for n, ms in zip(profile.sizes, row)]
    y = np.array([ms for _, ms in rows])
    coef = []
    for k in (0, 1):
        t = np.array([terms[k] for terms, _ in rows]) / 1e9
        a, b = np.linalg.lstsq(np.stack([t, np.ones_like(t)], 1), y, rcond=None)[0]
        coef += [max(float(a), 0.0), float(b)]
    return coef


def interp(x, xs, ys):
    """Piecewise-linear interpolation, linear extrapolation past both ends. x: scalar or array
    (the result has its shape); or x scalar and ys [len(xs), ...] (rows interpolated)."""
    xs, ys = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    if xs.size == 1:
        out = np.broadcast_to(ys[0], np.shape(x)) if np.ndim(x) else ys[0]
    else:
        i = np.clip(np.searchsorted(xs, x) - 1, 0, xs.size - 2)
        t = (np.asarray(x, dtype=float) - xs[i]) / (xs[i + 1] - xs[i])
        out = ys[i] + t * (ys[i + 1] - ys[i])
    return out if np.ndim(out) else float(out)


class CostModel:
    """Predicts round costs from a profile and corrects them online from measured times.

    measured / profiled = drift x shape. Drift (thermal, other load) is one ratio for every
    size, an EMA over all measured verifies; shape is a per-size residual at each grid size the
    decode loop has actually run (a profile taken by repeating one forward in a tight loop can
    be 10-20% off for some sizes), measured relative to the drift at the time, so a size seen
    long ago still follows today's drift. Residuals learn at half the drift's speed, keep a
    geometric mean of 1 over the measured sizes (a common level is drift) and are shrunk toward
    1 until they have `trust` observations. The drafter pass has its own ratio."""

    def __init__(self, profile: CostProfile, ema: float = 0.1, trust: float = 3.0):
        self.profile = profile
        self.ema, self.trust = ema, trust
        self.ratio = 1.0  # drift
        self.size_ratio = np.ones(len(profile.sizes))  # [S] shape residual per grid size
        self.size_weight = np.zeros(len(profile.sizes))  # [S] observations seen per grid size
        self.draft_ratio = 1.0

    def _table(self, smooth: bool) -> list[list[float]]:
        return self.profile.fitted_ms if smooth else self.profile.verify_ms

    def profiled_ms(self, tokens, context: int, smooth: bool = False):
        """C_v as profiled, before any online correction (tokens: scalar or array)."""
        per_context = np.stack([interp(np.atleast_1d(tokens), self.profile.sizes, row)
                                for row in self._table(smooth)])  # [C, T]
        out = interp(context, self.profile.contexts, per_context)  # [T]
        return out if np.ndim(tokens) else float(out[0])

    def shape(self, tokens):
        """The shape residual of a `tokens`-token verify (scalar or array), 1 where unmeasured."""
        trust = self.size_weight / (self.size_weight + self.trust)
        return interp(tokens, self.profile.sizes, 1.0 + trust * (self.size_ratio - 1.0))

    def verify_ms(self, tokens, context: int, smooth: bool = False):
        """C_v for a forward of `tokens` new tokens after `context` cached ones (tokens: scalar
        or array). The convex fit (smooth) gets the drift ratio only: a per-size correction
        would undo its convexity."""
        factor = self.ratio if smooth else self.ratio * self.shape(tokens)
        return factor * self.profiled_ms(tokens, context, smooth)

    def verify_curve(self, max_tokens: int, context: int, smooth: bool = False) -> np.ndarray:
        """C_v(n) for n = 1..max_tokens tokens. [max_tokens]"""
        return self.verify_ms(np.arange(1, max_tokens + 1), context, smooth)

    def roofline_ms(self, tokens: int, context: int) -> float:
        """BASTION's calibrated roofline estimate of C_v (with the drift correction)."""
        a_c, b_c, a_m, b_m = self.profile.roofline
        flops, nbytes = roofline_terms(self.profile.shape, tokens, context)
        return self.ratio * max(a_c * flops / 1e9 + b_c, a_m * nbytes / 1e9 + b_m)

    def draft_ms(self, context: int) -> float:
        return self.draft_ratio * interp(context, self.profile.contexts, self.profile.draft_ms)

    def observe(self, tokens: int, context: int, measured_ms: float) -> None:
        """Fold a measured verify time into the drift and into the shape residuals of the two grid
        sizes around `tokens` (weighted by closeness)."""
        profiled = self.profiled_ms(tokens, context)
        if profiled <= 0 or measured_ms <= 0:
            return
        r = measured_ms / profiled
        ratio = (1 - self.ema) * self.ratio + self.ema * r / self.shape(tokens)
        r = r / ratio  # the residual of this size under today's drift
        size_ratio, size_weight = self.size_ratio.copy(), self.size_weight.copy()
        sizes = self.profile.sizes
        i = min(max(int(np.searchsorted(sizes, tokens, side="right")) - 1, 0), len(sizes) - 1)
        j = min(i + 1, len(sizes) - 1)
        t = 0.0 if i == j else min(max((tokens - sizes[i]) / (sizes[j] - sizes[i]), 0.0), 1.0)
        for k, w in ((i, 1 - t), (j, t)):
            if w > 0:
                # half the drift's speed: a change every size shares goes to the drift first
                size_ratio[k] += 0.5 * self.ema * w * (r - size_ratio[k])
                size_weight[k] += w
        # what all measured sizes share is drift, not shape: residuals keep a geometric mean of 1
        with np.errstate(all="ignore"):
            level = np.exp(np.average(np.log(size_ratio), weights=size_weight))
        size_ratio, ratio = size_ratio / level, ratio * level
        if not (np.isfinite(ratio) and ratio > 0 and np.all(np.isfinite(size_ratio)) and np.all(size_ratio > 0)):
            return  # a degenerate measurement must not poison the model (it is saved and reloaded)
        self.ratio, self.size_ratio, self.size_weight = float(ratio), size_ratio, size_weight

    def observe_draft(self, context: int, measured_ms: float) -> None:
        """Fold a measured drafter pass (with its context absorption) into the draft ratio."""
        profiled = interp(context, self.profile.contexts, self.profile.draft_ms)
        if profiled > 0 and measured_ms > 0:
            self.draft_ratio = (1 - self.ema) * self.draft_ratio + self.ema * measured_ms / profiled

    def state(self) -> dict:
        """The online corrections (saved beside the profile, so a new process starts from them)."""
        return {"ratio": self.ratio, "size_ratio": self.size_ratio.tolist(),
                "size_weight": self.size_weight.tolist(), "draft_ratio": self.draft_ratio}

    def load_state(self, state: dict) -> None:
        if len(state.get("size_ratio", [])) != len(self.profile.sizes):
            return  # from another grid: start fresh
        values = [state["ratio"], state["draft_ratio"], *state["size_ratio"], *state["size_weight"]]
        if not all(isinstance(v, (int, float)) and np.isfinite(v) for v in values):
            return  # a state saved with a NaN in it (before session 23's guards): start fresh
        self.ratio, self.draft_ratio = float(state["ratio"]), float(state["draft_ratio"])
        self.size_ratio = np.array(state["size_ratio"], dtype=float)
        self.size_weight = np.array(state["size_weight"], dtype=float)

    def save(self, path: Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.profile.to_json(), indent=1))
        return path

    @classmethod
    def load(cls, path: Path) -> "CostModel":
        return cls(CostProfile.from_json(json.loads(Path(path).read_text())))


def median_ms(samples: list[float]) -> float:
    return 1000 * statistics.median(samples)


def profile_key(engine) -> dict:
    from .models import library_versions

    return {"model": engine.loaded.path, "quant": engine.quant,
            "drafter": getattr(engine.drafter, "identity", None), "drafter_quant": engine.drafter_quant,
            "device": str(engine.device), "threads": __import__("torch").get_num_threads(),
            "exact": engine.exact, **library_versions()}


def profile_path(key: dict) -> Path:
    from hashlib import sha256

    from .models import cache_dir

    digest = sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / "profiles" / f"{Path(str(key['model'])).name}-{key['quant']}-{digest}.json"


def learned_path(profile: Path) -> Path:
    """Where the online corrections and sizer states learned on top of a profile are kept."""
    return profile.with_name(profile.stem + ".learned.json")
