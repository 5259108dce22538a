"""Gemma 3 facts shared by the gateway, the Triton Python models and the build scripts.

Token ids are those of the Gemma 3 SentencePiece vocabulary (identical for 270M and 27B);
`<image_soft_token>` (262144) is the one token the multimodal checkpoints add on top of it.
"""

from __future__ import annotations

from dataclasses import dataclass

# --- special tokens -------------------------------------------------------------------------------
PAD_ID = 0
EOS_ID = 1
BOS_ID = 2
START_OF_TURN_ID = 105
END_OF_TURN_ID = 106
NEWLINE_ID = 107
BOI_ID = 255999  # <start_of_image>
EOI_ID = 256000  # <end_of_image>
IMAGE_SOFT_TOKEN_ID = 262144  # <image_soft_token>, added after the 262144-piece SentencePiece vocab

BOS = "<bos>"
EOS = "<eos>"
START_OF_TURN = "<start_of_turn>"
END_OF_TURN = "<end_of_turn>"
START_OF_IMAGE = "<start_of_image>"
END_OF_IMAGE = "<end_of_image>"
IMAGE_SOFT_TOKEN = "<image_soft_token>"

# The instruction-tuned models end a turn with <end_of_turn> and sometimes <eos>: stop on both
# (generation_config.json `eos_token_id: [1, 106]`).
DEFAULT_STOP_IDS: tuple[int, ...] = (EOS_ID, END_OF_TURN_ID)

# Number of SentencePiece pieces (ids 0..262143); the tokenizer is 262145 long with the image token.
SENTENCEPIECE_VOCAB = 262144

# --- images ---------------------------------------------------------------------------------------
IMAGE_SIZE = 896
PATCH_SIZE = 14
MM_TOKENS_PER_IMAGE = 256
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)
RESCALE_FACTOR = 1 / 255
# Pan-and-scan defaults of Gemma3Processor (off unless asked for).
PAN_AND_SCAN_MIN_CROP_SIZE = 256
PAN_AND_SCAN_MAX_NUM_CROPS = 4
PAN_AND_SCAN_MIN_RATIO_TO_ACTIVATE = 1.2

# What HF's Gemma3Processor substitutes for every <start_of_image> in the rendered prompt.
FULL_IMAGE_SEQUENCE = f"\n\n{START_OF_IMAGE}{IMAGE_SOFT_TOKEN * MM_TOKENS_PER_IMAGE}{END_OF_IMAGE}\n\n"


# --- the served checkpoints -----------------------------------------------------------------------
@dataclass(frozen=True)
class TextArch:
    """The language-model facts the build and the engines need (HF `text_config`)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    query_pre_attn_scalar: int
    sliding_window: int
    sliding_window_pattern: int
    rope_theta: float
    rope_local_base_freq: float
    rope_linear_factor: float | None
    max_position_embeddings: int

    def is_global_layer(self, layer_idx: int) -> bool:
        # Gemma 3: every `pattern`-th layer (5, 11, ...) attends globally; the others use the window.
        return (layer_idx + 1) % self.sliding_window_pattern == 0

    def attention_window_pattern(self, max_seq_len: int) -> list[int]:
        """One period of TensorRT-LLM's per-layer `max_attention_window_size` list."""
        return [
            max_seq_len if self.is_global_layer(i) else self.sliding_window
            for i in range(self.sliding_window_pattern)
        ]


GEMMA3_27B = TextArch(
    hidden_size=5376,
    num_layers=62,
    num_heads=32,
    num_kv_heads=16,
    head_dim=128,
    intermediate_size=21504,
    vocab_size=262208,
    query_pre_attn_scalar=168,
    sliding_window=1024,
    sliding_window_pattern=6,
    rope_theta=1_000_000.0,
    rope_local_base_freq=10_000.0,
    rope_linear_factor=8.0,
    max_position_embeddings=131072,
)

GEMMA3_270M = TextArch(
    hidden_size=640,
    num_layers=18,
    num_heads=4,
    num_kv_heads=1,
    head_dim=256,
    intermediate_size=2048,
    vocab_size=262144,
    query_pre_attn_scalar=256,
    sliding_window=512,
    sliding_window_pattern=6,
    rope_theta=1_000_000.0,
    rope_local_base_freq=10_000.0,
    rope_linear_factor=None,
    max_position_embeddings=32768,
)

# Model ids the gateway serves.
MODEL_CARD_ID = "ISTA-DASLab/gemma-3-27b-it-GPTQ-4b-128g"
MODEL_CARD_SLUG = "ista-daslab-gemma-3-27b-it-gptq-4b-128g"
CPU_MODEL_ID = "gemma-3-270m"
