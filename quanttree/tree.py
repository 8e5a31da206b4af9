"""Draft trees as pure tensor functions: build, compile (ids, positions, mask), walk.

A tree has n+1 nodes; node 0 is the root (the current bonus token, already committed
on the target side but not yet in its KV cache). Nodes are stored parents-before-children,
so node i's parent index is always < i. Depth d >= 1 nodes carry a token drafted for the
position root + d.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tree:
    tokens: torch.Tensor  # [n+1] long, tokens[0] = root
    parents: torch.Tensor  # [n+1] long, parents[0] = -1
    depths: torch.Tensor  # [n+1] long, depths[0] = 0
    scores: torch.Tensor  # [n+1] float, log path probability under the draft marginals (root 0)
    # [n+1, len(SOURCES)] float or None: per draft source, the node's own probability under that
    # source (its estimate that the node is right given its parent), NaN where the source did not
    # propose it. None: a tree of the drafter alone, own probabilities read from `scores`
    own: torch.Tensor | None = None

    @property
    def size(self) -> int:
        """Number of drafted nodes (root excluded)."""
        return self.tokens.numel() - 1

    def is_chain(self) -> bool:
        return bool((self.parents[1:] == torch.arange(self.size, device=self.parents.device)).all())


# draft sources a tree's nodes can come from: the DFlash drafter, n-gram lookup in the request
# by the length of the matched suffix (a 1-token match predicts far worse than a 3-token one),
# and lookup in a corpus of the target's earlier responses by match length (up to 8 tokens)
SOURCES = ("drafter", "lookup-1", "lookup-2", "lookup-3+", "corpus-1-3", "corpus-4-7", "corpus-8+")


def lookup_source(match_len: int) -> int:
    return min(max(match_len, 1), 3)


LOOKUP_COLUMNS = [i for i, name in enumerate(SOURCES) if name.startswith("lookup")]
CORPUS_COLUMNS = [i for i, name in enumerate(SOURCES) if name.startswith("corpus")]


def corpus_source(match_len: int) -> int:
    return CORPUS_COLUMNS[0 if match_len <= 3 else 1 if match_len <= 7 else 2]


def own_probs(tree: Tree) -> torch.Tensor:
    """Each node's own probability from its path scores: P(path) / P(parent's path). [n+1]"""
    parents = tree.parents.clamp(min=0)
    return (tree.scores - tree.scores[parents]).exp()


def node_origins(tree: Tree) -> list[str]:
    """Who proposed each drafted node (root excluded): 'drafter', 'lookup' (in the request),
    'corpus' (in earlier responses only) or 'both' (the drafter and an n-gram source)."""
    if tree.own is None:
        return ["drafter"] * tree.size
    have = ~torch.isnan(tree.own[1:])
    drafter = have[:, 0].tolist()
    lookup, corpus = (have[:, cols].any(dim=1).tolist() for cols in (LOOKUP_COLUMNS, CORPUS_COLUMNS))
    return ["both" if d and (g or c) else "drafter" if d else "lookup" if g else "corpus"
            for d, g, c in zip(drafter, lookup, corpus)]


def with_source(tree: Tree, source: int) -> Tree:
    """The tree with its nodes marked as proposed by `source` (an index into SOURCES)."""
    own = torch.full((tree.size + 1, len(SOURCES)), float("nan"), device=tree.scores.device)
    own[:, source] = own_probs(tree).float()
    return Tree(tree.tokens, tree.parents, tree.depths, tree.scores, own)


def subtree(tree: Tree, keep: torch.Tensor, parents: torch.Tensor) -> Tree:
    """Nodes `keep` (parents first, root included) with their new parent indices."""
    return Tree(tree.tokens[keep], parents, tree.depths[keep], tree.scores[keep],
                None if tree.own is None else tree.own[keep])


@dataclass(frozen=True)
class VerifyInputs:
    input_ids: torch.Tensor  # [1, n+1]
    position_ids: torch.Tensor  # [1, n+1]
    attention_mask: torch.Tensor | None  # [1, 1, n+1, past+n+1] additive, None = plain causal
    ancestors: torch.Tensor | None = None  # [n+1, n+1] bool, reused by walk() (None for chains)


@dataclass(frozen=True)
class Acceptance:
    path: torch.Tensor  # [L] node indices from the root (0) to the deepest accepted node
    bonus: int  # the target's token after the last path node

    @property
    def accept_len(self) -> int:
        """Drafted tokens accepted (root and bonus excluded)."""
        return self.path.numel() - 1


def root_only(root: int, device: torch.device | str = "cpu") -> Tree:
    """The tree of plain autoregressive decoding: nothing drafted."""
    one = torch.tensor([root], dtype=torch.long, device=device)
    return Tree(one, torch.tensor([-1], device=device), torch.zeros(1, dtype=torch.long, device=device),
                torch.zeros(1, device=device))


def build_chain(log_probs: torch.Tensor, root: int, length: int | None = None) -> Tree:
    """DFlash's chain: the top-1 token at every depth. log_probs: [D, V] -> chain of min(length, D)."""
    depth = log_probs.shape[0] if length is None else min(length, log_probs.shape[0])
    best, tok = log_probs[:depth].max(dim=-1)  # [depth]
    device = log_probs.device
    tokens = torch.cat([torch.tensor([root], device=device), tok])
    parents = torch.arange(-1, depth, device=device)
    depths = torch.arange(0, depth + 1, device=device)
    scores = torch.cat([torch.zeros(1, device=device), best.float().cumsum(0)])
    return Tree(tokens, parents, depths, scores)


