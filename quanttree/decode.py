"""The one generation loop: a generator of per-round Step records.

Every round is draft -> build tree -> compile -> target forward -> select -> walk -> compact.
Plain autoregressive decoding is the tree with only a root; DFlash is a chain; DDTree a tree.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from . import kvcache
from .drafter import DFlashDrafter
from .errors import QuanttreeError
from .kvcache import ContextKV
from .lookup import CorpusIndex, NgramIndex, lookup_tree
from .policy import ADAPTIVE_METHODS, TreeSizer, prune
from .sampling import SamplingParams, make_generator, select_tokens
from .target import Target
from .tree import Tree, build_branch_tree, build_chain, build_tree, compile_tree, corpus_source, lookup_source, \
    map_tokens, merge_trees, rejection_boundaries, root_only, subtree, walk, walk_drawn, with_source

DRAFT_METHODS = ("dflash", "ddtree", "d2sd", "caddtree", "bastion")  # need a DFlash drafter
METHODS = ("ar", "lookup") + DRAFT_METHODS + ("auto",)  # auto: drafter and/or n-gram lookup
MERGES_LOOKUP = ("auto",)  # methods that merge n-gram drafts into every round's tree
LOOKUP_DEPTH = 16  # tokens of an n-gram continuation (16 beat 8 in nf4, both suites)
TREE_METHODS = ("ddtree", "d2sd")  # always verify trees; the adaptive methods size chains where trees can't run


@dataclass(frozen=True)
class DecodeConfig:
    method: str = "ar"
    max_new_tokens: int = 128
    sampling: SamplingParams = SamplingParams()
    budget: int = 8  # ddtree node budget; the cap for adaptive methods (drafted nodes, root excluded)
    branches: int = 4  # d2sd: rejection points re-drafted per round
    eos_token_ids: frozenset[int] = frozenset()


@dataclass
class PhaseTimes:
    draft: float = 0.0  # drafter passes, absorbing committed tokens included
    lookup: float = 0.0  # the n-gram source: index lookups and its tree
    build: float = 0.0  # shaping, merging and sizing trees, compiling the verify inputs
    verify: float = 0.0
    walk: float = 0.0  # select + walk + KV compaction

    def add(self, other: "PhaseTimes") -> None:
        self.draft += other.draft
        self.lookup += other.lookup
        self.build += other.build
        self.verify += other.verify
        self.walk += other.walk


@dataclass
class Step:
    tokens: list[int]  # tokens committed this round
    prefill: bool = False
    tree_size: int = 0  # drafted nodes verified (root excluded)
    accept_len: int = 0  # drafted tokens accepted
    times: PhaseTimes = field(default_factory=PhaseTimes)
    seconds: float = 0.0  # wall time of the round
    finished: str | None = None  # "eos" or "length" on the last step
    tree: Tree | None = None
    path: torch.Tensor | None = None
    # the sizer's expected accepted tokens for the tree it chose (raw drafter path probabilities,
    # calibrated); None on rounds no sizer chose (fixed methods, plain rounds of auto's gate)
    predicted_raw: float | None = None
    predicted: float | None = None


class Clock:
    """perf_counter that waits for the GPU first, so phases are timed honestly."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


