"""DFlash drafter training: target features, many anchors per sequence, block-diagonal masks,
slot-weighted cross-entropy through the frozen target lm_head; AdamW, warmup + cosine;
resumable safetensors checkpoints; held-out acceptance and calibration.

Variable-prefix mode (D2SD's second drafter): each block shows a ground-truth prefix of
length l ~ 0.9^l after the anchor and is trained on the slots after it.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..drafter import (DFlashDrafter, check_fits_target, init_random, random_drafter_config, read_draft_vocab,
                       read_drafter, save_drafter, window_visible)
from ..errors import QuanttreeError
from ..models import native_bf16
from ..target import Target
from .baselines import slot1_baselines
from .datagen import is_held_out, is_scored_text
from .features import FeatureCache


@dataclass(frozen=True)
class TrainConfig:
    num_layers: int = 2
    block_size: int = 16
    num_features: int = 4  # target layers whose hidden states feed the drafter (DFlash's spread rule)
    feature_layers: tuple[int, ...] | None = None  # explicit target layer ids (overrides num_features)
    draft_vocab: int = 8192  # frequency-ranked draft vocabulary (0 = the whole target vocabulary)
    anchors: int = 64  # blocks per sequence
    seqs_per_step: int = 4
    steps: int = 2000
    lr: float = 6e-4
    warmup: float = 0.04
    weight_decay: float = 0.01
    gamma: float = 7.0
    distill: float = 0.0  # weight of the soft-label loss (target's top-k distribution); 1 - distill on hard labels
    init: str = "target"  # "target": copies of the target's last layers; "random"
    fc_init: str = "normal"  # "scaled": fc columns divided by each feature dim's spread (massive activations)
    max_seq_len: int = 640
    ckpt_every: int = 50
    eval_every: int = 200
    eval_minutes: float = 0.0  # also evaluate after this much training time (0 = by steps only)
    eval_seqs: int = 48
    seed: int = 0
    variable_prefix: bool = False
    prefix_decay: float = 0.9
    # drafter matmuls in bf16 (fp32 master weights); None: where the device computes bf16 natively
    # (on a CPU with AVX2 alone bf16 is emulated: a training sequence 29x slower, benchmarks/cpu_bf16.py)
    bf16_autocast: bool | None = None
    init_from: str | None = None  # start from this drafter dir (its shape and draft vocabulary win)
    grow_layers: int = 0  # with init_from: append this many layers that start as the identity
    refresh_vocab: bool = False  # with init_from: pick the draft vocabulary from this run's data instead
    mask_token_id: int | None = None  # a target vocabulary token as the mask (None: a learned mask embedding)
    scored_text: bool = True  # train on the cache's scored text too (code_text.py), not only the target's answers
    # share of each sequence's anchors drawn where greedy decoding's rounds start (replayed with the
    # drafter as it is when the sequence is first drawn, DDTree of round_start_budget nodes; 1: the
    # chain); the rest uniformly. Decoding anchors every round right after a rejection: harder positions
    round_start_share: float = 0.0
    round_start_budget: int = 16


# ---------------------------------------------------------------- data

def split_indices(pool_index) -> tuple[list[int], list[int]]:
    """Held-out = every 50th pool prompt, so the split is stable as data grows. -> (train, held) rows"""
    train = [i for i, p in enumerate(pool_index) if not is_held_out(p)]
    held = [i for i, p in enumerate(pool_index) if is_held_out(p)]
    return train, held


def draft_vocabulary(responses: list[np.ndarray], size: int, vocab_size: int, always: frozenset[int]) -> torch.Tensor:
    """The `size` most frequent response tokens (plus `always`), ascending ids. [N] long"""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for tokens in responses:
        np.add.at(counts, tokens, 1)
    for t in always:
        counts[t] = counts.max() + 1
    top = np.argsort(-counts, kind="stable")[:size]
    return torch.tensor(np.sort(top), dtype=torch.long)


def sample_anchors(length: int, prompt_len: int, count: int, gen: torch.Generator) -> torch.Tensor:
    """Anchor positions in the response region (the anchor token is known, its successors are not)."""
    lo, hi = max(prompt_len - 1, 0), length - 2
    if hi < lo:
        return torch.empty(0, dtype=torch.long)
    choices = torch.arange(lo, hi + 1)
    if choices.numel() > count:
        choices = choices[torch.randperm(choices.numel(), generator=gen)[:count]]
    return torch.sort(choices).values


def block_inputs(tokens: torch.Tensor, anchors: torch.Tensor, block: int, prefix: torch.Tensor | None):
    """Block token ids (-1 = MASK), labels (-100 = no loss) and positions, each [A, B]."""
    offsets = torch.arange(block)
    pos = anchors[:, None] + offsets[None, :]
    valid = pos < tokens.numel()
    truth = torch.where(valid, tokens[pos.clamp(max=tokens.numel() - 1)], torch.full_like(pos, -100))
    visible = offsets[None, :] == 0
    if prefix is not None:
        visible = offsets[None, :] <= prefix[:, None]
    ids = torch.where(visible & valid, truth, torch.full_like(pos, -1))
    labels = torch.where(visible, torch.full_like(pos, -100), truth)
    return ids, labels, pos


def block_context_mask(anchors: torch.Tensor, context_len: int, block: int) -> torch.Tensor:
    """[A, 1, B, L + B] bool, one row set per block: the context strictly before the block's
    anchor, then the block itself (bidirectional). Blocks run as a batch: they never see each other."""
    ctx = torch.arange(context_len)[None, :] < anchors[:, None]  # [A, L]
    ctx = ctx[:, None, None, :].expand(-1, 1, block, -1)
    own = torch.ones(anchors.numel(), 1, block, block, dtype=torch.bool)
    return torch.cat([ctx, own], dim=-1)


# ---------------------------------------------------------------- model

def copy_target_layer(dst, src) -> None:
    """Copy one target decoder layer's projections and norms into a drafter layer (as fp32)."""
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        getattr(dst.self_attn, name).weight.copy_(getattr(src.self_attn, name).weight.float())
    for name in ("gate_proj", "up_proj", "down_proj"):
        getattr(dst.mlp, name).weight.copy_(getattr(src.mlp, name).weight.float())
    dst.input_layernorm.weight.copy_(src.input_layernorm.weight.float())
    dst.post_attention_layernorm.weight.copy_(src.post_attention_layernorm.weight.float())