def build_tree(log_probs: torch.Tensor, root: int, budget: int) -> Tree:
    """DDTree's best-first tree: exactly the `budget` most probable prefixes under the
    per-depth marginals (the set a best-first heap pops), built depth by depth with topk.

    log_probs: [D, V] log-softmax draft marginals for depths 1..D.
    Exactness: a top-`budget` prefix at depth d extends a top-`budget` prefix at depth d-1,
    so a beam of width `budget` per depth holds every candidate; the global top set is then
    prefix-closed because a child never scores above its parent.
    """
    device = log_probs.device
    if budget <= 0:
        return root_only(root, device)
    depth_count, vocab = log_probs.shape
    k = min(budget, vocab)
    lp, tok = torch.topk(log_probs.float(), k, dim=-1)  # [D, k], sorted descending
    beam = lp[0]  # [k] scores of depth-1 prefixes
    level_scores, level_tokens, level_parents = [beam], [tok[0]], [torch.full((k,), -1, device=device)]
    for d in range(1, depth_count):
        cand = (beam[:, None] + lp[d][None, :]).reshape(-1)  # [b*k]
        width = min(budget, cand.numel())
        beam, idx = torch.topk(cand, width)
        level_scores.append(beam)
        level_tokens.append(tok[d][idx % k])
        level_parents.append(idx // k)  # index into the previous level
    return _select_top(level_scores, level_tokens, level_parents, root, budget)


def _select_top(level_scores, level_tokens, level_parents, root: int, budget: int) -> Tree:
    """Keep the global top-`budget` prefixes across levels; order nodes by depth (parents first)."""
    device = level_scores[0].device
    sizes = [s.numel() for s in level_scores]
    scores = torch.cat(level_scores)
    depth_of = torch.cat([torch.full((n,), d + 1, device=device) for d, n in enumerate(sizes)])
    # stable sort: among equal scores the shallower (earlier) candidate wins, so parents precede
    order = torch.sort(scores, descending=True, stable=True).indices[:budget]
    keep = torch.sort(order).values  # flat indices, grouped by depth, ascending
    offsets = torch.tensor([0] + sizes, device=device).cumsum(0)
    new_index = torch.full((scores.numel(),), -1, dtype=torch.long, device=device)
    new_index[keep] = torch.arange(1, keep.numel() + 1, device=device)
    depth = depth_of[keep]
    local_parent = torch.cat(level_parents)[keep]
    parent_flat = torch.where(depth > 1, offsets[(depth - 2).clamp(min=0)] + local_parent, -1)
    parents = torch.where(depth > 1, new_index[parent_flat.clamp(min=0)], torch.zeros_like(depth))
    zero = torch.zeros(1, dtype=torch.long, device=device)
    return Tree(
        tokens=torch.cat([torch.tensor([root], device=device), torch.cat(level_tokens)[keep]]),
        parents=torch.cat([torch.tensor([-1], device=device), parents]),
        depths=torch.cat([zero, depth]),
        scores=torch.cat([torch.zeros(1, device=device), scores[keep]]),
    )


def merge_trees(a: Tree, b: Tree) -> tuple[Tree, torch.Tensor]:
    """One tree holding two drafts of the same root (token ids in the target's vocabulary): a
    node of `b` whose path already exists in `a` is that node (the better score kept), the rest
    of `b` hangs below its merged parent. Parents stay before children. Also returns which
    nodes `b` proposed ([n+1] bool; the root counts for both)."""
    if int(a.tokens[0]) != int(b.tokens[0]):
        raise ValueError("merge_trees: the two trees have different roots")
    tokens, parents, depths = a.tokens.tolist(), a.parents.tolist(), a.depths.tolist()
    scores = a.scores.tolist()
    width = len(SOURCES)
    nan = [float("nan")] * width
    own = a.own.tolist() if a.own is not None else [list(nan) for _ in tokens]
    b_own = b.own.tolist() if b.own is not None else [list(nan) for _ in range(b.size + 1)]
    from_b = [True] + [False] * a.size
    child = {(parents[i], tokens[i]): i for i in range(1, len(tokens))}
    where = [0] * (b.size + 1)  # b's node -> merged node
    for i, (tok, par, score) in enumerate(zip(b.tokens.tolist(), b.parents.tolist(), b.scores.tolist())):
        if i == 0:
            continue
        key = (where[par], tok)
        j = child.get(key)
        if j is None:
            j = len(tokens)
            child[key] = j
            tokens.append(tok)
            parents.append(where[par])
            depths.append(depths[where[par]] + 1)
            scores.append(score)
            own.append(list(b_own[i]))
            from_b.append(True)
        else:
            scores[j] = max(scores[j], score)
            own[j] = [y if x != x else x for x, y in zip(own[j], b_own[i])]  # x != x: NaN, not proposed
            from_b[j] = True
        where[i] = j
    device = a.tokens.device
    carry = a.own is not None or b.own is not None
    merged = Tree(torch.tensor(tokens, device=device), torch.tensor(parents, device=device),
                  torch.tensor(depths, device=device), torch.tensor(scores, device=device),
                  torch.tensor(own, device=device) if carry else None)
    return merged, torch.tensor(from_b, device=device)


def map_tokens(tree: Tree, vocab: torch.Tensor) -> Tree:
    """Draft-vocabulary indices -> target token ids for every node but the root."""
    tokens = torch.cat([tree.tokens[:1], vocab[tree.tokens[1:]]])
    return Tree(tokens, tree.parents, tree.depths, tree.scores, tree.own)


def ancestor_matrix(parents: torch.Tensor) -> torch.Tensor:
    """vis[i, j] = node j is node i or one of its ancestors. parents: [n+1] -> [n+1, n+1] bool.

    Uses vis[i] = onehot(i) | vis[parent[i]], vectorised by pointer doubling over depths.
    """
    n = parents.numel()
    idx = torch.arange(n, device=parents.device)
    vis = torch.zeros(n, n, dtype=torch.bool, device=parents.device)
    vis[idx, idx] = True
    hop = parents.clamp(min=0)  # the root points to itself
    has = parents >= 0
    vis[idx[has], hop[has]] = True
    # after step s, vis holds ancestors up to 2^(s+1) hops; depth <= n so log2(n) steps suffice
    steps = max(1, int(n).bit_length())
    for _ in range(steps):
        vis = vis | vis[hop]
        hop = hop[hop]
    return vis


def compile_tree(tree: Tree, start: int, dtype: torch.dtype) -> VerifyInputs:
    """Flatten a tree for one target forward after `start` cached positions.

    Positions are start + depth (siblings share one). A chain needs no mask (plain causal);
    otherwise the mask is 4D additive: every cached column visible, tree columns visible
    only for ancestors (and self).
    """
    input_ids = tree.tokens[None, :]
    position_ids = (tree.depths + start)[None, :]
    if tree.is_chain():
        return VerifyInputs(input_ids, position_ids, None)
    vis = ancestor_matrix(tree.parents)
    n = vis.shape[0]
    mask = torch.zeros(n, start + n, dtype=dtype, device=vis.device)
    mask[:, start:] = mask[:, start:].masked_fill(~vis, torch.finfo(dtype).min)
    return VerifyInputs(input_ids, position_ids, mask[None, None], vis)


def sliding_window_mask(mask: torch.Tensor, position_ids: torch.Tensor, window: int) -> torch.Tensor:
    """The tree mask [1, 1, n, past+n] of a sliding-window layer: a query at position p also
    hides every key at position <= p - window (transformers' convention). Cached keys sit at
    positions 0..past-1 (the cache is compacted), tree keys at the tree's own positions."""
    n, total = mask.shape[-2:]
    q = position_ids.reshape(-1).to(mask.device)
    k = torch.cat([torch.arange(total - n, device=mask.device), q])
    return mask.masked_fill((q[:, None] - k[None, :]) >= window, torch.finfo(mask.dtype).min)


def walk(tree: Tree, target_tokens: torch.Tensor, ancestors: torch.Tensor | None = None) -> Acceptance:
    """Follow the target from the root: at each node, go to the child whose token equals the
    target's token there; stop when none does. target_tokens: [n+1] (one per node);
    ancestors: the tree's ancestor matrix when compile_tree already built it."""
    if tree.size == 0:  # plain decoding: nothing to walk
        return Acceptance(path=torch.zeros(1, dtype=torch.long, device=target_tokens.device),
                          bonus=int(target_tokens[0]))
    parents = tree.parents
    ok = torch.zeros_like(parents, dtype=torch.bool)
    ok[0] = True
    ok[1:] = tree.tokens[1:] == target_tokens[parents[1:]]
    vis = ancestors if ancestors is not None else ancestor_matrix(parents)
    on_path = (vis & ~ok[None, :]).sum(dim=1) == 0  # every ancestor (and self) accepted
    depth = torch.where(on_path, tree.depths, torch.full_like(tree.depths, -1))
    last = int(depth.argmax())
    path = vis[last].nonzero().squeeze(-1)  # ancestors of the deepest accepted node, ascending
    return Acceptance(path=path, bonus=int(target_tokens[last]))


def walk_drawn(tree: Tree, draw) -> Acceptance:
    """Sampling's walk: draw the target's token at the root, go to the child holding it, draw
    there, and so on; the first draw no child holds is the bonus. draw(node) -> token id.

    Only the nodes the walk visits are drawn: the same distribution as a draw at every node (the
    others are never read), one draw per committed token in commit order, as plain decoding
    draws, and a fraction of the cost when a draw (top-p, softmax over the vocabulary) costs more
    per row than the target's forward does. Trees are tries: siblings hold distinct tokens."""
    child = {(p, t): i for i, (p, t) in enumerate(zip(tree.parents.tolist(), tree.tokens.tolist())) if i}
    path = [0]
    while True:
        token = draw(path[-1])
        nxt = child.get((path[-1], token))
        if nxt is None:
            return Acceptance(path=torch.tensor(path, dtype=torch.long, device=tree.tokens.device), bonus=token)
        path.append(nxt)


def rejection_boundaries(chain_log_probs: torch.Tensor, count: int) -> torch.Tensor:
    """D2SD's likely rejection points: r(i) = prod_{k<i} c_k * (1 - c_i) over draft slots, where
    c is the drafter's top-1 confidence; returns the `count` best prefix lengths i (0 = the first
    drafted token is the one likely rejected). chain_log_probs: [D, V] -> [count] long."""
    conf = chain_log_probs.max(dim=-1).values.float().exp()  # [D]
    before = torch.cat([torch.ones(1, device=conf.device), conf.cumprod(0)[:-1]])
    score = before * (1 - conf)
    return torch.topk(score, min(count, score.numel())).indices


def build_branch_tree(chain_log_probs: torch.Tensor, branch_log_probs: torch.Tensor, prefixes: torch.Tensor,
                      root: int) -> Tree:
    """Merge the drafter's greedy chain and K re-drafted branches into one token tree (a trie).

    chain_log_probs: [D, V]; branch_log_probs: [K, D, V], branch k re-drafted with the chain's
    first prefixes[k] tokens visible. Branch k keeps the chain up to its prefix, takes its best
    token that differs from the chain at slot prefixes[k] (the alternative at the likely
    rejection point), then its own greedy tokens. Shared prefixes become shared nodes.
    """
    chain_lp, chain_tok = chain_log_probs.float().max(dim=-1)  # [D]
    sequences = [(chain_tok.tolist(), chain_lp.tolist())]
    for lp, cut in zip(branch_log_probs.float(), prefixes.tolist()):
        alt_lp, alt_tok = torch.topk(lp[cut], 2)
        pick = 1 if int(alt_tok[0]) == int(chain_tok[cut]) else 0
        tail_lp, tail_tok = lp[cut + 1:].max(dim=-1)
        tokens = chain_tok[:cut].tolist() + [int(alt_tok[pick])] + tail_tok.tolist()
        scores = chain_lp[:cut].tolist() + [float(alt_lp[pick])] + tail_lp.tolist()
        sequences.append((tokens, scores))
    children: dict[tuple[int, int], int] = {}
    tokens, parents, depths, path_scores = [root], [-1], [0], [0.0]
    for seq, slot_scores in sequences:  # the trie: at most (K+1)*D nodes, a fixed small size
        node = 0
        for depth, (tok, lp) in enumerate(zip(seq, slot_scores), start=1):
            key = (node, tok)
            if key not in children:
                children[key] = len(tokens)
                tokens.append(tok)
                parents.append(node)
                depths.append(depth)
                path_scores.append(path_scores[node] + lp)
            node = children[key]
    device = chain_log_probs.device
    return Tree(torch.tensor(tokens, device=device), torch.tensor(parents, device=device),
                torch.tensor(depths, device=device), torch.tensor(path_scores, device=device))
