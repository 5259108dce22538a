"""KV memory shares per window size and the capacity the engine's startup log implies."""

from __future__ import annotations

from pathlib import Path

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


# --- capacity per GPU (docs/scale.md) ------------------------------------------------------------------
DOCS = Path(__file__).resolve().parents[1] / "docs" / "scale.md"


def test_kv_pool_is_the_profile_fraction_of_what_weights_and_runtime_leave() -> None:
    # 0.9 x (80 - 17 - 4) GB; 0.92 x (48 - 21) GB
    assert kv.kv_pool_bytes(80 * 10**9, PROFILES["latency"]) == 53_100_000_000
    assert kv.kv_pool_bytes(48 * 10**9, PROFILES["throughput"]) == 24_840_000_000


def test_concurrent_sequences_hand_checked() -> None:
    lat = PROFILES["latency"]
    pool = 53_100_000_000  # 80 GB, latency
    # Global pool: 0.93 x 53.1e9 B / (10 layers x 32 tokens x 8 KiB) = 18838 blocks; 128k = 4096 blocks.
    assert kv.concurrent_sequences(pool, [0.07, 0.93], 131_072, lat) == 4
    # Equal halves: 26.55e9 B / 2621440 B = 10128 blocks -> 2 sequences of 128k.
    assert kv.concurrent_sequences(pool, [0.5, 0.5], 131_072, lat) == 2
    # 32k needs 1024 global blocks (18 fit) and 33 sliding ones (272 blocks: 8 fit): max_batch_size caps at 8.
    assert kv.concurrent_sequences(pool, [0.07, 0.93], 32_768, lat) == lat.max_batch_size
    # 48 GB: the sliding pool decides: 0.07 x 24.3e9 B / (52 x 32 x 8 KiB) = 124 blocks / 33 per sequence.
    assert kv.concurrent_sequences(24_300_000_000, [0.07, 0.93], 4096, lat) == 3
    # Throughput on 80 GB at 32k: 0.446 x 54.28e9 B = 9234 global blocks / 1024 per sequence.
    thr = PROFILES["throughput"]
    assert kv.concurrent_sequences(54_280_000_000, [0.554, 0.446], 32_768, thr) == 9
    # Short sequences: no spare block in the sliding pool (a 512-token one is 16 blocks everywhere).
    assert kv.concurrent_sequences(54_280_000_000, [0.554, 0.446], 512, thr) == thr.max_batch_size
    assert kv.concurrent_sequences(54_280_000_000, [0.554, 0.446], 131_072, thr) == 0  # beyond max_seq_len
    with pytest.raises(ValueError, match="window sizes"):
        kv.concurrent_sequences(pool, [1.0], 4096, lat)


def test_sequence_tokens_add_one_block_only_beyond_the_window() -> None:
    assert kv.sequence_tokens(1000, 1024) == 1000
    assert kv.sequence_tokens(1024, 1024) == 1024
    assert kv.sequence_tokens(4096, 1024) == 1024 + kv.TOKENS_PER_BLOCK
    assert kv.sequence_tokens(4096, 131_072) == 4096


def test_docs_show_the_generated_capacity_table() -> None:
    text = DOCS.read_text()
    assert kv.DOC_BEGIN in text and kv.DOC_END in text, f"{DOCS} lost its generated capacity table"
    shown = text.split(kv.DOC_BEGIN, 1)[1].split(kv.DOC_END, 1)[0].strip("\n")
    regenerate = "regenerate it with `python -m build_engine.gpu.kv_capacity`"
    assert shown == kv.capacity_markdown(), f"{DOCS} is stale: {regenerate}"
    # The shares shown are the ones compose (latency) and .env.example (throughput) carry.
    assert "latency (0.07, 0.93)" in shown
    assert f"throughput ({kv.default_shares_env('throughput').replace(',', ', ')})" in shown


def test_cli_prints_the_doc_block_and_shares_for_a_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    assert kv.main([]) == 0
    assert capsys.readouterr().out == f"{kv.DOC_BEGIN}\n{kv.capacity_markdown()}\n{kv.DOC_END}\n"
    assert kv.main(["--gpu-gb", "48", "--profile", "latency"]) == 0
    out = capsys.readouterr().out.splitlines()
    pool = kv.kv_pool_bytes(48 * 10**9, PROFILES["latency"])
    shares = kv.window_size_shares(PROFILES["latency"], kv_bytes=pool)
    assert out[0] == f"{kv.ENV_VAR}={kv.shares_env_value(shares)}"
    # Sized for this pool, the sliding share holds a full batch of windows again.
    assert out[1] == f"# concurrent sequences at 4k: {PROFILES['latency'].max_batch_size}"