class DraftContext:
    """The drafter plus its context cache and the committed features it has not seen yet."""

    def __init__(self, drafter: DFlashDrafter, target: Target):
        self.drafter, self.target = drafter, target
        self.cache = ContextKV(drafter.config.num_hidden_layers)
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        mask = drafter.mask_embedding
        if mask is None:
            mask = target.embed(torch.tensor([drafter.config.mask_token_id], device=target.device))[0]
        self.mask_embed = mask.detach().to(device=target.device, dtype=drafter.dtype)
        self.vocab = drafter.draft_vocab  # None: the whole target vocabulary
        head = target.model.get_output_embeddings().weight
        self.head = head.detach()[self.vocab] if self.vocab is not None else None  # [N, H] rows of the lm_head
        if drafter.lm_head is not None:  # a drafter with its own head over its draft vocabulary
            self.head = drafter.lm_head.weight.detach()

    def commit(self, features: torch.Tensor, positions: torch.Tensor) -> None:
        """Queue committed tokens' target features [c, k*H] at positions [c] (until the next draft)."""
        self.pending.append((features, positions))

    def absorb(self) -> None:
        """Extend the drafter's context cache with the committed features queued so far."""
        if self.pending:
            features = torch.cat([f for f, _ in self.pending])
            positions = torch.cat([p for _, p in self.pending])
            self.drafter.extend_context(self.cache, features[None], positions)
            self.pending = []

    @torch.inference_mode()
    def states(self, root: int, start: int) -> torch.Tensor:
        """The drafter's final states for depths 1..B-1 after root at position start. [B-1, H]"""
        self.absorb()
        block = self.drafter.config.block_size
        root_embed = self.target.embed(torch.tensor([root], device=self.target.device)).to(self.drafter.dtype)
        embeds = torch.cat([root_embed, self.mask_embed.expand(block - 1, -1)])[None]  # [1, B, H]
        positions = torch.arange(start, start + block, device=self.target.device)
        return self.drafter.forward_block(embeds, positions, self.cache)[0, 1:]

    @torch.inference_mode()
    def log_probs(self, root: int, start: int) -> torch.Tensor:
        """Per-depth draft marginals for depths 1..B-1 after root at position start.
        -> [B-1, V], or [B-1, N] over the draft vocabulary (map indices with `self.vocab`)."""
        return self._log_softmax(self.states(root, start))

    def _log_softmax(self, hidden: torch.Tensor) -> torch.Tensor:
        """Drafter states [..., H] -> log-probs over the draft vocabulary (or the full one)."""
        if self.head is not None:  # 2D matmul: a batched [K, D, H] @ head.T would copy the head K times
            flat = hidden.reshape(-1, hidden.shape[-1]).to(device=self.head.device, dtype=self.head.dtype)
            logits = (flat @ self.head.T).view(*hidden.shape[:-1], -1)
        else:
            logits = self.target.lm_head(hidden)
        return torch.log_softmax(logits.float(), dim=-1)

    @torch.inference_mode()
    def branch_log_probs(self, root: int, start: int, chain: torch.Tensor, prefixes: torch.Tensor) -> torch.Tensor:
        """D2SD: re-draft K branches in ONE batched pass, branch k seeing root + chain[:prefixes[k]].

        chain: [D] drafted tokens (draft-vocabulary indices when one is used); prefixes: [K].
        -> [K, D, V] log-probs per slot (depths 1..D)."""
        self.absorb()
        block = self.drafter.config.block_size
        ids = self.vocab[chain] if self.vocab is not None else chain
        full = torch.cat([torch.tensor([root], device=ids.device), ids])  # [B]
        embeds = self.target.embed(full).to(self.drafter.dtype)  # [B, H]
        slot = torch.arange(block, device=ids.device)
        visible = slot[None, :] <= prefixes[:, None]  # [K, B]: root + the first prefixes[k] tokens
        x = torch.where(visible[..., None], embeds[None], self.mask_embed[None, None])  # [K, B, H]
        positions = torch.arange(start, start + block, device=ids.device)
        hidden = self.drafter.forward_block(x, positions, self.cache)
        return self._log_softmax(hidden[:, 1:])


