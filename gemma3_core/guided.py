"""Gemma 3's vocabulary as grammar engines need it, and the tokenizer file TensorRT-LLM's xgrammar reads.

Special tokens (`<start_of_turn>`, `<unusedN>`, `<start_of_image>`, …) get an empty string in the vocab
handed to xgrammar, which makes it treat them as special: they can never appear inside the constrained
text (otherwise a JSON string could contain `<start_of_turn>`). Stop tokens stay allowed by id
(`<eos>`=1, `<end_of_turn>`=106) once the grammar is complete. The CPU engine's xgrammar wiring is
`cpu_engine.guided`; the GPU backend reads the file written by `write_xgrammar_tokenizer_info`.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer

from gemma3_core import constants as C

_CONTROL_TOKENS = frozenset({C.START_OF_IMAGE, C.END_OF_IMAGE, C.IMAGE_SOFT_TOKEN, "[multimodal]"})


def encoded_vocab(path: str) -> tuple[list[str], str]:
    """(encoded vocab indexed by id, serialized backend tokenizer) of a HF `tokenizer.json`."""
    tok = Tokenizer.from_file(path)
    vocab = tok.get_vocab(with_added_tokens=True)
    encoded = [""] * (max(vocab.values()) + 1)
    for piece, idx in vocab.items():
        encoded[idx] = piece
    # xgrammar treats empty-string tokens as special: never part of the constrained text. The image
    # markers are not flagged special in tokenizer.json, but they are control tokens all the same.
    for idx, added in tok.get_added_tokens_decoder().items():
        if (added.special or added.content in _CONTROL_TOKENS) and idx < len(encoded):
            encoded[idx] = ""
    return encoded, tok.to_str()


def write_xgrammar_tokenizer_info(
    tokenizer_json: str | Path,
    out_path: str | Path,
    stop_token_ids: tuple[int, ...] = C.DEFAULT_STOP_IDS,
) -> Path:
    """Write the JSON file named by the tensorrt_llm model's `xgrammar_tokenizer_info_path` parameter.

    The C++ backend reads exactly three keys (tensorrtllm_backend `model_instance_state.cc`,
    `getGuidedDecodingConfigFromParams`): `encoded_vocab` (token strings by id), `tokenizer_str`
    (the serialized HF fast tokenizer, used by xgrammar to detect the vocab type) and
    `stop_token_ids`. NVIDIA's `examples/generate_xgrammar_tokenizer_info.py` writes the same keys from
    `AutoTokenizer`; we differ on purpose in two points: both Gemma stop ids (1, 106), and special
    tokens blanked (see the module docstring). The model's padded vocab size comes from the engine.
    """
    encoded, backend_str = encoded_vocab(str(tokenizer_json))
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"encoded_vocab": encoded, "tokenizer_str": backend_str, "stop_token_ids": list(stop_token_ids)}
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, ensure_ascii=False), encoding="utf-8")
    tmp.replace(out)
    return out
