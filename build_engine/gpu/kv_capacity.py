"""KV-cache arithmetic for Gemma 3's two window sizes, and what the engine's startup log says it allocated.

TensorRT-LLM keeps one block pool per attention window size. Without `TRTLLM_WINDOW_SIZE_SHARES` recent
releases split the KV memory equally between the pools, which hands the 52 sliding-window layers (they need
at most `window` tokens per sequence) as much memory as the 10 global layers (they need the whole sequence):
half the 128k capacity is wasted. `window_size_shares` sizes the sliding pool for `max_batch_size` full
windows and gives the rest to the global layers; compose passes the result to `triton` and to `verify`.

`python -m build_engine.gpu.kv_capacity` prints the capacity table of docs/scale.md (a test keeps the two
equal); `--gpu-gb N --profile P` prints the shares sized for that GPU's pool.
"""

from __future__ import annotations

import argparse
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from build_engine.gpu.settings import PROFILES, EngineProfile
from gemma3_core import constants as C

ENV_VAR = "TRTLLM_WINDOW_SIZE_SHARES"
# trtllm-build's default paged-KV block; one spare block per sequence covers a window that starts mid-block.
TOKENS_PER_BLOCK = 32
# KV memory the shares are sized for: an 80 GB GPU, ~17 GB of int4 weights and activations, fraction 0.9.
REFERENCE_KV_BYTES = 52 * 10**9

# Capacity planning only (the real pool is in the engine's startup log, which `verify` reads). What a GPU
# keeps besides the KV cache: the int4 engine's weights (int4 layers plus the bf16 embedding and its lm_head
# copy, docs/gpu.md's file sizes) and an estimate for activations, the CUDA context and the vision engine.
ENGINE_WEIGHT_BYTES = 17 * 10**9
RUNTIME_RESERVE_BYTES = 4 * 10**9


def kv_bytes_per_token_layer(arch: C.TextArch = C.GEMMA3_27B, dtype_bytes: int = 2) -> int:
    return 2 * arch.num_kv_heads * arch.head_dim * dtype_bytes  # K and V


def layers_per_window(profile: EngineProfile, arch: C.TextArch = C.GEMMA3_27B) -> dict[int, int]:
    """{window size: number of layers}, the engine cycling the window list over every layer."""
    pattern = profile.attention_window(arch)
    return dict(sorted(Counter(pattern[i % len(pattern)] for i in range(arch.num_layers)).items()))


def sequence_tokens(seq_len: int, window: int, tokens_per_block: int = TOKENS_PER_BLOCK) -> int:
    """Tokens of KV one sequence of `seq_len` tokens holds in window `window`'s pool: a window moving over
    a longer sequence rarely starts on a block boundary, so it spans one block more."""
    return seq_len if seq_len <= window else window + tokens_per_block


def window_size_shares(
    profile: EngineProfile,
    arch: C.TextArch = C.GEMMA3_27B,
    *,
    kv_bytes: int = REFERENCE_KV_BYTES,
    tokens_per_block: int = TOKENS_PER_BLOCK,
) -> list[float]:
    """Memory share per window size, ascending by window (the order TensorRT-LLM reads the variable in).

    Every window smaller than `max_seq_len` gets room for `max_batch_size` sequences at a full window (more
    is never used); the largest window gets the rest. If the small windows would need more than the whole
    pool, memory is split in proportion to one full-length sequence's need instead.
    """
    layers = layers_per_window(profile, arch)
    per_layer = kv_bytes_per_token_layer(arch)
    windows = list(layers)
    if len(windows) == 1:
        return [1.0]
    largest = windows[-1]

    def seq_need(w: int) -> int:  # bytes one sequence can occupy in window w's pool
        return layers[w] * per_layer * sequence_tokens(profile.max_seq_len, w, tokens_per_block)

    small = {w: profile.max_batch_size * seq_need(w) / kv_bytes for w in windows if w != largest}
    if sum(small.values()) >= 1.0:
        total = sum(seq_need(w) for w in windows)
        shares = {w: seq_need(w) / total for w in windows}
    else:
        shares = {**small, largest: 1.0 - sum(small.values())}
    # Round up the small shares so rounding never shrinks them below what they need.
    out = [math.ceil(shares[w] * 1000) / 1000 for w in windows[:-1]]
    return [*out, round(1.0 - sum(out), 3)]