class LookupSource:
    """Draft source: n-gram continuations of the prompt and of everything committed since, and
    of the same context in a corpus of the target's earlier responses when there is one (no
    model; well under a millisecond a round). Lifecycle: begin(prompt) -> propose() -> accept(tokens)."""

    def __init__(self, corpus: CorpusIndex | None = None):
        self.index = NgramIndex()
        self.corpus = corpus

    def begin(self, prompt_ids: list[int], first: int) -> None:
        self.index.extend(prompt_ids + [first])

    def propose(self, root: int, depth: int, budget: int, chain_only: bool) -> Tree | None:
        """A tree of at most `budget` nodes from continuations up to `depth` tokens, or None."""
        found = self.index.continuations(depth=depth)
        tree = with_source(lookup_tree(found, root, budget), lookup_source(found[0].match_len)) if found else None
        if self.corpus is not None:  # one tree: a continuation both propose is one node
            earlier = self.corpus.continuations(self.index.tokens, depth=depth)
            if earlier:
                other = with_source(lookup_tree(earlier, root, budget), corpus_source(earlier[0].match_len))
                tree = other if tree is None else merge_trees(tree, other)[0]
        if tree is None:
            return None
        return prune_to_chain(tree) if chain_only else tree

    def accept(self, tokens: list[int]) -> None:
        self.index.extend(tokens)


class DrafterSource:
    """Draft source: the DFlash drafter, shaped as a chain (dflash), a best-first tree (ddtree,
    the adaptive methods) or D2SD's re-drafted branches (with the VP drafter when there is one).
    Lifecycle: begin(prompt features) -> propose() -> accept(committed features)."""

    def __init__(self, drafter: DFlashDrafter, target: Target, shape: str, vp_drafter: DFlashDrafter | None = None,
                 branches: int = 4):
        self.shape, self.branches = shape, branches
        self.max_nodes = target.max_nodes  # exact mode's row range caps even a whole chain
        self.context = DraftContext(drafter, target)
        self.second = DraftContext(vp_drafter, target) if shape == "d2sd" and vp_drafter is not None else None
        self.layers = tuple(drafter.config.target_layer_ids)

    def _contexts(self):
        return [c for c in (self.context, self.second) if c is not None]

    def begin(self, features: torch.Tensor, positions: torch.Tensor) -> None:
        for ctx in self._contexts():  # the drafter reads the prompt now: part of prefill, not of a round
            ctx.commit(features, positions)
            ctx.absorb()

    def propose(self, root: int, start: int, budget: int, chain_only: bool, clock: Clock,
                times: PhaseTimes) -> Tree:
        """The drafted tree in target-vocabulary ids (drafter passes timed as `draft`, shaping as `build`)."""
        t0 = clock()
        log_probs = self.context.log_probs(root, start)
        if self.shape == "d2sd":  # re-draft from the likely rejection points
            prefixes = rejection_boundaries(log_probs, self.branches)
            branch_lp = (self.second or self.context).branch_log_probs(root, start, log_probs.argmax(-1), prefixes)
        t1 = clock()
        if self.shape == "dflash" or chain_only:  # a sizer cuts a chain to a prefix (path probabilities fall)
            tree = build_chain(log_probs, root, self.max_nodes(log_probs.shape[0]))
        elif self.shape == "d2sd":  # trimmed to the `budget` most probable nodes (prefix-closed)
            tree = prune(build_branch_tree(log_probs, branch_lp, prefixes, root), budget)
        else:
            tree = build_tree(log_probs, root, budget)
        if self.context.vocab is not None:
            tree = map_tokens(tree, self.context.vocab)
        times.draft += t1 - t0
        times.build += clock() - t1
        return tree

    def accept(self, features: torch.Tensor, positions: torch.Tensor) -> None:
        for ctx in self._contexts():
            ctx.commit(features, positions)


