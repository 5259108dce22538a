"""Loading and using the Gemma 3 fast tokenizer (`tokenizer.json`) without transformers.

The gateway and the Triton Python models only need the Rust `tokenizers` library: the prompt arrives
already rendered by the chat template (it starts with `<bos>`), so nothing may add special tokens again.
"""

from __future__ import annotations

import functools
from pathlib import Path

from tokenizers import Tokenizer

from gemma3_core import constants as C


@functools.lru_cache(maxsize=4)
def load_tokenizer(tokenizer_dir: str | Path) -> Tokenizer:
    path = Path(tokenizer_dir)
    file = path if path.is_file() else path / "tokenizer.json"
    if not file.exists():
        raise FileNotFoundError(f"no tokenizer.json at {file} (run `python -m build_engine cpu` first)")
    tok = Tokenizer.from_file(str(file))
    # The rendered prompt is the whole truth: no BOS/EOS templates, no truncation, no padding.
    tok.no_truncation()
    tok.no_padding()
    if tok.token_to_id(C.IMAGE_SOFT_TOKEN) != C.IMAGE_SOFT_TOKEN_ID:
        raise ValueError(
            f"{file}: {C.IMAGE_SOFT_TOKEN} must have id {C.IMAGE_SOFT_TOKEN_ID} as in Gemma 3 27B"
        )
    return tok


def encode(tok: Tokenizer, text: str) -> list[int]:
    """Token ids of `text` as-is (special-token strings in it are recognised, none are added)."""
    return tok.encode(text, add_special_tokens=False).ids
