"""xgrammar guided decoding with the real Gemma 3 tokenizer: masked random "models" must emit valid JSON."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch
import xgrammar as xgr
from tokenizers import Tokenizer

from build_engine.cpu import CpuArtifacts
from cpu_engine.guided import (
    GuidedDecoder,
    check_guide,
    compile_guide,
    tokenizer_info_from_tokenizer_json,
)
from gemma3_core import constants as C
from gemma3_core.guided import write_xgrammar_tokenizer_info
from gemma3_core.tool_parser import parse_tool_calls
from gemma3_core.tool_prompt import guided_decoding_for

VOCAB = C.GEMMA3_27B.vocab_size  # wider than the tokenizer: padding rows must stay masked


@pytest.fixture(scope="module")
def tokenizer_json(cpu_artifacts: CpuArtifacts) -> Path:
    """GEMMA3_TOKENIZER_JSON if set, else the prepared CPU model's tokenizer (prepared on first use)."""
    explicit = os.environ.get("GEMMA3_TOKENIZER_JSON")
    path = Path(explicit) if explicit else cpu_artifacts.tokenizer_dir / "tokenizer.json"
    assert path.is_file(), f"no Gemma 3 tokenizer.json at {path}"
    return path


@pytest.fixture(scope="module")
def tok(tokenizer_json: Path) -> Tokenizer:
    return Tokenizer.from_file(str(tokenizer_json))


@pytest.fixture(scope="module")
def info(tokenizer_json: Path) -> Any:
    return tokenizer_info_from_tokenizer_json(tokenizer_json, VOCAB)


@pytest.fixture(scope="module")
def closers(tok: Tokenizer) -> torch.Tensor:
    """Ids of short structural tokens; boosting them makes a random walk finish quickly."""
    ids = [tok.token_to_id(p) for p in ('"', "}", "]", '"}', "}]", "}}", '"]', ",", "0", "1", "true")]
    return torch.tensor([i for i in ids if i is not None] + list(C.DEFAULT_STOP_IDS))


def _generate(
    dec: GuidedDecoder, tok: Tokenizer, closers: torch.Tensor, seed: int, max_steps: int = 400
) -> str:
    gen = torch.Generator().manual_seed(seed)
    out: list[int] = []
    for _ in range(max_steps):
        logits = torch.randn(VOCAB, generator=gen)
        logits[closers] += 4.0  # random, but biased towards finishing
        dec.apply_bitmask(logits)
        assert torch.isinf(logits[C.SENTENCEPIECE_VOCAB :]).all(), "padding ids must never be allowed"
        token = int(torch.argmax(logits))
        assert dec.accept_token(token), token
        if dec.is_terminated():
            assert token in C.DEFAULT_STOP_IDS
            return tok.decode(out, skip_special_tokens=False)
        out.append(token)
    raise AssertionError(f"no termination in {max_steps} steps: {tok.decode(out)!r}")


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 12},
                    "unit": {"enum": ["celsius", "fahrenheit"]},
                    "days": {"type": "integer", "minimum": 1, "maximum": 7},
                },
                "required": ["city", "unit"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "set_alarm",
            "parameters": {
                "type": "object",
                "properties": {"hour": {"type": "integer"}, "label": {"type": "string", "maxLength": 8}},
                "required": ["hour"],
            },
        },
    },
]


def test_tokenizer_info(info: Any, tok: Tokenizer, tokenizer_json: Path) -> None:
    assert info.vocab_size == VOCAB
    assert info.vocab_type == xgr.VocabType.BYTE_FALLBACK
    assert sorted(info.stop_token_ids) == sorted(C.DEFAULT_STOP_IDS)
    special = set(info.special_token_ids)
    assert C.START_OF_TURN_ID in special and C.BOI_ID in special  # blanked: never inside constrained text
    assert C.NEWLINE_ID not in special
    # Cached: the same object for the same arguments.
    assert tokenizer_info_from_tokenizer_json(str(tokenizer_json), VOCAB) is info


