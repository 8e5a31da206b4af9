"""Tree-size policies: how many of the drafted nodes to verify this round.

All work on Phi(n), the expected accepted draft tokens of the best n nodes (the sum of their
calibrated path probabilities, nodes taken in best-first pop order), and on a verify-cost curve
C_v(n + 1) (root included). Throughput of a round with n nodes:

    theta(n) = (1 + Phi(n)) / (C_fixed + C_v(n + 1))

where C_fixed is the draft pass plus per-round overhead (zero for a round that does not draft).
"""

from __future__ import annotations

import numpy as np
import torch

from .tree import Tree


def pop_order(tree: Tree) -> torch.Tensor:
    """Non-root node indices in best-first order (score descending, shallower first on ties)."""
    scores = tree.scores[1:]
    # stable sort on depth first, then on score: ties keep the shallower (parent) first
    by_depth = torch.argsort(tree.depths[1:], stable=True)
    order = by_depth[torch.argsort(scores[by_depth], descending=True, stable=True)]
    return order + 1


def expected_gain(path_probs: np.ndarray) -> np.ndarray:
    """Phi(n) for n = 0..N from path probabilities in pop order. [N] -> [N+1]"""
    return np.concatenate([[0.0], np.cumsum(path_probs)])


def throughput(phi: np.ndarray, verify: np.ndarray, fixed_ms: float) -> np.ndarray:
    """theta(n) for n = 0..N; verify[n] = C_v(n + 1 tokens). phi, verify: [N+1] (the shorter wins)"""
    m = min(phi.size, verify.size)
    return (1.0 + phi[:m]) / (fixed_ms + verify[:m])


def best_size(phi: np.ndarray, verify: np.ndarray, fixed_ms: float) -> int:
    """Exact argmax of theta over n = 0..N on the given (raw, possibly non-convex) curve."""
    return int(np.argmax(throughput(phi, verify, fixed_ms)))


def greedy_size(phi: np.ndarray, verify: np.ndarray, fixed_ms: float) -> int:
    """CaDDTree's rule: keep adding the next node while theta grows; stop at the first decrease.
    Exact when Phi is concave and C_v convex; can stop early on a non-convex curve."""
    theta = throughput(phi, verify, fixed_ms)
    n = 0
    while n + 1 < theta.size and theta[n + 1] > theta[n]:
        n += 1
    return n


def prune(tree: Tree, n: int) -> Tree:
    """The tree of the n best nodes (prefix-closed: a parent always pops before its child)."""
    if n >= tree.size:
        return tree
    keep = torch.sort(pop_order(tree)[:n]).values  # original indices, still parents-first
    keep = torch.cat([torch.zeros(1, dtype=torch.long, device=keep.device), keep])
    new_index = torch.full((tree.size + 1,), -1, dtype=torch.long, device=keep.device)
    new_index[keep] = torch.arange(keep.numel(), device=keep.device)
    parents = tree.parents[keep]
    parents = torch.where(parents >= 0, new_index[parents.clamp(min=0)], parents)
    return Tree(tree.tokens[keep], parents, tree.depths[keep], tree.scores[keep])


class AcceptanceCalibrator:
    """Per-depth correction of the drafter's path probabilities from observed acceptance.

    Predicted: sum of p(v) over verified nodes at depth d (expected accepted at d).
    Observed: 1 if the round accepted >= d tokens. Both are exponential moving averages; the
    factor observed/predicted multiplies p(v) of depth-d nodes (clipped to [0.02, 3])."""

    def __init__(self, depths: int, ema: float = 0.05, prior: float = 1.0):
        self.predicted = np.full(depths, prior)
        self.observed = np.full(depths, prior)
        self.ema = ema

    def factors(self) -> np.ndarray:
        return np.clip(self.observed / np.maximum(self.predicted, 1e-6), 0.02, 3.0)

    def calibrate(self, probs: np.ndarray, depths: np.ndarray) -> np.ndarray:
        """Calibrated path probabilities for nodes at the given depths (1-based). [N] -> [N]"""
        return np.clip(probs * self.factors()[depths - 1], 0.0, 1.0)

    def update(self, tree: Tree, accept_len: int) -> None:
        if tree.size == 0:
            return
        depths = tree.depths[1:].cpu().numpy()
        probs = tree.scores[1:].exp().cpu().numpy()
        predicted = np.bincount(depths - 1, weights=probs, minlength=self.predicted.size)[: self.predicted.size]
        reached = depths.max()
        observed = (np.arange(1, self.predicted.size + 1) <= accept_len).astype(float)
        mask = np.arange(1, self.predicted.size + 1) <= reached  # only depths the tree tested
        self.predicted[mask] = (1 - self.ema) * self.predicted[mask] + self.ema * predicted[mask]
        self.observed[mask] = (1 - self.ema) * self.observed[mask] + self.ema * observed[mask]


