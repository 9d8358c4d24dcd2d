"""How one global batch becomes each rank's micro-batches, and the token weights that make their
gradients sum to the global batch's.

A global batch of B rows is split over `world_size` ranks into contiguous shards whose sizes differ
by at most one row (10 rows on 8 ranks: 2, 2, 1, 1, 1, 1, 1, 1), and each shard into `accumulation`
micro-batches the same way. The loss is a mean over answer tokens, so a micro-batch's gradient is
weighted by its share of the global batch's answer tokens: the weighted sum over every rank and
micro-batch is the gradient of the global token mean, whatever the split, exactly as one pass over
the whole batch gives.
"""

from __future__ import annotations

from typing import Any

from panacea_platform.config import ConfigError

IGNORE_INDEX = -100


def answer_token_count(batch: Any) -> int:
    """Tokens `lm_loss` averages over: labels other than -100, after the one-token shift."""
    if not isinstance(batch, dict) or "labels" not in batch:
        raise TypeError("answer_token_count needs a batch dict with 'labels'; pass token_count= for other batches")
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def batch_rows(batch: Any) -> int:
    if isinstance(batch, dict):
        return int(next(iter(batch.values())).shape[0])
    return int(batch.shape[0])


def select_rows(batch: Any, start: int, stop: int) -> Any:
    if isinstance(batch, dict):
        return {k: v[start:stop] for k, v in batch.items()}
    return batch[start:stop]


def shard_bounds(rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows [start, stop) of this rank: contiguous, sizes differing by at most one."""
    base, extra = divmod(rows, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def shard_batch(batch: Any, rank: int, world_size: int) -> Any:
    """This rank's contiguous share of a global batch (may be empty when rows < world_size)."""
    return select_rows(batch, *shard_bounds(batch_rows(batch), rank, world_size))


def micro_batches(batch: Any, rank: int, world_size: int, accumulation: int) -> list[Any]:
    """This rank's `accumulation` micro-batches of a global batch, in order; some may have no rows."""
    shard = shard_batch(batch, rank, world_size)
    rows = batch_rows(shard)
    return [select_rows(shard, *shard_bounds(rows, index, accumulation)) for index in range(accumulation)]


def check_accumulation(global_batch: int, accumulation: int, field: str) -> None:
    """Refuse an accumulation the global batch cannot fill even on one worker: some micro-batch would
    hold no sample on every step. (Across workers an empty share is allowed: it contributes zero.)"""
    section = field.rsplit(".", 1)[0]
    if accumulation < 1:
        raise ConfigError(f"{section}.grad_accum_steps = {accumulation}: expected at least 1")
    if global_batch < accumulation:
        raise ConfigError(
            f"{section}.grad_accum_steps = {accumulation} cannot be filled by {field} = {global_batch}: each "
            f"accumulation step needs at least one sample; use at most {global_batch} steps or a larger batch"
        )
