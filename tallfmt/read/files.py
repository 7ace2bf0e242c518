"""Writing an archive's stored files (FORMAT.md §10) into a decoded or merged model folder, and the
note a merged model carries about how it was made."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tallfmt.errors import InputError
from tallfmt.format.atomic import write_atomic
from tallfmt.format.files import name_problem

#: safetensors metadata key of a merged model's note (a JSON object as a string).
MERGE_NOTE_KEY = "tallfmt.merge"


def write_files(folder: str | Path, files: Mapping[str, bytes]) -> list[Path]:
    """Write {relative name: bytes} into ``folder`` (subfolders made as needed), each file atomically.

        >>> import tempfile
        >>> [p.name for p in write_files(tempfile.mkdtemp(), {"config.json": b"{}"})]
        ['config.json']
    """
    out = []
    root = Path(folder)
    for name, data in files.items():
        why = name_problem(name)
        if why is not None:  # the header checks already refused these; never write outside the folder
            raise InputError(f"{root}: refusing to write file {name!r}: {why}")
        path = root.joinpath(*name.split("/"))
        path.parent.mkdir(parents=True, exist_ok=True)
        out.append(write_atomic(path, bytes(data)))
    return out


def merge_note(archive: Any, method: str, params: Mapping[str, Any], per_task: str, tasks: list[str]) -> dict[str, str]:
    """The safetensors metadata of a merged model: how it was made, so the folder says what it is.

        >>> merge_note("zoo.tall", "consensus", {"k": 2}, "base", ["a", "b"])[MERGE_NOTE_KEY]
        '{"archive": "zoo.tall", "method": "consensus", "params": {"k": 2}, "per_task": "base", "tasks": ["a", "b"]}'
    """
    note = {"archive": Path(str(archive)).name, "method": method, "params": dict(params), "per_task": per_task,
            "tasks": list(tasks)}
    return {MERGE_NOTE_KEY: json.dumps(note, ensure_ascii=False)}
