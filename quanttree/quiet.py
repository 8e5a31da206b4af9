"""Silence library chatter that is not ours (bitsandbytes per-call casts, hub fallbacks)."""

import logging
import os
import warnings

_NOISY_LOGGERS = ("bitsandbytes", "transformers.modeling_utils", "transformers.integrations.ggml")


def silence_libraries() -> None:
    """Keep bitsandbytes' per-call cast warning and kernel-hub fallback out of our output."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
    warnings.filterwarnings("ignore", message=".*inputs will be cast.*")
    warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated.*")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # transformers missing: load() reports it
        pass
