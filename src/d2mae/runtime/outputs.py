"""One rule for every command that writes: into its own output (a folder, or the one file it was asked for), never
into one of its inputs, never over a file it did not create.

* An output is never an input, nor inside an input folder: not the image folder, the model folder, the labels file
  a command reads (``check_not_input``).
* A folder output is new, empty, or an earlier output of the same command. A command marks each folder it writes
  with ``.d2mae-output`` (its name); folders written before the marker existed are recognised by the command's own
  files (``pretrain.yaml``, ``obs.csv``, …). A folder holding anything else is refused, unless the command has
  ``--force`` and it is given (the user's word that those files may sit beside its outputs).
* An earlier output of the same command is continued with ``--resume`` (pretrain, finetune, experiment) or replaced
  with ``--force`` (obs, phantoms, evaluate --out, compare, export); without either it is refused. An earlier
  attempt that stopped before its result (no ``obs.csv``, ``labels.csv``, …) is simply done again.
* A file output (``predict --out FILE``) that exists is replaced only with ``--force``; so is a finished folder
  output (``predict --out DIR`` of a segmentation model: ``masks.csv``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Sequence

from d2mae.runtime.errors import D2maeError
from d2mae.runtime.locks import check_writable

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
    "export": ("d2mae_export.json",), "predict": ("masks.csv",),
}


def _resolved(path: str | Path) -> Path:
    return Path(os.path.realpath(str(path).split("#")[0]))  # a frame or shard-member reference: its file


def check_not_input(out: str | Path, inputs: Iterable[str | Path | None], option: str = "out") -> None:
    """Refuse an output that is one of ``inputs`` or lies inside an input folder."""
    target = _resolved(out)
    for given in inputs:
        if given is None or str(given) == "":
            continue
        source = _resolved(given)
        if target == source or (source.is_dir() and source in target.parents):
            what = "is" if target == source else f"lies inside {given}, which is"
            raise D2maeError(f"{out} {what} one of this command's inputs; d2mae never writes into its inputs — "
                             "choose another output path", option=option)


def owner(folder: Path) -> str | None:
    """The command whose output ``folder`` is (its marker, else its own files), or ``None``."""
    marker = folder / MARKER
    if marker.is_file():
        try:
            return str(json.loads(marker.read_text(encoding="utf-8")).get("command"))
        except (OSError, ValueError, AttributeError):
            return None
    for command, files in LEGACY_FILES.items():
        if any((folder / name).exists() for name in files):
            return command
    return None


def claim_folder(folder: str | Path, command: str, inputs: Sequence[str | Path | None] = (), *,
                 force: bool = False, resumable: bool = False, forceable: bool = True, option: str = "out") -> None:
    """Check that ``command`` may write into ``folder`` (see the module docstring), then mark it as its output.

    ``resumable``: an earlier output of this command is left to the command's own resume rule; otherwise it needs
    ``force``. A folder that holds other files needs ``force`` (``forceable``: the command has the flag).
    """
    folder = Path(folder)
    check_not_input(folder, inputs, option)
    if folder.exists() and not folder.is_dir():
        raise D2maeError(f"{folder} exists and is not a folder; choose another path", option=option)
    entries = sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []
    if entries:
        found = owner(folder)
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
    if not (folder / MARKER).is_file():
        (folder / MARKER).write_text(json.dumps({"command": command}) + "\n", encoding="utf-8")


def check_output_path(path: str | Path, inputs: Sequence[str | Path | None] = (), *, force: bool = False,
                      option: str = "out") -> None:
    """A single output file: not an input nor inside an input folder, not a folder, and replaced only with
    ``force``."""
    path = Path(path)
    check_not_input(path, inputs, option)
    if path.is_dir():
        raise D2maeError(f"{path} is a folder; give a file name, e.g. {path / 'predictions.csv'}", option=option)
    if path.exists() and not force:
        raise D2maeError(f"{path} exists; d2mae never writes over a file it was not asked to replace — give --force "
                         "to replace it, or choose another file name", option=option)
    check_writable(path.parent if str(path.parent) else Path("."), option)  # its folder, probed now