def init_from_target(drafter: DFlashDrafter, target_model) -> None:
    """Start the drafter layers from copies of the target's last layers (same shapes) and its
    final norm from the target's, so drafter logits start on the scale the lm_head expects."""
    layers = target_model.model.layers
    src = layers[len(layers) - len(drafter.layers):]
    with torch.no_grad():
        for dst, s in zip(drafter.layers, src):
            copy_target_layer(dst, s)
        drafter.norm.weight.copy_(target_model.model.norm.weight.float())  # logits on the lm_head's scale
        drafter.fc.weight.normal_(0.0, 0.02)
        if drafter.mask_embedding is not None:
            drafter.mask_embedding.normal_(0.0, 0.02)


def grown_config(cfg, extra: int):
    """`cfg` with `extra` more layers (each new layer attends like the last one)."""
    if extra < 0:
        raise ValueError(f"cannot grow a drafter by {extra} layers")
    types = cfg.layer_types + (cfg.layer_types[-1:] * extra if cfg.layer_types else ())
    return replace(cfg, num_hidden_layers=cfg.num_hidden_layers + extra, layer_types=types)


def init_identity_layers(drafter: DFlashDrafter, first: int, target_model) -> None:
    """Layers `first`.. start as copies of the target's last layer with their two output
    projections zeroed: each adds nothing to the residual stream, so the grown drafter computes
    exactly what it did before growing, and training moves them from there."""
    src = target_model.model.layers[-1]
    with torch.no_grad():
        for dst in drafter.layers[first:]:
            copy_target_layer(dst, src)
            dst.self_attn.o_proj.weight.zero_()
            dst.mlp.down_proj.weight.zero_()


def start_from_drafter(path: Path, target: Target, grow: int = 0) -> tuple[DFlashDrafter, torch.Tensor | None]:
    """A trained drafter as the starting point (for example the DFlash drafter for a VP drafter, or
    for a deeper drafter with `grow` identity layers appended): fp32 weights with a mask
    embedding, and its draft vocabulary."""
    cfg, tensors = read_drafter(path)
    check_fits_target(cfg, target.model.config, True)  # a mask embedding is trained if absent
    drafter = DFlashDrafter(grown_config(cfg, grow), with_mask_embedding=True).float()
    new = {k for k in drafter.state_dict()
           if k.startswith("layers.") and int(k.split(".")[1]) >= cfg.num_hidden_layers}
    missing = set(drafter.state_dict()) - set(tensors) - new
    if missing - {"mask_embedding"}:
        raise ValueError(f"{path} lacks drafter tensors {sorted(missing)[:5]}")
    drafter.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=False)
    if grow:
        init_identity_layers(drafter, cfg.num_hidden_layers, target.model)
    if "mask_embedding" in missing:
        with torch.no_grad():
            drafter.mask_embedding.normal_(0.0, 0.02)
    return drafter, read_draft_vocab(path, target.vocab_size)


