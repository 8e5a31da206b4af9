"""Issue 18: drafter config fields of published DFlash checkpoints: read, computed, or refused by name."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

import quanttree
from quanttree import QuanttreeError
from quanttree.decode import DraftContext
from quanttree.drafter import DrafterConfig, read_drafter, build_drafter

from helpers import make_tiny_drafter

PROMPT = "the quick brown fox jumps over the lazy dog and runs far away into the dark green forest"


def published(tiny_dirs, tmp_path, edit, tensors_edit=None, name="d"):
    """The tiny llama drafter rewritten in the hub's config form, then edited."""
    src = make_tiny_drafter(tmp_path / f"{name}-src", tiny_dirs["llama"], num_layers=2, block_size=8)
    data = json.loads((src / "config.json").read_text())
    dflash = data["dflash_config"]
    dflash["block_size"] = data.pop("block_size")  # newer checkpoints keep these inside dflash_config
    dflash["num_target_layers"] = data.pop("num_target_layers")
    data.update({"tie_word_embeddings": True, "rope_parameters": {"rope_type": "default",
                                                                  "rope_theta": data.pop("rope_theta")},
                 "max_position_embeddings": 512})
    edit(data)
    out = tmp_path / name
    out.mkdir()
    tensors = load_file(str(src / "model.safetensors"))
    if tensors_edit:
        tensors_edit(tensors)
    save_file(tensors, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(data))
    return out


def load(tiny_dirs, drafter):
    return quanttree.load(str(tiny_dirs["llama"]), drafter=str(drafter), quant="fp32", device="cpu")


def test_published_config_fields_are_read(tiny_dirs, tmp_path):
    path = published(tiny_dirs, tmp_path, lambda d: None)
    cfg, _ = read_drafter(path)
    assert cfg.block_size == 8 and cfg.num_target_layers == 4 and cfg.extra["tie_word_embeddings"] is True
    engine = load(tiny_dirs, path)
    ar = engine.generate(PROMPT, max_new_tokens=20, method="ar", chat=False)
    assert engine.generate(PROMPT, max_new_tokens=20, method="ddtree", budget=8, chat=False).token_ids == ar.token_ids


