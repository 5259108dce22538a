"""Stop/bad words in TensorRT-LLM's `[2, N]` list format.

Row 0 holds the token ids of all words back to back (padded with 0), row 1 the cumulative end offset of
each word (padded with -1). Words are tokenized without special tokens: a `<bos>` in front of
`<end_of_turn>` would make the list `[2, 106]`, which never matches.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from tokenizers import Tokenizer

from gemma3_core.tokenizer import encode


def to_word_list(word_ids: Sequence[Sequence[int]]) -> npt.NDArray[np.int32]:
    flat: list[int] = []
    offsets: list[int] = []
    for ids in word_ids:
        if not ids:
            continue
        flat.extend(int(i) for i in ids)
        offsets.append(len(flat))
    width = max(len(flat), len(offsets), 1)
    out = np.zeros((2, width), dtype=np.int32)
    out[1, :] = -1
    out[0, : len(flat)] = flat
    out[1, : len(offsets)] = offsets
    return out


def from_word_list(arr: npt.NDArray[np.integer[Any]]) -> list[list[int]]:
    """Inverse of `to_word_list` (accepts `[2, N]` or `[1, 2, N]`)."""
    arr = np.asarray(arr).reshape(2, -1)
    words: list[list[int]] = []
    start = 0
    for end in arr[1]:
        if end < 0:
            break
        words.append([int(i) for i in arr[0, start:end]])
        start = int(end)
    return words


def encode_words(
    tok: Tokenizer, words: Iterable[str], extra_ids: Iterable[int] = ()
) -> npt.NDArray[np.int32]:
    ids = [encode(tok, w) for w in words if w]
    ids.extend([int(i)] for i in extra_ids)
    return to_word_list(ids)
