"""Gemma 3 vision encoder: SigLIP tower + multimodal projector, with TensorRT-LLM √hidden compensation.

`Gemma3VisionEncoder.image_features(pixel_values)` equals HF `Gemma3ForConditionalGeneration
.get_image_features(...).pooler_output` ([num_images, 256, text_hidden]). HF merges those features into
`inputs_embeds` *after* the text embeddings were scaled by √hidden, while TensorRT-LLM's Gemma multiplies
every looked-up row — prompt-table (image) rows included — by √hidden. So the served output
(`forward`, the ONNX/TensorRT graph and the Triton `prompt_embedding_table`) is the features divided by
the LLM's embedding scale, rounded the way HF rounds it (`torch.tensor(√h)` cast to the LLM dtype).

Also the runners the Triton `vision_encoder` model uses (`load_vision_runner`): torch on CPU, TensorRT on GPU.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn

from gemma3_core.constants import IMAGE_SIZE, MM_TOKENS_PER_IMAGE, PATCH_SIZE

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
ENGINE_FILE = "vision_encoder.engine"
FORMAT_NAME = "gemma3-vision-encoder"
INPUT_NAME = "pixel_values"
OUTPUT_NAME = "image_embeds"

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}

# The SigLIP fields that define the tower (SiglipVisionConfig kwargs); Gemma 3 never uses the pooling head.
_SIGLIP_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_channels",
    "image_size",
    "patch_size",
    "hidden_act",
    "layer_norm_eps",
    "attention_dropout",
)


def dtype_name(dtype: torch.dtype) -> str:
    for name, dt in _DTYPES.items():
        if dt == dtype:
            return name
    raise ValueError(f"unsupported dtype {dtype}")


def embed_scale_for(hidden_size: int, llm_dtype: str | torch.dtype) -> float:
    """The √hidden factor as HF applies it: a float32 tensor cast to the embedding weight dtype.

    In bfloat16 √5376 = 73.32 becomes 73.5; TensorRT-LLM multiplies by a constant of the model dtype too,
    so dividing by this rounded value is what makes engine-side (table row × scale) equal HF's features.
    """
    dt = _DTYPES[llm_dtype] if isinstance(llm_dtype, str) else llm_dtype
    return float(torch.tensor(hidden_size**0.5, dtype=torch.float32).to(dt).float())


@dataclass
class VisionEncoderConfig:
    vision: dict[str, Any]  # SiglipVisionConfig kwargs (see _SIGLIP_FIELDS)
    text_hidden_size: int
    mm_tokens_per_image: int = MM_TOKENS_PER_IMAGE
    llm_dtype: str = "bfloat16"  # dtype of the LLM's embedding table, whose scale is compensated
    extra: dict[str, Any] = field(default_factory=dict)  # provenance (source checkpoint, seed, ...)

    @property
    def embed_scale(self) -> float:
        return embed_scale_for(self.text_hidden_size, self.llm_dtype)

    def siglip_config(self, attn_implementation: str = "sdpa") -> Any:
        from transformers import SiglipVisionConfig

        cfg = SiglipVisionConfig(**self.vision, vision_use_head=False)
        cfg._attn_implementation = attn_implementation
        return cfg

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT_NAME, "version": 1, **asdict(self), "embed_scale": self.embed_scale}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> VisionEncoderConfig:
        if data.get("format") != FORMAT_NAME:
            raise ValueError(f"not a {FORMAT_NAME} config (format={data.get('format')!r})")
        return cls(
            vision=dict(data["vision"]),
            text_hidden_size=int(data["text_hidden_size"]),
            mm_tokens_per_image=int(data.get("mm_tokens_per_image", MM_TOKENS_PER_IMAGE)),
            llm_dtype=str(data.get("llm_dtype", "bfloat16")),
            extra=dict(data.get("extra", {})),
        )


class _SoftEmbNorm(nn.Module):
    """The projector norm's gain `w` only (the RMSNorm is computed in `Gemma3Projector.forward`)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))