def drafter_train_forward(drafter: DFlashDrafter, features: torch.Tensor, block_embeds: torch.Tensor,
                          block_pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The decoding forward with the blocks as a batch: features [L, k*H] of one sequence,
    block_embeds [A, B, H], block_pos [A, B], mask [A, 1, B, L+B] -> states [A, B, H]."""
    ctx = drafter.fuse_context(features[None])  # [1, L, H]
    ctx_pos = torch.arange(features.shape[0])
    ctx_rope = drafter.rope(ctx_pos, ctx.dtype)
    cos, sin = drafter.rope(block_pos.reshape(-1), ctx.dtype)
    a, b = block_pos.shape
    blk_rope = (cos.view(a, 1, b, -1), sin.view(a, 1, b, -1))  # broadcast over heads
    keys = torch.cat([ctx_pos[None, :].expand(a, -1), block_pos], dim=1)  # [A, L+B] key positions
    x = block_embeds
    for i, layer in enumerate(drafter.layers):
        window = drafter.config.layer_window(i)
        layer_mask = mask if window is None else mask & window_visible(block_pos, keys, window)[:, None]
        k_ctx, v_ctx = layer.self_attn.project_kv(ctx, ctx_rope)  # [1, kv, L, d], shared by the blocks
        x = layer(x, blk_rope, k_ctx, v_ctx, layer_mask)
    return drafter.norm(x)


def tree_tau(logits: torch.Tensor, truth: torch.Tensor, temperature: float, budget: int) -> float:
    """Teacher-forced DDTree tau: mean accepted length + 1 of best-first trees of `budget` nodes
    built from the marginals softmax(logits / temperature), walked along the true continuation.
    logits: [N, D, V] per block and depth; truth: [N, D] the true tokens (-1: none matches)."""
    return 1 + float(tree_accepts(logits.float() / temperature, truth, budget).float().mean()) if len(logits) else 1.0


def tree_accepts(logits: torch.Tensor, truth: torch.Tensor, budget: int) -> torch.Tensor:
    """Drafted tokens each block's tree accepts when walked along the truth, all blocks at once:
    DDTree's best-first tree of `budget` nodes (`tree.build_tree`), or DFlash's chain for budget 1.
    The best-first tree holds exactly the `budget` highest-scoring prefixes (score: the sum of the
    per-depth marginal log-probs), at most `budget` of them at each depth, so the true prefix of
    depth d is in it iff its score reaches the budget-th best of the per-depth top-`budget`s.
    logits: [N, D, V]; truth: [N, D] (-1 or out of range: no token matches). -> [N] long"""
    n, depth, vocab = logits.shape
    if n == 0:
        return torch.zeros(0, dtype=torch.long)
    valid = (truth >= 0) & (truth < vocab)
    if budget == 1:
        hit = (logits.argmax(-1) == truth) & valid
        return hit.long().cumprod(dim=1).sum(dim=1)
    lp = logits.float().log_softmax(-1)
    true_lp = torch.where(valid, lp.gather(-1, truth.clamp(0, vocab - 1)[..., None])[..., 0],
                          torch.full(truth.shape, -math.inf))
    k = min(budget, vocab)
    top = lp.topk(k, dim=-1).values  # [N, D, k]
    beam, levels = top[:, 0], [top[:, 0]]
    for d in range(1, depth):
        cand = (beam[:, :, None] + top[:, d, None, :]).reshape(n, -1)
        beam = cand.topk(min(budget, cand.shape[1]), dim=-1).values
        levels.append(beam)
    scores = torch.cat(levels, dim=1)
    threshold = scores.topk(min(budget, scores.shape[1]), dim=-1).values[:, -1]  # [N]
    prefix = [true_lp[:, 0]]  # summed depth by depth as the beam sums (cumsum rounds otherwise)
    for d in range(1, depth):
        prefix.append(prefix[-1] + true_lp[:, d])
    return (torch.stack(prefix, dim=1) >= threshold[:, None]).long().cumprod(dim=1).sum(dim=1)


def replay_rounds(accepts: torch.Tensor, first: int, end: int) -> torch.Tensor:
    """Greedy decoding's round starts, replayed: a round anchored at position p accepts
    accepts[p - first] drafted tokens, and the next round starts at the target's token after
    them. accepts: [end - first] for anchors first..end-1. -> the anchor positions visited [R]"""
    starts, pos = [], first
    acc = accepts.tolist()
    while pos < end:
        starts.append(pos)
        pos += int(acc[pos - first]) + 1
    return torch.tensor(starts, dtype=torch.long)


def slot_weights(block: int, gamma: float, prefix: torch.Tensor | None, anchors: int) -> torch.Tensor:
    """w_k = exp(-(k - l - 1) / gamma) for slots after the visible prefix l (l = 0 for DFlash). [A, B]"""
    k = torch.arange(block)[None, :].expand(anchors, block)
    l = prefix[:, None] if prefix is not None else torch.zeros(anchors, 1, dtype=torch.long)
    return torch.exp(-(k - l - 1).clamp(min=0).float() / gamma)


# ---------------------------------------------------------------- the trainer

class Trainer:
    """Trains a drafter on a FeatureCache: target features and soft labels are read, never recomputed."""

    def __init__(self, target: Target, cache: FeatureCache, cfg: TrainConfig, work: Path, log=print,
                 eos_ids: frozenset[int] = frozenset()):
        torch.set_flush_denormal(True)
        self.target, self.cache, self.cfg, self.work, self.log = target, cache, cfg, work, log
        self.autocast = cfg.bf16_autocast if cfg.bf16_autocast is not None else native_bf16(target.device)
        self.train_ids, self.held_ids = split_indices(cache.pool_index[:len(cache)])
        if not cfg.scored_text:
            self.train_ids = [i for i in self.train_ids if not is_scored_text(cache.pool_index[i])]
        if not self.train_ids:
            raise ValueError("no training sequences")
        if cfg.distill < 1.0 and any(is_scored_text(cache.pool_index[i]) for i in self.train_ids):
            raise ValueError("the feature cache holds scored text (answers the target did not write): its hard "
                             "labels are not the target's; train with --distill 1.0 (the target's own distribution)")
        if not 0.0 <= cfg.round_start_share <= 1.0 or cfg.round_start_budget < 1:
            raise ValueError(f"--round-start-share must be in [0, 1] (got {cfg.round_start_share}) and "
                             f"--round-start-budget at least 1 (got {cfg.round_start_budget})")
        if cfg.round_start_share and cfg.variable_prefix:
            raise ValueError("--round-start-share replays DFlash rounds: it does not apply to a variable-prefix drafter")
        torch.manual_seed(cfg.seed)  # the drafter's initialisation depends only on the config
        if cfg.init_from:
            self.drafter, vocab = start_from_drafter(Path(cfg.init_from), target, cfg.grow_layers)
            if cfg.refresh_vocab:  # new data (chat after code) brings words the old vocabulary lacks
                if self.drafter.lm_head is not None:
                    raise ValueError(f"{cfg.init_from} has its own lm_head over its draft vocabulary: "
                                     "its vocabulary cannot change (drop --refresh-vocab)")
                responses = [self.response(i) for i in self.train_ids]
                vocab = draft_vocabulary(responses, cfg.draft_vocab, target.vocab_size, eos_ids) \
                    if 0 < cfg.draft_vocab < target.vocab_size else None
            self.use_vocab(vocab)
        else:
            if cfg.grow_layers:
                raise ValueError("growing layers needs a drafter to start from (--init-from)")
            vocab = target.vocab_size
            responses = [self.response(i) for i in self.train_ids]
            self.use_vocab(draft_vocabulary(responses, cfg.draft_vocab, vocab, eos_ids)
                           if 0 < cfg.draft_vocab < vocab else None)
            dcfg = random_drafter_config(target.model.config, num_layers=cfg.num_layers,
                                         block_size=cfg.block_size, num_features=cfg.num_features,
                                         mask_token_id=cfg.mask_token_id)
            if cfg.feature_layers:
                dcfg = replace(dcfg, target_layer_ids=tuple(cfg.feature_layers))
            self.drafter = DFlashDrafter(dcfg, with_mask_embedding=cfg.mask_token_id is None).float()
            if cfg.init == "target":
                init_from_target(self.drafter, target.model)
            else:
                init_random(self.drafter, seed=cfg.seed)
                with torch.no_grad():
                    self.drafter.norm.weight.copy_(target.model.model.norm.weight.float())
        missing = sorted(set(self.drafter.config.target_layer_ids) - set(cache.layers))
        if missing:
            raise ValueError(f"the drafter reads target layers {missing} that the feature cache lacks "
                             f"(it has {list(cache.layers)}): rebuild the cache with those layers")
        if cfg.fc_init == "scaled" and not cfg.init_from:
            self.scale_fc_init()
        if self.drafter.config.block_size != cfg.block_size:
            raise ValueError(f"block size {cfg.block_size} differs from the drafter's "
                             f"{self.drafter.config.block_size}")
        self.opt = torch.optim.AdamW(self.drafter.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                     betas=(0.9, 0.95))
        self.step, self.minutes = 0, 0.0
        self.history: list[dict] = []  # every evaluation of this run (kept in checkpoints)
        self._baselines: dict | None = None
        self.round_starts: dict[int, torch.Tensor] = {}  # sequence -> replayed round starts (kept in checkpoints)

    # ------------------------------------------------ pieces
    @torch.no_grad()
    def scale_fc_init(self, rows: int = 20000) -> None:
        """Divide each fc input column by that feature dimension's spread in the cached data.
        Target hidden states carry a few massive-activation dims (100-400x the median here):
        with a plain init they drown every other feature in the fused context. The published
        format is unchanged: the scaling lives in fc's own weights."""
        layers = self.drafter.config.target_layer_ids
        sample, n = [], 0
        for i in self.train_ids:
            sample.append(self.cache.feature_rows(i, layers).float())
            n += sample[-1].shape[0]
            if n >= rows:
                break
        spread = torch.cat(sample).std(dim=0).clamp(min=1e-3)  # [k*H]
        w = self.drafter.fc.weight
        w.div_(spread[None, :] / spread.median())

    def response(self, i: int) -> np.ndarray:
        return self.cache.token_ids(i)[int(self.cache.prompt_lens[i]):].numpy()

    def use_vocab(self, vocab: torch.Tensor | None) -> None:
        """Draft over `vocab` (None = the whole vocabulary): lm_head rows and the id remap."""
        self.vocab = vocab
        head = self.target.model.get_output_embeddings().weight.detach()
        # bf16 values as the exported drafter holds them; bf16 arithmetic only where it is native
        self.head = (head[vocab] if vocab is not None else head).to(torch.bfloat16) \
            .to(torch.bfloat16 if self.autocast else torch.float32)
        self.remap = torch.arange(self.target.vocab_size)
        if vocab is not None:  # full id -> draft index (-100 outside the draft vocabulary)
            self.remap = torch.full((self.target.vocab_size,), -100, dtype=torch.long)
            self.remap[vocab] = torch.arange(vocab.numel())

    def lr_at(self, step: int) -> float:
        warm = max(1, int(self.cfg.warmup * self.cfg.steps))
        if step < warm:
            return self.cfg.lr * (step + 1) / warm
        progress = (step - warm) / max(1, self.cfg.steps - warm)
        return self.cfg.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    def embed_blocks(self, ids: torch.Tensor) -> torch.Tensor:
        """[A, B] ids with -1 = MASK -> [A, B, H]."""
        with torch.no_grad():
            emb = self.target.embed(ids.clamp(min=0)).float()
            vocab_mask = self.target.embed(torch.tensor([self.drafter.config.mask_token_id])).float()[0] \
                if self.drafter.mask_embedding is None else None
        mask = (self.drafter.mask_embedding if vocab_mask is None else vocab_mask).expand_as(emb)
        return torch.where((ids < 0)[..., None], mask, emb)

    def sample_prefix(self, count: int, gen: torch.Generator) -> torch.Tensor:
        """Visible prefix lengths for a VP drafter: P(l) ~ decay^l, l in 0..B-2."""
        probs = self.cfg.prefix_decay ** torch.arange(self.cfg.block_size - 1, dtype=torch.float)
        return torch.multinomial(probs / probs.sum(), count, replacement=True, generator=gen)

    def block_states(self, i: int, anchors: torch.Tensor, prefix: torch.Tensor | None):
        """Drafter states of blocks at `anchors` of cached sequence i -> (states [A, B, H], labels, pos [A, B])."""
        tokens = self.cache.token_ids(i)[: self.cfg.max_seq_len]
        ids, labels, pos = block_inputs(tokens, anchors, self.cfg.block_size, prefix)
        feats = self.cache.feature_rows(i, self.drafter.config.target_layer_ids)[: tokens.numel()]
        mask = block_context_mask(anchors, tokens.numel(), self.cfg.block_size)
        with torch.autocast(self.target.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            states = drafter_train_forward(self.drafter, feats.to(self.target.device), self.embed_blocks(ids), pos,
                                           mask)
        return states, labels, pos

    def soft_targets(self, i: int, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The target's next-token distribution at positions `rows` of sequence i, over the draft
        vocabulary: (draft indices [n, K], probabilities [n, K], renormalised over the kept ids)."""
        ids, logp = self.cache.soft_labels(i)
        ids, logp = ids[rows], logp[rows]
        idx = self.remap[ids]
        probs = torch.where(idx >= 0, logp.exp(), torch.zeros_like(logp))
        probs = probs / probs.sum(-1, keepdim=True).clamp(min=1e-9)
        return idx.clamp(min=0), probs

    def sequence_len(self, i: int) -> int:
        return min(int(self.cache.offsets[i + 1] - self.cache.offsets[i]), self.cfg.max_seq_len)

    @torch.no_grad()
    def response_accepts(self, i: int, budgets: tuple[int, ...], chunk: int = 128) -> dict[int, torch.Tensor]:
        """Drafted tokens a round anchored at each response position of cached sequence i would
        accept (teacher-forced context, trees of each budget walked along the truth: 1 = the chain).
        The first anchor is the first response token, as after prefill. -> {budget: [P]}"""
        n, first = self.sequence_len(i), int(self.cache.prompt_lens[i])
        out = {b: [] for b in budgets}
        for part in torch.arange(first, max(n - 1, first)).split(chunk):
            logits, truth = self.block_logits(i, part, None)
            beyond = part[:, None] + torch.arange(1, self.cfg.block_size)[None, :] >= n
            truth = truth.masked_fill(beyond, -1)
            for b in budgets:
                out[b].append(tree_accepts(logits, truth, b))
        return {b: torch.cat(v) if v else torch.zeros(0, dtype=torch.long) for b, v in out.items()}

    def replayed_round_starts(self, i: int, budget: int) -> torch.Tensor:
        """Where greedy decoding of sequence i's response starts its rounds, replayed with this drafter."""
        first = int(self.cache.prompt_lens[i])
        accepts = self.response_accepts(i, (budget,))[budget]
        return replay_rounds(accepts, first, first + accepts.numel())

    @torch.no_grad()
    def replayed_decoding(self, ids: list[int], budgets: tuple[int, ...] = (1, 16)) -> dict:
        """Greedy decoding replayed on sequences `ids` (teacher-forced features): per budget, tau
        (tokens per round) and the share of rounds that accept a drafted token."""
        rounds, produced, firsts = dict.fromkeys(budgets, 0), dict.fromkeys(budgets, 0), dict.fromkeys(budgets, 0)
        for i in ids:
            first = int(self.cache.prompt_lens[i])
            for b, accepts in self.response_accepts(i, budgets).items():
                got = accepts[replay_rounds(accepts, first, first + accepts.numel()) - first]
                rounds[b] += got.numel()
                produced[b] += int(got.sum()) + got.numel()
                firsts[b] += int((got > 0).sum())
        name = {1: "chain"}
        out = {}
        for b in budgets:
            key = name.get(b, f"ddtree{b}")
            out[f"replay_{key}_tau"] = round(produced[b] / max(rounds[b], 1), 3)
            out[f"replay_{key}_first"] = round(firsts[b] / max(rounds[b], 1), 3)
        return out

    def draw_anchors(self, i: int, gen: torch.Generator) -> torch.Tensor:
        """cfg.anchors anchor positions of sequence i: uniform over its response, or a
        round_start_share of them drawn among the rounds greedy decoding would start there."""
        cfg = self.cfg
        n, plen = self.sequence_len(i), int(self.cache.prompt_lens[i])
        if cfg.round_start_share <= 0:
            return sample_anchors(n, plen, cfg.anchors, gen)
        if i not in self.round_starts:
            self.round_starts[i] = self.replayed_round_starts(i, cfg.round_start_budget)
        starts = self.round_starts[i]
        take = min(round(cfg.round_start_share * cfg.anchors), starts.numel())
        picked = starts[torch.randperm(starts.numel(), generator=gen)[:take]]
        return torch.unique(torch.cat([picked, sample_anchors(n, plen, cfg.anchors - take, gen)]))

    def sequence_loss(self, i: int, gen: torch.Generator):
        """Weighted loss sum and weight sum over the sampled blocks of cached sequence i."""
        cfg = self.cfg
        anchors = self.draw_anchors(i, gen)
        if anchors.numel() == 0:
            return None
        prefix = self.sample_prefix(anchors.numel(), gen) if cfg.variable_prefix else None
        states, labels, pos = self.block_states(i, anchors, prefix)
        weights = slot_weights(cfg.block_size, cfg.gamma, prefix, anchors.numel()).reshape(-1)
        labels, pos = labels.reshape(-1), pos.reshape(-1)
        keep = labels >= 0
        logq = torch.log_softmax((states.reshape(-1, states.shape[-1])[keep].to(self.head.dtype)
                                  @ self.head.T).float(), dim=-1)  # [n, N]
        hard_ids = self.remap[labels[keep]]
        loss = torch.zeros(logq.shape[0])
        if cfg.distill < 1.0:
            hard = -logq.gather(1, hard_ids.clamp(min=0)[:, None])[:, 0]
            loss = loss + (1 - cfg.distill) * torch.where(hard_ids >= 0, hard, torch.zeros_like(hard))
        if cfg.distill > 0.0:  # slot k's label is the target's distribution at position anchor + k - 1
            idx, probs = self.soft_targets(i, pos[keep] - 1)
            loss = loss + cfg.distill * -(probs * logq.gather(1, idx)).sum(-1)
        w = weights[keep]
        return (loss * w).sum(), w.sum()

    # ------------------------------------------------ loop
    def train(self, minutes: float | None = None, stop_at: int | None = None) -> None:
        """Train to cfg.steps (resuming first); stop early after `minutes` or at step `stop_at`,
        checkpointed, as a kill would (the next call continues with the same data order)."""
        from tqdm import tqdm

        self.resume()
        cfg = self.cfg
        start, last_eval = time.time(), self.minutes
        bar = tqdm(total=cfg.steps, initial=self.step, desc="training", unit="step")
        while self.step < cfg.steps:
            t0 = time.time()
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.step)
            picks = torch.randint(len(self.train_ids), (cfg.seqs_per_step,), generator=gen).tolist()
            lr = self.lr_at(self.step)
            for group in self.opt.param_groups:
                group["lr"] = lr
            self.opt.zero_grad(set_to_none=True)
            parts = [self.sequence_loss(self.train_ids[j], gen) for j in picks]
            parts = [p for p in parts if p is not None]
            total = 0.0
            if parts:
                loss_sum = sum(p[0] for p in parts)
                weight = float(sum(p[1] for p in parts))
                (loss_sum / weight).backward()
                torch.nn.utils.clip_grad_norm_(self.drafter.parameters(), 1.0)
                self.opt.step()
                total = float(loss_sum.detach()) / weight
            self.step += 1
            self.minutes += (time.time() - t0) / 60
            rate = self.step / max(self.minutes * 60, 1e-6)
            bar.set_postfix(loss=f"{total:.3f}", lr=f"{lr:.1e}", steps_s=f"{rate:.2f}")
            bar.update(1)
            if self.step % 10 == 0:
                self.log(f"step {self.step} loss {total:.4f} lr {lr:.2e} minutes {self.minutes:.1f}")
            if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps:
                self.save_checkpoint()
            if self.step % cfg.eval_every == 0 or self.step == cfg.steps or \
                    (cfg.eval_minutes and self.minutes - last_eval >= cfg.eval_minutes):
                self.report(self.evaluate())
                last_eval = self.minutes
            if stop_at is not None and self.step >= stop_at:
                self.save_checkpoint()
                break
            if minutes is not None and time.time() - start > 60 * minutes:
                self.save_checkpoint()
                self.log(f"stopping after {minutes} minutes at step {self.step} (resume continues)")
                break
        bar.close()

    def report(self, result: dict) -> None:
        """Log an evaluation; a drafter that does not beat the bigram table on slot 1 is broken."""
        self.log("eval " + json.dumps(result))
        self.history.append(result)
        if "slot1" in result and result["slot1"] <= result.get("bigram_slot1", 0.0):
            self.log(f"WARNING: drafter BROKEN at step {self.step}: slot-1 accuracy {result['slot1']} does not "
                     f"beat a bigram table ({result['bigram_slot1']}) that never sees the target")

    # ------------------------------------------------ evaluation
    def eval_blocks(self, limit: int | None = None) -> list[tuple[int, torch.Tensor]]:
        """Fixed held-out (sequence, anchors) pairs: up to 16 full blocks per sequence, from
        sequences spread evenly over the held-out set (so every section of the pool is scored)."""
        gen = torch.Generator().manual_seed(1234)
        out = []
        count = min(limit or self.cfg.eval_seqs, len(self.held_ids))
        picks = np.linspace(0, len(self.held_ids) - 1, count).round().astype(int) if count else []
        for i in [self.held_ids[k] for k in picks]:
            n = self.sequence_len(i)
            anchors = sample_anchors(n, int(self.cache.prompt_lens[i]), 16, gen)
            anchors = anchors[anchors + self.cfg.block_size <= n]
            if anchors.numel():
                out.append((i, anchors))
        return out

    def baselines(self) -> dict:
        if self._baselines is None:
            held = [(self.cache.token_ids(i).numpy(), a.tolist()) for i, a in self.eval_blocks()]
            self._baselines = slot1_baselines([self.response(i) for i in self.train_ids], held)
        return self._baselines

    @torch.no_grad()
    def evaluate(self, limit: int | None = None) -> dict:
        """Teacher-forced chain acceptance on held-out target responses (slot-1 accuracy, chain tau),
        the n-gram baselines' slot-1 accuracy on the same blocks, and calibration: predicted
        P(accept >= d) (product of the drafter's top-1 probabilities) vs observed.
        A variable-prefix drafter is scored on the slots after a sampled visible prefix."""
        block = self.cfg.block_size
        accepted, predicted, observed, blocks = [], torch.zeros(block - 1), torch.zeros(block - 1), 0
        gen = torch.Generator().manual_seed(1234)
        pairs = self.eval_blocks(limit)
        for i, anchors in pairs:
            prefix = self.sample_prefix(anchors.numel(), gen) if self.cfg.variable_prefix else None
            logits, truth = self.block_logits(i, anchors, prefix)
            probs = logits.softmax(-1)
            visible = torch.zeros_like(truth, dtype=torch.bool)
            if prefix is not None:  # slots 1..prefix hold ground truth: given, not drafted
                visible = torch.arange(1, block)[None, :] <= prefix[:, None]
            hit = ((probs.argmax(-1) == truth) & (truth >= 0)) | visible
            run = hit.long().cumprod(dim=1)  # 1 while every earlier slot matched
            given = visible.sum(dim=1)
            accepted.append((run.sum(dim=1) - given).float())
            p_top = torch.where(visible, 1.0, probs.max(-1).values)  # the policy's chance the top-1 is right
            predicted += p_top.cumprod(dim=1).sum(0)
            observed += run.float().sum(0)
            blocks += anchors.numel()
        if not accepted:
            return {"step": self.step}
        acc = torch.cat(accepted)
        result = {"step": self.step, "minutes": round(self.minutes, 2), "chain_tau": round(1 + float(acc.mean()), 3),
                  "slot1": round(float(observed[0] / blocks), 3), "blocks": blocks,
                  "predicted_accept_by_depth": [round(float(x), 3) for x in (predicted / blocks)[:8]],
                  "observed_accept_by_depth": [round(float(x), 3) for x in (observed / blocks)[:8]]}
        if not self.cfg.variable_prefix:
            result.update(self.baselines())
            result.update(self.replayed_decoding(sorted({i for i, _ in pairs})))
        return result

    @torch.no_grad()
    def held_out_logits(self, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Draft logits [N, B-1, V] of held-out blocks and their true tokens [N, B-1] (draft
        indices, -1 outside the draft vocabulary)."""
        pairs = [self.block_logits(i, anchors, None) for i, anchors in self.eval_blocks(limit)]
        return torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])

    def block_logits(self, i: int, anchors: torch.Tensor, prefix: torch.Tensor | None):
        """Draft logits [A, B-1, V] of the blocks at `anchors` of cached sequence i (full blocks)
        and their true tokens [A, B-1] as draft indices (-1 outside the draft vocabulary)."""
        states, labels, _ = self.block_states(i, anchors, prefix)
        return (states[:, 1:].to(self.head.dtype) @ self.head.T).float(), self.remap[labels[:, 1:].clamp(min=0)]

    # ------------------------------------------------ checkpoints
    def checkpoint_dir(self) -> Path:
        return self.work / "checkpoint"

    def save_checkpoint(self) -> None:
        """Drafter + optimizer tensors as safetensors and the step as JSON, written atomically."""
        import os
        import shutil
        import tempfile

        from safetensors.torch import save_file

        self.work.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.work, prefix=".ckpt-"))
        save_file({k: v.contiguous() for k, v in self.drafter.state_dict().items()}, str(tmp / "drafter.safetensors"))
        opt_tensors, names = {}, dict(zip(map(id, self.drafter.parameters()),
                                          [n for n, _ in self.drafter.named_parameters()]))
        for group in self.opt.param_groups:
            for p in group["params"]:
                for key, value in self.opt.state.get(p, {}).items():
                    opt_tensors[f"{names[id(p)]}::{key}"] = torch.as_tensor(value).clone().contiguous()
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        if self.round_starts:
            save_file({str(i): v.contiguous() for i, v in self.round_starts.items()},
                      str(tmp / "round_starts.safetensors"))
        meta = {"step": self.step, "minutes": self.minutes, "history": self.history, "config": asdict(self.cfg),
                "drafter": self.drafter.config.to_json()}
        (tmp / "state.json").write_text(json.dumps(meta, indent=2))
        if self.vocab is not None:
            (tmp / "draft_vocab.json").write_text(json.dumps(self.vocab.tolist()))
        final = self.checkpoint_dir()
        old = self.work / ".ckpt-old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)

    def resume(self) -> bool:
        from safetensors.torch import load_file

        ckpt = self.checkpoint_dir()
        if not (ckpt / "state.json").exists():
            return False
        meta = json.loads((ckpt / "state.json").read_text())
        self.drafter.load_state_dict(load_file(str(ckpt / "drafter.safetensors")))
        if (ckpt / "draft_vocab.json").exists():
            self.use_vocab(torch.tensor(json.loads((ckpt / "draft_vocab.json").read_text()), dtype=torch.long))
        opt_tensors = load_file(str(ckpt / "optimizer.safetensors"))
        params = dict(self.drafter.named_parameters())
        for key, value in opt_tensors.items():
            name, field = key.split("::")
            self.opt.state[params[name]][field] = value
        if (ckpt / "round_starts.safetensors").exists():
            self.round_starts = {int(i): v for i, v in load_file(str(ckpt / "round_starts.safetensors")).items()}
        self.step, self.minutes = int(meta["step"]), float(meta.get("minutes", 0.0))
        self.history = list(meta.get("history", []))
        self.log(f"resumed from {ckpt} at step {self.step}")
        return True

    def export(self, out: Path, dtype: torch.dtype = torch.bfloat16, for_engines: bool = False) -> Path:
        """The drafter in the published DFlash layout (draft vocabulary as d2t, and as
        draft_vocab.json). for_engines: loadable by vLLM / SGLang / llama.cpp's converter too:
        the mask must be a token of the target's vocabulary, and a draft vocabulary ships its
        lm_head rows (engines that read d2t build the draft head from them)."""
        has_mask = self.drafter.mask_embedding is not None
        if for_engines and has_mask:
            raise QuanttreeError(
                "this drafter learned its own mask embedding (mask_embedding), which other engines cannot "
                "load: they take the mask as a token id of the target's vocabulary. Train with "
                "--mask-token-id ID (an unused or special token) to export a drafter they can run")
        head_rows = self.vocab.numel() if for_engines and self.vocab is not None else None
        export = DFlashDrafter(self.drafter.config, with_mask_embedding=has_mask, own_head_rows=head_rows)
        state = dict(self.drafter.state_dict())
        if head_rows:
            state["lm_head.weight"] = self.head.float()
        export.load_state_dict(state)
        export.draft_vocab = self.vocab
        save_drafter(export.to(dtype), out)
        if self.vocab is not None:
            (Path(out) / "draft_vocab.json").write_text(json.dumps(self.vocab.tolist()))
        return Path(out)

