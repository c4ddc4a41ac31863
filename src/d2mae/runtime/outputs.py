"""One rule for every command that writes: into its own output (a folder, or the one file it was asked for), never
into one of its inputs, never over a file it did not write — with ``--force`` or without.

* An output is never an input, nor inside an input folder, nor a folder that holds an input (the folder of an image
  given, a parent of a labels file) (:func:`check_not_input`).
* A folder output is new, empty, or an earlier output of the same command. A command marks each folder it writes
  with ``.d2mae-output``: its first line names the command, each further line a file it wrote there (the ledger,
  kept by :func:`d2mae.runtime.files.atomic_writer`). Folders written before the marker existed are recognised by
  the command's own files (``pretrain.yaml``, ``obs.csv``, …). A folder holding anything else — hidden files such as
  ``.git`` included — is refused, unless the command has ``--force`` and it is given: the user's word that those
  files may sit *beside* its outputs. They are never replaced: every file in the folder that the ledger does not
  list, and every input, is kept (:func:`d2mae.runtime.files.check_replaceable`), and a command that knows its
  output names checks them before any work (:func:`check_new_files`).
* An earlier output of the same command is continued with ``--resume`` (pretrain, finetune, segment, experiment) or
  replaced with ``--force`` (obs, phantoms, probe, evaluate --out, compare, export, predict); without either it is
  refused. An earlier attempt that stopped before its result (no ``obs.csv``, ``labels.csv``, …) is simply done again.
* A file output (``predict --out FILE``) that exists is replaced only with ``--force``, and only when d2mae wrote it
  (its header is a prediction table's).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Sequence

from d2mae.runtime.errors import D2maeError
from d2mae.runtime.files import check_replaceable, keep, keep_ledger
from d2mae.runtime.locks import LOCK_NAME, check_writable

MARKER = ".d2mae-output"

#: The files that show a folder from before the marker was written is this command's own output.
LEGACY_FILES: dict[str, tuple[str, ...]] = {
    "pretrain": ("pretrain.yaml", "resume.pt", "pretrain_hashes.txt"),
    "finetune": ("finetune.yaml", "run.json"),
    "obs": ("obs.yaml", "obs.csv"),
    "phantoms": ("phantoms.yaml",),
    "experiment": ("experiment.yaml", "plan.json"),
    "compare": ("compare.json",),
    "export": ("d2mae_export.json",),
    "shards": ("index.json", "shards_config.yaml"),
}


#: The files of a finished output of the commands that replace one only with --force.
FINISHED: dict[str, tuple[str, ...]] = {
    "obs": ("obs.csv",), "phantoms": ("labels.csv",), "evaluate": ("metrics.json",), "compare": ("compare.json",),
    "export": ("d2mae_export.json",), "predict": ("masks.csv",), "probe": ("probe.csv",), "view": ("index.html",),
}


def _resolved(path: str | Path) -> Path:
    return Path(os.path.realpath(str(path).split("#")[0]))  # a frame or shard-member reference: its file


def check_not_input(out: str | Path, inputs: Iterable[str | Path | None], option: str = "out") -> None:
    """Refuse an output that is one of ``inputs``, lies inside an input folder, or holds an input (the folder an
    input file sits in, or any folder above it)."""
    target = _resolved(out)
    for given in inputs:
        if given is None or str(given) == "":
            continue
        source = _resolved(given)
        if target == source or (source.is_dir() and source in target.parents):
            what = "is" if target == source else f"lies inside {given}, which is"
            raise D2maeError(f"{out} {what} one of this command's inputs; d2mae never writes into its inputs — "
                             "choose another output path", option=option)
        if target in source.parents:
            raise D2maeError(f"{out} holds {given}, one of this command's inputs; d2mae never writes beside its "
                             "inputs — choose another output folder", option=option)


def _marker_lines(folder: Path) -> list[dict]:
    """The marker's lines: the command, then each file it wrote (``[]`` without a readable marker)."""
    try:
        return [json.loads(line) for line in (folder / MARKER).read_text(encoding="utf-8").splitlines() if line]
    except (OSError, ValueError):
        return []


def owner(folder: Path) -> str | None:
    """The command whose output ``folder`` is (its marker, else its own files), or ``None``."""
    if (folder / MARKER).is_file():
        lines = _marker_lines(folder)
        return str(lines[0].get("command")) if lines and isinstance(lines[0], dict) else None
    for command, files in LEGACY_FILES.items():
        if any((folder / name).exists() for name in files):
            return command
    return None


def written_files(folder: Path) -> set[str] | None:
    """What d2mae wrote into ``folder`` (relative paths), from its ledger; ``None`` for a folder written before
    d2mae kept one (its command's output then counts as d2mae's, as it did then)."""
    lines = _marker_lines(folder)
    if len(lines) < 2:
        return None
    return {str(d["file"]) for d in lines[1:] if isinstance(d, dict) and "file" in d}


