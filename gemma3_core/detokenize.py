"""Token ids -> exact UTF-8 bytes, statelessly, and incremental UTF-8 decoding for consumers.

Gemma's tokenizer decodes with `Replace("▁", " ")`, `ByteFallback`, `Fuse` and no `Strip`, so the text of a
sequence is the concatenation of its tokens' bytes: decoding chunk by chunk and joining the bytes is
byte-identical to decoding everything at once. Only byte-fallback tokens (`<0xE4>`…) can split one character
over two chunks; those bytes travel as they are and an incremental UTF-8 decoder joins them.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Iterable
from typing import SupportsInt

from tokenizers import Tokenizer

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class ByteDetokenizer:
    """Precomputed id -> bytes table; special tokens decode to nothing (skip_special_tokens=True)."""

    def __init__(self, tok: Tokenizer) -> None:
        special = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
        table: list[bytes] = [b""] * tok.get_vocab_size(with_added_tokens=True)
        for piece, idx in tok.get_vocab(with_added_tokens=True).items():
            if piece in special:
                continue
            m = _BYTE_PIECE.match(piece)
            table[idx] = bytes([int(m.group(1), 16)]) if m else piece.replace("▁", " ").encode("utf-8")
        self._table = table

    def __len__(self) -> int:
        return len(self._table)

    def token_bytes(self, ids: Iterable[SupportsInt]) -> bytes:
        table, n = self._table, len(self._table)
        # Ids past the tokenizer (embedding padding rows of the 27B) decode to nothing, never raise.
        return b"".join([table[i] if 0 <= i < n else b"" for i in map(int, ids)])


class IncrementalText:
    """Bytes in, text out: holds back an incomplete UTF-8 sequence until its last byte arrives."""

    def __init__(self) -> None:
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, data: bytes) -> str:
        return self._dec.decode(data)

    def flush(self) -> str:
        # A sequence cut short by the end of generation becomes U+FFFD, as a full decode would give.
        return self._dec.decode(b"", final=True)