class Gemma3Projector(nn.Module):
    """avg-pool the patch grid to √mm_tokens per side, Gemma RMSNorm (1 + w), project to the text hidden size.

    Parameter names follow HF's `Gemma3MultiModalProjector` so checkpoints load by name.
    """

    def __init__(self, vision_hidden: int, text_hidden: int, patches_per_side: int, tokens: int, eps: float):
        super().__init__()
        self.tokens_per_side = math.isqrt(tokens)
        if self.tokens_per_side**2 != tokens or patches_per_side % self.tokens_per_side:
            raise ValueError(f"cannot pool a {patches_per_side}² patch grid to {tokens} tokens")
        self.patches_per_side = patches_per_side
        self.kernel = patches_per_side // self.tokens_per_side
        self.eps = eps
        self.vision_hidden = vision_hidden
        self.mm_input_projection_weight = nn.Parameter(torch.zeros(vision_hidden, text_hidden))
        self.mm_soft_emb_norm = _SoftEmbNorm(vision_hidden)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        # Python-int shapes (batch -1): the ONNX graph then has static [B, 256, hidden] output dims.
        d, p, t = self.vision_hidden, self.patches_per_side, self.tokens_per_side**2
        grid = patches.transpose(1, 2).reshape(-1, d, p, p)
        pooled = (
            F.avg_pool2d(grid, kernel_size=self.kernel, stride=self.kernel).reshape(-1, d, t).transpose(1, 2)
        )
        # Gemma RMSNorm: computed in float32, scaled by (1 + w), then back to the input dtype.
        x = pooled.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        x = (x * (1.0 + self.mm_soft_emb_norm.weight.float())).to(pooled.dtype)
        return torch.matmul(x, self.mm_input_projection_weight).to(patches.dtype)