def _not_written(folder: Path, ours: set[str] | None) -> list[Path]:
    """The files in ``folder`` that its ledger ``ours`` does not list (itself or a folder above it, an entry ending
    in '/'); none for a folder of this command from before the ledger (``None``)."""
    if ours is None:
        return []
    under = tuple(entry for entry in ours if entry.endswith("/"))
    files = (p for p in folder.rglob("*") if p.is_file() and p.name not in (MARKER, LOCK_NAME))
    return [p for p in files if not (p.relative_to(folder).as_posix() in ours
                                     or p.relative_to(folder).as_posix().startswith(under))]


def claim_folder(folder: str | Path, command: str, inputs: Sequence[str | Path | None] = (), *,
                 force: bool = False, resumable: bool = False, forceable: bool = True, option: str = "out",
                 outputs: Sequence[str | Path] = ()) -> None:
    """Check that ``command`` may write into ``folder`` (see the module docstring), then mark it as its output and
    keep every input and every file d2mae did not write there from being replaced.

    ``resumable``: an earlier output of this command is left to the command's own resume rule; otherwise it needs
    ``force``. A folder that holds other files needs ``force`` (``forceable``: the command has the flag).
    ``outputs``: the files the command will write, when it knows them now: one that may not be replaced is refused
    here, before the folder is marked and before any work.
    """
    folder = Path(folder)
    check_not_input(folder, inputs, option)
    if folder.exists() and not folder.is_dir():
        raise D2maeError(f"{folder} exists and is not a folder; choose another path", option=option)
    entries = sorted(p.name for p in folder.iterdir() if p.name not in (MARKER, LOCK_NAME)) if folder.is_dir() else []
    found = owner(folder) if entries else None
    if entries:
        if found != command and not force:
            whose = f"an output of d2mae {found}" if found else "files d2mae did not write"
            advice = "choose an empty or new folder" + (", or give --force to write beside them" if forceable else "")
            raise D2maeError(f"{folder} holds {whose} ({', '.join(entries[:3])}{' …' if len(entries) > 3 else ''}); "
                             f"{advice}", option=option)
        finished = any((folder / name).exists() for name in FINISHED.get(command, ()))
        if finished and not (resumable or force):  # an attempt that stopped before its result is simply redone
            raise D2maeError(f"{folder} holds an earlier output of d2mae {command}; give --force to replace it, or "
                             "choose another folder", option=option)
    check_writable(folder, option)  # creates it; a read-only or full disk, or a file in the path, is one line
    keep([*_not_written(folder, written_files(folder) if found == command else set()),
          *(str(i).split("#")[0] for i in inputs if i and Path(str(i).split("#")[0]).is_file())])
    check_new_files(outputs, option)
    if found != command:  # a new output (or, with --force, ours from now on beside the files it keeps)
        (folder / MARKER).write_text(json.dumps({"command": command}) + "\n", encoding="utf-8")
    keep_ledger(folder, folder / MARKER)


def check_new_files(paths: Iterable[str | Path], option: str = "out") -> None:
    """Before any work: refuse output files that this command may not replace (inputs, files d2mae did not write),
    with the first of them named."""
    for path in paths:
        try:
            check_replaceable(path)
        except D2maeError as exc:
            raise D2maeError(str(exc), option=option) from None


def check_output_path(path: str | Path, inputs: Sequence[str | Path | None] = (), *, force: bool = False,
                      option: str = "out", header: str = "") -> None:
    """A single output file: not an input nor inside an input folder, not a folder, and replaced only with
    ``force`` and only when d2mae wrote it (its first line starts with ``header``)."""
    path = Path(path)
    check_not_input(path, inputs, option)
    if path.is_dir():
        raise D2maeError(f"{path} is a folder; give a file name, e.g. {path / 'predictions.csv'}", option=option)
    if path.exists() and not force:
        raise D2maeError(f"{path} exists; d2mae never writes over a file it was not asked to replace — give --force "
                         "to replace it, or choose another file name", option=option)
    if path.exists():
        try:
            with path.open(encoding="utf-8") as fh:
                first = fh.readline()
        except (OSError, UnicodeDecodeError):
            first = ""
        if not first.startswith(header):
            raise D2maeError(f"{path} was not written by d2mae (not a prediction table); --force replaces only what "
                             "d2mae wrote — choose another file name", option=option)
    check_writable(path.parent if str(path.parent) else Path("."), option)  # its folder, probed now
    keep(str(i).split("#")[0] for i in inputs if i and Path(str(i).split("#")[0]).is_file())
