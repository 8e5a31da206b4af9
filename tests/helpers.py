"""Tiny randomly initialised targets and drafters, saved in the real on-disk formats."""

from __future__ import annotations

from pathlib import Path

import torch

from quanttree.drafter import DFlashDrafter, init_random, random_drafter_config, save_drafter

TINY_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=512)


ARCHITECTURES = ("llama", "qwen3", "qwen3_moe", "gpt_oss", "qwen3_5")


def tiny_config(kind: str, vocab_size: int, **overrides):
    """Small configs of each target architecture a published DFlash drafter exists for:
    plain attention (llama, qwen3), MoE (qwen3_moe), sliding window + sinks + MoE (gpt_oss, window
    8 so short prompts already slide), hybrid linear-attention recurrent (qwen3_5: 3 Gated
    DeltaNet layers + 1 full attention layer)."""
    from transformers import GptOssConfig, LlamaConfig, Qwen3_5TextConfig, Qwen3Config, Qwen3MoeConfig

    shape = {**TINY_SHAPE, "vocab_size": vocab_size, **overrides}
    if kind == "llama":
        return LlamaConfig(**shape, rope_theta=10000.0, tie_word_embeddings=True)
    if kind == "qwen3":
        return Qwen3Config(**shape, rope_theta=1e6, tie_word_embeddings=False)
    if kind == "qwen3_moe":
        return Qwen3MoeConfig(**{**shape, "moe_intermediate_size": 32}, num_experts=4, num_experts_per_tok=2,
                              decoder_sparse_step=1, rope_theta=1e6, tie_word_embeddings=False)
    if kind == "gpt_oss":
        layers = shape["num_hidden_layers"]
        return GptOssConfig(**shape, num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
                            layer_types=["sliding_attention" if i % 2 == 0 else "full_attention"
                                         for i in range(layers)], tie_word_embeddings=False)
    if kind == "qwen3_5":
        layers = shape["num_hidden_layers"]
        return Qwen3_5TextConfig(**shape, linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16,
                                 linear_num_key_heads=2, linear_num_value_heads=4,
                                 layer_types=["full_attention" if (i + 1) % 4 == 0 else "linear_attention"
                                              for i in range(layers)], tie_word_embeddings=False)
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


class Oracle:
    """Replaces the drafter's marginals with ones built from the known AR continuation:
    the right token ranks first at some depths and second at others, so trees accept deep,
    non-contiguous paths."""

    def __init__(self, reference: list[int], vocab: int, seed: int = 0):
        self.reference, self.vocab = reference, vocab
        self.gen = torch.Generator().manual_seed(seed)

    def log_probs(self, draft_self, root, start):
        block = draft_self.drafter.config.block_size
        logits = torch.randn(block - 1, self.vocab, generator=self.gen)
        for d in range(1, block):
            pos = start + d
            if pos < len(self.reference):
                boost = 8.0 if torch.rand(1, generator=self.gen) < 0.7 else 4.0
                runner = int(torch.randint(self.vocab, (1,), generator=self.gen))
                logits[d - 1, runner] += 6.0
                logits[d - 1, self.reference[pos]] += boost
        return torch.log_softmax(logits, -1)
