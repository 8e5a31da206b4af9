"""The DFlash block-diffusion drafter: our own module, loading the published on-disk format.

One forward predicts a block of B tokens [anchor, MASK, ...] from target features of the
committed context, injected as extra keys/values in every layer. It has no embedding and
no LM head of its own: it borrows the target's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import QuanttreeError
from .kvcache import ContextKV

ARCHITECTURE = "DFlashDraftModel"
WEIGHTS_FILE = "model.safetensors"
DRAFT_VOCAB_FILE = "draft_vocab.json"  # ours, optional; engines that do not know it ignore it


@dataclass(frozen=True)
class DrafterConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    num_target_layers: int
    target_layer_ids: tuple[int, ...]
    mask_token_id: int
    block_size: int = 16
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    model_type: str = "qwen3"
    rope_scaling: tuple[tuple[str, object], ...] = ()  # rope_parameters beyond rope_theta (e.g. yarn)
    max_position_embeddings: int | None = None
    layer_types: tuple[str, ...] = ()  # per drafter layer: full_attention (default) or sliding_attention
    sliding_window: int | None = None
    extra: dict = field(default_factory=dict, compare=False)  # other published keys, kept on save

    @classmethod
    def from_json(cls, data: dict) -> "DrafterConfig":
        dflash = data.get("dflash_config") or {}
        rope = dict(data.get("rope_parameters") or data.get("rope_scaling") or {})
        check_supported(data)
        try:
            heads = data["num_attention_heads"]
            return cls(
                hidden_size=data["hidden_size"],
                intermediate_size=data["intermediate_size"],
                num_hidden_layers=data["num_hidden_layers"],
                num_attention_heads=heads,
                num_key_value_heads=data.get("num_key_value_heads", heads),
                head_dim=data.get("head_dim") or data["hidden_size"] // heads,
                vocab_size=data["vocab_size"],
                target_layer_ids=tuple(dflash["target_layer_ids"]),
                mask_token_id=dflash["mask_token_id"],
                num_target_layers=dflash.get("num_target_layers", data.get("num_target_layers")),
                block_size=dflash.get("block_size", data.get("block_size", 16)),
                rms_norm_eps=data.get("rms_norm_eps", 1e-6),
                rope_theta=rope.pop("rope_theta", data.get("rope_theta", 1e6)),
                model_type=data.get("model_type", "qwen3"),
                rope_scaling=tuple(sorted((k, v) for k, v in rope.items()
                                          if not (k in ("rope_type", "type") and v == "default"))),
                max_position_embeddings=data.get("max_position_embeddings"),
                layer_types=tuple(data.get("layer_types") or ()),
                sliding_window=data.get("sliding_window") if "sliding_attention" in (data.get("layer_types") or ())
                else None,
                extra={k: v for k, v in data.items() if k in ("torch_dtype", "dtype", "tie_word_embeddings",
                                                              "draft_vocab_size")},
            )
        except KeyError as exc:
            raise QuanttreeError(f"drafter config.json lacks the key {exc}: is this a DFlash drafter?") from exc

    def to_json(self) -> dict:
        return {
            "architectures": [ARCHITECTURE],
            "model_type": self.model_type,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "vocab_size": self.vocab_size,
            "block_size": self.block_size,
            "num_target_layers": self.num_target_layers,
            "dflash_config": {"mask_token_id": self.mask_token_id, "target_layer_ids": list(self.target_layer_ids)},
            **({"rope_parameters": {"rope_theta": self.rope_theta, **dict(self.rope_scaling)}}
               if self.rope_scaling else {}),
            **({"max_position_embeddings": self.max_position_embeddings} if self.max_position_embeddings else {}),
            **({"layer_types": list(self.layer_types)} if self.layer_types else {}),
            **({"sliding_window": self.sliding_window} if self.sliding_window else {}),
            **self.extra,
        }

    def layer_window(self, i: int) -> int | None:
        """The sliding window of drafter layer i (None: full attention)."""
        if self.layer_types and self.layer_types[i] == "sliding_attention":
            return self.sliding_window
        return None


KNOWN_DFLASH_KEYS = {"mask_token_id", "target_layer_ids", "block_size", "num_target_layers"}
LAYER_TYPES = {"full_attention", "sliding_attention"}


def check_supported(data: dict) -> None:
    """Refuse, naming the feature, what this drafter implementation does not compute."""
    if "DFlash2DraftModel" in (data.get("architectures") or []):
        raise QuanttreeError("DFlash2 drafters (convolution and candidate-selector modules) are not supported "
                             "yet: use a DFlash (v1) drafter")
    unknown = set(data.get("dflash_config") or {}) - KNOWN_DFLASH_KEYS
    if unknown:
        raise QuanttreeError(f"drafter dflash_config has keys this version does not implement: {sorted(unknown)} "
                             f"(known: {sorted(KNOWN_DFLASH_KEYS)}); refusing rather than drafting wrongly")
    types = set(data.get("layer_types") or ())
    if types - LAYER_TYPES:
        raise QuanttreeError(f"drafter layer_types {sorted(types - LAYER_TYPES)} are not supported "
                             f"(supported: {sorted(LAYER_TYPES)})")
    if "sliding_attention" in types and not data.get("sliding_window"):
        raise QuanttreeError("drafter config has sliding_attention layers but no sliding_window")
    if len(data.get("layer_types") or ()) not in (0, data.get("num_hidden_layers")):
        raise QuanttreeError("drafter layer_types must name one type per drafter layer")
    rope = dict(data.get("rope_parameters") or data.get("rope_scaling") or {})
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        if kind not in ROPE_INIT_FUNCTIONS:
            raise QuanttreeError(f"drafter rope type {kind!r} is not supported (supported: default, "
                                 f"{', '.join(ROPE_INIT_FUNCTIONS)})")


def rope_frequencies(cfg: DrafterConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim / 2] and the cos/sin scale of the drafter's rope (default,
    or scaled, e.g. yarn, computed by transformers' own rope functions)."""
    d = cfg.head_dim
    params = dict(cfg.rope_scaling)
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2).float() / d)), 1.0
    from transformers import Qwen3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = Qwen3Config(hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads, head_dim=d,
                     max_position_embeddings=cfg.max_position_embeddings or 32768,
                     rope_parameters={"rope_theta": cfg.rope_theta, **params, "rope_type": kind})
    inv_freq, scale = ROPE_INIT_FUNCTIONS[kind](hf, torch.device("cpu"))
    return inv_freq.float(), float(scale)