def naive_block(drafter, ctx_feats, block_embeds, start, window_of):
    """A direct reference: every query attends over keys it may see, one by one, in fp64."""
    cfg = drafter.config
    ctx = drafter.fuse_context(ctx_feats[None].double())[0]  # [c, H]
    x = block_embeds.double()
    c, b = ctx.shape[0], x.shape[0]
    positions = torch.arange(c + b)
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2).double() / cfg.head_dim))

    def rope(v, pos):  # v [n, heads, d]
        ang = pos.double()[:, None] * inv[None]
        cos, sin = torch.cat([ang, ang], -1).cos()[:, None], torch.cat([ang, ang], -1).sin()[:, None]
        half = v.shape[-1] // 2
        return v * cos + torch.cat([-v[..., half:], v[..., :half]], -1) * sin

    for i, layer in enumerate(drafter.layers):
        a = layer.self_attn
        h = layer.input_layernorm(x)
        q = rope(a.q_norm(a.q_proj(h).view(b, a.heads, -1)), positions[c:])
        kv_in = torch.cat([ctx, h])
        k = rope(a.k_norm(a.k_proj(kv_in).view(c + b, a.kv_heads, -1)), positions)
        v = a.v_proj(kv_in).view(c + b, a.kv_heads, -1)
        rep = a.heads // a.kv_heads
        out = torch.zeros(b, a.heads, cfg.head_dim, dtype=torch.float64)
        for qi in range(b):
            p = c + qi
            seen = [j for j in range(c + b) if window_of(i) is None or abs(p - j) < window_of(i)]
            for hd in range(a.heads):
                kk, vv = k[seen, hd // rep], v[seen, hd // rep]
                w = torch.softmax(kk @ q[qi, hd] / math.sqrt(cfg.head_dim), 0)
                out[qi, hd] = w @ vv
        x = x + a.o_proj(out.reshape(b, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return drafter.norm(x)


def test_sliding_window_drafter_layers_use_the_window(tiny_dirs, tmp_path):
    def sliding(d):
        d["layer_types"] = ["sliding_attention", "full_attention"]
        d["sliding_window"] = 4

    path = published(tiny_dirs, tmp_path, sliding)
    engine = load(tiny_dirs, path)
    drafter = engine.drafter.double()
    assert drafter.config.layer_window(0) == 4 and drafter.config.layer_window(1) is None
    gen = torch.Generator().manual_seed(0)
    width = len(drafter.config.target_layer_ids) * drafter.config.hidden_size
    feats = torch.randn(12, width, generator=gen, dtype=torch.float64)
    block = torch.randn(8, drafter.config.hidden_size, generator=gen, dtype=torch.float64)

    from quanttree.kvcache import ContextKV

    def ours(d):
        cache = ContextKV(d.config.num_hidden_layers)
        d.extend_context(cache, feats[None], torch.arange(12))
        return d.forward_block(block[None], torch.arange(12, 20), cache)[0]

    with torch.no_grad():
        got = ours(drafter)
        want = naive_block(drafter, feats, block, 12, drafter.config.layer_window)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        full = DrafterConfig(**{**drafter.config.__dict__, "layer_types": (), "sliding_window": None})
        drafter.config = full  # the same weights run with full attention
        assert not torch.allclose(ours(drafter), got, atol=1e-4)
        torch.testing.assert_close(ours(drafter), naive_block(drafter, feats, block, 12, lambda i: None),
                                   atol=1e-5, rtol=1e-5)


def test_yarn_rope_matches_transformers(tiny_dirs, tmp_path):
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "rope_theta": 10000.0}
    path = published(tiny_dirs, tmp_path, lambda d: d.update(rope_parameters=dict(yarn)))
    drafter = load(tiny_dirs, path).drafter
    from transformers import Qwen3Config
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    cfg = drafter.config
    ref = Qwen3RotaryEmbedding(Qwen3Config(hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
                                           head_dim=cfg.head_dim, max_position_embeddings=512,
                                           rope_parameters=dict(yarn)))
    pos = torch.arange(300)
    cos, sin = ref(torch.zeros(1, 300, cfg.hidden_size), pos[None])
    ours_cos, ours_sin = drafter.rope(pos, torch.float32)
    torch.testing.assert_close(ours_cos, cos[0]) and torch.testing.assert_close(ours_sin, sin[0])
    assert drafter.rope_scale != 1.0  # yarn's attention factor is applied


def test_d2t_draft_vocabulary(tiny_dirs, tmp_path):
    ids = torch.arange(0, 2000, 3)  # draft index i -> target id 3i

    def vocab(d):
        d["draft_vocab_size"] = ids.numel()

    path = published(tiny_dirs, tmp_path, vocab, lambda t: t.update(d2t=ids - torch.arange(ids.numel())))
    engine = load(tiny_dirs, path)
    assert torch.equal(engine.drafter.draft_vocab, ids)
    ctx_vocab = DraftContext(engine.drafter, engine.target).vocab
    assert torch.equal(ctx_vocab, ids)
    ar = engine.generate(PROMPT, max_new_tokens=20, method="ar", chat=False)
    assert engine.generate(PROMPT, max_new_tokens=20, method="ddtree", budget=8, chat=False).token_ids == ar.token_ids


@pytest.mark.parametrize("edit, tensors_edit, match", [
    (lambda d: d["dflash_config"].update(use_candidate_selector=True), None, "use_candidate_selector"),
    (lambda d: d.update(architectures=["DFlash2DraftModel"]), None, "DFlash2"),
    (lambda d: None, lambda t: t.update({"conv.weight": torch.zeros(4, 4)}), "DFlash2"),
    (lambda d: d.update(layer_types=["chunked_attention", "full_attention"]), None, "chunked_attention"),
    (lambda d: d.update(layer_types=["sliding_attention", "full_attention"]), None, "sliding_window"),
    (lambda d: d.update(rope_parameters={"rope_type": "warp", "rope_theta": 1e4}), None, "warp"),
    (lambda d: d.update(draft_vocab_size=7), lambda t: t.update(d2t=torch.zeros(5, dtype=torch.long)), "d2t"),
])
def test_unsupported_drafter_features_are_refused_by_name(tiny_dirs, tmp_path, edit, tensors_edit, match):
    path = published(tiny_dirs, tmp_path, edit, tensors_edit)
    with pytest.raises(QuanttreeError, match=match):
        load(tiny_dirs, path)


def test_retrained_weights_of_the_same_size_get_another_identity(tmp_path):
    """Profiles (with learned acceptance) are keyed by drafter_identity: a retrained drafter has
    the same config and file sizes, and must not inherit the old drafter's learned acceptance."""
    from quanttree.drafter import drafter_identity

    first, second = tmp_path / "a" / "drafter", tmp_path / "b" / "drafter"
    for directory, seed in ((first, 0), (second, 1)):
        directory.mkdir(parents=True)
        (directory / "config.json").write_text(json.dumps({"model_type": "dflash"}))
        gen = torch.Generator().manual_seed(seed)
        save_file({"w": torch.randn(64, 64, generator=gen)}, str(directory / "model.safetensors"))
    assert (first / "model.safetensors").stat().st_size == (second / "model.safetensors").stat().st_size
    assert drafter_identity(first) != drafter_identity(second)
    assert drafter_identity(first) == drafter_identity(first)