class Gemma3VisionEncoder(nn.Module):
    """pixel_values [B, 3, 896, 896] → served prompt-table rows [B, 256, text_hidden] (compensated)."""

    def __init__(self, config: VisionEncoderConfig, attn_implementation: str = "sdpa"):
        super().__init__()
        from transformers import SiglipVisionModel

        self.config = config
        siglip = config.siglip_config(attn_implementation)
        self.vision_tower = SiglipVisionModel(siglip)
        self.multi_modal_projector = Gemma3Projector(
            vision_hidden=siglip.hidden_size,
            text_hidden=config.text_hidden_size,
            patches_per_side=siglip.image_size // siglip.patch_size,
            tokens=config.mm_tokens_per_image,
            eps=siglip.layer_norm_eps,
        )
        # A Python float, not a buffer: `.to(dtype)` must not re-round it (it is already the LLM-dtype value).
        self.embed_scale = config.embed_scale

    @property
    def image_size(self) -> int:
        return int(self.config.vision["image_size"])

    @property
    def hidden_size(self) -> int:
        return self.config.text_hidden_size

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """HF `get_image_features(...).pooler_output`: uncompensated features."""
        patches = self.vision_tower(pixel_values=pixel_values).last_hidden_state
        features: torch.Tensor = self.multi_modal_projector(patches)
        return features

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        feats = self.image_features(pixel_values)
        return (feats.float() / self.embed_scale).to(feats.dtype)

    # --- construction ------------------------------------------------------------------------------
    @classmethod
    def from_hf_gemma3(
        cls,
        model_or_state_dict: PreTrainedModel | Mapping[str, torch.Tensor],
        config: PretrainedConfig | Mapping[str, Any],
        *,
        llm_dtype: str | None = None,
        attn_implementation: str = "sdpa",
    ) -> Gemma3VisionEncoder:
        """From a HF Gemma3ForConditionalGeneration (module or state dict) and its config (object or dict).

        Accepts the original/transformers-4 key layout (`vision_tower.vision_model.*`,
        `multi_modal_projector.*`, optionally under `model.`) and the transformers-5 one
        (`model.vision_tower.*`, `model.multi_modal_projector.*`). `llm_dtype` defaults to the dtype of the
        module's text embedding, else the config's `dtype`/`torch_dtype`, else bfloat16.
        """
        cfg = _as_dict(config)
        vision = cfg.get("vision_config") or {}
        text = cfg.get("text_config") or {}
        siglip = {k: vision[k] for k in _SIGLIP_FIELDS if k in vision}
        siglip.setdefault("image_size", IMAGE_SIZE)
        siglip.setdefault("patch_size", PATCH_SIZE)
        if isinstance(model_or_state_dict, nn.Module):
            state = model_or_state_dict.state_dict()
            if llm_dtype is None:
                # A model without a tensor embedding weight leaves the dtype to the config, below.
                weight = getattr(model_or_state_dict.get_input_embeddings(), "weight", None)
                llm_dtype = dtype_name(weight.dtype) if isinstance(weight, torch.Tensor) else None
        else:
            state = dict(model_or_state_dict)
        if llm_dtype is None:
            raw = text.get("dtype") or text.get("torch_dtype") or cfg.get("dtype") or cfg.get("torch_dtype")
            llm_dtype = str(raw).replace("torch.", "") if raw else "bfloat16"
        enc_cfg = VisionEncoderConfig(
            vision=siglip,
            text_hidden_size=int(text["hidden_size"]),
            mm_tokens_per_image=int(cfg.get("mm_tokens_per_image", MM_TOKENS_PER_IMAGE)),
            llm_dtype=llm_dtype,
            extra={"source": "hf_gemma3"},
        )
        enc = cls(enc_cfg, attn_implementation=attn_implementation)
        weights = vision_weights_from_state_dict(state)
        enc.load_weights(weights)
        first = next(iter(weights.values()))
        return enc.to(first.dtype).eval()

    @classmethod
    def from_hf_checkpoint_dir(
        cls, checkpoint_dir: str | Path, *, llm_dtype: str | None = None
    ) -> Gemma3VisionEncoder:
        """Read only the vision tower + projector tensors of a (sharded) safetensors checkpoint."""
        d = Path(checkpoint_dir)
        config = json.loads((d / "config.json").read_text())
        return cls.from_hf_gemma3(read_vision_weights(d), config, llm_dtype=llm_dtype)

    @classmethod
    def synthetic_for_text_model(
        cls,
        hidden_size: int,
        seed: int,
        *,
        vision_hidden: int = 128,
        num_layers: int = 2,
        num_heads: int = 2,
        intermediate_size: int = 256,
        image_size: int = IMAGE_SIZE,
        patch_size: int = PATCH_SIZE,
        llm_dtype: str = "float32",
        attn_implementation: str = "sdpa",
    ) -> Gemma3VisionEncoder:
        """A small SigLIP + projector to `hidden_size` with seeded random weights (same seed → same tensors).

        For text-only checkpoints (the CPU 270M model): the weights mean nothing, but every tensor path
        (preprocessing → tower → projector → prompt table → engine) is the real one.
        """
        cfg = VisionEncoderConfig(
            vision={
                "hidden_size": vision_hidden,
                "intermediate_size": intermediate_size,
                "num_hidden_layers": num_layers,
                "num_attention_heads": num_heads,
                "num_channels": 3,
                "image_size": image_size,
                "patch_size": patch_size,
                "hidden_act": "gelu_pytorch_tanh",
                "layer_norm_eps": 1e-6,
                "attention_dropout": 0.0,
            },
            text_hidden_size=hidden_size,
            llm_dtype=llm_dtype,
            extra={"source": "synthetic", "seed": seed},
        )
        enc = cls(cfg, attn_implementation=attn_implementation)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in sorted(enc.named_parameters()):
                noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
                if name.endswith("mm_soft_emb_norm.weight"):
                    p.copy_(0.1 * noise)  # Gemma norm multiplies by (1 + w)
                elif p.ndim == 1 and "norm" in name and name.endswith("weight"):
                    p.copy_(1.0 + 0.1 * noise)  # LayerNorm gains
                elif p.ndim == 1:
                    p.copy_(0.02 * noise)  # biases
                else:
                    fan_in = p.shape[0] if name.endswith("mm_input_projection_weight") else p[0].numel()
                    p.copy_(noise / math.sqrt(max(fan_in, 1)))
        return enc.eval()

    def load_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        own = self.state_dict()
        missing = sorted(set(own) - set(weights))
        if missing:
            raise KeyError(
                f"vision weights missing from checkpoint: {missing[:8]}{' ...' if len(missing) > 8 else ''}"
            )
        unexpected = sorted(set(weights) - set(own))
        if unexpected:
            raise KeyError(f"unexpected vision weights: {unexpected[:8]}")
        for k, v in weights.items():
            if tuple(v.shape) != tuple(own[k].shape):
                raise ValueError(
                    f"{k}: checkpoint shape {tuple(v.shape)} != model shape {tuple(own[k].shape)}"
                )
        self.load_state_dict(dict(weights), strict=True)

    def save_encoder(self, directory: str | Path) -> Path:
        return save_encoder(self, directory)