def default_target_layer_ids(num_target_layers: int, num_drafter_layers: int) -> tuple[int, ...]:
    """DFlash's default feature layers: spread from layer 1 to num_target_layers - 3."""
    if num_drafter_layers == 1:
        return (num_target_layers // 2,)
    span = (num_target_layers - 4) / (num_drafter_layers - 1)
    ids = (round(1 + j * span) for j in range(num_drafter_layers))
    return tuple(sorted({min(max(i, 0), num_target_layers - 1) for i in ids}))  # tiny targets: clamp


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_tables(positions: torch.Tensor, inv_freq: torch.Tensor, scale: float, dtype: torch.dtype):
    """cos, sin [n, head_dim] for integer positions [n] (inv_freq, scale: rope_frequencies)."""
    angles = positions.float()[:, None] * inv_freq.to(positions.device)[None, :]
    emb = torch.cat([angles, angles], dim=-1)
    return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [1, heads, n, d]; cos/sin: [n, d]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class DrafterAttention(nn.Module):
    def __init__(self, cfg: DrafterConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def _split(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        # [b, n, heads*d] -> [b, heads, n, d]
        return x.view(x.shape[0], x.shape[1], heads, self.head_dim).transpose(1, 2)

    def project_kv(self, x: torch.Tensor, rope) -> tuple[torch.Tensor, torch.Tensor]:
        k = apply_rope(self.k_norm(self._split(self.k_proj(x), self.kv_heads)), *rope)
        return k, self._split(self.v_proj(x), self.kv_heads)

    def forward(self, x, block_rope, ctx_k, ctx_v, mask=None) -> torch.Tensor:
        """x: [b, B, H] block states; ctx_k/ctx_v: [b, kv, c, d] roped context K/V (or None)."""
        q = apply_rope(self.q_norm(self._split(self.q_proj(x), self.heads)), *block_rope)
        k, v = self.project_kv(x, block_rope)
        if ctx_k is not None:
            if ctx_k.shape[0] != k.shape[0]:  # several blocks (D2SD branches) share one context
                ctx_k, ctx_v = ctx_k.expand(k.shape[0], -1, -1, -1), ctx_v.expand(k.shape[0], -1, -1, -1)
            k, v = torch.cat([ctx_k, k], dim=-2), torch.cat([ctx_v, v], dim=-2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=False,
                                             enable_gqa=self.heads != self.kv_heads)
        return self.o_proj(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))


class DrafterMLP(nn.Module):
    def __init__(self, cfg: DrafterConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DrafterLayer(nn.Module):
    def __init__(self, cfg: DrafterConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = DrafterAttention(cfg)
        self.mlp = DrafterMLP(cfg)

    def forward(self, x, block_rope, ctx_k, ctx_v, mask=None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), block_rope, ctx_k, ctx_v, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class DFlashDrafter(nn.Module):
    """Published tensor names: fc, hidden_norm, norm, layers.{i}.*, optional mask_embedding."""

    def __init__(self, cfg: DrafterConfig, with_mask_embedding: bool = False, own_head_rows: int | None = None):
        super().__init__()
        self.config = cfg
        width = len(cfg.target_layer_ids) * cfg.hidden_size
        self.fc = nn.Linear(width, cfg.hidden_size, bias=False)
        self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.layers = nn.ModuleList(DrafterLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mask_embedding = nn.Parameter(torch.zeros(cfg.hidden_size)) if with_mask_embedding else None
        # its own head (draft-vocabulary rows); None: the target's lm_head, as DFlash publishes
        self.lm_head = nn.Linear(cfg.hidden_size, own_head_rows, bias=False) if own_head_rows else None
        self.draft_vocab: torch.Tensor | None = None  # frequency-ranked subset the drafter predicts over
        self.inv_freq, self.rope_scale = rope_frequencies(cfg)  # not a tensor of the published format

    def rope(self, positions: torch.Tensor, dtype: torch.dtype):
        return rope_tables(positions, self.inv_freq, self.rope_scale, dtype)

    @property
    def dtype(self) -> torch.dtype:
        return self.norm.weight.dtype

    def fuse_context(self, features: torch.Tensor) -> torch.Tensor:
        """Target features [b, c, k*H] -> fused context states [b, c, H]."""
        return self.hidden_norm(self.fc(features.to(self.dtype)))

    def extend_context(self, cache: ContextKV, features: torch.Tensor, positions: torch.Tensor) -> None:
        """Append committed tokens' target features [1, c, k*H] at positions [c] to the cache."""
        ctx = self.fuse_context(features)
        rope = self.rope(positions, ctx.dtype)
        for i, layer in enumerate(self.layers):
            k, v = layer.self_attn.project_kv(ctx, rope)
            cache.extend(i, k, v)

    def forward_block(self, block_embeds: torch.Tensor, positions: torch.Tensor, cache: ContextKV) -> torch.Tensor:
        """Block states [b, B, H] at positions [B] attending to the cached context -> [b, B, H]."""
        x = block_embeds.to(self.dtype)
        rope = self.rope(positions, x.dtype)
        keys = torch.cat([torch.arange(cache.length, device=positions.device), positions])
        for i, layer in enumerate(self.layers):
            window = self.config.layer_window(i)
            mask = None if window is None else window_visible(positions, keys, window)[None, None]
            x = layer(x, rope, cache.keys[i], cache.values[i], mask)
        return self.norm(x)


def window_visible(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int) -> torch.Tensor:
    """Which keys a sliding-window drafter layer's queries see: |q - k| < window, as the
    reference engines run it (flash attention's symmetric window on a non-causal layer).
    q_pos [..., B], k_pos [..., K] -> bool [..., B, K]."""
    return (q_pos[..., :, None] - k_pos[..., None, :]).abs() < window


def check_fits_target(cfg: DrafterConfig, target_config, has_mask_embedding: bool) -> None:
    """A drafter must match the target's width, vocabulary and layers; say which does not."""
    text_cfg = target_config.get_text_config() if hasattr(target_config, "get_text_config") else target_config
    problems = []
    if cfg.hidden_size != text_cfg.hidden_size:
        problems.append(f"hidden size {cfg.hidden_size} != target's {text_cfg.hidden_size}")
    if cfg.vocab_size != text_cfg.vocab_size:
        problems.append(f"vocabulary {cfg.vocab_size} != target's {text_cfg.vocab_size}")
    layers = text_cfg.num_hidden_layers
    bad = [i for i in cfg.target_layer_ids if not 0 <= i < layers]
    if bad:
        problems.append(f"target_layer_ids {bad} outside the target's {layers} layers")
    if cfg.num_target_layers != layers:
        problems.append(f"trained for a {cfg.num_target_layers}-layer target, this one has {layers}")
    if not has_mask_embedding and not 0 <= cfg.mask_token_id < text_cfg.vocab_size:
        problems.append(f"mask_token_id {cfg.mask_token_id} outside the vocabulary and no mask_embedding")
    if cfg.block_size < 2:
        problems.append(f"block_size {cfg.block_size} < 2")
    if problems:
        raise QuanttreeError(
            "this drafter does not fit the target (" + "; ".join(problems)
            + "): use the drafter trained for this target, or train one with `quanttree train-drafter`"
        )


def resolve_drafter_dir(drafter: str) -> Path:
    """A local drafter directory, or a hub id downloaded as config.json + safetensors only."""
    path = Path(drafter).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise QuanttreeError(f"drafter directory {path} has no config.json")
        return path
    if "/" in drafter and not drafter.startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(drafter, allow_patterns=["config.json", "*.safetensors"]))
        except Exception as exc:  # network, auth or missing repo
            raise QuanttreeError(f"could not fetch drafter {drafter!r} from the hub: {exc}") from exc
    raise QuanttreeError(f"drafter {drafter!r} not found: pass a drafter directory or a hub id 'org/name'")


IDENTITY_BYTES = 1 << 20


def drafter_identity(path: Path) -> str:
    """Names a drafter's weights for cache keys: directory name, config, and each weight file's
    size and first and last MiB (a retrained drafter has the same sizes; its profile's learned
    acceptance must not carry over, and hashing whole multi-GB files would slow every load)."""
    from hashlib import sha256

    digest = sha256((path / "config.json").read_bytes())
    for file in sorted(path.glob("*.safetensors")):
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}".encode())
        with file.open("rb") as fh:
            digest.update(fh.read(IDENTITY_BYTES))
            fh.seek(max(size - IDENTITY_BYTES, 0))
            digest.update(fh.read(IDENTITY_BYTES))
    return f"{path.name}-{digest.hexdigest()[:12]}"


def read_draft_vocab(path: Path, vocab_size: int) -> torch.Tensor | None:
    """Optional draft_vocab.json beside the weights: target token ids the drafter predicts over."""
    file = path / DRAFT_VOCAB_FILE
    if not file.exists():
        return None
    ids = torch.tensor(json.loads(file.read_text()), dtype=torch.long)
    if ids.ndim != 1 or ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
        raise QuanttreeError(f"{file} must list token ids of the target vocabulary (0..{vocab_size - 1})")
    return ids


def read_drafter(path: Path) -> tuple[DrafterConfig, dict[str, torch.Tensor]]:
    """Config and tensors of a drafter directory (safetensors only, never pickle)."""
    from safetensors.torch import load_file

    data = json.loads((path / "config.json").read_text())
    check_supported(data)
    if ARCHITECTURE not in (data.get("architectures") or []):
        raise QuanttreeError(f"{path}/config.json is not a DFlash drafter (architectures lacks {ARCHITECTURE!r})")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise QuanttreeError(f"drafter directory {path} has no .safetensors weights")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors.update(load_file(str(file)))
    return DrafterConfig.from_json(data), {k.removeprefix("model."): v for k, v in tensors.items()}


DFLASH2_TENSORS = ("conv", "selector", "candidate")  # name parts of DFlash2-only modules


def d2t_vocabulary(tensors: dict[str, torch.Tensor], cfg: DrafterConfig) -> torch.Tensor | None:
    """EAGLE-3 / published style draft vocabulary: draft index i means target token i + d2t[i]."""
    d2t = tensors.pop("d2t", None)
    tensors.pop("t2d", None)  # the inverse map (a [V] bool mask): implied by d2t
    if d2t is None:
        return None
    ids = torch.arange(d2t.numel()) + d2t.long()
    size = cfg.extra.get("draft_vocab_size")
    if size is not None and size != d2t.numel():
        raise QuanttreeError(f"drafter draft_vocab_size {size} != its d2t tensor's {d2t.numel()} entries")
    if int(ids.min()) < 0 or int(ids.max()) >= cfg.vocab_size or ids.unique().numel() != ids.numel():
        raise QuanttreeError("drafter d2t does not map the draft vocabulary onto distinct target token ids")
    return ids


def build_drafter(cfg: DrafterConfig, tensors: dict[str, torch.Tensor]) -> DFlashDrafter:
    """Instantiate and fill a drafter, naming missing or unexpected tensors. A `d2t` tensor becomes
    the draft vocabulary; an `lm_head.weight` of the draft (or full) vocabulary its own head."""
    tensors = dict(tensors)
    vocab = d2t_vocabulary(tensors, cfg)
    extra = [k for k in tensors if any(part in k for part in DFLASH2_TENSORS)]
    if extra:
        raise QuanttreeError(f"drafter tensors {extra[:3]} belong to DFlash2 (convolution / candidate selector), "
                             "which is not supported yet: use a DFlash (v1) drafter")
    head = tensors.get("lm_head.weight")
    drafter = DFlashDrafter(cfg, with_mask_embedding="mask_embedding" in tensors,
                            own_head_rows=None if head is None else head.shape[0])
    rows = (vocab.numel() if vocab is not None else cfg.vocab_size)
    if head is not None and head.shape[0] != rows:
        raise QuanttreeError(f"drafter lm_head has {head.shape[0]} rows, its draft vocabulary {rows}")
    drafter.draft_vocab = vocab
    expected = set(drafter.state_dict())
    missing, unexpected = expected - set(tensors), set(tensors) - expected
    if missing or unexpected:
        raise QuanttreeError(
            f"drafter weights do not match its config: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    drafter.load_state_dict(tensors)
    return drafter


def save_drafter(drafter: DFlashDrafter, out: str | Path) -> Path:
    """Write config.json + model.safetensors in the published DFlash layout; a draft vocabulary
    goes in as `draft_vocab_size` + a `d2t` tensor (draft index i -> target id i + d2t[i])."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in drafter.state_dict().items()}
    config = drafter.config.to_json()
    if drafter.draft_vocab is not None:
        vocab = drafter.draft_vocab.cpu().long()
        state["d2t"] = (vocab - torch.arange(vocab.numel())).contiguous()
        config["draft_vocab_size"] = vocab.numel()
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def quantize_linears(module: nn.Module, quant: str, compute_dtype: torch.dtype) -> None:
    """Swap every nn.Linear below `module` for a bitsandbytes int8/4-bit one (call on drafter.layers)."""
    import bitsandbytes as bnb

    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, _bnb_linear(bnb, child, quant, compute_dtype))
        else:
            quantize_linears(child, quant, compute_dtype)


def _bnb_linear(bnb, lin: nn.Linear, quant: str, compute_dtype: torch.dtype) -> nn.Module:
    device, weight = lin.weight.device, lin.weight.data.float().cpu()
    if quant == "int8":
        new = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=False, has_fp16_weights=False)
        new.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        new = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False,
                                compute_dtype=compute_dtype, quant_type=quant)
        new.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type=quant)
    return new.to(device)


def random_drafter_config(target_config, num_layers: int = 1, block_size: int = 16,
                          num_features: int = 4, mask_token_id: int | None = None) -> DrafterConfig:
    """A drafter config shaped for a target (used to train from scratch and in tests)."""
    t = target_config.get_text_config() if hasattr(target_config, "get_text_config") else target_config
    heads = t.num_attention_heads
    rope = getattr(t, "rope_parameters", None) or {}
    return DrafterConfig(
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=getattr(t, "num_key_value_heads", heads) or heads,
        head_dim=getattr(t, "head_dim", None) or t.hidden_size // heads,
        vocab_size=t.vocab_size,
        num_target_layers=t.num_hidden_layers,
        target_layer_ids=default_target_layer_ids(t.num_hidden_layers, num_features),
        mask_token_id=t.vocab_size if mask_token_id is None else mask_token_id,
        block_size=block_size,
        rms_norm_eps=t.rms_norm_eps,
        rope_theta=float(rope.get("rope_theta", getattr(t, "rope_theta", 1e4))),
        model_type=t.model_type,
    )


def init_random(drafter: DFlashDrafter, seed: int = 0, std: float = 0.02) -> DFlashDrafter:
    """Deterministic random init (norms to one) for tests and training from scratch."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in drafter.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return drafter


def param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())

