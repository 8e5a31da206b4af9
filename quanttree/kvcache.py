"""The one module that touches KV-cache internals (transformers' DynamicCache and ours)."""

from __future__ import annotations

import torch


def new_target_cache(model):
    """An empty transformers DynamicCache for the target, every attention layer keeping its whole
    history. A sliding-window layer's own cache keeps only the last window-1 tokens, so rejected
    draft tokens could not be cropped from it nor the accepted path compacted; with the full
    history kept, transformers' sliding-window mask (absolute positions) still limits what each
    query sees, and crop / compact work alike for every layer."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    cache = DynamicCache(config=model.config)
    for i, layer in enumerate(cache.layers):
        if type(layer) is DynamicSlidingWindowLayer:
            cache.layers[i] = DynamicLayer()
    return cache


def has_recurrent_state(cache) -> bool:
    """True when some layer carries a recurrent (linear-attention / conv) state rather than
    per-token keys: such state cannot be cropped, and a tree cannot be verified through it."""
    from transformers.cache_utils import LinearAttentionCacheLayerMixin

    return any(isinstance(layer, LinearAttentionCacheLayerMixin) for layer in cache.layers)


def _kv_layers(cache):
    """The layers that hold per-token keys and values (recurrent layers hold none)."""
    return [layer for layer in cache.layers if getattr(layer, "keys", None) is not None]


def cache_length(cache) -> int:
    return cache.get_seq_length()


@torch.inference_mode()
def snapshot(cache) -> list[dict]:
    """Copies of every recurrent layer's conv and recurrent states (before a verify forward)."""
    from transformers.cache_utils import LinearAttentionCacheLayerMixin

    saved = []
    for layer in cache.layers:
        if isinstance(layer, LinearAttentionCacheLayerMixin):
            saved.append({"conv": {k: v.clone() for k, v in layer.conv_states.items() if v is not None},
                          "recurrent": {k: v.clone() for k, v in layer.recurrent_states.items() if v is not None},
                          "previous": dict(layer.has_previous_state)})
    return saved


@torch.inference_mode()
def restore(cache, saved: list[dict]) -> None:
    """Put back the recurrent states `snapshot` copied (the KV layers are cropped separately)."""
    from transformers.cache_utils import LinearAttentionCacheLayerMixin

    layers = [layer for layer in cache.layers if isinstance(layer, LinearAttentionCacheLayerMixin)]
    for layer, state in zip(layers, saved):
        for k, v in state["conv"].items():
            layer.conv_states[k] = v
        for k, v in state["recurrent"].items():
            layer.recurrent_states[k] = v
        layer.has_previous_state.update(state["previous"])


def crop(cache, length: int) -> None:
    """Keep the first `length` positions of every KV layer."""
    for layer in _kv_layers(cache):
        if layer.keys.numel() and layer.keys.shape[-2] > length:
            layer.keys = layer.keys[..., :length, :]
            layer.values = layer.values[..., :length, :]


@torch.inference_mode()  # cache tensors are inference tensors: update them in that mode
def compact(cache, start: int, path: torch.Tensor) -> None:
    """Keep the accepted tree path: entries at start+path[i] move to start+i, then crop.

    path: [L] long node indices into the verified tree (root = 0), ascending.
    """
    length = start + path.numel()
    if path.numel() and int(path[-1]) != path.numel() - 1:  # not already a contiguous prefix
        src = path + start
        for layer in _kv_layers(cache):  # layers may sit on different devices (accelerate offload)
            idx = src.to(layer.keys.device)
            layer.keys[..., start:length, :] = layer.keys.index_select(-2, idx)
            layer.values[..., start:length, :] = layer.values.index_select(-2, idx)
    crop(cache, length)


class ContextKV:
    """The drafter's cache: per-layer K/V of the committed context only (never the block)."""

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    @property
    def length(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[-2]

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append new context K/V [1, h, c, d] for one layer; return the full context K/V."""
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=-2)
            v = torch.cat([self.values[layer], v], dim=-2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


@torch.inference_mode()
def select_rows(cache, rows: torch.Tensor) -> None:
    """Keep only the batch rows `rows` [r] of every layer (finished sequences leave the batch)."""
    for layer in _kv_layers(cache):
        if layer.keys.numel():
            layer.keys = layer.keys.index_select(0, rows)
            layer.values = layer.values.index_select(0, rows)
