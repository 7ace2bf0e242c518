"""The one shard planner: split a sequence of items (tensors, or groups of tied tensors) into
contiguous runs, as huggingface_hub's state-dict splitter does. Used for the shards of a sharded
archive (FORMAT.md §9.5) and for the shards of a decoded Hugging Face folder.

    >>> plan_shards([4, 1, 1, 4], shards=2)
    [range(0, 2), range(2, 4)]
    >>> plan_shards([3, 3, 3], max_shard_size=5)
    [range(0, 1), range(1, 2), range(2, 3)]
"""

from __future__ import annotations

from collections.abc import Sequence

from tallfmt.errors import InputError


def plan_shards(weights: Sequence[int], *, shards: int | None = None,
                max_shard_size: int | None = None) -> list[range]:
    """Contiguous runs of item indices covering ``weights`` in order.

    ``max_shard_size``: a new run starts when the next item would take the run past it (an item
    larger than that gets a run of its own). ``shards=N``: min(N, items) runs (at least one), the
    heaviest as light as it can be. One of the two, not both; neither gives one run.
    """
    if shards is not None and max_shard_size is not None:
        raise InputError("pass shards= or max_shard_size=, not both")
    if max_shard_size is not None:
        cuts = _greedy(weights, max_shard_size, 1)
    else:
        cuts = _balanced(weights, max(1, min(shards or 1, len(weights))))
    return [range(a, b) for a, b in zip([0, *cuts], [*cuts, len(weights)])] if weights else [range(0, 0)]


def _greedy(weights: Sequence[int], cap: int, parts: int) -> list[int]:
    """Cut positions: start a new part when the next weight would pass ``cap``, or when the items
    left are only just enough to give each of the ``parts`` still to fill one item."""
    cuts: list[int] = []
    size = 0
    g = len(weights)
    for i, w in enumerate(weights):
        if i > 0 and (size + w > cap or g - i <= parts - len(cuts) - 1):
            cuts.append(i)
            size = 0
        size += w
    return cuts


def _balanced(weights: Sequence[int], n: int) -> list[int]:
    """n contiguous parts minimising the heaviest part (binary search on the capacity)."""
    lo, hi = max(weights, default=0), sum(weights)
    while lo < hi:
        mid = (lo + hi) // 2
        if len(_greedy(weights, mid, 1)) + 1 <= n:
            hi = mid
        else:
            lo = mid + 1
    return _greedy(weights, lo, n)
