"""xgrammar guided decoding for the CPU reference engine: grammars compiled once, bitmasks per row.

The reference engine accepts the same request inputs as TensorRT-LLM (`guided_decoding_guide_type`,
`guided_decoding_guide`, guide types named as in `tensorrt_llm.GuidedDecodingParams.GuideType`) and
applies them to its logits with xgrammar, the backend TensorRT-LLM uses on GPU:

    info = tokenizer_info_from_tokenizer_json("…/tokenizer.json", vocab_size=262144)
    dec = GuidedDecoder.create("json_schema", schema_json, info)
    while ...:
        dec.apply_bitmask(logits)          # disallowed tokens -> -inf (in place)
        tok = sample(logits)
        dec.accept_token(tok)
        if dec.is_terminated(): break      # a stop token was accepted after the grammar completed

The vocabulary (special tokens blanked) comes from `gemma3_core.guided.encoded_vocab`. JSON schemas are
compiled with `any_whitespace=False` (canonical `", "`/`": "` separators): every output it allows is also
allowed by TensorRT-LLM's default (any whitespace), and a small model cannot wander into endless whitespace.
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from pathlib import Path

import torch
import xgrammar as xgr

from gemma3_core import constants as C
from gemma3_core.guided import encoded_vocab

# TensorRT-LLM GuidedDecodingParams.GuideType names, as the Triton backend spells them. `structural_tag` is
# left out: the C++ backend accepts the name and silently ignores it, so neither target offers it.
GUIDE_TYPES = ("json", "json_schema", "regex", "ebnf_grammar")

_GRAMMAR_CACHE_SIZE = 64


def _detect_metadata(backend_str: str) -> tuple[xgr.VocabType, bool]:
    try:
        # Private, but it is what TokenizerInfo.from_huggingface uses (and what the C++ side does).
        meta = xgr.TokenizerInfo._detect_metadata_from_hf(backend_str)
        return meta["vocab_type"], bool(meta["add_prefix_space"])
    except Exception:  # pragma: no cover - API drift: fall back to the Gemma 3 facts
        return xgr.VocabType.BYTE_FALLBACK, False


@functools.lru_cache(maxsize=4)
def _tokenizer_info(path: str, vocab_size: int | None, stop_token_ids: tuple[int, ...]) -> xgr.TokenizerInfo:
    encoded, backend_str = encoded_vocab(path)
    vocab_type, add_prefix_space = _detect_metadata(backend_str)
    return xgr.TokenizerInfo(
        encoded,
        vocab_type,
        vocab_size=vocab_size or len(encoded),
        stop_token_ids=list(stop_token_ids),
        add_prefix_space=add_prefix_space,
    )


def tokenizer_info_from_tokenizer_json(
    path: str | Path,
    vocab_size: int | None = None,
    stop_token_ids: tuple[int, ...] = C.DEFAULT_STOP_IDS,
) -> xgr.TokenizerInfo:
    """xgrammar TokenizerInfo for a Gemma 3 `tokenizer.json` (cached per path/size/stops).

    `vocab_size` is the model's logits width (262144 for 270M, 262208 for 27B); ids past the tokenizer
    are padding and are always masked.
    """
    return _tokenizer_info(str(Path(path).resolve()), vocab_size, tuple(stop_token_ids))


# --- compilation (cached) -------------------------------------------------------------------------
class _CompilerEntry:
    def __init__(self, info: xgr.TokenizerInfo) -> None:
        self.info = info  # keeps id(info) from being reused while cached
        self.compiler = xgr.GrammarCompiler(info, max_threads=2)
        self.grammars: OrderedDict[tuple[str, str], xgr.CompiledGrammar] = OrderedDict()
        self.lock = threading.Lock()


_compilers: dict[int, _CompilerEntry] = {}
_compilers_lock = threading.Lock()


def _entry(info: xgr.TokenizerInfo) -> _CompilerEntry:
    with _compilers_lock:
        entry = _compilers.get(id(info))
        if entry is None or entry.info is not info:
            entry = _compilers[id(info)] = _CompilerEntry(info)
        return entry


def _unknown_type(guide_type: str) -> ValueError:
    return ValueError(f"unknown guided_decoding_guide_type {guide_type!r}; expected one of {GUIDE_TYPES}")


def _compile(compiler: xgr.GrammarCompiler, guide_type: str, guide: str) -> xgr.CompiledGrammar:
    if guide_type == "json":
        return compiler.compile_builtin_json_grammar()
    if guide_type == "json_schema":
        return compiler.compile_json_schema(guide, any_whitespace=False, strict_mode=True)
    if guide_type == "regex":
        return compiler.compile_regex(guide)
    if guide_type == "ebnf_grammar":
        return compiler.compile_grammar(guide)
    raise _unknown_type(guide_type)


def compile_guide(guide_type: str, guide: str, tokenizer_info: xgr.TokenizerInfo) -> xgr.CompiledGrammar:
    """Compiled grammar for a guide, cached by (type, guide) per tokenizer (LRU)."""
    if guide_type not in GUIDE_TYPES:
        raise _unknown_type(guide_type)
    entry = _entry(tokenizer_info)
    key = (guide_type, guide if guide_type != "json" else "")
    with entry.lock:
        hit = entry.grammars.get(key)
        if hit is not None:
            entry.grammars.move_to_end(key)
            return hit
    try:
        compiled = _compile(entry.compiler, guide_type, guide)
    except ValueError:
        raise
    except Exception as e:  # xgrammar raises RuntimeError / its own errors on bad schemas and grammars
        raise ValueError(f"invalid {guide_type} guide: {e}") from e
    with entry.lock:
        entry.grammars[key] = compiled
        while len(entry.grammars) > _GRAMMAR_CACHE_SIZE:
            entry.grammars.popitem(last=False)
    return compiled


def check_guide(guide_type: str, guide: str) -> None:
    """Raise ValueError if xgrammar cannot build a grammar for the guide (no tokenizer needed)."""
    try:
        if guide_type == "json_schema":
            xgr.Grammar.from_json_schema(guide)
        elif guide_type == "regex":
            xgr.Grammar.from_regex(guide)
        elif guide_type == "ebnf_grammar":
            xgr.Grammar.from_ebnf(guide)
        elif guide_type != "json":
            raise _unknown_type(guide_type)
    except ValueError:
        raise
    except Exception as e:
        raise ValueError(f"invalid {guide_type} guide: {e}") from e


# --- per-request decoder --------------------------------------------------------------------------
class GuidedDecoder:
    """One request's grammar state: masks logits, follows accepted tokens."""

    def __init__(self, compiled: xgr.CompiledGrammar, vocab_size: int) -> None:
        self._matcher = xgr.GrammarMatcher(compiled)
        self.vocab_size = vocab_size
        self._bitmask = xgr.allocate_token_bitmask(1, vocab_size)

    @classmethod
    def create(cls, guide_type: str, guide: str, tokenizer_info: xgr.TokenizerInfo) -> GuidedDecoder:
        return cls(compile_guide(guide_type, guide, tokenizer_info), tokenizer_info.vocab_size)

    def fill_bitmask(self) -> torch.Tensor:
        """The int32 bitmask `[1, ceil(vocab/32)]` of tokens allowed next (bit set = allowed)."""
        self._matcher.fill_next_token_bitmask(self._bitmask)
        return self._bitmask

    def apply_bitmask(self, logits: torch.Tensor) -> torch.Tensor:
        """Set disallowed entries of `logits` (`[vocab]` or `[1, vocab]`, CPU) to -inf, in place."""
        self.fill_bitmask()
        flat = logits.view(1, -1) if logits.dim() == 1 else logits
        width = flat.shape[-1]
        if width > self.vocab_size:
            flat[:, self.vocab_size :] = float("-inf")  # logits rows the tokenizer info does not cover
        n = min(width, self.vocab_size)
        try:
            xgr.apply_token_bitmask_inplace(flat, self._bitmask, vocab_size=n)
        except (RuntimeError, TypeError, ValueError):  # a dtype/layout the xgrammar kernel refuses
            flat[:, :n].masked_fill_(~self.allowed_mask()[:n], float("-inf"))
        return logits

    def allowed_mask(self) -> torch.Tensor:
        """Bool tensor `[vocab_size]` of the last filled bitmask."""
        bits = self._bitmask[0].to(torch.int64).unsqueeze(1) >> torch.arange(32, dtype=torch.int64)
        return (bits & 1).bool().flatten()[: self.vocab_size]

    def accept_token(self, token_id: int) -> bool:
        """Advance the grammar; False if the token is not allowed (the state is then unchanged)."""
        return bool(self._matcher.accept_token(int(token_id)))

    def is_terminated(self) -> bool:
        """True once a stop token was accepted after the grammar completed."""
        return bool(self._matcher.is_terminated())

    def is_completed(self) -> bool:
        """True when the text so far is a complete match (a stop token may come next)."""
        return bool(self._matcher.is_completed())

    def reset(self) -> None:
        self._matcher.reset()
