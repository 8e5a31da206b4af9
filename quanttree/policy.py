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

from .tree import SOURCES, Tree, own_probs, subtree


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


def best_size(phi: np.ndarray, verify: np.ndarray, rate: float) -> int:
    """Exact argmax over n = 0..N of Phi(n) - rate * C_v(n + 1) on the given (raw, possibly
    non-convex) curve: the tokens a round's nodes add beyond what decoding at `rate` tokens per
    ms would produce in the time they take. phi, verify: [N+1] (the shorter wins)

    Tokens per second over many rounds is a ratio of sums, sum(1 + Phi) / sum(C); it is maximal
    when every round maximises 1 + Phi - rate * C with rate at that maximum (Dinkelbach), so the
    draft pass and overheads, paid once a round has drafted, do not change the choice. With
    rate = max theta of one round this is that round's argmax of theta; maximising each round's
    own theta instead (a mean of ratios) takes too few nodes in confident rounds and too many in
    doubtful ones."""
    m = min(phi.size, verify.size)
    return int(np.argmax(phi[:m] - rate * verify[:m]))


def ranked_by(tree: Tree, path: np.ndarray) -> Tree:
    """The tree with calibrated path probabilities [n+1] as its scores (so pop_order ranks by them)."""
    scores = torch.tensor(np.log(np.maximum(path, 1e-30)), dtype=torch.float32, device=tree.scores.device)
    return Tree(tree.tokens, tree.parents, tree.depths, scores, tree.own)


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
    return subtree(tree, keep, parents)


def exclusive_rates(parents: np.ndarray, rate: np.ndarray) -> np.ndarray:
    """Each parent's children's rates [n+1] (root first) made to sum to at most 1, best first:
    the best-rated child keeps its rate, each next one gets at most what the better ones leave.
    Siblings are exclusive (the target takes one token after a node), but rates calibrated per
    source or per bin do not know it: a lookup token, a corpus token and a drafter token each
    at 0.5 would promise 1.5 accepted tokens where at most one can be. Scaling them all in
    proportion instead (the rule until session 20) let a drafter's sibling halve a sure lookup
    chain's path probabilities at every depth, so merged trees were cut to a few nodes and
    accepted less than lookup's alone (benchmarks/sibling_rates.py, benchmarks/drafter_worth.py)."""
    out = rate.copy()
    order = np.lexsort((-rate[1:], parents[1:])) + 1  # by parent, best rate first within it
    r, p = rate[order], parents[order]
    total = np.cumsum(r)
    first = np.concatenate([[True], p[1:] != p[:-1]])
    within = total - np.maximum.accumulate(np.where(first, total - r, 0.0))  # sum so far among siblings
    out[order] = np.minimum(within, 1.0) - np.minimum(within - r, 1.0)
    return out


def path_probs(tree: Tree, rate: np.ndarray) -> np.ndarray:
    """Path probabilities [n+1] (root 1) from each drafted node's calibrated rate [n],
    P(node accepted | parent accepted): the product of the rates along the path, siblings'
    rates first made exclusive (`exclusive_rates`)."""
    parents, depths = tree.parents.cpu().numpy(), tree.depths.cpu().numpy()
    rate = exclusive_rates(parents, np.concatenate([[1.0], np.asarray(rate, dtype=float)]))
    out = np.ones(tree.size + 1)
    for d in range(1, int(depths.max(initial=0)) + 1):  # parents are one level up, done already
        level = depths == d
        out[level] = out[parents[level]] * rate[level]
    return out


