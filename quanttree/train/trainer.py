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
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..drafter import (DFlashDrafter, check_fits_target, random_drafter_config, read_draft_vocab, read_drafter,
                       rope_tables, save_drafter)
from ..target import Target


@dataclass(frozen=True)
class TrainConfig:
    num_layers: int = 2
    block_size: int = 16
    num_features: int = 4  # target layers whose hidden states feed the drafter
    draft_vocab: int = 8192  # frequency-ranked draft vocabulary (0 = the whole target vocabulary)
    anchors: int = 64  # blocks per sequence
    seqs_per_step: int = 4
    steps: int = 2000
    lr: float = 6e-4
    warmup: float = 0.04
    weight_decay: float = 0.01
    gamma: float = 7.0
    max_seq_len: int = 640
    ckpt_every: int = 50
    eval_every: int = 200
    eval_seqs: int = 48
    seed: int = 0
    variable_prefix: bool = False
    prefix_decay: float = 0.9
    bf16_autocast: bool = True  # drafter matmuls in bf16, fp32 master weights
    init_from: str | None = None  # start from this drafter dir (its shape and draft vocabulary win)


# ---------------------------------------------------------------- data

def split(sequences, heldout_every: int = 50):
    """Held-out = every 50th pool prompt, so the split is stable as data grows."""
    train = [s for s in sequences if s[2] % heldout_every]
    held = [s for s in sequences if s[2] % heldout_every == 0]
    return train, held


def draft_vocabulary(sequences, size: int, vocab_size: int, always: frozenset[int]) -> torch.Tensor:
    """The `size` most frequent response tokens (plus `always`), ascending ids. [N] long"""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for tokens, plen, _ in sequences:
        np.add.at(counts, tokens[plen:], 1)
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


def training_mask(anchors: torch.Tensor, context_len: int, block: int) -> torch.Tensor:
    """[A*B, L + A*B] bool: context strictly before the anchor, bidirectional inside a block."""
    a = anchors.numel()
    ctx = torch.arange(context_len)[None, :] < anchors.repeat_interleave(block)[:, None]
    blk = torch.block_diag(*[torch.ones(block, block, dtype=torch.bool)] * a)
    return torch.cat([ctx, blk], dim=1)


# ---------------------------------------------------------------- model

def init_from_target(drafter: DFlashDrafter, target_model) -> None:
    """Start the drafter layers from copies of the target's last layers (same shapes) and its
    final norm from the target's, so drafter logits start on the scale the lm_head expects."""
    layers = target_model.model.layers
    src = layers[len(layers) - len(drafter.layers):]
    with torch.no_grad():
        for dst, s in zip(drafter.layers, src):
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                getattr(dst.self_attn, name).weight.copy_(getattr(s.self_attn, name).weight.float())
            for name in ("gate_proj", "up_proj", "down_proj"):
                getattr(dst.mlp, name).weight.copy_(getattr(s.mlp, name).weight.float())
            dst.input_layernorm.weight.copy_(s.input_layernorm.weight.float())
            dst.post_attention_layernorm.weight.copy_(s.post_attention_layernorm.weight.float())
        drafter.norm.weight.copy_(target_model.model.norm.weight.float())  # logits on the lm_head's scale
        drafter.fc.weight.normal_(0.0, 0.02)
        if drafter.mask_embedding is not None:
            drafter.mask_embedding.normal_(0.0, 0.02)


def start_from_drafter(path: Path, target: Target) -> tuple[DFlashDrafter, torch.Tensor | None]:
    """A trained drafter as the starting point (for example the DFlash drafter for a VP drafter):
    fp32 weights with a mask embedding, and its draft vocabulary."""
    cfg, tensors = read_drafter(path)
    check_fits_target(cfg, target.model.config, True)  # a mask embedding is trained if absent
    drafter = DFlashDrafter(cfg, with_mask_embedding=True).float()
    missing = set(drafter.state_dict()) - set(tensors)
    if missing - {"mask_embedding"}:
        raise ValueError(f"{path} lacks drafter tensors {sorted(missing)[:5]}")
    drafter.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=False)
    if "mask_embedding" in missing:
        with torch.no_grad():
            drafter.mask_embedding.normal_(0.0, 0.02)
    return drafter, read_draft_vocab(path, target.vocab_size)