def shares_env_value(shares: list[float]) -> str:
    return ",".join(f"{s:g}" for s in shares)


def default_shares_env(profile_name: str = "latency") -> str:
    return shares_env_value(window_size_shares(PROFILES[profile_name]))


@dataclass(frozen=True)
class WindowCapacity:
    window: int
    layers: int
    blocks: int
    tokens: int
    sequences_at_max_len: float


def capacity_from_blocks(
    blocks_per_window: dict[int, int],
    profile: EngineProfile,
    arch: C.TextArch = C.GEMMA3_27B,
    *,
    tokens_per_block: int = TOKENS_PER_BLOCK,
) -> list[WindowCapacity]:
    """What the allocated primary blocks mean: tokens per pool and concurrent full-length sequences."""
    layers = layers_per_window(profile, arch)
    out = []
    for window, blocks in sorted(blocks_per_window.items()):
        tokens = blocks * tokens_per_block
        need = sequence_tokens(profile.max_seq_len, window, tokens_per_block)
        out.append(WindowCapacity(window, layers.get(window, 0), blocks, tokens, tokens / need))
    return out


def concurrent_max_len_sequences(capacities: list[WindowCapacity]) -> float:
    """Full-length sequences that fit at once: the tightest pool decides."""
    return min((c.sequences_at_max_len for c in capacities), default=0.0)


def kv_pool_bytes(gpu_bytes: int, profile: EngineProfile) -> int:
    """The KV pool one TP=1 replica gets on a GPU of `gpu_bytes`: the profile's
    `kv_cache_free_gpu_mem_fraction` of what the weights and the runtime leave free."""
    free = gpu_bytes - ENGINE_WEIGHT_BYTES - RUNTIME_RESERVE_BYTES
    return max(0, round(profile.kv_cache_free_gpu_mem_fraction * free))


