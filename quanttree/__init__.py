"""quanttree: lossless tree speculative decoding for 4/8-bit quantized models."""

from __future__ import annotations

from typing import Sequence

from .decode import METHODS, DecodeConfig, Step
from .engine import Engine, Result, Stats, StreamEvent, load
from .errors import QuanttreeError
from .models import DEFAULT_TARGET, QUANT_MODES
from .sampling import SamplingParams

__version__ = "0.1.0"

_ENGINES: dict[tuple, Engine] = {}


def generate(prompt, target: str = DEFAULT_TARGET, quant: str = "auto", drafter: str | None = "auto",
             drafter_quant: str | None = None, method: str | None = None, max_new_tokens: int = 128,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
             stop: str | Sequence[str] | None = None, budget: int | None = None, device: str | None = None) -> Result:
    """One call for scripts: load (cached across calls) and generate."""
    key = (target, drafter, quant, drafter_quant, device)
    if key not in _ENGINES:
        _ENGINES[key] = load(target=target, drafter=drafter, quant=quant, drafter_quant=drafter_quant, device=device)
    return _ENGINES[key].generate(prompt, method=method, max_new_tokens=max_new_tokens, temperature=temperature,
                                  top_p=top_p, top_k=top_k, seed=seed, stop=stop, budget=budget)


__all__ = ["load", "generate", "Engine", "Result", "Stats", "StreamEvent", "Step", "DecodeConfig",
           "SamplingParams", "QuanttreeError", "METHODS", "QUANT_MODES", "DEFAULT_TARGET"]