@pytest.mark.parametrize("seed", range(4))
def test_required_tool_calls_validate_and_parse(
    info: Any, tok: Tokenizer, closers: torch.Tensor, seed: int
) -> None:
    guide = guided_decoding_for(TOOLS, "required", None)
    assert guide is not None
    text = _generate(GuidedDecoder.create(*guide, info), tok, closers, seed)
    value = json.loads(text)
    jsonschema.validate(value, json.loads(guide[1]))
    parsed = parse_tool_calls(text, TOOLS)
    assert parsed.content is None and len(parsed.calls) == len(value) >= 1
    by_name = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for call in parsed.calls:
        jsonschema.validate(json.loads(call.arguments_json), by_name[call.name])


def test_named_tool_call(info: Any, tok: Tokenizer, closers: torch.Tensor) -> None:
    guide = guided_decoding_for(TOOLS, {"type": "function", "function": {"name": "set_alarm"}}, None)
    assert guide is not None
    text = _generate(GuidedDecoder.create(*guide, info), tok, closers, seed=7)
    parsed = parse_tool_calls(text, TOOLS)
    assert [c.name for c in parsed.calls] == ["set_alarm"]
    jsonschema.validate(json.loads(text), json.loads(guide[1]))


def test_response_format_json_schema(info: Any, tok: Tokenizer, closers: torch.Tensor) -> None:
    schema = {
        "type": "object",
        "properties": {
            "ok": {"type": "boolean"},
            "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 2},
        },
        "required": ["ok", "tags"],
        "additionalProperties": False,
    }
    guide = guided_decoding_for(
        None, None, {"type": "json_schema", "json_schema": {"name": "r", "schema": schema}}
    )
    assert guide is not None
    for seed in range(2):
        jsonschema.validate(
            json.loads(_generate(GuidedDecoder.create(*guide, info), tok, closers, seed)), schema
        )


def test_json_object_and_builtin_json(info: Any, tok: Tokenizer, closers: torch.Tensor) -> None:
    guide = guided_decoding_for(None, None, {"type": "json_object"})
    assert guide is not None
    assert isinstance(json.loads(_generate(GuidedDecoder.create(*guide, info), tok, closers, 3)), dict)
    json.loads(_generate(GuidedDecoder.create("json", "", info), tok, closers, 4))


def test_regex_and_bf16_logits(info: Any, tok: Tokenizer) -> None:
    dec = GuidedDecoder.create("regex", r"(yes|no)", info)
    logits = torch.randn(VOCAB).to(torch.bfloat16)
    dec.apply_bitmask(logits)
    allowed = torch.nonzero(~torch.isinf(logits.float())).flatten().tolist()
    texts = [tok.decode([i]) for i in allowed]
    assert texts and all(t and ("yes".startswith(t) or "no".startswith(t)) for t in texts)


def test_grammar_cache_and_errors(info: Any) -> None:
    assert compile_guide("json_schema", '{"type": "object"}', info) is compile_guide(
        "json_schema", '{"type": "object"}', info
    )
    with pytest.raises(ValueError, match="unknown guided_decoding_guide_type"):
        compile_guide("xml", "", info)
    with pytest.raises(ValueError):
        check_guide("json_schema", "{not json")
    with pytest.raises(ValueError):
        check_guide("regex", "(")
    check_guide("json_schema", '{"type": "array", "items": {"const": "x"}}')


def test_write_xgrammar_tokenizer_info(tmp_path: Path, tok: Tokenizer, tokenizer_json: Path) -> None:
    out = write_xgrammar_tokenizer_info(tokenizer_json, tmp_path / "xgrammar_tokenizer_info.json")
    data = json.loads(out.read_text(encoding="utf-8"))
    assert set(data) == {"encoded_vocab", "tokenizer_str", "stop_token_ids"}
    assert data["stop_token_ids"] == list(C.DEFAULT_STOP_IDS)
    assert len(data["encoded_vocab"]) == tok.get_vocab_size(with_added_tokens=True)
    assert data["encoded_vocab"][C.START_OF_TURN_ID] == ""
    assert data["encoded_vocab"][C.NEWLINE_ID] == "\n"
    # What TensorRT-LLM's C++ side does with it: TokenizerInfo.from_huggingface(vocab, tokenizer_str, ...).
    rebuilt = xgr.TokenizerInfo(
        data["encoded_vocab"],
        xgr.TokenizerInfo._detect_metadata_from_hf(data["tokenizer_str"])["vocab_type"],
        vocab_size=VOCAB,
        stop_token_ids=data["stop_token_ids"],
    )
    assert rebuilt.vocab_type == xgr.VocabType.BYTE_FALLBACK