def concurrent_sequences(
    kv_bytes: int,
    shares: Sequence[float],
    seq_len: int,
    profile: EngineProfile,
    arch: C.TextArch = C.GEMMA3_27B,
    *,
    tokens_per_block: int = TOKENS_PER_BLOCK,
) -> int:
    """Sequences of `seq_len` tokens one replica holds at once: each window's pool (its share of `kv_bytes`,
    in whole blocks) fits so many, the scarcest pool decides, `max_batch_size` caps; 0 beyond `max_seq_len`.

    `shares` are ascending by window, as in `window_size_shares` and TRTLLM_WINDOW_SIZE_SHARES.
    """
    if seq_len > profile.max_seq_len:
        return 0
    layers = layers_per_window(profile, arch)
    if len(shares) != len(layers):
        raise ValueError(f"{len(shares)} shares for {len(layers)} window sizes {list(layers)}")
    block_bytes = kv_bytes_per_token_layer(arch) * tokens_per_block
    fits = profile.max_batch_size
    for (window, n_layers), share in zip(layers.items(), shares, strict=True):
        pool_blocks = int(share * kv_bytes) // (n_layers * block_bytes)
        seq_blocks = math.ceil(sequence_tokens(seq_len, window, tokens_per_block) / tokens_per_block)
        fits = min(fits, pool_blocks // seq_blocks)
    return fits


# --- docs/scale.md's capacity table ------------------------------------------------------------------
@dataclass(frozen=True)
class PlanningGpu:
    memory_gb: int  # as sold: 10**9 bytes
    models: str


# Common memory sizes of the sm80+ GPUs the engine runs on (settings.MIN_COMPUTE_CAPABILITY).
PLANNING_GPUS = (
    PlanningGpu(48, "L40S, RTX 6000 Ada"),
    PlanningGpu(80, "A100, H100"),
    PlanningGpu(141, "H200"),
)
TABLE_LENGTHS = {"4k": 4096, "32k": 32_768, "128k": 131_072}
EQUAL_HALVES = (0.5, 0.5)

DOC_BEGIN = (
    "<!-- kv capacity: generated by `python -m build_engine.gpu.kv_capacity`; "
    "tests/test_gpu_kv_capacity.py checks it -->"
)
DOC_END = "<!-- kv capacity: end -->"


def capacity_markdown() -> str:
    """Concurrent sequences per TP=1 replica for every planning GPU and profile: with the shares compose and
    the manifests set (`window_size_shares`) and, in brackets, with TensorRT-LLM's equal halves."""
    lines = [
        "| GPU | profile (shares) | KV pool | " + " | ".join(TABLE_LENGTHS) + " |",
        "|---|---|---|" + "---|" * len(TABLE_LENGTHS),
    ]
    for gpu in PLANNING_GPUS:
        for i, (name, profile) in enumerate(PROFILES.items()):
            label = f"{gpu.memory_gb} GB ({gpu.models})" if i == 0 else f"{gpu.memory_gb} GB"
            shares = window_size_shares(profile)
            pool = kv_pool_bytes(gpu.memory_gb * 10**9, profile)
            cells = []
            for seq_len in TABLE_LENGTHS.values():
                if seq_len > profile.max_seq_len:
                    cells.append("—")
                    continue
                ours = concurrent_sequences(pool, shares, seq_len, profile)
                equal = concurrent_sequences(pool, EQUAL_HALVES, seq_len, profile)
                cells.append(f"{ours} ({equal})")
            shown = ", ".join(f"{s:g}" for s in shares)
            lines.append(
                f"| {label} | {name} ({shown}) | ≈ {pool / 2**30:.0f} GiB | " + " | ".join(cells) + " |"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m build_engine.gpu.kv_capacity",
        description="Print docs/scale.md's capacity table, or the window shares sized for one GPU.",
    )
    parser.add_argument("--gpu-gb", type=int, help="GPU memory in GB: print the shares sized for its pool")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="latency")
    args = parser.parse_args(argv)
    if args.gpu_gb is None:
        print(f"{DOC_BEGIN}\n{capacity_markdown()}\n{DOC_END}")
        return 0
    profile = PROFILES[args.profile]
    pool = kv_pool_bytes(args.gpu_gb * 10**9, profile)
    shares = window_size_shares(profile, kv_bytes=pool)
    print(f"{ENV_VAR}={shares_env_value(shares)}")
    for name, seq_len in TABLE_LENGTHS.items():
        if seq_len <= profile.max_seq_len:
            print(f"# concurrent sequences at {name}: {concurrent_sequences(pool, shares, seq_len, profile)}")
    return 0


_WINDOW_BLOCKS = re.compile(
    r"windowSize\s*=\s*(\d+)\D[^\n]*?primaryBlocks\s*=\s*(\d+)|"
    r"windowSize\s*=\s*(\d+)\]?\s*[:,]?\s*\{?\s*(\d+)\s*,"
)
_TOKENS_PER_BLOCK = re.compile(r"[Nn]umber of tokens per block:\s*(\d+)")


def parse_blocks_per_window(log: str) -> dict[int, int]:
    """{window size: primary blocks} from the executor's "Blocks per window size" startup log lines.

    Reads the lines after the last "Blocks per window size" header; the entries look like
    `[windowSize=1024] {.primaryBlocks=…, .secondaryBlocks=…}` (spacing varies between releases).
    """
    start = log.rfind("Blocks per window size")
    if start < 0:
        return {}
    found: dict[int, int] = {}
    for line in log[start:].splitlines()[:16]:
        for m in _WINDOW_BLOCKS.finditer(line):
            window, blocks = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
            found[int(window)] = int(blocks)
    return found


def parse_tokens_per_block(log: str, default: int = TOKENS_PER_BLOCK) -> int:
    m = _TOKENS_PER_BLOCK.search(log)
    return int(m.group(1)) if m else default


if __name__ == "__main__":
    raise SystemExit(main())
