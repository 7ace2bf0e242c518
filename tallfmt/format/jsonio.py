"""Strict JSON objects, as the header (FORMAT.md §1.2) and the index (§9.2) need them: UTF-8, an object
starting with '{', no duplicate keys, no NaN/Infinity, bounded nesting."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _reject_constant(c: str) -> Any:
    raise ValueError(f"{c} is not JSON")


def json_depth(obj: Any, limit: int) -> int:
    """Nesting depth of parsed JSON, counted up to limit + 1 (iterative)."""
    depth, level = 0, [obj]
    while level and depth <= limit:
        depth += 1
        nxt = []
        for v in level:
            if isinstance(v, dict):
                nxt.extend(x for x in v.values() if isinstance(x, (dict, list)))
            elif isinstance(v, list):
                nxt.extend(x for x in v if isinstance(x, (dict, list)))
        level = nxt
    return depth


def loads_strict_object(raw: bytes, fail: Callable[[str], Exception], what: str,
                        too_deep: Callable[[], Exception] | None = None, max_depth: int | None = None) -> dict:
    """A JSON object by strict rules: UTF-8, starts with '{', no duplicate keys (Python's json would
    keep the last), no NaN/Infinity, and — with ``max_depth`` — nesting at most that deep. Errors are
    ``fail(message)``, or ``too_deep()`` for nesting (Python's C parser stops at the interpreter's
    recursion limit, so hostile nesting cannot exhaust the stack)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise fail(f"{what} is not valid UTF-8 ({exc})") from None
    if not text.startswith("{"):
        raise fail(f"{what} must be a JSON object starting with '{{'")
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_reject_constant)
    except RecursionError:
        raise (too_deep or (lambda: fail(f"{what} nests too deeply")))() from None
    except ValueError as exc:
        raise fail(f"{what} is not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise fail(f"{what} is not a JSON object")
    if max_depth is not None and json_depth(obj, max_depth) > max_depth:
        raise (too_deep or (lambda: fail(f"{what} nests deeper than {max_depth} levels")))()
    return obj