# --- checkpoint keys -------------------------------------------------------------------------------
def vision_key(key: str) -> str | None:
    """Map a Gemma3ForConditionalGeneration key to this module's key (None: not a vision/projector weight)."""
    k = key.removeprefix("model.")
    if k.startswith("vision_tower.vision_model."):  # original checkpoints / transformers 4
        k = "vision_tower." + k.removeprefix("vision_tower.vision_model.")
    if k.startswith("vision_tower.head."):  # SigLIP pooling head: unused by Gemma 3 (vision_use_head false)
        return None
    if k.startswith(("vision_tower.", "multi_modal_projector.")):
        return k
    return None


def vision_weights_from_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        k = vision_key(key)
        if k is None:
            continue
        if k in out:
            raise KeyError(f"duplicate vision weight {k} (from {key})")
        out[k] = value
    if not out:
        raise KeyError("no vision_tower / multi_modal_projector weights found")
    return out


def read_vision_weights(checkpoint_dir: str | Path) -> dict[str, torch.Tensor]:
    """Vision + projector tensors from `*.safetensors` shards, without loading the language model."""
    from safetensors import safe_open

    d = Path(checkpoint_dir)
    index = d / "model.safetensors.index.json"
    if index.exists():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        files: dict[str, list[str]] = {}
        for key, fname in weight_map.items():
            if vision_key(key) is not None:
                files.setdefault(fname, []).append(key)
    else:
        files = {p.name: [] for p in sorted(d.glob("*.safetensors"))}
    state: dict[str, torch.Tensor] = {}
    for fname, keys in files.items():
        with safe_open(str(d / fname), framework="pt") as f:
            for key in keys or [k for k in f.keys() if vision_key(k) is not None]:  # noqa: SIM118
                state[key] = f.get_tensor(key)
    return vision_weights_from_state_dict(state)


def _as_dict(config: PretrainedConfig | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "to_dict"):
        data: dict[str, Any] = config.to_dict()
        return data
    raise TypeError(f"expected a Gemma3Config or dict, got {type(config).__name__}")


# --- save / load -----------------------------------------------------------------------------------
def save_encoder(encoder: Gemma3VisionEncoder, directory: str | Path) -> Path:
    """Write `config.json` + `model.safetensors` (weights in the encoder's current dtype)."""
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in encoder.state_dict().items()}
    save_file(state, str(d / WEIGHTS_FILE), metadata={"format": FORMAT_NAME})
    data = encoder.config.to_json()
    data["weights_dtype"] = dtype_name(next(encoder.parameters()).dtype)
    (d / CONFIG_FILE).write_text(json.dumps(data, indent=2) + "\n")
    return d


def load_encoder_config(directory: str | Path) -> VisionEncoderConfig:
    return VisionEncoderConfig.from_json(json.loads((Path(directory) / CONFIG_FILE).read_text()))


def load_encoder(
    directory: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
) -> Gemma3VisionEncoder:
    from safetensors.torch import load_file

    d = Path(directory)
    enc = Gemma3VisionEncoder(load_encoder_config(d), attn_implementation=attn_implementation)
    state = load_file(str(d / WEIGHTS_FILE))
    enc.load_weights(state)
    target = dtype or next(iter(state.values())).dtype
    return enc.to(device=device, dtype=target).eval().requires_grad_(False)


# --- runners (Triton `vision_encoder` model) -------------------------------------------------------
class VisionRunner(Protocol):
    hidden_size: int
    tokens_per_image: int

    def __call__(self, pixel_values: npt.NDArray[np.float32]) -> npt.NDArray[np.float16]:
        """float32 [N, 3, 896, 896] → float16 prompt table [N * 256, hidden]."""
        ...


def _check_pixels(pixel_values: npt.NDArray[np.float32], image_size: int) -> None:
    if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, image_size, image_size):
        raise ValueError(f"pixel_values must be [N, 3, {image_size}, {image_size}], got {pixel_values.shape}")