ADAPTIVE_METHODS = ("caddtree", "bastion", "auto")


class TreeSizer:
    """Chooses each round's tree size from the cost model and the calibrated surrogate.

    caddtree: the greedy stopping rule on the convex fit of C_v.
    bastion:  the greedy rule on the calibrated roofline estimate, never below `min_nodes`.
    auto:     the exact argmax on the raw measured table, n = 0 included. Before drafting it
              checks that speculation pays, twice: predicted (recent rounds' expected gain on
              the measured curve beats plain decoding) and realized (drafted rounds save time:
              each one's wall time against what plain rounds would have taken for the tokens it
              committed, an EMA over drafted rounds). When either says no it decodes plainly,
              probing with a drafted round after `probe_every` plain rounds, the interval doubling
              (to `max_probe_every`) while probes keep losing.

    `explore(sizes)` makes any method draft every round and verify the given node counts in turn
    (the calibration warm-up: in-situ verify costs at every size, and acceptance statistics).
    `state()` / `load_state()` carry what it learned into the next process.
    """

    def __init__(self, method: str, cost, cap: int, depths: int, probe_every: int = 8, min_nodes: int = 0,
                 max_probe_every: int = 64, realized_ema: float = 0.1):
        self.method, self.cost, self.cap = method, cost, cap
        self.calibrator = AcceptanceCalibrator(depths)
        self.expected_phi: np.ndarray | None = None
        self.overhead_ms = cost.profile.overhead_ms
        self.probe_every, self.min_nodes = probe_every, min_nodes
        self.base_probe_every, self.max_probe_every = probe_every, max_probe_every
        # EMAs (None before any): wall ms of a plain round, and ms a drafted round saved against
        # plain rounds producing its tokens (per round matched, so it is not biased by when
        # auto chooses to draft)
        self.plain_ms: float | None = None
        self.savings_ms: float | None = None
        self.realized_ema = realized_ema
        self.skipped = 0
        self.chosen: list[int] = []
        # per verified round: expected accepted tokens of the chosen tree from the drafter's raw
        # path probabilities, from the calibrated ones, and the tokens actually accepted
        self.predicted_raw: list[float] = []
        self.predicted: list[float] = []
        self.observed: list[int] = []
        self._chose = self._approved = False
        self.schedule: list[int] = []
        self._build = min(cap, 16)

    def build_budget(self) -> int:
        """Nodes to build before choosing: twice the largest recent choice (at least 16, at most
        the cap), so a round does not build 64 nodes to verify 4; it grows as choices near it."""
        return self.cap if self.schedule else self._build

    def explore(self, sizes: list[int]) -> None:
        """Draft every round and verify these node counts in turn (empty: back to the policy)."""
        self.schedule = list(sizes)

    def state(self) -> dict:
        """What this sizer learned (acceptance calibration, expected gain, realized times, overhead)."""
        return {"method": self.method, "cap": self.cap, "overhead_ms": self.overhead_ms,
                "acceptance": {"predicted": self.calibrator.predicted.tolist(),
                               "observed": self.calibrator.observed.tolist()},
                "expected_phi": None if self.expected_phi is None else self.expected_phi.tolist(),
                "plain_ms": self.plain_ms, "savings_ms": self.savings_ms}

    def load_state(self, state: dict) -> None:
        acceptance = state.get("acceptance", {})
        if len(acceptance.get("predicted", [])) != self.calibrator.predicted.size:
            return  # another drafter block size: start fresh
        self.calibrator.predicted = np.array(acceptance["predicted"], dtype=float)
        self.calibrator.observed = np.array(acceptance["observed"], dtype=float)
        self.overhead_ms = float(state["overhead_ms"])
        phi = state.get("expected_phi")
        self.expected_phi = None if phi is None else np.array(phi, dtype=float)
        self.plain_ms, self.savings_ms = state.get("plain_ms"), state.get("savings_ms")

    def _curve(self, context: int, smooth: bool) -> np.ndarray:
        if self.method == "bastion":
            return np.array([self.cost.roofline_ms(n, context) for n in range(1, self.cap + 2)])
        return self.cost.verify_curve(self.cap + 1, context, smooth=smooth)

    def predicted_pays(self, context: int) -> bool:
        """Recent rounds' expected gain, on the measured curve, beats plain decoding."""
        verify = self._curve(context, smooth=False)
        fixed = self.cost.draft_ms(context) + self.overhead_ms
        return throughput(self.expected_phi, verify, fixed)[1:].max(initial=0.0) > 1.0 / verify[0]

    def speculation_pays(self, context: int) -> bool:
        """Predicted to pay, and drafted rounds the prediction approved have saved time."""
        return self.predicted_pays(context) and (self.savings_ms is None or self.savings_ms >= 0.0)

    def should_draft(self, context: int) -> bool:
        self._approved = False
        if self.method != "auto" or self.expected_phi is None or self.schedule:
            return True
        if 0 < self.skipped < self.probe_every:  # inside a plain streak: no evaluation at all
            self.skipped += 1
            self.chosen.append(0)
            return False
        if self.skipped:  # the streak ends with a probe; the next one is longer if this one loses
            self.skipped = 0
            self.probe_every = min(2 * self.probe_every, self.max_probe_every)
            self._approved = self.predicted_pays(context)  # its savings count only if approved
            return True
        if self.speculation_pays(context):
            self.probe_every = self.base_probe_every
            self._approved = True
            return True
        self.skipped = 1
        self.chosen.append(0)
        return False

    def choose(self, tree: Tree, context: int) -> Tree:
        """Prune the drafted tree to the size this method picks."""
        order = pop_order(tree)
        probs = self.calibrator.calibrate(tree.scores[order].exp().cpu().numpy(),
                                          tree.depths[order].cpu().numpy())
        phi = expected_gain(probs)
        fixed = self.cost.draft_ms(context) + self.overhead_ms
        if self.schedule:
            n = min(self.schedule[len(self.chosen) % len(self.schedule)], tree.size)
        elif self.method == "auto":
            n = best_size(phi, self._curve(context, smooth=False), fixed)
        else:
            n = max(greedy_size(phi, self._curve(context, smooth=True), fixed), min(self.min_nodes, tree.size))
        self.expected_phi = phi if self.expected_phi is None else _ema_curve(self.expected_phi, phi)
        self.chosen.append(n)
        recent = max((c for c in self.chosen[-32:]), default=0)
        self._build = min(self.cap, max(16, 2 * recent))
        self.predicted_raw.append(float(tree.scores[order[:n]].exp().sum()))
        self.predicted.append(float(phi[min(n, phi.size - 1)]))
        self._chose = True
        return prune(tree, n)

    def observe(self, tree: Tree, accept_len: int, tokens: int, context: int, verify_ms: float,
                overhead_ms: float, round_ms: float | None = None, draft_ms: float = 0.0) -> None:
        """After a verified round: acceptance, verify and draft times, the per-round overhead of a
        drafted round, and (auto) the realized wall time: of a plain round, or saved by a drafted
        round the prediction approved."""
        self.calibrator.update(tree, accept_len)
        self.cost.observe(tokens, context, verify_ms)
        if self._chose:  # rounds that skipped the drafter predicted nothing and cost no overhead
            self.observed.append(accept_len)
            self.cost.observe_draft(context, draft_ms)
            self.overhead_ms = 0.9 * self.overhead_ms + 0.1 * overhead_ms
        if round_ms is not None and round_ms > 0 and not self.schedule:  # exploring is not the policy
            if self._chose and self._approved:
                plain = self.plain_ms if self.plain_ms is not None else self.cost.verify_ms(1, context)
                self.savings_ms = _ema(self.savings_ms, (accept_len + 1) * plain - round_ms, self.realized_ema)
            elif not self._chose:
                self.plain_ms = _ema(self.plain_ms, round_ms, self.realized_ema)
        self._chose = self._approved = False


def _ema(old: float | None, new: float, weight: float) -> float:
    return new if old is None else (1 - weight) * old + weight * new


def _ema_curve(old: np.ndarray, new: np.ndarray, ema: float = 0.2) -> np.ndarray:
    size = max(old.size, new.size)
    pad = lambda a: np.concatenate([a, np.full(size - a.size, a[-1])])  # noqa: E731
    return (1 - ema) * pad(old) + ema * pad(new)
