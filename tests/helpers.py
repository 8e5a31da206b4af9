"""Tiny randomly initialised targets and drafters, saved in the real on-disk formats."""

from __future__ import annotations

from pathlib import Path

import torch

from quanttree.drafter import DFlashDrafter, init_random, random_drafter_config, save_drafter

TINY_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=512)


def tiny_config(kind: str, vocab_size: int, **overrides):
    from transformers import LlamaConfig, Qwen3Config

    shape = {**TINY_SHAPE, "vocab_size": vocab_size, **overrides}
    if kind == "llama":
        return LlamaConfig(**shape, rope_theta=10000.0, tie_word_embeddings=True)
    if kind == "qwen3":
        return Qwen3Config(**shape, rope_theta=1e6, tie_word_embeddings=False)
    raise ValueError(kind)


def make_tiny_target(out: Path, kind: str, tokenizer=None, vocab_size: int | None = None, seed: int = 0,
                     head_scale: float = 1.0, **overrides) -> Path:
    """Save a random causal LM (and tokenizer if given) as an HF directory with safetensors."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    vocab = vocab_size or len(tokenizer)
    config = tiny_config(kind, vocab, **overrides)
    if tokenizer is not None:
        config.eos_token_id = tokenizer.eos_token_id
        config.bos_token_id = tokenizer.bos_token_id
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if head_scale != 1.0:  # peakier distributions make sampling tests sharper
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(head_scale)
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def make_tiny_drafter(out: Path, target_dir: Path, num_layers: int = 1, block_size: int = 8, seed: int = 0,
                      mask_embedding: bool = True) -> Path:
    """Save a random DFlash drafter shaped for the target, in the published layout."""
    from transformers import AutoConfig

    cfg = random_drafter_config(AutoConfig.from_pretrained(target_dir), num_layers=num_layers,
                                block_size=block_size, num_features=2,
                                mask_token_id=None if mask_embedding else 0)
    drafter = init_random(DFlashDrafter(cfg, with_mask_embedding=mask_embedding), seed=seed, std=0.2)
    return save_drafter(drafter, out)
