"""KV-cache pieces of the batched greedy decoder (evaluation/generation._greedy_decode).

Imported only when a batch is decoded, so that importing the generation module stays cheap.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from transformers.cache_utils import DynamicLayer


class PreallocatedLayer(DynamicLayer):
    """A DynamicLayer whose keys and values live in buffers allocated once, with room for the answer.

    DynamicLayer grows by torch.cat at every step, copying the whole cache each time; with a
    700-token prompt in a 40-row batch that copying made decoding 1.3x slower. Here a step
    writes its column in place and attention reads a view of the filled columns (same values,
    same shapes).
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
        super().__init__()
        self._keys, self._values, self.length = keys, values, length
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True
        self._views()

    def _views(self) -> None:
        self.keys, self.values = self._keys[:, :, : self.length], self._values[:, :, : self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        end = self.length + key_states.shape[-2]
        if end > self._keys.shape[2]:
            raise RuntimeError(f"preallocated KV cache full: {end} > {self._keys.shape[2]} positions")
        self._keys[:, :, self.length : end] = key_states
        self._values[:, :, self.length : end] = value_states
        self.length = end
        self._views()
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._keys, self._values = self._keys[indices], self._values[indices]
        self._views()

    def _unsupported(self, *args: Any, **kwargs: Any) -> None:
        # The inherited versions would replace the views and leave the buffers stale.
        raise NotImplementedError("PreallocatedLayer serves the evaluation decoder only")

    batch_repeat_interleave = crop = reorder_cache = reset = offload = prefetch = _unsupported


def side_by_side(
    groups: Sequence[Any], room: int, zero_gaps: bool = True
) -> tuple[list[PreallocatedLayer], torch.Tensor, torch.Tensor, list[int]]:
    """One decoding batch from prefill groups of different widths (each with per-layer `keys` and
    `values`, its attention `mask` and last `logits`), as (cache layers, mask, logits, first columns).

    Each group's columns are right-aligned, so every row ends at the same column as in a
    left-padded batch, and the cache gets `room` free columns for the answer. A row's first
    column is where its group's columns begin: attention that starts there
    (`grouped_sdpa_attention`) skips the other groups' padding. Positions come from the mask, so
    the padding moves no token. `zero_gaps=False` leaves the cache columns left of each row's
    first column unwritten, for attention that never reads them (zeroing them was 8% of decoding).
    """
    width = max(group.mask.shape[1] for group in groups)
    rows = sum(group.mask.shape[0] for group in groups)

    def right_aligned(tensors: list[torch.Tensor], seq_dim: int, extra: int, zero: bool = True) -> torch.Tensor:
        shape = list(tensors[0].shape)
        shape[0], shape[seq_dim] = rows, width + extra
        buffer = tensors[0].new_zeros(shape) if zero else tensors[0].new_empty(shape)
        start = 0
        for tensor in tensors:
            end, columns = start + tensor.shape[0], tensor.shape[seq_dim]
            buffer[start:end].narrow(seq_dim, width - columns, columns).copy_(tensor)
            start = end
        return buffer

    layers = [
        PreallocatedLayer(
            right_aligned([g.keys[i] for g in groups], 2, room, zero_gaps),
            right_aligned([g.values[i] for g in groups], 2, room, zero_gaps),
            width,
        )
        for i in range(len(groups[0].keys))
    ]
    first_columns = [width - g.mask.shape[1] for g in groups for _ in range(g.mask.shape[0])]
    return layers, right_aligned([g.mask for g in groups], 1, 0), torch.cat([g.logits for g in groups]), first_columns


def column_groups(first_columns: Sequence[int]) -> tuple[tuple[int, int, int], ...]:
    """Runs of consecutive rows with the same first column, as (first row, end row, first column)."""
    runs: list[tuple[int, int, int]] = []
    for row, column in enumerate(first_columns):
        if runs and runs[-1][2] == column:
            runs[-1] = (runs[-1][0], row + 1, column)
        else:
            runs.append((row, row + 1, column))
    return tuple(runs)


GROUPED_SDPA = "panacea_grouped_sdpa"


def grouped_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    decode_groups: tuple[tuple[int, int, int], ...] | None = None,
    **kwargs: Any,
):
    """SDPA that attends each run of rows (`decode_groups`, passed by the decoder through the
    model's forward) only from its first column on: a 700-token prompt's row no longer makes 39
    short rows read 700 columns of masked padding at every step."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if decode_groups is None:
        # Columns left of a group may be unwritten memory: attending over them must not happen silently.
        raise RuntimeError(
            "grouped attention called without decode_groups: a wrapper around the model dropped the keyword "
            "argument; decode without grouped_attention()"
        )
    outputs = []
    for start, end, column in decode_groups:
        mask = attention_mask
        if mask is not None:
            # A mask without padding may come broadcast over the batch (first dimension 1).
            mask = (mask if mask.shape[0] == 1 else mask[start:end])[..., column:]
        output, _ = sdpa_attention_forward(
            module, query[start:end], key[start:end, :, column:], value[start:end, :, column:], mask, **kwargs
        )
        outputs.append(output)
    return torch.cat(outputs), None


@contextmanager
def grouped_attention(model: Any) -> Iterator[bool]:
    """Switch a model on SDPA to `grouped_sdpa_attention` for the block; yields whether it did
    (a model on another attention implementation is left as it is and attends over the padding)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    config = model.config
    if config._attn_implementation != "sdpa":
        yield False
        return
    AttentionInterface.register(GROUPED_SDPA, grouped_sdpa_attention)
    AttentionMaskInterface.register(GROUPED_SDPA, sdpa_mask)
    config._attn_implementation = GROUPED_SDPA
    try:
        yield True
    finally:
        config._attn_implementation = "sdpa"