class AcceptanceCalibrator:
    """Calibrated path probabilities from observed acceptance (a reliability map, learned online).

    A node's own probability q (its token's draft marginal: path probability over its parent's)
    is mapped to the observed rate at which such a node is accepted when its parent was, per
    depth group (1, 2, 3, 4+) and per bin of q; a calibrated path probability is the product
    of the mapped rates along the path. The bins are finer at low q, where a weak drafter's
    nodes live (a tree's tail is nodes of q = 0.01-0.1, and one bin for all of them flattens
    its ranks: the 5th and the 16th node were predicted the same). Binning by q lets over- and
    underconfidence differ by confidence level, which one factor per depth cannot (and a
    cost-aware policy keeps exactly the confident nodes, so their level is the one that matters).
    Counts decay every round (the map follows drift); each cell starts at its own q (identity)
    with the weight of `prior` observations."""

    EDGES = np.array([0.0, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                      0.65, 0.8, 0.9, 1.0])

    def __init__(self, depth_groups: int = 4, decay: float = 0.995, prior: float = 4.0):
        centres = (self.EDGES[1:] + self.EDGES[:-1]) / 2
        self.hits = np.tile(centres * prior, (depth_groups, 1))  # [G, B] accepted (decayed counts)
        self.trials = np.full((depth_groups, centres.size), prior)  # [G, B] parent accepted (decayed)
        self.decay = decay

    def rates(self) -> np.ndarray:
        """P(node accepted | parent accepted) per depth group and bin of q. [G, B]"""
        return self.hits / self.trials

    def _cells(self, tree: Tree, q: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(depth group, q bin, parents) of the drafted nodes 1..n; q: their own probabilities
        under this calibrator's source (default: from the tree's path scores)."""
        if q is None:
            q = own_probs(tree).float().cpu().numpy()[1:]
        parents = tree.parents.cpu().numpy()
        group = np.minimum(tree.depths[1:].cpu().numpy(), self.hits.shape[0]) - 1
        return group, self.bin(np.nan_to_num(q)), parents

    def node_rates(self, tree: Tree, q: np.ndarray) -> np.ndarray:
        """P(node accepted | parent accepted) of nodes 1..n with own probabilities q. [n]"""
        group, qbin, _ = self._cells(tree, q)
        return self.rates()[group, qbin]

    @classmethod
    def bin(cls, q):
        """The bin of own probability q (scalar or array)."""
        return np.searchsorted(cls.EDGES[1:-1], q, side="right")

    def calibrate(self, tree: Tree) -> np.ndarray:
        """Calibrated path probabilities of every node (root = 1), parents before children. [n+1]"""
        group, qbin, _ = self._cells(tree)
        return path_probs(tree, self.rates()[group, qbin])

    def update(self, tree: Tree, path: torch.Tensor, q: np.ndarray | None = None) -> None:
        """After verification: every node whose parent was accepted is one trial of its cell
        (q: own probabilities under this source, NaN for nodes it did not propose)."""
        if tree.size == 0:
            return
        group, qbin, parents = self._cells(tree, q)
        accepted = np.zeros(tree.size + 1, dtype=bool)
        accepted[path.cpu().numpy()] = True
        tried = accepted[parents[1:]]
        if q is not None:
            tried &= ~np.isnan(q)
        self.hits *= self.decay
        self.trials *= self.decay
        np.add.at(self.hits, (group[tried], qbin[tried]), accepted[1:][tried].astype(float))
        np.add.at(self.trials, (group[tried], qbin[tried]), 1.0)


class Savings:
    """Decayed mean and standard error of a per-round quantity (what drafted rounds saved, how
    far acceptance fell short of the expected). With the decay (per sample) the sums hold
    (1 + decay) / (1 - decay) effective samples at most."""

    def __init__(self, decay: float = 0.98):
        self.decay = decay
        self.sums = [0.0, 0.0, 0.0, 0.0]  # weights, squared weights, weighted sum, weighted square sum

    def add(self, ms: float) -> None:
        w, w2, s1, s2 = self.sums
        d = self.decay
        self.sums = [d * w + 1.0, d * d * w2 + 1.0, d * s1 + ms, d * s2 + ms * ms]

    def count(self) -> float:
        """Effective number of samples."""
        w, w2 = self.sums[0], self.sums[1]
        return w * w / w2 if w2 > 0 else 0.0

    def mean_se(self) -> tuple[float, float]:
        w, _, s1, s2 = self.sums
        mean = s1 / w
        var = max(s2 / w - mean * mean, 0.0)
        return mean, (var / max(self.count(), 1.0)) ** 0.5


class DrafterWorth:
    """Whether a round's drafter pass is worth its time when n-gram lookup already proposes.

    Per bin of lookup's calibrated chance that its first token is right, the decayed mean net
    gain of the rounds that drafted, in tokens (`Counterfactual`): accepted tokens beyond those
    of the lookup-only tree the sizer would have verified instead, minus what the drafted round's
    extra time (the drafter pass, merging and sizing, the extra nodes' verify time) would have
    decoded at the current rate. Where that mean is not positive the round verifies lookup's
    nodes alone; every `probe_every`-th such round drafts anyway, so the estimate follows the
    drafter and the text. Until a bin has `min_samples` rounds, and where lookup proposes
    nothing, the drafter runs."""

    EDGES = np.array([0.5, 0.7, 0.8, 0.9, 0.95])

    def __init__(self, decay: float = 0.95, min_samples: float = 3.0, probe_every: int = 8):
        self.sum = np.zeros(self.EDGES.size + 1)
        self.weight = np.zeros(self.EDGES.size + 1)
        self.skips = np.zeros(self.EDGES.size + 1, dtype=int)
        self.decay, self.min_samples, self.probe_every = decay, min_samples, probe_every

    @classmethod
    def bin(cls, p: float) -> int:
        return int(np.searchsorted(cls.EDGES, p, side="right"))

    def worth(self, p: float) -> bool:
        """Run the drafter this round? p: lookup's calibrated first-token chance."""
        b = self.bin(p)
        if self.weight[b] < self.min_samples or self.sum[b] / self.weight[b] > 0.0:
            return True
        self.skips[b] += 1
        return self.skips[b] % self.probe_every == 0

    def observe(self, p: float, net: float) -> None:
        if not (np.isfinite(p) and np.isfinite(net)):
            return  # a NaN would stick in its bin for good and keep the drafter off (session 23)
        b = self.bin(p)
        self.sum[b] = self.decay * self.sum[b] + net
        self.weight[b] = self.decay * self.weight[b] + 1.0

    def state(self) -> dict:
        return {"sum": self.sum.tolist(), "weight": self.weight.tolist()}

    def load_state(self, state: dict) -> None:
        if np.shape(state.get("sum")) == self.sum.shape and np.shape(state.get("weight")) == self.weight.shape:
            self.sum, self.weight = np.array(state["sum"], dtype=float), np.array(state["weight"], dtype=float)
            bad = ~(np.isfinite(self.sum) & np.isfinite(self.weight))
            self.sum[bad], self.weight[bad] = 0.0, 0.0  # bins saved with a NaN start fresh


class SpeculationGate:
    """auto's go/no-go: does drafting pay right now, or should this round decode plainly?

    Measured, once `min_samples` drafted rounds are known, as the time drafted rounds saved
    against plain rounds producing the same tokens (drafting goes on while the mean saving plus
    one standard error is >= 0; see `measured_saving`); predicted before that by the sizer
    (recent rounds' expected gain on the measured curve beats plain decoding). When it does not
    pay, plain rounds follow, with a drafted probe after `probe_every` of them, the interval
    doubling (to `max_probe_every`) while the answer stays no, and at a new prompt."""

    def __init__(self, cost, probe_every: int = 8, max_probe_every: int = 64, min_samples: float = 6.0):
        self.cost = cost
        self.probe_every, self.base_probe_every, self.max_probe_every = probe_every, probe_every, max_probe_every
        self.min_samples = min_samples
        self.skipped = 0  # plain rounds in the current streak (0: not in one)
        # measured: a plain round's wall time over the profiled one-token verify (EMA); what
        # drafted rounds saved against plain rounds producing their expected tokens (recent
        # rounds); the accepted minus expected tokens (a long window: the surrogate's bias)
        self.plain_ratio: float | None = None
        self.savings = Savings(decay=0.8)  # ~9 rounds: the text decoded now (code, chat) decides
        self.shortfall = Savings(decay=0.998)

    def open(self, context: int, predicted_pays) -> bool:
        """Whether this round drafts. predicted_pays(context): the sizer's prediction."""
        if 0 < self.skipped < self.probe_every:  # inside a plain streak: no evaluation at all
            self.skipped += 1
            return False
        if self.skipped:  # the streak ends with a probe; the next one is longer if this one loses
            self.skipped = 0
            self.probe_every = min(2 * self.probe_every, self.max_probe_every)
            return True
        if self.speculation_pays(context, predicted_pays):
            self.probe_every = self.base_probe_every
            return True
        self.skipped = 1
        return False

    def start_sequence(self) -> None:
        """A new prompt: inside a plain streak, its first round probes (a new text can be one the
        drafter is good at: code after chat)."""
        if self.skipped:
            self.skipped = self.probe_every

    def measured_saving(self, context: int) -> tuple[float, float]:
        """Mean and standard error of the ms a drafted round saves against plain rounds.

        A round's realised saving, (1 + accepted) * plain - wall, swings by a plain round per
        token accepted or not (SD 10-15 ms where the mean is ~2 ms): too noisy to decide on. So
        each round's sample uses its calibrated expected tokens instead, (1 + expected) * plain -
        wall, and the accepted-minus-expected tokens, a zero-mean control variate when the
        calibration is right, are averaged over a long window and added back: the estimate stays
        unbiased (the surrogate's bias is measured, not trusted) at a fraction of the variance
        (per-round SD 1.5-4 ms).
        The price: what the drafter's own confidence shows (a prompt it is bad at) counts at
        once, but a drafter that turns confidently wrong counts only as fast as the long window
        and the calibration map learn it (tens of rounds)."""
        plain = self.plain_round_ms(context)
        mean, se = self.savings.mean_se()
        if self.shortfall.count() == 0:
            return mean, se
        bias, bias_se = self.shortfall.mean_se()
        return mean + plain * bias, (se * se + (plain * bias_se) ** 2) ** 0.5

    def speculation_pays(self, context: int, predicted_pays) -> bool:
        """Measured drafted rounds save time (optimistically: mean + one standard error >= 0);
        the prediction decides until enough drafted rounds are measured."""
        if self.savings.count() < self.min_samples:
            return predicted_pays(context)
        mean, se = self.measured_saving(context)
        return mean + se >= 0.0

    def plain_round_ms(self, context: int) -> float:
        """What a plain round costs here, wall time: the profiled one-token verify times what
        plain rounds measured over it. Plain rounds keep their own ratio: the cost model's drift
        is learned mostly from drafted rounds, whose verify runs after the drafter (colder
        caches), and a policy that drafts nearly every round would otherwise price plain rounds
        at that (bf16: 25 ms against 21.8 measured), overstating what drafting saves."""
        if self.plain_ratio is None:
            return self.cost.verify_ms(1, context) + 0.3  # nothing measured yet: the verify, small extras
        return self.cost.profiled_ms(1, context) * self.plain_ratio

    def observe_plain(self, context: int, round_ms: float) -> None:
        ratio = round_ms / float(self.cost.profiled_ms(1, context))
        self.plain_ratio = ratio if self.plain_ratio is None else 0.9 * self.plain_ratio + 0.1 * ratio

    def observe_drafted(self, context: int, round_ms: float, expected: float, accepted: int) -> None:
        self.savings.add((1 + expected) * self.plain_round_ms(context) - round_ms)
        self.shortfall.add(accepted - expected)

    def state(self) -> dict:
        return {"plain_ratio": self.plain_ratio, "savings": self.savings.sums, "shortfall": self.shortfall.sums}

    def load_state(self, state: dict) -> None:
        self.plain_ratio = state.get("plain_ratio")
        self.savings.sums = [float(x) for x in state.get("savings", self.savings.sums)]
        self.shortfall.sums = [float(x) for x in state.get("shortfall", self.shortfall.sums)]


ADAPTIVE_METHODS = ("caddtree", "bastion", "auto", "lookup")
LOOKUP_PROBE_EVERY, LOOKUP_PROBE_NODES = 8, 4
RATE_RULE_METHODS = ("auto", "lookup")  # sized by best_size on the measured rate (lookup: n-gram drafts alone)


class TreeSizer:
    """Chooses each round's tree size from the cost model and the calibrated surrogate.

    caddtree: the greedy stopping rule on the convex fit of C_v.
    bastion:  the greedy rule on the calibrated roofline estimate, never below `min_nodes`.
    auto:     the exact argmax of Phi(n) - rate * C_v(n + 1) on the raw measured table, n = 0
              included, rate being the tokens per ms it decodes at (measured over recent rounds,
              never below plain decoding's): `best_size`. Before drafting, its
              SpeculationGate (`self.gate`) checks that speculation pays.
    lookup:   auto's rule on n-gram drafts alone (no drafter pass to gate: n = 0 is a plain round).

    `explore(sizes)` makes any method draft every round and verify the given node counts in turn
    (the calibration warm-up: in-situ verify costs at every size, and acceptance statistics).
    `state()` / `load_state()` carry what it learned into the next process.
    """

    def __init__(self, method: str, cost, cap: int, probe_every: int = 8, min_nodes: int = 0,
                 max_probe_every: int = 64, min_samples: float = 6.0):
        self.method, self.cost, self.cap = method, cost, cap
        self.calibrator = AcceptanceCalibrator()  # the drafter's
        # one per n-gram source (by match length): their own probabilities (a continuation's
        # share of the matches) mean something else than a drafter's marginal
        self.lookup_calibrators = [AcceptanceCalibrator() for _ in SOURCES[1:]]
        self.expected_phi: np.ndarray | None = None
        self.overhead_ms = cost.profile.overhead_ms
        self.min_nodes = min_nodes
        self.gate = SpeculationGate(cost, probe_every, max_probe_every, min_samples)  # auto's go/no-go
        self.worth = DrafterWorth()  # auto: skip the drafter pass where lookup's draft suffices
        self._alone: tuple[float, Tree] | None = None  # (lookup's first-token chance, the lookup-only tree) if asked
        self._worth_round: tuple | None = None  # _alone + (rate, verify curve) of a merged round, until observed
        self._judging: list[Counterfactual] = []  # drafted rounds whose lookup-only alternative is still matching
        self.lookup_overhead_ms: float | None = None  # build + walk of a lookup-only round (decayed mean)
        self._expected = 0.0
        self.recent = [0.0, 0.0]  # decayed tokens and wall ms of this policy's rounds: its rate
        self.chosen: list[int] = []  # sizes chosen (0: a plain round); the exploring schedule indexes it
        self._predicted_raw = 0.0  # this round's expected accepted tokens from raw path probabilities
        self._chose = False
        self._drafted = False
        self._plain_pending = False
        self.schedule: list[int] = []
        self._build = min(cap, 8)
        self._lookup_short = 0  # n-gram-only rounds in a row that left nodes out (see _probe_lookup)

    def build_budget(self) -> int:
        """Nodes to build before choosing: twice the largest recent choice (at least 8, at most
        the cap), so a round does not build 64 nodes to verify 4; it grows as choices near it."""
        return self.cap if self.schedule else self._build

    def explore(self, sizes: list[int]) -> None:
        """Draft every round and verify these node counts in turn (empty: back to the policy)."""
        self.schedule = list(sizes)

    def state(self) -> dict:
        """What this sizer learned (acceptance map, expected gain, measured savings, overheads)."""
        return {"method": self.method, "cap": self.cap, "overhead_ms": self.overhead_ms,
                "acceptance": {"hits": self.calibrator.hits.tolist(), "trials": self.calibrator.trials.tolist()},
                "lookup_acceptance": [{"hits": c.hits.tolist(), "trials": c.trials.tolist()}
                                      for c in self.lookup_calibrators],
                "expected_phi": None if self.expected_phi is None else self.expected_phi.tolist(),
                **self.gate.state(), "recent": self.recent, "drafter_net": self.worth.state(),
                "lookup_overhead_ms": self.lookup_overhead_ms}

    def load_state(self, state: dict) -> None:
        acceptance = state.get("acceptance", {})
        if np.shape(acceptance.get("hits")) != self.calibrator.hits.shape:
            return  # another calibrator layout: start fresh
        self.calibrator.hits = np.array(acceptance["hits"], dtype=float)
        self.calibrator.trials = np.array(acceptance["trials"], dtype=float)
        for cal, saved in zip(self.lookup_calibrators, state.get("lookup_acceptance", [])):
            if np.shape(saved.get("hits")) == cal.hits.shape:
                cal.hits = np.array(saved["hits"], dtype=float)
                cal.trials = np.array(saved["trials"], dtype=float)
        self.overhead_ms = float(state["overhead_ms"])
        phi = state.get("expected_phi")
        self.expected_phi = None if phi is None else np.array(phi, dtype=float)
        self.gate.load_state(state)
        self.worth.load_state(state.get("drafter_net", {}))  # not "drafter_worth": another accounting
        self.lookup_overhead_ms = state.get("lookup_overhead_ms")
        self.recent = [float(x) for x in state.get("recent", self.recent)]

    def _curve(self, context: int, smooth: bool, nodes: int | None = None) -> np.ndarray:
        """C_v for 1 .. nodes + 1 tokens (nodes: the cap by default)."""
        tokens = (self.cap if nodes is None else nodes) + 1
        if self.method == "bastion":
            return np.array([self.cost.roofline_ms(n, context) for n in range(1, tokens + 1)])
        return self.cost.verify_curve(tokens, context, smooth=smooth)

    def predicted_pays(self, context: int) -> bool:
        """Recent rounds' expected gain, on the measured curve, beats plain decoding."""
        verify = self._curve(context, smooth=False, nodes=self.expected_phi.size - 1)
        fixed = self.cost.draft_ms(context) + self.overhead_ms
        return throughput(self.expected_phi, verify, fixed)[1:].max(initial=0.0) > 1.0 / verify[0]

    def rate(self, context: int) -> float:
        """Tokens per ms this policy decodes at: measured over recent rounds, at least plain
        decoding's (a node that buys less than a plain round would in its time never pays)."""
        tokens, ms = self.recent
        plain = 1.0 / self.gate.plain_round_ms(context)
        return max(plain, tokens / ms) if ms > 0 else plain

    def start_sequence(self) -> None:
        self.gate.start_sequence()
        for c in self._judging:  # the sequence ended while lookup's tree still matched: as far as it went
            self.worth.observe(c.p, c.net())
        self._judging = []

    def should_draft(self, context: int) -> bool:
        if self.schedule:  # exploring: a size of 0 is a plain round (no drafter), measured as one
            if self.schedule[len(self.chosen) % len(self.schedule)] > 0:
                return True
            self.chosen.append(0)
            return False
        if self.method != "auto" or self.expected_phi is None:
            return True
        if self.gate.open(context, self.predicted_pays):
            return True
        self.chosen.append(0)
        self._plain_pending = True
        return False

    def calibrators(self) -> list[AcceptanceCalibrator]:
        """One per entry of tree.SOURCES."""
        return [self.calibrator] + self.lookup_calibrators

    def drafter_worth(self, lookup: Tree, context: int) -> bool:
        """auto, with lookup's draft in hand: is the drafter pass worth running this round?"""
        if self.method != "auto" or self.schedule or lookup.size == 0:
            return True
        path = self.calibrate_sources(lookup)
        p = float(min(path[lookup.depths.cpu().numpy() == 1].sum(), 1.0))
        if not self.worth.worth(p):
            return False
        ranked, _, phi = self._ranked_gain(lookup, path)
        n = best_size(phi, self._curve(context, smooth=False, nodes=lookup.size), self.rate(context))
        self._alone = (p, prune(ranked, n))  # the counterfactual a drafted round is measured against
        return True

    def _ranked_gain(self, tree: Tree, path: np.ndarray | None = None) -> tuple[Tree, torch.Tensor, np.ndarray]:
        """A several-source tree ranked by its calibrated path probabilities, its pop order and
        Phi (only the calibrated estimates are comparable across sources)."""
        path = self.calibrate_sources(tree) if path is None else path
        tree = ranked_by(tree, path)
        order = pop_order(tree)
        return tree, order, expected_gain(path[order.cpu().numpy()])

    def calibrate_sources(self, tree: Tree, sources: range | None = None) -> np.ndarray:
        """Calibrated path probabilities of a tree whose nodes carry per-source own probabilities:
        a node's rate is the best of its sources' calibrated rates (a node two sources propose
        is one node with the better estimate); see `path_probs` for siblings and paths. sources:
        only these entries of tree.SOURCES (a node none of them proposed gets 0). [n+1]"""
        own = tree.own.float().cpu().numpy()[1:]  # [n, S]
        rates = np.full(own.shape, -1.0)
        for s, cal in enumerate(self.calibrators()):
            if sources is not None and s not in sources:
                continue
            have = ~np.isnan(own[:, s])
            if have.any():
                rates[have, s] = cal.node_rates(tree, own[:, s])[have]
        return path_probs(tree, rates.max(axis=1).clip(min=0.0))

    def choose(self, tree: Tree, context: int, drafted: bool = True) -> Tree:
        """Prune the drafted tree to the size this method picks. drafted: the drafter ran this
        round (else the nodes are n-gram drafts, which cost no drafter pass)."""
        if self._plain_pending:  # should_draft said no drafter this round; n-gram nodes may still go
            self._plain_pending = False
            self.chosen.pop()
        self._drafted = drafted
        if tree.own is None:
            # the drafter alone: its own best-first order decides WHICH nodes, the calibrated
            # probabilities HOW MANY (ranking by the noisier calibrated cells makes worse trees)
            order = pop_order(tree)
            phi = expected_gain(self.calibrator.calibrate(tree)[order.cpu().numpy()])
        else:
            tree, order, phi = self._ranked_gain(tree)
            if drafted and self._alone is not None and self.method == "auto":
                # observed after verification: the drafted round's net gain (DrafterWorth)
                nodes = max(tree.size, self._alone[1].size)
                self._worth_round = (*self._alone, self.rate(context), self._curve(context, smooth=False, nodes=nodes))
        self._alone = None
        if self.schedule:
            n = min(self.schedule[len(self.chosen) % len(self.schedule)], tree.size)
        elif self.method in RATE_RULE_METHODS:
            n = best_size(phi, self._curve(context, smooth=False, nodes=tree.size), self.rate(context))
            n = self._probe_lookup(tree, drafted, n)
        else:
            fixed = self.cost.draft_ms(context) + self.overhead_ms
            n = max(greedy_size(phi, self._curve(context, smooth=True, nodes=tree.size), fixed),
                    min(self.min_nodes, tree.size))
        n = min(n, self.cap)  # merged sources can hold up to twice the build budget
        self.expected_phi = phi if self.expected_phi is None else _ema_curve(self.expected_phi, phi)
        self.chosen.append(n)
        recent = max(self.chosen[-16:], default=0)
        self._build = min(self.cap, max(8, 2 * recent))
        self._predicted_raw = float(tree.scores[order[:n]].exp().sum())
        self._expected = float(phi[min(n, phi.size - 1)])
        self._chose = True
        return prune(tree, n)

    def _probe_lookup(self, tree: Tree, drafted: bool, n: int) -> int:
        """n, except that every `LOOKUP_PROBE_EVERY`-th n-gram-only round in a row that leaves
        nodes out verifies `LOOKUP_PROBE_NODES` more: a calibration that says "not that deep"
        (or "never") is otherwise never corrected (no drafter pass to gate, and nodes no round
        verifies teach nothing)."""
        if drafted or n >= tree.size:
            self._lookup_short = 0
            return n
        self._lookup_short += 1
        return min(tree.size, n + LOOKUP_PROBE_NODES) if self._lookup_short % LOOKUP_PROBE_EVERY == 0 else n

    def prediction(self) -> tuple[float, float] | None:
        """This round's expected accepted tokens (raw, calibrated), if this sizer chose its tree."""
        return (self._predicted_raw, self._expected) if self._chose else None

    def observe(self, tree: Tree, path: torch.Tensor, tokens: int, context: int, verify_ms: float,
                overhead_ms: float, round_ms: float | None = None, draft_ms: float = 0.0,
                bonus: int | None = None) -> None:
        """After a verified round: acceptance, verify and draft times, the per-round overhead of a
        drafted round, and (auto) the measured wall time: a plain round's extras beyond its
        verify forward, or what a drafted round saved against plain rounds. bonus: the target's
        token after the accepted path (auto needs it to judge a drafted round against lookup)."""
        accept_len = path.numel() - 1
        if self._worth_round is not None and bonus is not None:
            p, alone, rate, verify = self._worth_round
            extra_ms = draft_ms + overhead_ms - (self.lookup_overhead_ms or 0.0)
            last = verify.size - 1
            extra_ms += verify[min(tree.size, last)] - verify[min(alone.size, last)]
            self._judging.append(Counterfactual(p, alone, accept_len, rate * extra_ms))
        if bonus is not None and self._judging:
            produced = tree.tokens[path[1:]].tolist() + [bonus]
            for c in self._judging:
                if c.follow(produced):
                    self.worth.observe(c.p, c.net())
            self._judging = [c for c in self._judging if not c.done]
        self._worth_round = None
        if self._chose and not self._drafted and tree.size and not self.schedule:  # a lookup-only round
            old = self.lookup_overhead_ms
            self.lookup_overhead_ms = overhead_ms if old is None else 0.9 * old + 0.1 * overhead_ms
        if tree.own is None:
            self.calibrator.update(tree, path)
        else:
            own = tree.own.float().cpu().numpy()[1:]
            for s, cal in enumerate(self.calibrators()):
                if not np.isnan(own[:, s]).all():
                    cal.update(tree, path, own[:, s])
        self.cost.observe(tokens, context, verify_ms)
        if self._chose:  # rounds that skipped the drafter predicted nothing and cost no overhead
            if self._drafted:
                self.cost.observe_draft(context, draft_ms)
                self.overhead_ms = 0.9 * self.overhead_ms + 0.1 * overhead_ms
        if round_ms is not None and round_ms > 0:
            if not self._chose or (not self._drafted and tree.size == 0):  # a plain round, the warm-up's too
                self.gate.observe_plain(context, round_ms)
            if not self.schedule:  # exploring is not the policy
                self.recent = [0.98 * self.recent[0] + accept_len + 1, 0.98 * self.recent[1] + round_ms]
                if self._chose and self._drafted:  # the gate decides whether to run the drafter
                    self.gate.observe_drafted(context, round_ms, self._expected, accept_len)
        self._chose = self._drafted = self._plain_pending = False


class Counterfactual:
    """A drafted round judged against the lookup-only round it replaced (`DrafterWorth`).

    Its net gain in tokens: accepted tokens minus those the lookup-only tree `alone` would have
    had accepted, minus `cost` (rate x the drafted round's extra ms: drafter pass, merging and
    sizing beyond a lookup-only round's, and the predicted verify ms of the extra nodes). The
    lookup-only count is the walk of `alone` along the tokens the target commits: this round's,
    then, while lookup's tree still matches (a merged round that cut lookup's chain short), the
    next rounds' -- exact for greedy decoding, an estimate when sampling."""

    def __init__(self, p: float, alone: Tree, accepted: int, cost: float):
        self.p, self.accepted, self.cost = p, accepted, cost
        parents, tokens = alone.parents.tolist(), alone.tokens.tolist()
        self.child = {(parents[i], tokens[i]): i for i in range(1, alone.size + 1)}
        self.leaf = set(range(alone.size + 1)) - set(parents[1:])
        self.node, self.depth, self.done = 0, 0, alone.size == 0

    def follow(self, tokens: list[int]) -> bool:
        """Walk on along committed tokens; True once the walk has ended (judge it now)."""
        for tok in tokens:
            if self.done:
                break
            nxt = self.child.get((self.node, tok))
            if nxt is None:
                self.done = True
            else:
                self.node, self.depth = nxt, self.depth + 1
                self.done = nxt in self.leaf
        return self.done

    def net(self) -> float:
        return self.accepted - self.depth - self.cost


def _ema_curve(old: np.ndarray, new: np.ndarray, ema: float = 0.2) -> np.ndarray:
    size = max(old.size, new.size)
    pad = lambda a: np.concatenate([a, np.full(size - a.size, a[-1])])  # noqa: E731
    return (1 - ema) * pad(old) + ema * pad(new)
