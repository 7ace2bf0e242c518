"""Strict JSON objects, as the header (FORMAT.md §1.2), the index (§9.2) and safetensors headers need
them: UTF-8, an object starting with '{', no duplicate keys, no NaN/Infinity, every string Unicode
text (no unpaired surrogate escape, in keys and values, known or not), bounded nesting."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

# A \u escape of a UTF-16 surrogate (D800..DFFF). Only such an escape can put a surrogate into a parsed
# string (UTF-8 decoding refuses encoded ones), so a text without one needs no per-string check.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise ValueError(f"duplicate key {k!r}")
            seen.add(k)
    return out


def _reject_constant(c: str) -> Any:
    raise ValueError(f"{c} is not JSON")


def is_text(s: str) -> bool:
    """Whether ``s`` is Unicode text, i.e. writable as UTF-8 (no unpaired surrogate)."""
    if s.isascii():
        return True
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def json_depth(obj: Any, limit: int) -> int:
    """Nesting depth of parsed JSON (a scalar is 0, ``{}`` 1), counted up to limit + 1 (iterative)."""
    return _walk(obj, limit, False)[0]


def _walk(obj: Any, limit: int, strings: bool) -> tuple[int, str | None]:
    """(depth up to limit + 1, the first string that is not Unicode text if ``strings``), level by level."""
    depth, level = 0, [obj] if isinstance(obj, (dict, list)) else []
    while level and depth <= limit:
        depth += 1
        nxt = []
        for v in level:
            items = v.values() if isinstance(v, dict) else v
            if strings:
                if isinstance(v, dict):
                    bad = next((k for k in v if not is_text(k)), None)
                    if bad is not None:
                        return depth, bad
                bad = next((x for x in items if isinstance(x, str) and not is_text(x)), None)
                if bad is not None:
                    return depth, bad
            nxt.extend(x for x in items if isinstance(x, (dict, list)))
        level = nxt
    return depth, None


def _path_of(obj: Any, target: str) -> str:
    """Where string ``target`` (the very object) is in ``obj``, e.g. ``tasks[0].name`` or ``metadata
    (a key)``; for error messages only."""
    stack: list[tuple[Any, str]] = [(obj, "")]
    while stack:
        v, at = stack.pop()
        pairs = v.items() if isinstance(v, dict) else enumerate(v)
        for k, x in pairs:
            here = f"{at}[{k}]" if isinstance(v, list) else (f"{at}.{k}" if at else str(k))
            if k is target:
                return f"{at or 'the top level'} (a key)"
            if x is target:
                return here
            if isinstance(x, (dict, list)):
                stack.append((x, here))
    return ""


def loads_strict_object(raw: bytes, fail: Callable[[str], Exception], what: str,
                        too_deep: Callable[[], Exception] | None = None, max_depth: int | None = None,
                        trailing_whitespace: bool = True) -> dict:
    """A JSON object by strict rules: UTF-8, starts with '{', no duplicate keys (Python's json would
    keep the last), no NaN/Infinity, every string (keys and values, anywhere) Unicode text, and — with
    ``max_depth`` — nesting at most that deep (the object itself is level 1). With
    ``trailing_whitespace=False`` the last byte must be the object's '}'. Errors are ``fail(message)``,
    or ``too_deep()`` for nesting (Python's C parser stops at the interpreter's recursion limit, so
    hostile nesting cannot exhaust the stack).

        >>> loads_strict_object(b'{"a": [1, 2]} ', ValueError, "x")
        {'a': [1, 2]}
    """
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
    if not trailing_whitespace and not text.endswith("}"):
        raise fail(f"{what} must end with the object's closing '}}' (no bytes, not even whitespace, after it)")
    limit = max_depth if max_depth is not None else 1 << 30
    depth, bad = _walk(obj, limit, _SURROGATE_ESCAPE.search(raw) is not None)
    if bad is not None:
        raise fail(f"{what} {_path_of(obj, bad)}: the string {bad[:80]!r} holds an unpaired surrogate escape: "
                   f"valid JSON, but not Unicode text")
    if depth > limit:
        raise (too_deep or (lambda: fail(f"{what} nests deeper than {max_depth} levels")))()
    return obj
