"""From a rendered prompt (+ images) to the tensors TensorRT-LLM's engine takes: shared by Triton's
`preprocessing` model and tests, so the rules live in one place.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from tokenizers import Tokenizer

from gemma3_core import constants as C
from gemma3_core.chat_template import expand_image_markers
from gemma3_core.tokenizer import encode
from gemma3_core.words import encode_words


class PrepError(ValueError):
    """The request cannot be served as sent; the message is meant for the client."""


@dataclass
class Prepared:
    input_ids: npt.NDArray[np.int32]  # [n]
    output_len: int
    stop_words: npt.NDArray[np.int32]  # [2, k]
    bad_words: npt.NDArray[np.int32]  # [2, k]
    end_id: int
    pad_id: int
    pixel_values: npt.NDArray[np.float32] | None = None  # [images(+crops), 3, 896, 896]
    extra_ids: npt.NDArray[np.uint64] | None = None  # [n]: image content hash on image rows, 0 elsewhere


def prepare_request(
    tok: Tokenizer,
    prompt: str,
    max_tokens: int,
    *,
    max_seq_len: int,
    engine_vocab_size: int,
    stop_words: Sequence[str] = (),
    bad_words: Sequence[str] = (),
    end_id: int | None = None,
    pad_id: int | None = None,
    images: Sequence[bytes] = (),
) -> Prepared:
    if not prompt:
        raise PrepError("text_input is empty")
    if max_tokens <= 0:
        raise PrepError(f"max_tokens must be at least 1, got {max_tokens}")
    end = C.END_OF_TURN_ID if end_id is None else int(end_id)
    pad = C.PAD_ID if pad_id is None else int(pad_id)

    n_markers = prompt.count(C.START_OF_IMAGE)
    if n_markers != len(images):
        raise PrepError(
            f"text_input has {n_markers} {C.START_OF_IMAGE} marker(s) but {len(images)} image(s) were sent"
        )
    pixel_values = extra = None
    if images:
        # Imported lazily: text-only deployments need neither Pillow decoding nor the image code path.
        from gemma3_core.images import (
            ImageError,
            expand_image_placeholders,
            image_content_hash,
            preprocess_image_bytes,
        )

        try:
            pixel_values = np.concatenate([preprocess_image_bytes(data).pixel_values for data in images])
        except ImageError as exc:
            raise PrepError(str(exc)) from exc
        ids = encode(tok, expand_image_markers(prompt))
        ids, extra_list = expand_image_placeholders(
            ids, engine_vocab_size, [image_content_hash(d) for d in images]
        )
        extra = np.asarray(extra_list, dtype=np.uint64)
    else:
        ids = encode(tok, prompt)
        if any(i >= engine_vocab_size for i in ids):
            # e.g. a literal "<image_soft_token>" typed by a user: the engine would read a prompt-table row.
            raise PrepError(f"text_input contains {C.IMAGE_SOFT_TOKEN} without an image")

    if len(ids) >= max_seq_len:
        raise PrepError(f"prompt has {len(ids)} tokens; the context is {max_seq_len} tokens")
    # Like TensorRT-LLM, clamp the budget to what fits rather than failing a long generation late.
    output_len = min(max_tokens, max_seq_len - len(ids))

    # <eos> always stops too (the model ends turns with <end_of_turn> and sometimes <eos>).
    default_stop = [i for i in C.DEFAULT_STOP_IDS if i != end]
    return Prepared(
        input_ids=np.asarray(ids, dtype=np.int32),
        output_len=output_len,
        stop_words=encode_words(tok, stop_words, extra_ids=default_stop),
        bad_words=encode_words(tok, bad_words),
        end_id=end,
        pad_id=pad,
        pixel_values=pixel_values,
        extra_ids=extra,
    )