class TorchVisionRunner:
    """CPU (or CUDA) torch execution of `load_encoder(dir)`, `max_batch` images per forward."""

    def __init__(self, directory: str | Path, *, device: str = "cpu", max_batch: int = 4):
        dtype = torch.float32 if device == "cpu" else torch.float16  # CPU half matmuls are slow
        self.encoder = load_encoder(directory, dtype=dtype, device=device)
        self.device = device
        self.dtype = dtype
        self.max_batch = max(1, max_batch)
        self.hidden_size = self.encoder.hidden_size
        self.tokens_per_image = self.encoder.config.mm_tokens_per_image
        self.image_size = self.encoder.image_size

    def __call__(self, pixel_values: npt.NDArray[np.float32]) -> npt.NDArray[np.float16]:
        _check_pixels(pixel_values, self.image_size)
        parts: list[npt.NDArray[np.float16]] = []
        with torch.inference_mode():
            for i in range(0, pixel_values.shape[0], self.max_batch):
                x = torch.from_numpy(np.ascontiguousarray(pixel_values[i : i + self.max_batch]))
                y = self.encoder(x.to(self.device, self.dtype))
                parts.append(y.to(torch.float16).cpu().numpy())
        if not parts:
            return np.zeros((0, self.hidden_size), dtype=np.float16)
        return np.concatenate(parts).reshape(-1, self.hidden_size)


class TensorRTVisionRunner:
    """Runs `vision_encoder.engine` (our ONNX, built with the TensorRT Python API) with TensorRT ≥ 10.

    Only usable inside NVIDIA's container (tensorrt + CUDA torch); chunks requests by the engine's max
    profile batch. Buffers are torch CUDA tensors, so no pycuda is needed.
    """

    def __init__(self, directory: str | Path, *, device_id: int = 0):
        import tensorrt as trt

        d = Path(directory)
        cfg = load_encoder_config(d)
        self.hidden_size = cfg.text_hidden_size
        self.tokens_per_image = cfg.mm_tokens_per_image
        self.image_size = int(cfg.vision["image_size"])
        self.device = torch.device("cuda", device_id)
        self._trt = trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine((d / ENGINE_FILE).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"cannot deserialize {d / ENGINE_FILE} (TensorRT version mismatch?)")
        self.context = self.engine.create_execution_context()
        _, _, max_shape = self.engine.get_tensor_profile_shape(INPUT_NAME, 0)
        self.max_batch = int(max_shape[0])
        self.in_dtype = self._torch_dtype(self.engine.get_tensor_dtype(INPUT_NAME))
        self.out_dtype = self._torch_dtype(self.engine.get_tensor_dtype(OUTPUT_NAME))
        # torch.cuda.Stream's constructor has no annotations.
        self.stream = torch.cuda.Stream(device=self.device)  # type: ignore[no-untyped-call]

    def _torch_dtype(self, trt_dtype: Any) -> torch.dtype:
        trt = self._trt
        table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16}
        return table[trt_dtype]

    def __call__(self, pixel_values: npt.NDArray[np.float32]) -> npt.NDArray[np.float16]:
        _check_pixels(pixel_values, self.image_size)
        parts: list[torch.Tensor] = []
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            for i in range(0, pixel_values.shape[0], self.max_batch):
                chunk = np.ascontiguousarray(pixel_values[i : i + self.max_batch])
                x = torch.from_numpy(chunk).to(self.device, self.in_dtype, non_blocking=False).contiguous()
                self.context.set_input_shape(INPUT_NAME, tuple(x.shape))
                out = torch.empty(
                    tuple(self.context.get_tensor_shape(OUTPUT_NAME)),
                    dtype=self.out_dtype,
                    device=self.device,
                )
                self.context.set_tensor_address(INPUT_NAME, x.data_ptr())
                self.context.set_tensor_address(OUTPUT_NAME, out.data_ptr())
                if not self.context.execute_async_v3(self.stream.cuda_stream):
                    raise RuntimeError("TensorRT vision encoder execution failed")
                parts.append(out.to(torch.float16))
            self.stream.synchronize()
        if not parts:
            return np.zeros((0, self.hidden_size), dtype=np.float16)
        return torch.cat(parts).reshape(-1, self.hidden_size).cpu().numpy()


def load_vision_runner(directory: str | Path, backend: str, **kwargs: Any) -> VisionRunner:
    """`backend`: "torch" (CPU reference; `device=` to override) or "tensorrt" (GPU engine)."""
    if backend == "torch":
        return TorchVisionRunner(directory, **kwargs)
    if backend == "tensorrt":
        return TensorRTVisionRunner(directory, **kwargs)
    raise ValueError(f"unknown vision backend {backend!r} (expected 'torch' or 'tensorrt')")


# Module-level spellings of the constructors (build_engine imports these).
synthetic_for_text_model = Gemma3VisionEncoder.synthetic_for_text_model
from_hf_gemma3 = Gemma3VisionEncoder.from_hf_gemma3
from_hf_checkpoint_dir = Gemma3VisionEncoder.from_hf_checkpoint_dir
