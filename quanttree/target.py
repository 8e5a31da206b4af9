"""The target model behind its public forward: logits, chosen hidden states, an explicit mask."""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .errors import QuanttreeError
from .kvcache import crop, has_recurrent_state
from .tree import sliding_window_mask


@dataclass(frozen=True)
class TargetOutput:
    logits: torch.Tensor  # [n, V] (n = 1 when only the last position was asked for)
    features: torch.Tensor | None  # [n, k*H]: hidden states of the chosen layers, concatenated


class Target:
    """A loaded causal LM; never patched, only called through model(...)."""

    def __init__(self, model, exact: bool = False):
        self.model = model
        from .exact import NAME

        self.exact = getattr(model.config, "_attn_implementation", None) == NAME  # a model shared by engines
        self.min_rows = 2
        self.max_rows: int | None = None  # exact mode: the most rows a forward after the prompt may hold
        self._attn_default = "sdpa" if self.exact else getattr(model.config, "_attn_implementation", None)
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.config = config
        self.device = model.get_input_embeddings().weight.device
        self.dtype = model.get_input_embeddings().weight.dtype
        self.num_layers = config.num_hidden_layers
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.max_positions = getattr(config, "max_position_embeddings", None)
        # transformers renamed past_key_values to cache in 5.2x; use whichever this version takes
        params = inspect.signature(model.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        self.layer_types = tuple(getattr(config, "layer_types", None) or ())
        self.sliding_window = getattr(config, "sliding_window", None) \
            if getattr(config, "use_sliding_window", True) is not False else None
        self._captured: dict[int, torch.Tensor] = {}
        self._hooks: dict[int, object] = {}
        if exact:
            self.set_exact(True)

    @contextmanager
    def stock_attention(self):
        """transformers' own attention for the duration (peers in the bench run unmodified)."""
        was = self.exact
        if was:
            self.set_exact(False)
        try:
            yield
        finally:
            if was:
                self.set_exact(True)

    def set_exact(self, on: bool, min_rows: int = 2, max_rows: int | None = None) -> None:
        """Exact mode: every token's numbers are the same whether it is decoded alone or verified
        in a tree (row-exact attention, and every forward after the prompt runs on `min_rows` to
        `max_rows` rows: a one-row matmul takes a gemv kernel, fp32 MKL switches kernels up to 3
        rows, bf16 on AMX above 32; exact.min_exact_rows measures the range). See quanttree/exact.py."""
        from .exact import NAME, use_exact_attention

        if on:
            if not use_exact_attention(self.model):
                raise QuanttreeError(f"{type(self.model).__name__} does not take a pluggable attention function "
                                     "(transformers' AttentionInterface), so exact mode cannot run on it: "
                                     "load it with exact=False")
        elif getattr(self.model.config, "_attn_implementation", None) == NAME:
            self.model.set_attn_implementation(self._attn_default or "sdpa")
        self.exact = on
        self.min_rows = min_rows
        self.max_rows = max_rows if on else None

    def max_nodes(self, budget: int) -> int:
        """The drafted nodes a round may verify: `budget`, within exact mode's row range (root included)."""
        return budget if self.max_rows is None else max(1, min(budget, self.max_rows - 1))

    def _capture(self, layer_ids: tuple[int, ...]) -> None:
        """Keep the outputs of these layers on every forward: hidden_states[i + 1] in
        transformers' terms (the last layer's after the final norm), through forward hooks
        registered once. output_hidden_states hooks every layer on every call (~0.2-0.3 ms a
        round on CPU). Nothing to do for a forward that wants no features (plain decoding)."""
        if not layer_ids or all(i in self._hooks for i in layer_ids):
            return
        decoder = self.model.get_decoder()
        layers = getattr(decoder, "layers", None)
        if layers is None or getattr(decoder, "norm", None) is None:
            raise QuanttreeError(f"{type(self.model).__name__}: no decoder layers and final norm found "
                                 "(model.get_decoder().layers / .norm); drafting needs a decoder-only LM")
        for i in layer_ids:
            if i in self._hooks:
                continue
            module = decoder.norm if i == self.num_layers - 1 else layers[i]

            def keep(_module, _args, output, i=i):
                self._captured[i] = output[0] if isinstance(output, tuple) else output

            self._hooks[i] = module.register_forward_hook(keep)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(ids)

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self.model.get_output_embeddings()
        weight = getattr(head, "weight", None)
        if weight is not None:
            hidden = hidden.to(device=weight.device, dtype=weight.dtype if weight.is_floating_point() else None)
        return head(hidden)

    @torch.inference_mode()
    def forward(self, input_ids, position_ids, cache, attention_mask=None,
                feature_layers: tuple[int, ...] = (), last_only: bool = False) -> TargetOutput:
        """One forward over new tokens [1, n] at positions [1, n], appending to `cache`.

        attention_mask: None (causal) or 4D additive [1, 1, n, past+n]. feature_layers: layer
        ids whose outputs become drafter features (id i = hidden_states[i + 1]).
        """
        self._capture(feature_layers)
        n = input_ids.shape[-1]
        past = cache.get_seq_length()
        if self.max_rows is not None and past > 0 and n > self.max_rows:
            raise QuanttreeError(f"exact mode verifies at most {self.max_rows} tokens per forward on this device "
                                 f"(its matmuls switch kernels above that), got {n}: lower the budget")
        padded = self.exact and n < self.min_rows and past > 0 and not has_recurrent_state(cache)
        if padded:
            input_ids, position_ids, attention_mask = pad_rows(input_ids, position_ids, attention_mask, past,
                                                               self.dtype, self.min_rows)
        if attention_mask is not None:
            attention_mask = self.layer_masks(attention_mask, position_ids)
        out = self.model(
            input_ids=input_ids.to(self.device),
            position_ids=position_ids.to(self.device),
            attention_mask=attention_mask,
            use_cache=True,
            **{self.cache_arg: cache},
            logits_to_keep=1 if last_only else 0,
        )
        features = None
        if feature_layers:
            features = torch.cat([self._captured.pop(i)[0].to(self.device) for i in feature_layers], dim=-1)
        if padded:  # drop the padding rows' outputs and their cache entries
            crop(cache, cache.get_seq_length() - (self.min_rows - n))
            return TargetOutput(logits=out.logits[0, :n], features=None if features is None else features[:n])
        return TargetOutput(logits=out.logits[0], features=features)

    def layer_masks(self, mask: torch.Tensor, position_ids: torch.Tensor):
        """A tree mask as each attention layer type needs it: a 4D mask given to transformers is
        used by every layer as it is, so sliding-window layers get the window applied here
        (a dict per layer type where the model has several types)."""
        kinds = set(self.layer_types)
        unknown = kinds - {"full_attention", "sliding_attention"}
        if unknown:
            raise QuanttreeError(f"tree verification is not supported on layers of type {sorted(unknown)}: "
                                 "use method='dflash' (a chain) or 'ar'")
        if self.sliding_window is None:
            return mask
        windowed = sliding_window_mask(mask, position_ids, self.sliding_window)
        if not kinds:  # one layer type, windowed (e.g. Mistral): the single mask carries the window
            return windowed
        return {"full_attention": mask, "sliding_attention": windowed}

    @contextmanager
    def computed_in(self, dtype: torch.dtype):
        """Floating-point weights cast to `dtype` for the duration, then back (bf16 -> fp32 ->
        bf16 is lossless): the same weights, with the arithmetic of `dtype`."""
        was = self.dtype
        cast = [t for t in {id(t): t for t in list(self.model.parameters()) + list(self.model.buffers())}.values()
                if t.dtype == was]  # only tensors in the model's dtype (fp32 rotary buffers stay as they are)
        for t in cast:
            t.data = t.data.to(dtype)
        self.dtype = dtype
        try:
            yield self
        finally:
            for t in cast:
                t.data = t.data.to(was)
            self.dtype = was

    @torch.inference_mode()
    def hidden_and_logits(self, input_ids: torch.Tensor, feature_layers: tuple[int, ...]):
        """A cache-free batched forward over [b, n] ids at positions 0..n-1 (training data):
        logits [b, n, V] and the chosen layers' outputs concatenated [b, n, k*H]."""
        self._capture(feature_layers)
        ids = input_ids.to(self.device)
        out = self.model(input_ids=ids, use_cache=False)
        features = torch.cat([self._captured.pop(i).to(self.device) for i in feature_layers], dim=-1)
        return out.logits, features


def pad_rows(input_ids, position_ids, mask, past: int, dtype, rows: int):
    """A forward of n < rows tokens as `rows` rows: the tokens, then padding rows that attend to
    nothing and that nothing attends to (exact mode: matmuls over fewer rows take kernels whose
    sums differ; at `rows` they take the many-row one, at about the same cost: all read the
    weights once). mask: None (causal) or [1, 1, n, past + n]."""
    n = input_ids.shape[-1]
    blocked = torch.finfo(dtype).min
    full = torch.full((1, 1, rows, past + rows), blocked, dtype=dtype, device=input_ids.device)
    if mask is None:
        full[0, 0, :n, :past + n] = torch.zeros(n, past + n, dtype=dtype, device=full.device).masked_fill(
            torch.ones(n, past + n, dtype=torch.bool, device=full.device).triu(past + 1), blocked)
    else:
        full[..., :n, :past + n] = mask.to(device=full.device, dtype=dtype)
    pad = rows - n
    return (torch.cat([input_ids, input_ids[..., -1:].expand(1, pad)], -1),
            torch.cat([position_ids, position_ids[..., -1:].expand(1, pad)], -1), full)
