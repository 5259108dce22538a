"""KV-cache arithmetic for Gemma 3's two window sizes, and what the engine's startup log says it allocated.

TensorRT-LLM keeps one block pool per attention window size. Without `TRTLLM_WINDOW_SIZE_SHARES` recent
releases split the KV memory equally between the pools, which hands the 52 sliding-window layers (they need
at most `window` tokens per sequence) as much memory as the 10 global layers (they need the whole sequence):
half the 128k capacity is wasted. `window_size_shares` sizes the sliding pool for `max_batch_size` full
windows and gives the rest to the global layers; compose passes the result to `triton` and to `verify`.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass

from build_engine.gpu.settings import PROFILES, EngineProfile
from gemma3_core import constants as C

ENV_VAR = "TRTLLM_WINDOW_SIZE_SHARES"
# trtllm-build's default paged-KV block; one spare block per sequence covers a window that starts mid-block.
TOKENS_PER_BLOCK = 32
# KV memory the shares are sized for: an 80 GB GPU, ~17 GB of int4 weights and activations, fraction 0.9.
REFERENCE_KV_BYTES = 52 * 10**9


def kv_bytes_per_token_layer(arch: C.TextArch = C.GEMMA3_27B, dtype_bytes: int = 2) -> int:
    return 2 * arch.num_kv_heads * arch.head_dim * dtype_bytes  # K and V


def layers_per_window(profile: EngineProfile, arch: C.TextArch = C.GEMMA3_27B) -> dict[int, int]:
    """{window size: number of layers}, the engine cycling the window list over every layer."""
    pattern = profile.attention_window(arch)
    return dict(sorted(Counter(pattern[i % len(pattern)] for i in range(arch.num_layers)).items()))


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
        return layers[w] * per_layer * min(profile.max_seq_len, w + tokens_per_block)

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
        need = min(profile.max_seq_len, window + tokens_per_block)
        out.append(WindowCapacity(window, layers.get(window, 0), blocks, tokens, tokens / need))
    return out


def concurrent_max_len_sequences(capacities: list[WindowCapacity]) -> float:
    """Full-length sequences that fit at once: the tightest pool decides."""
    return min((c.sequences_at_max_len for c in capacities), default=0.0)


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
