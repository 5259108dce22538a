"""A batch of KV caches of different lengths, right-aligned so every row gains one token per decode step.

Row i's tokens fill the last `lengths[i]` columns; the columns before them are padding, masked out by the
2-D attention mask and zeroed. The model gets a transformers `DynamicCache` built from these tensors with
full-length layers: Gemma 3's sliding-window layers then see every column and apply their window through
the mask transformers builds from the cache positions. Right alignment keeps a row's tokens contiguous,
so a window over cache positions is the same window over that row's own positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.cache_utils import CacheLayerMixin


@dataclass
class PaddedKV:
    keys: list[torch.Tensor]  # per layer [rows, kv_heads, columns, head_dim]
    values: list[torch.Tensor]
    mask: torch.Tensor  # [rows, columns] int64, 1 = a real token
    # The cache the last forward appended to, reused by the next one until rows change.
    _cache: DynamicCache | None = field(default=None, repr=False)

    @classmethod
    def empty(cls, rows: int) -> PaddedKV:
        return cls([], [], torch.zeros(rows, 0, dtype=torch.long))

    @property
    def rows(self) -> int:
        return int(self.mask.shape[0])

    @property
    def columns(self) -> int:
        return int(self.mask.shape[1])

    def cache(self) -> DynamicCache:
        """A transformers cache over these tensors (its `update` appends the step's keys/values)."""
        if self._cache is None:
            pairs = list(zip(self.keys, self.values, strict=True))
            self._cache = DynamicCache(ddp_cache_data=pairs) if pairs else DynamicCache()
        return self._cache

    def step_mask(self, new_columns: int) -> torch.Tensor:
        """The attention mask for a forward that appends `new_columns` real tokens to every row."""
        return torch.cat([self.mask, torch.ones(self.rows, new_columns, dtype=torch.long)], dim=1)

    def absorb(self, cache: DynamicCache, mask: torch.Tensor) -> None:
        """Take the cache a forward appended to (and the mask it ran with) as this batch's new state."""
        new = mask.shape[1] - self.columns
        self._cache = cache
        kv = [_filled(layer) for layer in cache.layers]
        self.keys = [k for k, _ in kv]
        self.values = [v for _, v in kv]
        self.mask = mask
        pad = (mask == 0)[:, None, :, None]
        # Padding columns of this forward (a prefill group) hold whatever the model computed there: make
        # them inert. Older columns were cleaned when they were added.
        if bool(pad[:, :, -new:].any()):
            for t in (*self.keys, *self.values):
                t.masked_fill_(pad, 0.0)

    def select(self, rows: Sequence[int]) -> None:
        """Keep only `rows` (in that order) and drop columns that are padding in every kept row."""
        idx = torch.tensor(list(rows), dtype=torch.long)
        mask = self.mask.index_select(0, idx)
        start = self.columns - int(mask.sum(dim=1).max()) if len(idx) else self.columns
        self.mask = mask[:, start:]
        self._cache = None
        self.keys = [k.index_select(0, idx)[:, :, start:] for k in self.keys]
        self.values = [v.index_select(0, idx)[:, :, start:] for v in self.values]

    def extend(self, other: PaddedKV) -> None:
        """Append `other`'s rows, left-padding whichever side is shorter."""
        self._cache = None
        if self.rows == 0:
            self.keys, self.values, self.mask = other.keys, other.values, other.mask
            return
        width = max(self.columns, other.columns)
        mine, theirs = _left_pad(self, width), _left_pad(other, width)
        self.keys = [torch.cat(p, dim=0) for p in zip(mine.keys, theirs.keys, strict=True)]
        self.values = [torch.cat(p, dim=0) for p in zip(mine.values, theirs.values, strict=True)]
        self.mask = torch.cat([mine.mask, theirs.mask], dim=0)


def _left_pad(kv: PaddedKV, width: int) -> PaddedKV:
    extra = width - kv.columns
    if extra == 0:
        return kv

    def pad(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, 0, extra, 0))

    mask = torch.nn.functional.pad(kv.mask, (extra, 0))
    return PaddedKV([pad(k) for k in kv.keys], [pad(v) for v in kv.values], mask)


def _filled(layer: object) -> tuple[torch.Tensor, torch.Tensor]:
    """A key/value layer's tensors after a forward wrote to it (Gemma 3 has no other kind of layer)."""
    if not isinstance(layer, CacheLayerMixin) or layer.keys is None or layer.values is None:
        raise TypeError(f"expected a filled key/value cache layer, got {type(layer).__name__}")
    return layer.keys, layer.values
