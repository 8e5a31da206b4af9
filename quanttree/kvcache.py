"""The one module that touches KV-cache internals (transformers' DynamicCache and ours)."""

from __future__ import annotations

import torch


def new_target_cache(model):
    """An empty transformers DynamicCache for the target."""
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def cache_length(cache) -> int:
    return cache.get_seq_length()


def crop(cache, length: int) -> None:
    """Keep the first `length` positions of every layer."""
    for layer in cache.layers:
        if layer.keys is not None and layer.keys.numel() and layer.keys.shape[-2] > length:
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
        for layer in cache.layers:  # layers may sit on different devices (accelerate offload)
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
    for layer in cache.layers:
        if layer.keys is not None and layer.keys.numel():
            layer.keys = layer.keys.index_select(0, rows)
            layer.values = layer.values.index_select(0, rows)