def propose(method: str, drafter: DrafterSource | None, lookup_src: LookupSource | None, root: int, start: int,
            cfg: DecodeConfig, clock: Clock, times: PhaseTimes, sizer: TreeSizer | None = None,
            chain_only: bool = False) -> Tree:
    """Collect this round's drafts from the sources, merge them into one tree and size it."""
    if method == "ar":
        return root_only(root)
    lookup = None
    if lookup_src is not None:  # n-gram drafts: microseconds, no model (auto and lookup: always sized)
        t0 = clock()
        lookup = lookup_src.propose(root, LOOKUP_DEPTH, sizer.build_budget(), chain_only)
        times.lookup += clock() - t0
    if drafter is None or (sizer is not None and not sizer.should_draft(start)):
        # exploring with a drafter, "no draft" is the schedule's plain round: measured as one
        if lookup is None or sizer is None or (sizer.schedule and drafter is not None):
            return root_only(root)
        t0 = clock()
        tree = sizer.choose(lookup, start, drafted=False)  # n-gram nodes cost no drafter pass
        times.build += clock() - t0
        return tree
    if lookup is not None and sizer is not None and not sizer.drafter_worth(lookup, start):
        t0 = clock()  # lookup is sure enough that a drafter pass would not pay for itself
        tree = sizer.choose(lookup, start, drafted=False)
        times.build += clock() - t0
        return tree
    tree = drafter.propose(root, start, sizer.build_budget() if sizer is not None else cfg.budget, chain_only,
                           clock, times)
    t0 = clock()
    if lookup is not None:  # one tree: shared prefixes are one node with the better estimate
        tree, _ = merge_trees(with_source(tree, 0), lookup)
        tree = prune_to_chain(tree) if chain_only else tree
    if sizer is not None:
        tree = sizer.choose(tree, start)
    times.build += clock() - t0
    return tree


def prune_to_chain(tree: Tree) -> Tree:
    """The tree's first branch (node 1 and its first children down): what a target that can
    verify only chains (recurrent layers) can take from a tree."""
    keep, node = [0], 0
    for i in range(1, tree.size + 1):
        if int(tree.parents[i]) == node:
            keep.append(i)
            node = i
    idx = torch.tensor(keep, device=tree.tokens.device)
    return subtree(tree, idx, torch.arange(-1, idx.numel() - 1, device=idx.device))


def replay(target: Target, cache, saved: list[dict], path_tokens: torch.Tensor, start: int) -> None:
    """Roll a recurrent target back to before a rejected chain: restore the recurrent states,
    crop the attention layers to `start`, then run the accepted tokens [L] through again."""
    kvcache.restore(cache, saved)
    kvcache.crop(cache, start)
    positions = start + torch.arange(path_tokens.numel(), device=path_tokens.device)
    target.forward(path_tokens[None], positions[None], cache, last_only=True)


def finish(tokens: list[int], produced: int, cfg: DecodeConfig) -> tuple[list[int], str | None]:
    """Cut a round's tokens at the first EOS and at max_new_tokens."""
    tokens = tokens[: cfg.max_new_tokens - produced]
    for i, tok in enumerate(tokens):
        if tok in cfg.eos_token_ids:
            return tokens[: i + 1], "eos"
    return tokens, "length" if produced + len(tokens) >= cfg.max_new_tokens else None


