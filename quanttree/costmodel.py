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

    def __post_init__(self):
        if not self.fitted_ms:
            self.fitted_ms = [convex_monotone_fit(self.sizes, row) for row in self.verify_ms]

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


def interp(x: float, xs: list[float], ys: list[float]) -> float:
    """Piecewise-linear interpolation, linear extrapolation past both ends."""
    if len(xs) == 1:
        return float(ys[0])
    if x <= xs[0]:
        i = 0
    elif x >= xs[-1]:
        i = len(xs) - 2
    else:
        i = int(np.searchsorted(xs, x)) - 1
    t = (x - xs[i]) / (xs[i + 1] - xs[i])
    return float(ys[i] + t * (ys[i + 1] - ys[i]))


class CostModel:
    """Predicts round costs from a profile; `observe` corrects it online with an EMA ratio."""

    def __init__(self, profile: CostProfile, ema: float = 0.1):
        self.profile = profile
        self.ema = ema
        self.ratio = 1.0

    def _table(self, smooth: bool) -> list[list[float]]:
        return self.profile.fitted_ms if smooth else self.profile.verify_ms

    def verify_ms(self, tokens: int, context: int, smooth: bool = False) -> float:
        """C_v for a forward of `tokens` new tokens after `context` cached ones."""
        rows = self._table(smooth)
        per_context = [interp(tokens, self.profile.sizes, row) for row in rows]
        return self.ratio * interp(context, self.profile.contexts, per_context)

    def verify_curve(self, max_tokens: int, context: int, smooth: bool = False) -> np.ndarray:
        """C_v(n) for n = 1..max_tokens tokens. [max_tokens]"""
        return np.array([self.verify_ms(n, context, smooth) for n in range(1, max_tokens + 1)])

    def draft_ms(self, context: int) -> float:
        return self.ratio * interp(context, self.profile.contexts, self.profile.draft_ms)

    def observe(self, tokens: int, context: int, measured_ms: float) -> None:
        """Fold a measured verify time into the correction ratio."""
        predicted = self.verify_ms(tokens, context) / self.ratio
        if predicted > 0 and measured_ms > 0:
            self.ratio = (1 - self.ema) * self.ratio + self.ema * (measured_ms / predicted)

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
