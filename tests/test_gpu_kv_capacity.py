"""KV memory shares per window size and the capacity the engine's startup log implies."""

from __future__ import annotations

import pytest

from build_engine.gpu import kv_capacity as kv
from build_engine.gpu.settings import PROFILES
from gemma3_core import constants as C

A = C.GEMMA3_27B


def test_layers_per_window_cover_every_layer() -> None:
    assert kv.layers_per_window(PROFILES["latency"]) == {1024: 52, 131072: 10}
    assert kv.layers_per_window(PROFILES["throughput"]) == {1024: 52, 32768: 10}


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_shares_fit_a_full_batch_of_windows_and_give_the_rest_to_global_layers(name: str) -> None:
    p = PROFILES[name]
    sliding, glob = kv.window_size_shares(p)
    assert sliding + glob == pytest.approx(1.0) and sliding > 0 and glob > 0
    per_layer = kv.kv_bytes_per_token_layer()
    sliding_tokens = sliding * kv.REFERENCE_KV_BYTES / (52 * per_layer)
    assert sliding_tokens >= p.max_batch_size * (A.sliding_window + kv.TOKENS_PER_BLOCK)
    # Never more than a few blocks per sequence of slack: the rest goes to the global layers.
    assert sliding_tokens < p.max_batch_size * (A.sliding_window + kv.TOKENS_PER_BLOCK) * 1.02


def test_latency_profile_doubles_128k_capacity_over_the_equal_split() -> None:
    p = PROFILES["latency"]
    per_seq_global = 10 * kv.kv_bytes_per_token_layer() * p.max_seq_len
    equal = 0.5 * kv.REFERENCE_KV_BYTES / per_seq_global
    ours = kv.window_size_shares(p)[1] * kv.REFERENCE_KV_BYTES / per_seq_global
    assert equal < 2.5 and ours > 4.4 and ours / equal > 1.8


def test_small_pool_falls_back_to_proportional_split() -> None:
    p = PROFILES["throughput"]
    shares = kv.window_size_shares(p, kv_bytes=10 * 10**9)  # 64 windows would need more than everything
    need_s = 52 * (1024 + kv.TOKENS_PER_BLOCK)
    need_g = 10 * p.max_seq_len
    assert shares[0] == pytest.approx(need_s / (need_s + need_g), abs=1e-3)


def test_env_value_is_what_compose_and_env_example_carry() -> None:
    assert kv.default_shares_env("latency") == "0.07,0.93"
    assert kv.shares_env_value([0.5, 0.5]) == "0.5,0.5"


LOG = """
[TensorRT-LLM][INFO] Number of tokens per block: 32.
[TensorRT-LLM][INFO] Blocks per window size:
[TensorRT-LLM][INFO] [windowSize=1024] {.primaryBlocks=9840, .secondaryBlocks=0}
[TensorRT-LLM][INFO] [windowSize=131072] {.primaryBlocks=152000, .secondaryBlocks=0}
[TensorRT-LLM][INFO] Max KV cache blocks per sequence: 4096
"""


def test_parse_blocks_per_window_and_capacity() -> None:
    blocks = kv.parse_blocks_per_window(LOG)
    assert blocks == {1024: 9840, 131072: 152000}
    assert kv.parse_tokens_per_block(LOG) == 32
    caps = kv.capacity_from_blocks(blocks, PROFILES["latency"])
    assert [c.window for c in caps] == [1024, 131072]
    assert caps[1].tokens == 152000 * 32 and caps[1].sequences_at_max_len == pytest.approx(37.1, abs=0.1)
    assert caps[0].sequences_at_max_len == pytest.approx(9840 * 32 / 1056)
    assert kv.concurrent_max_len_sequences(caps) == caps[1].sequences_at_max_len
    assert kv.parse_blocks_per_window("no such line") == {}
    other = "Blocks per window size:\n [windowSize=1024] {.primaryBlocks=7, .secondaryBlocks=1}\n"
    assert kv.parse_blocks_per_window(other) == {1024: 7}
