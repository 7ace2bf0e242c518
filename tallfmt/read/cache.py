"""The decoded-segment cache of an open archive: θ0 and τ_MTL of masked tensors as they come out of
their codec (byte planes for ``byteplane-zstd``, bytes otherwise) — or, for decodes on another
device, as tensors on that device — kept up to a byte budget so that a later decode of another task
skips checksums, decompression and transfers and only runs the fused kernel.

Policy: a segment is kept when it fits in what is left of the budget, and stays until the archive is
closed or :meth:`SegmentCache.clear` is called. Nothing is evicted: a decode reads the tensors in
table order, so under least-recently-used eviction a model larger than the budget would never hit;
keeping the first ones gives budget / model of every later decode. A budget of 0 turns it off.

    >>> import numpy as np
    >>> c = SegmentCache(100)
    >>> c.put("a", np.zeros(60, np.uint8)), c.put("b", np.zeros(60, np.uint8)), c.get("a") is not None
    (True, False, True)
"""

from __future__ import annotations

import threading
from collections.abc import Hashable
from typing import Any

import numpy as np

from tallfmt.errors import InputError

def check_budget(cache_bytes: Any) -> int:
    if isinstance(cache_bytes, bool) or not isinstance(cache_bytes, int) or cache_bytes < 0:
        raise InputError(f"cache_bytes must be a non-negative integer (0: no cache), got {cache_bytes!r}")
    return cache_bytes


class SegmentCache:
    """Decoded segments by key, up to ``budget`` bytes in all; thread-safe. Cached arrays are read-only."""

    def __init__(self, budget: int) -> None:
        self.budget = check_budget(budget)
        self._items: dict[Hashable, Any] = {}
        self._lock = threading.Lock()
        self.nbytes = self.hits = self.misses = 0

    def get(self, key: Hashable) -> Any:
        with self._lock:
            arr = self._items.get(key)
            if arr is None:
                self.misses += 1
            else:
                self.hits += 1
            return arr

    def put(self, key: Hashable, arr: Any) -> bool:
        """Keep ``arr`` (a numpy array, made read-only, or a tensor, which no reader writes) if it fits
        in the budget; True when it is cached."""
        with self._lock:
            if key in self._items:
                return True
            if self.nbytes + arr.nbytes > self.budget:
                return False
            if isinstance(arr, np.ndarray) and arr.flags.writeable:
                arr.setflags(write=False)
            self._items[key] = arr
            self.nbytes += arr.nbytes
            return True

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.nbytes = 0

    def info(self) -> dict[str, int]:
        """budget, bytes (held), segments, hits and misses."""
        with self._lock:
            return {"budget": self.budget, "bytes": self.nbytes, "segments": len(self._items),
                    "hits": self.hits, "misses": self.misses}
