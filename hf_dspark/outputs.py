"""Guards for the folders and files the ``hf-dspark`` commands write.

Every command that writes a folder (``prepare-data``, ``build-cache``, ``train``, ``export``,
``convert``) claims it first with :func:`claim_output_folder`:

* it refuses an ``--output`` that holds one of the command's inputs (a prompt file, the checkpoint
  being exported, the target) among the files it would write or delete;
* it refuses a folder that is not empty unless the same command wrote it before, as recorded by
  the marker file :data:`MARKER_NAME` that it writes into every folder it claims (folders written
  before the marker existed are recognised by the files named in ``legacy_files``);
* ``export --overwrite`` deletes only the files the earlier export recorded in its marker
  (:func:`clear_recorded_files`), and nothing when the folder holds anything else.

The marker is a hidden file, so ``push`` does not upload it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from hf_dspark.errors import OutputFolderError

MARKER_NAME = ".hf_dspark_output.json"
_MARKER_VERSION = 1


def read_marker(folder: str | os.PathLike) -> dict | None:
    """The marker an ``hf-dspark`` command left in ``folder``, or ``None``."""
    path = Path(folder) / MARKER_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {"command": "unknown (unreadable marker)"}
    return data if isinstance(data, dict) else {"command": "unknown (unreadable marker)"}


def write_marker(folder: str | os.PathLike, command: str, **record) -> None:
    """Record that ``hf-dspark command`` wrote ``folder`` (``record``: e.g. the files it wrote)."""
    path = Path(folder) / MARKER_NAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"command": command, "version": _MARKER_VERSION, **record}, indent=2) + "\n",
                   encoding="utf-8")
    os.replace(tmp, path)


def _local(path) -> Path | None:
    """``path`` resolved, when it names something on this machine (Hub ids do not)."""
    if path is None:
        return None
    candidate = Path(str(path)).expanduser()
    return candidate.resolve() if candidate.exists() else None


def check_inputs_outside(folder: str | os.PathLike, inputs: Iterable[tuple[str, object]],
                         written: Iterable[str] | None) -> None:
    """Refuse when an input would be overwritten or deleted by writing ``folder``.

    Args:
        inputs: ``(flag, path)`` of everything the command reads (Hub ids and ``None`` are skipped).
        written: the names (relative to ``folder``) the command writes; ``None`` when it may replace
            the whole folder (``export --overwrite``), so no input may lie anywhere inside it.
    """
    out = Path(folder).expanduser().resolve()
    names = None if written is None else {out / name for name in written}
    for flag, path in inputs:
        source = _local(path)
        if source is None:
            continue
        if source == out:
            clash = f"{flag} {path} is the --output folder {folder}"
        elif names is None and source.is_relative_to(out):
            clash = f"{flag} {path} lies inside --output {folder}"
        elif names is not None and any(source == name or source.is_relative_to(name) for name in names):
            clash = f"{flag} {path} is one of the files --output {folder} receives"
        else:
            continue
        raise OutputFolderError(f"{clash}, so writing it would destroy that input; pass a new --output folder.")


def claim_output_folder(folder: str | os.PathLike, command: str, *, inputs: Iterable[tuple[str, object]] = (),
                        written: Iterable[str] | None = (), legacy_files: Iterable[str] = (),
                        also_accept: Iterable[str] = (), create: bool = True) -> Path:
    """Check that ``hf-dspark command`` may write ``folder``, then create it and mark it as its own.

    Refused (:class:`~hf_dspark.errors.OutputFolderError`) when an input lies among the files the
    command writes (see :func:`check_inputs_outside`), when the folder is not empty and was written
    by another command, or holds files no ``hf-dspark`` command wrote. ``legacy_files``: names whose
    presence shows the folder was written by this command before markers existed (glob patterns).
    ``also_accept``: other commands whose output this one may take over (``convert`` / ``export``).
    With ``create=False`` only the checks run (a later step creates the folder).
    """
    path = Path(folder)
    check_inputs_outside(path, inputs, written)
    if path.exists() and not path.is_dir():
        raise OutputFolderError(f"--output {folder} is a file, not a folder; pass a folder path.")
    if path.is_dir() and any(path.iterdir()):
        marker = read_marker(path)
        accepted = {command, *also_accept}
        if marker is not None and marker.get("command") not in accepted:
            raise OutputFolderError(
                f"--output {folder} holds the output of `hf-dspark {marker.get('command')}`, not of "
                f"`hf-dspark {command}`; pass a new --output folder.")
        if marker is None and not any(any(path.glob(pattern)) for pattern in legacy_files):
            raise OutputFolderError(
                f"--output {folder} is not empty and was not written by `hf-dspark {command}` (it has no "
                f"{MARKER_NAME}); pass a new or empty --output folder, so nothing in it is overwritten.")
    if create:
        path.mkdir(parents=True, exist_ok=True)
        if read_marker(path) is None or read_marker(path).get("command") != command:
            write_marker(path, command)
    return path


def files_in(folder: str | os.PathLike) -> list[str]:
    """Every file under ``folder`` (relative POSIX paths, the marker excluded)."""
    root = Path(folder)
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.is_file() and p.name != MARKER_NAME)


def clear_recorded_files(folder: str | os.PathLike, command: str, delete: bool = True) -> None:
    """``--overwrite``: delete the files the earlier ``command`` run recorded in its marker, and only them.

    Refused, deleting nothing, when the marker is missing or the folder holds any other file: those
    were put there by someone else. ``delete=False`` only runs the checks.
    """
    path = Path(folder)
    marker = read_marker(path)
    if marker is None or not isinstance(marker.get("files"), list):
        raise OutputFolderError(
            f"--overwrite refuses to clear {folder}: it was not written by `hf-dspark {command}` (no {MARKER_NAME} "
            "listing its files); delete it yourself if you are sure, or pass a new --output folder.")
    recorded = set(marker["files"])
    foreign = [name for name in files_in(path) if name not in recorded]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise OutputFolderError(
            f"--overwrite refuses to clear {folder}: it holds files `hf-dspark {command}` did not write ({shown}); "
            "move them away or pass a new --output folder.")
    if not delete:
        return
    for name in sorted(recorded, key=lambda n: n.count("/"), reverse=True):
        (path / name).unlink(missing_ok=True)
    for sub in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        if not any(sub.iterdir()):
            sub.rmdir()


__all__ = ["MARKER_NAME", "read_marker", "write_marker", "check_inputs_outside", "claim_output_folder",
           "files_in", "clear_recorded_files"]
