"""A key/value cache for continuous batching: rows join and leave between decoding steps.

Layout: per layer one tensor (row capacity, kv heads, column capacity, head dim). All live rows
write their next token into the same column ``t``; row i's tokens sit in columns
``[start[i], t)`` (left padding before them is masked out), so a decoding step is one forward
with a shared write position and a per-row attention mask and position id. A finished row is
removed by moving the last row into its place (one row copied, not the whole cache); a new row
is copied in once after its prompt was prefilled alone. Only when a prompt is longer than ``t``
or the columns run out is the used region copied into fresh tensors (``_relayout``).

transformers' attention calls only ``update(key, value, layer_idx)`` on the cache when it is
given explicit ``position_ids`` and a 4D mask, which is all this class provides.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

HEADROOM = 128  # columns allocated beyond the current need, so relayouts stay rare


def token_bytes(config: Any, dtype: torch.dtype) -> int | None:
    """Bytes one token's keys and values take over all layers, or ``None`` when the config does not say."""
    config = getattr(config, "text_config", None) or config
    layers = getattr(config, "num_hidden_layers", None)
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else None)
    if not (layers and kv_heads and head_dim):
        return None
    return 2 * layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


@dataclass
class KVBudget:
    """How much key/value cache the batch may grow to, counted for every row as if it ran to its end.

    The cache is one rectangle per layer: its rows grow by doubling (up to ``max_rows``), its
    columns reach the longest row's span (prompt + max tokens) plus ``HEADROOM``.
    """

    limit_bytes: int | None  # None: no limit
    token_bytes: int | None  # one token's keys and values over all layers (None: unknown, no limit)
    max_rows: int
    max_context: int

    def __post_init__(self) -> None:
        if self.limit_bytes is not None and self.limit_bytes < 1:
            raise ValueError(f"the KV-cache budget must be >= 1 byte (or None: no limit), got {self.limit_bytes}")

    def bytes_for(self, spans: Sequence[int]) -> int:
        """Bytes the batch cache can grow to holding rows that fill ``spans`` columns each."""
        if not spans or self.token_bytes is None:
            return 0
        rows = max(len(spans), min(self.max_rows, 2 * len(spans)))
        return rows * (min(max(spans), self.max_context) + HEADROOM) * self.token_bytes

    def fits(self, spans: Sequence[int]) -> bool:
        return self.limit_bytes is None or self.bytes_for(spans) <= self.limit_bytes


class BatchKV:
    """Key/value states of the live rows of a decoding batch."""

    def __init__(self, max_rows: int = 64) -> None:
        self.max_rows = max_rows  # row capacity grows by doubling up to this
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.starts: list[int] = []  # first valid column of each live row
        self.t = 0  # the column the next token of every row is written to

    @property
    def rows(self) -> int:
        return len(self.starts)

    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() * 2 for k in self.keys)

    # ---- the cache protocol transformers' attention layers use
    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        rows, t = self.rows, self.t
        self.keys[layer_idx][:rows, :, t : t + 1] = key  # key: (rows, kv heads, 1, head dim)
        self.values[layer_idx][:rows, :, t : t + 1] = value
        return self.keys[layer_idx][:rows, :, : t + 1], self.values[layer_idx][:rows, :, : t + 1]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.t

    # ---- what the engine asks for before a step
    def step_inputs(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Make room for one more column; return the 4D attention mask and the position ids."""
        if self.t + 1 > self.keys[0].shape[2]:
            self._relayout(self.t - min(self.starts), self.keys[0].shape[0])
        starts = torch.tensor(self.starts, device=device)
        columns = torch.arange(self.t + 1, device=device)
        mask = (columns.unsqueeze(0) >= starts.unsqueeze(1)).view(self.rows, 1, 1, self.t + 1)
        positions = (self.t - starts).view(self.rows, 1)
        return mask, positions

    def advance(self) -> None:
        self.t += 1

    # ---- rows joining and leaving
    def reserve(self, rows: int, length: int) -> None:
        """Make room for ``rows`` more rows with prompts up to ``length`` tokens in one relayout."""
        if not self.keys or not self.starts:
            return
        end = max(self.t, length)
        capacity = self.keys[0].shape[0]
        if end != self.t or self.rows + rows > capacity or end + 1 > self.keys[0].shape[2]:
            grow = capacity if self.rows + rows <= capacity else min(self.max_rows, 2 * (self.rows + rows))
            self._relayout(self.t - min(self.starts), grow, columns=end)

    def add(self, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Append a row from its prefill cache: per layer (keys, values) of shape (1, heads, length, dim)."""
        length = layers[0][0].shape[2]
        if not self.keys:
            self.keys = [k.new_zeros(0, k.shape[1], 0, k.shape[3]) for k, _ in layers]
            self.values = [v.new_zeros(0, v.shape[1], 0, v.shape[3]) for _, v in layers]
        if not self.starts:
            self.t = 0
        width = self.t - min(self.starts, default=self.t)
        end = max(self.t, length)
        capacity = self.keys[0].shape[0]
        if end != self.t or self.rows + 1 > capacity or end + 1 > self.keys[0].shape[2]:
            self._relayout(width, capacity if self.rows < capacity else min(self.max_rows, 2 * (self.rows + 1)), columns=end)
        row, start = self.rows, self.t - length
        for buf_k, buf_v, (k, v) in zip(self.keys, self.values, layers):
            buf_k[row, :, start : self.t] = k[0]
            buf_v[row, :, start : self.t] = v[0]
        self.starts.append(start)

    def remove(self, row: int, scrub: bool = False) -> None:
        """Drop a row: the last row moves into its place (callers mirror the move in their own lists).

        ``scrub`` zeroes the dropped row's slot first: its states may hold NaN or inf, and masked
        positions still enter attention as ``0 * value`` (NaN for a NaN value) for the next row there.
        """
        last = self.rows - 1
        if scrub:
            for buf in (*self.keys, *self.values):
                buf[row].zero_()
        if row != last:
            lo = self.starts[last]
            for buf in (*self.keys, *self.values):
                buf[row, :, lo : self.t] = buf[last, :, lo : self.t]
            self.starts[row] = self.starts[last]
        self.starts.pop()
        if not self.starts:  # an idle server gives back buffers sized for its largest batch and context
            self.t = 0
            self.keys, self.values = [], []

    def _relayout(self, width: int, rows: int, columns: int | None = None) -> None:
        """Copy the used region (the last ``width`` columns) into tensors of ``rows`` x enough columns.

        The region ends at column ``columns`` (default ``width``) in the new layout.
        """
        end = width if columns is None else columns
        shift = end - self.t
        capacity_rows = max(rows, self.rows + 1)
        capacity_cols = end + HEADROOM
        for bufs in (self.keys, self.values):
            for i, old in enumerate(bufs):
                new = old.new_zeros(capacity_rows, old.shape[1], capacity_cols, old.shape[3])
                if self.rows and width:
                    new[: self.rows, :, end - width : end] = old[: self.rows, :, self.t - width : self.t]
                bufs[i] = new
        self.starts = [s + shift for s in self.starts]
        self.t = end
