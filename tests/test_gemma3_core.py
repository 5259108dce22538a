"""The shared Gemma 3 package: chat template vs the official Jinja, exact detokenization, word lists."""

from __future__ import annotations

import jinja2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gemma3_core import constants as C
from gemma3_core.chat_template import REFERENCE_TEMPLATE, TemplateError, expand_image_markers, render_chat
from gemma3_core.detokenize import ByteDetokenizer, IncrementalText
from gemma3_core.preprocess import PrepError, prepare_request
from gemma3_core.tokenizer import encode
from gemma3_core.words import encode_words, from_word_list, to_word_list


def _jinja(messages: list[dict], add_generation_prompt: bool = True) -> str:
    def raise_exception(msg: str) -> None:
        raise jinja2.TemplateError(msg)

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(REFERENCE_TEMPLATE.read_text()).render(
        messages=messages, bos_token=C.BOS, add_generation_prompt=add_generation_prompt
    )


text = st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=40)
part = st.one_of(
    st.builds(lambda t: {"type": "text", "text": t}, text),
    st.just({"type": "image"}),
)
content = st.one_of(text, st.lists(part, min_size=1, max_size=4))


@st.composite
def conversations(draw: st.DrawFn) -> list[dict]:
    msgs: list[dict] = []
    if draw(st.booleans()):
        msgs.append(
            {
                "role": "system",
                "content": draw(
                    st.one_of(
                        text, st.lists(part.filter(lambda p: p["type"] == "text"), min_size=1, max_size=2)
                    )
                ),
            }
        )
    for i in range(draw(st.integers(1, 5))):
        msgs.append({"role": "user" if i % 2 == 0 else "assistant", "content": draw(content)})
    return msgs


@settings(max_examples=300, deadline=None)
@given(conversations(), st.booleans())
def test_template_equals_official_jinja(messages: list[dict], gen: bool) -> None:
    assert render_chat(messages, add_generation_prompt=gen) == _jinja(messages, gen)


def test_template_known_rendering() -> None:
    got = render_chat(
        [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": [{"type": "text", "text": " Describe "}, {"type": "image"}]},
            {"role": "assistant", "content": "A cat. "},
            {"role": "user", "content": "Thanks"},
        ]
    )
    assert got == (
        "<bos><start_of_turn>user\nYou are a helpful assistant.\n\nDescribe<start_of_image><end_of_turn>\n"
        "<start_of_turn>model\nA cat.<end_of_turn>\n"
        "<start_of_turn>user\nThanks<end_of_turn>\n<start_of_turn>model\n"
    )


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ([{"role": "assistant", "content": "hi"}], "messages[0].role"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "messages[1].role"),
        ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "x"}], "messages[1].role"),
        ([{"role": "user", "content": None}], "messages[0].content"),
        ([], "messages"),
    ],
)
def test_template_rejections_name_the_field(messages: list[dict], param: str) -> None:
    with pytest.raises(TemplateError) as err:
        render_chat(messages)
    assert err.value.param == param


def test_image_expansion_token_count(tokenizer) -> None:
    prompt = render_chat(
        [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, {"type": "image"}]}]
    )
    ids = encode(tokenizer, expand_image_markers(prompt))
    assert ids.count(C.IMAGE_SOFT_TOKEN_ID) == C.MM_TOKENS_PER_IMAGE
    assert ids.count(C.BOI_ID) == 1 and ids.count(C.EOI_ID) == 1
    assert ids[0] == C.BOS_ID and ids.count(C.BOS_ID) == 1


def test_special_token_ids(tokenizer) -> None:
    for tok, idx in [
        (C.BOS, C.BOS_ID),
        (C.EOS, C.EOS_ID),
        (C.START_OF_TURN, C.START_OF_TURN_ID),
        (C.END_OF_TURN, C.END_OF_TURN_ID),
        (C.START_OF_IMAGE, C.BOI_ID),
        (C.END_OF_IMAGE, C.EOI_ID),
        (C.IMAGE_SOFT_TOKEN, C.IMAGE_SOFT_TOKEN_ID),
    ]:
        assert tokenizer.token_to_id(tok) == idx


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, C.IMAGE_SOFT_TOKEN_ID), min_size=1, max_size=30))
def test_byte_detokenizer_matches_hf_decode(tokenizer, detok: ByteDetokenizer, ids: list[int]) -> None:
    data = detok.token_bytes(ids)
    expected = tokenizer.decode(ids, skip_special_tokens=True)
    try:
        assert data.decode("utf-8") == expected
    except UnicodeDecodeError:
        # Invalid byte runs: HF replaces the whole run, Python each bad byte; the bytes stay exact.
        assert "\ufffd" in expected
        return
    # Chunked decoding (any split) joins to the same bytes and, incrementally, the same text.
    cut = len(ids) // 2
    inc = IncrementalText()
    out = inc.feed(detok.token_bytes(ids[:cut])) + inc.feed(detok.token_bytes(ids[cut:])) + inc.flush()
    assert out == expected


@pytest.fixture(scope="session")
def detok(tokenizer) -> ByteDetokenizer:  # building the id -> bytes table takes ~0.3 s: once
    return ByteDetokenizer(tokenizer)


def test_detokenizer_split_multibyte_character(tokenizer, detok: ByteDetokenizer) -> None:
    # "🦊" needs byte fallback: its UTF-8 bytes are separate tokens.
    ids = encode(tokenizer, "fox 🦊!")
    chunks = [detok.token_bytes([i]) for i in ids]
    inc = IncrementalText()
    pieces = [inc.feed(c) for c in chunks] + [inc.flush()]
    assert "".join(pieces) == "fox 🦊!"
    assert all("\ufffd" not in p for p in pieces)


def test_word_lists_round_trip(tokenizer) -> None:
    arr = encode_words(tokenizer, ["<end_of_turn>", "hello world", ""], extra_ids=[C.EOS_ID])
    words = from_word_list(arr)
    assert words[0] == [C.END_OF_TURN_ID]  # no <bos> in front (the classic [2, 106] bug)
    assert words[-1] == [C.EOS_ID]
    assert len(words) == 3
    assert arr.dtype == np.int32 and arr.shape[0] == 2
    empty = to_word_list([])
    assert from_word_list(empty) == []


def test_prepare_request_rules(tokenizer) -> None:
    prompt = render_chat([{"role": "user", "content": "hi"}])
    p = prepare_request(tokenizer, prompt, 16, max_seq_len=64, engine_vocab_size=C.GEMMA3_270M.vocab_size)
    assert p.input_ids[0] == C.BOS_ID and list(p.input_ids).count(C.BOS_ID) == 1
    assert p.end_id == C.END_OF_TURN_ID and from_word_list(p.stop_words) == [[C.EOS_ID]]
    clamped = prepare_request(
        tokenizer, prompt, 1000, max_seq_len=64, engine_vocab_size=C.GEMMA3_270M.vocab_size
    )
    assert clamped.output_len == 64 - len(p.input_ids)
    for bad, msg in [("", "empty"), (prompt + C.IMAGE_SOFT_TOKEN, "image"), (prompt * 20, "context")]:
        with pytest.raises(PrepError, match=msg):
            prepare_request(tokenizer, bad, 8, max_seq_len=64, engine_vocab_size=C.GEMMA3_270M.vocab_size)
