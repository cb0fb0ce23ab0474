"""Ray Data's block size for one stage: the largest block a task builds in memory before handing it on."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def max_block_bytes(limit: int) -> Iterator[None]:
    """Cap Ray Data's blocks (DataContext.target_max_block_size, 128 MiB by default) while the datasets built
    and run inside the block execute; the previous value is restored after, even on error."""
    import ray

    context = ray.data.DataContext.get_current()
    previous, context.target_max_block_size = context.target_max_block_size, limit
    try:
        yield
    finally:
        context.target_max_block_size = previous
