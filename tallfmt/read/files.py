"""The note a merged model carries about how it was made (written beside its stored files, FORMAT.md
§10)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any


#: safetensors metadata key of a merged model's note (a JSON object as a string).
MERGE_NOTE_KEY = "tallfmt.merge"


def merge_note(archive: Any, method: str, params: Mapping[str, Any], per_task: str, tasks: list[str]) -> dict[str, str]:
    """The safetensors metadata of a merged model: how it was made, so the folder says what it is.

        >>> merge_note("zoo.tall", "consensus", {"k": 2}, "base", ["a", "b"])[MERGE_NOTE_KEY]
        '{"archive": "zoo.tall", "method": "consensus", "params": {"k": 2}, "per_task": "base", "tasks": ["a", "b"]}'
    """
    note = {"archive": Path(str(archive)).name, "method": method, "params": dict(params), "per_task": per_task,
            "tasks": list(tasks)}
    return {MERGE_NOTE_KEY: json.dumps(note, ensure_ascii=False)}