def drafter_train_forward(drafter: DFlashDrafter, features: torch.Tensor, block_embeds: torch.Tensor,
                          block_pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """features [L, k*H], block_embeds [A*B, H], block_pos [A*B], mask [A*B, L+A*B] -> states [A*B, H]."""
    cfg = drafter.config
    ctx = drafter.fuse_context(features[None])  # [1, L, H]
    ctx_rope = rope_tables(torch.arange(features.shape[0]), cfg.head_dim, cfg.rope_theta, ctx.dtype)
    blk_rope = rope_tables(block_pos, cfg.head_dim, cfg.rope_theta, ctx.dtype)
    x = block_embeds[None]
    for layer in drafter.layers:
        attn = layer.self_attn
        k_ctx, v_ctx = attn.project_kv(ctx, ctx_rope)
        x = layer(x, blk_rope, k_ctx, v_ctx, mask[None, None])
    return drafter.norm(x)[0]


def slot_weights(block: int, gamma: float, prefix: torch.Tensor | None, anchors: int) -> torch.Tensor:
    """w_k = exp(-(k - l - 1) / gamma) for slots after the visible prefix l (l = 0 for DFlash). [A, B]"""
    k = torch.arange(block)[None, :].expand(anchors, block)
    l = prefix[:, None] if prefix is not None else torch.zeros(anchors, 1, dtype=torch.long)
    return torch.exp(-(k - l - 1).clamp(min=0).float() / gamma)


# ---------------------------------------------------------------- the trainer

class Trainer:
    def __init__(self, target: Target, sequences, cfg: TrainConfig, work: Path, log=print,
                 eos_ids: frozenset[int] = frozenset()):
        torch.set_flush_denormal(True)
        self.target, self.cfg, self.work, self.log = target, cfg, work, log
        self.train_seqs, self.held_seqs = split(sequences)
        if not self.train_seqs:
            raise ValueError("no training sequences")
        if cfg.init_from:
            self.drafter, vocab = start_from_drafter(Path(cfg.init_from), target)
            self.use_vocab(vocab)
        else:
            vocab = target.vocab_size
            self.use_vocab(draft_vocabulary(self.train_seqs, cfg.draft_vocab, vocab, eos_ids)
                           if 0 < cfg.draft_vocab < vocab else None)
            dcfg = random_drafter_config(target.model.config, num_layers=cfg.num_layers,
                                         block_size=cfg.block_size, num_features=cfg.num_features)
            self.drafter = DFlashDrafter(dcfg, with_mask_embedding=True).float()
            init_from_target(self.drafter, target.model)
        if self.drafter.config.block_size != cfg.block_size:
            raise ValueError(f"block size {cfg.block_size} differs from the drafter's "
                             f"{self.drafter.config.block_size}")
        self.opt = torch.optim.AdamW(self.drafter.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                     betas=(0.9, 0.95))
        self.step = 0

    # ------------------------------------------------ pieces
    def use_vocab(self, vocab: torch.Tensor | None) -> None:
        """Draft over `vocab` (None = the whole vocabulary): lm_head rows and the id remap."""
        self.vocab = vocab
        head = self.target.model.get_output_embeddings().weight.detach()
        self.head = (head[vocab] if vocab is not None else head).to(torch.bfloat16)
        self.remap = None
        if vocab is not None:  # full id -> draft index (-100 outside the draft vocabulary)
            self.remap = torch.full((self.target.vocab_size,), -100, dtype=torch.long)
            self.remap[vocab] = torch.arange(vocab.numel())

    def lr_at(self, step: int) -> float:
        warm = max(1, int(self.cfg.warmup * self.cfg.steps))
        if step < warm:
            return self.cfg.lr * (step + 1) / warm
        progress = (step - warm) / max(1, self.cfg.steps - warm)
        return self.cfg.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    @torch.no_grad()
    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        """Target hidden states of the chosen layers for one sequence. [L, k*H] float32"""
        from .. import kvcache

        cache = kvcache.new_target_cache(self.target.model)
        out = self.target.forward(tokens[None], torch.arange(tokens.numel())[None], cache,
                                  feature_layers=self.drafter.config.target_layer_ids, last_only=True)
        return out.features.float()

    def embed_blocks(self, ids: torch.Tensor) -> torch.Tensor:
        """[A, B] ids with -1 = MASK -> [A*B, H]."""
        flat = ids.reshape(-1)
        with torch.no_grad():
            emb = self.target.embed(flat.clamp(min=0)).float()
        mask = self.drafter.mask_embedding[None, :].expand_as(emb)
        return torch.where((flat < 0)[:, None], mask, emb)

    def sample_prefix(self, count: int, gen: torch.Generator) -> torch.Tensor:
        """Visible prefix lengths for a VP drafter: P(l) ~ decay^l, l in 0..B-2."""
        probs = self.cfg.prefix_decay ** torch.arange(self.cfg.block_size - 1, dtype=torch.float)
        return torch.multinomial(probs / probs.sum(), count, replacement=True, generator=gen)

    def sequence_loss(self, seq, gen: torch.Generator):
        tokens = torch.as_tensor(seq[0][: self.cfg.max_seq_len], dtype=torch.long)
        anchors = sample_anchors(tokens.numel(), seq[1], self.cfg.anchors, gen)
        if anchors.numel() == 0:
            return None
        block = self.cfg.block_size
        prefix = None
        if self.cfg.variable_prefix:
            prefix = self.sample_prefix(anchors.numel(), gen)
        ids, labels, pos = block_inputs(tokens, anchors, block, prefix)
        feats = self.features(tokens)
        mask = training_mask(anchors, tokens.numel(), block)
        with torch.autocast(self.target.device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16_autocast):
            states = drafter_train_forward(self.drafter, feats, self.embed_blocks(ids), pos.reshape(-1), mask)
        weights = slot_weights(block, self.cfg.gamma, prefix, anchors.numel()).reshape(-1)
        target_ids = labels.reshape(-1)
        if self.remap is not None:
            target_ids = torch.where(target_ids >= 0, self.remap[target_ids.clamp(min=0)], target_ids)
        keep = target_ids >= 0
        logits = states[keep].to(torch.bfloat16) @ self.head.T
        losses = F.cross_entropy(logits.float(), target_ids[keep], reduction="none")
        w = weights[keep]
        return (losses * w).sum(), w.sum()

    # ------------------------------------------------ loop
    def train(self, minutes: float | None = None) -> None:
        from tqdm import tqdm

        self.resume()
        start = time.time()
        bar = tqdm(total=self.cfg.steps, initial=self.step, desc="training", unit="step")
        tokens_seen, t_window = 0, time.time()
        while self.step < self.cfg.steps:
            gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.step)
            picks = torch.randint(len(self.train_seqs), (self.cfg.seqs_per_step,), generator=gen).tolist()
            lr = self.lr_at(self.step)
            for group in self.opt.param_groups:
                group["lr"] = lr
            self.opt.zero_grad(set_to_none=True)
            total, weight = 0.0, 0.0
            parts = [self.sequence_loss(self.train_seqs[i], gen) for i in picks]
            parts = [p for p in parts if p is not None]
            if parts:
                loss_sum = sum(p[0] for p in parts)
                weight = float(sum(p[1] for p in parts))
                (loss_sum / weight).backward()
                torch.nn.utils.clip_grad_norm_(self.drafter.parameters(), 1.0)
                self.opt.step()
                total = float(loss_sum.detach()) / weight
            tokens_seen += sum(min(len(self.train_seqs[i][0]), self.cfg.max_seq_len) for i in picks)
            self.step += 1
            rate = tokens_seen / max(time.time() - t_window, 1e-6)
            bar.set_postfix(loss=f"{total:.3f}", lr=f"{lr:.1e}", tok_s=f"{rate:.0f}")
            bar.update(1)
            if self.step % 10 == 0:
                self.log(f"step {self.step} loss {total:.4f} lr {lr:.2e} tok/s {rate:.0f}")
            if self.step % self.cfg.ckpt_every == 0 or self.step == self.cfg.steps:
                self.save_checkpoint()
            if self.step % self.cfg.eval_every == 0 or self.step == self.cfg.steps:
                self.log("eval " + json.dumps(self.evaluate()))
            if minutes is not None and time.time() - start > 60 * minutes:
                self.save_checkpoint()
                self.log(f"stopping after {minutes} minutes at step {self.step} (resume continues)")
                break
        bar.close()

    # ------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, limit: int | None = None) -> dict:
        """Teacher-forced chain acceptance on held-out target responses, and calibration:
        predicted P(accept >= d) (product of draft probabilities of the true tokens) vs observed.
        A variable-prefix drafter is scored on the slots after a sampled visible prefix."""
        seqs = self.held_seqs[: limit or self.cfg.eval_seqs]
        block = self.cfg.block_size
        accepted, predicted, observed, blocks = [], torch.zeros(block - 1), torch.zeros(block - 1), 0
        gen = torch.Generator().manual_seed(1234)
        for seq in seqs:
            tokens = torch.as_tensor(seq[0][: self.cfg.max_seq_len], dtype=torch.long)
            anchors = sample_anchors(tokens.numel(), seq[1], 16, gen)
            anchors = anchors[anchors + block <= tokens.numel()]
            if anchors.numel() == 0:
                continue
            prefix = self.sample_prefix(anchors.numel(), gen) if self.cfg.variable_prefix else None
            ids, labels, pos = block_inputs(tokens, anchors, block, prefix)
            states = drafter_train_forward(self.drafter, self.features(tokens), self.embed_blocks(ids),
                                           pos.reshape(-1), training_mask(anchors, tokens.numel(), block))
            logits = (states.to(torch.bfloat16) @ self.head.T).float().view(anchors.numel(), block, -1)[:, 1:]
            probs = logits.softmax(-1)
            truth = torch.as_tensor(tokens[anchors[:, None] + torch.arange(1, block)])
            if self.remap is not None:
                truth = self.remap[truth]
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
        return {"step": self.step, "chain_tau": round(1 + float(acc.mean()), 3), "blocks": blocks,
                "predicted_accept_by_depth": [round(float(x), 3) for x in (predicted / blocks)[:8]],
                "observed_accept_by_depth": [round(float(x), 3) for x in (observed / blocks)[:8]]}

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
        meta = {"step": self.step, "config": asdict(self.cfg), "drafter": self.drafter.config.to_json()}
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
        self.step = int(meta["step"])
        self.log(f"resumed from {ckpt} at step {self.step}")
        return True

    def export(self, out: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
        """The drafter in the published DFlash layout (+ draft_vocab.json when one is used)."""
        export = DFlashDrafter(self.drafter.config, with_mask_embedding=True)
        export.load_state_dict(self.drafter.state_dict())
        save_drafter(export.to(dtype), out)
        if self.vocab is not None:
            (Path(out) / "draft_vocab.json").write_text(json.dumps(self.vocab.tolist()))
        return Path(out)