def decode(target: Target, drafter: DFlashDrafter | None, prompt_ids: list[int],
           cfg: DecodeConfig, sizer: TreeSizer | None = None,
           vp_drafter: DFlashDrafter | None = None, corpus: CorpusIndex | None = None) -> Iterator[Step]:
    """Yield one Step per target forward until EOS or max_new_tokens.

    sizer: required by the adaptive methods (caddtree, bastion, auto); it chooses tree sizes.
    vp_drafter: D2SD's variable-prefix drafter (d2sd without it re-drafts with `drafter`).
    corpus: earlier responses of the target, a further n-gram source for lookup and auto."""
    if cfg.method not in METHODS:
        raise QuanttreeError(f"unknown method {cfg.method!r}: choose one of {', '.join(METHODS)}")
    if cfg.method in DRAFT_METHODS and drafter is None:
        raise QuanttreeError(f"method {cfg.method!r} needs a drafter: load(..., drafter=PATH), or use method='auto' "
                             "or 'lookup' (n-gram drafts, no drafter) or 'ar'")
    if cfg.method in ADAPTIVE_METHODS and sizer is None:
        raise QuanttreeError(f"method {cfg.method!r} needs a cost model: use Engine.generate, which calibrates one")
    device = target.device
    clock = Clock(device)
    gen = make_generator(cfg.sampling, device)
    # the round's draft sources: the drafter (shaped by the method) and/or n-gram lookup
    draft = DrafterSource(drafter, target, cfg.method, vp_drafter, cfg.branches) \
        if drafter is not None and cfg.method not in ("ar", "lookup") else None
    lookup = LookupSource(corpus) if cfg.method in ("lookup",) + MERGES_LOOKUP else None
    layers = draft.layers if draft is not None else ()
    cache = kvcache.new_target_cache(target.model)
    recurrent = kvcache.has_recurrent_state(cache)
    if recurrent and cfg.method in TREE_METHODS:
        raise QuanttreeError(
            f"method {cfg.method!r} verifies a tree, which is not exact on this target: its recurrent "
            "(linear-attention) layers would read the flattened tree as one sequence. Use method='dflash' "
            "or 'auto' (chains, with the recurrent state rolled back by replaying the accepted tokens) or 'ar'")

    if sizer is not None:
        sizer.start_sequence()
    # prefill: the prompt, then the first token (it becomes the first root)
    t0 = clock()
    ids = torch.tensor([prompt_ids], device=device)
    out = target.forward(ids, torch.arange(len(prompt_ids), device=device)[None], cache,
                         feature_layers=layers, last_only=True)
    root = int(select_tokens(out.logits[-1:], cfg.sampling, gen)[0])
    if draft is not None:
        draft.begin(out.features, torch.arange(len(prompt_ids), device=device))
    if lookup is not None:
        lookup.begin(prompt_ids, root)
    tokens, finished = finish([root], 0, cfg)
    t1 = clock()
    yield Step(tokens=tokens, prefill=True, seconds=t1 - t0, finished=finished,
               times=PhaseTimes(verify=t1 - t0))
    produced, start = len(tokens), len(prompt_ids)
    while finished is None:
        t0 = clock()
        times = PhaseTimes()
        tree = propose(cfg.method, draft, lookup, root, start, cfg, clock, times, sizer, chain_only=recurrent)
        inputs = compile_tree(tree, start, target.dtype)
        t1 = clock()
        saved = kvcache.snapshot(cache) if recurrent and tree.size else None
        out = target.forward(inputs.input_ids, inputs.position_ids, cache, inputs.attention_mask, layers)
        t2 = clock()
        times.verify += t2 - t1
        if cfg.sampling.greedy:
            accepted = walk(tree, select_tokens(out.logits, cfg.sampling).to(tree.tokens.device), inputs.ancestors)
        else:  # draws only where the walk goes: one per committed token, as plain decoding draws
            accepted = walk_drawn(tree, lambda node: int(select_tokens(out.logits[node:node + 1], cfg.sampling, gen)[0]))
        if saved is not None and accepted.path.numel() < tree.size + 1:
            replay(target, cache, saved, tree.tokens[accepted.path], start)
            times.verify += clock() - t2
        else:
            kvcache.compact(cache, start, accepted.path)
        if draft is not None:
            draft.accept(out.features[accepted.path], start + torch.arange(accepted.path.numel(), device=device))
        new = tree.tokens[accepted.path[1:]].tolist() + [accepted.bonus]
        if lookup is not None:
            lookup.accept(new)
        tokens, finished = finish(new, produced, cfg)
        t3 = clock()
        times.walk += t3 - t2
        times.build = (t1 - t0) - times.draft - times.lookup  # tree building includes compiling it
        prediction = sizer.prediction() if sizer is not None else None
        if sizer is not None:
            sizer.observe(tree, accepted.path, tree.size + 1, start, 1000 * (t2 - t1),
                          1000 * (times.build + times.walk), round_ms=1000 * (t3 - t0),
                          draft_ms=1000 * times.draft, bonus=accepted.bonus)
        yield Step(tokens=tokens, tree_size=tree.size, accept_len=accepted.accept_len, times=times,
                   seconds=t3 - t0, finished=finished, tree=tree, path=accepted.path,
                   predicted_raw=prediction[0] if prediction else None,
                   predicted=prediction[1] if prediction else None)
        produced += len(tokens)
        start += accepted.path.numel()
        root = accepted.bonus
