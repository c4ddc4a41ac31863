"""How artefacts reach disk: atomic writes, file hashes, resume states loadable with ``weights_only=True``.

Every file d2mae writes goes through :func:`atomic_writer` (temp file in the same folder, fsync, rename), so a
run killed at any instant leaves either the old file or the new one, never half of one. It is also where the rule
of :mod:`d2mae.runtime.outputs` holds for every write: a path this process was told to keep (an input, a file in
its output folder that d2mae did not write) is never replaced, and each file written into a claimed output folder
is added to that folder's ledger, the list of what d2mae wrote there.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch

from d2mae.runtime.errors import D2maeError


def _default_mode(fd: int) -> None:
    """Give a ``mkstemp`` file (created 0600) the permissions a plain ``open`` would: 0666 minus the umask."""
    umask = os.umask(0)
    os.umask(umask)
    with contextlib.suppress(OSError):
        os.fchmod(fd, 0o666 & ~umask)


_KEEP: set[str] = set()  # real paths this process must not replace: its inputs, files d2mae did not write
_LEDGERS: dict[str, Path] = {}  # a claimed output folder (real path) → its ledger (the marker file)


def keep(paths: Iterable[str | Path]) -> None:
    """Never replace these files in this process (:func:`check_replaceable`)."""
    _KEEP.update(os.path.realpath(str(p)) for p in paths)


def keep_ledger(folder: str | Path, ledger: Path) -> None:
    """From now on, append every file written into ``folder`` to ``ledger`` (one JSON line each)."""
    _LEDGERS[os.path.realpath(str(folder))] = ledger


def release() -> None:
    """Forget the kept paths and the ledgers: a new command starts (the command line calls it)."""
    _KEEP.clear()
    _LEDGERS.clear()


def check_replaceable(path: str | Path) -> None:
    """Refuse to write ``path`` when this process must keep it: one of its inputs, or a file in its output folder
    that d2mae did not write.

    Raises:
        D2maeError: naming the file and what to do.
    """
    if os.path.realpath(str(path)) in _KEEP:
        raise D2maeError(f"{path} is an input or a file d2mae did not write; d2mae never replaces it, with --force "
                         "or without — move it away or choose another output folder")


def record_written(path: str | Path, folder: bool = False) -> None:
    """Add ``path`` (with ``folder``: everything under it) to the ledger of the innermost claimed folder that
    holds it."""
    real = os.path.realpath(str(path))
    owners = [f for f in _LEDGERS if real.startswith(f + os.sep)]
    if owners:
        root = max(owners, key=len)
        with open(_LEDGERS[root], "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"file": os.path.relpath(real, root) + ("/" if folder else "")}) + "\n")


@contextlib.contextmanager
def atomic_writer(path: str | Path) -> Iterator[Any]:
    """A binary file handle whose content replaces ``path`` atomically when the block ends without error: a temp
    file in the same folder, fsync, then a rename over the target (and an fsync of the folder, so the rename lasts).
    It streams: a ViT-B resume state is over a gigabyte, with no second copy in memory. A path this process must
    keep is refused before anything is written (:func:`check_replaceable`)."""
    path = Path(path)
    check_replaceable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    _default_mode(fd)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:  # a full or read-only disk: name the file being written, not its temp file or none
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if exc.filename in (None, tmp):
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    record_written(path)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (:func:`atomic_writer`)."""
    with atomic_writer(path) as fh:
        fh.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def csv_text(fields: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> str:
    """A CSV table as text: a header of ``fields``, then one line per row (``\n`` line ends)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(fields), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def read_csv_rows(path: str | Path) -> list[dict[str, str]]:
    """The rows of a CSV file with a header, as dicts of strings."""
    with Path(path).open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def file_sha256(path: str | Path) -> str:
    """sha256 hex of a file's bytes, read in 1 MiB chunks; an unreadable file is an ``OSError`` for the caller."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------------------------
# Resume states: saved atomically, loadable with torch.load(weights_only=True)
# --------------------------------------------------------------------------------------------------------------------


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """``torch.save`` a resume state atomically. Only tensors and plain Python values: loadable with
    ``torch.load(weights_only=True)`` (checked here, so a bad state fails at save time, not at resume time)."""
    _check_plain(state, "state")
    with atomic_writer(path) as fh:
        torch.save(state, fh)


def load_checkpoint(path: str | Path, given: bool = False) -> dict[str, Any]:
    """Load a resume state with ``torch.load(weights_only=True)`` onto the CPU; unreadable files are clear errors in
    d2mae's words (never torch's advice to load it unsafely). ``given``: the user named the file (``--resume FILE``),
    so the advice is to name another, not to delete it."""
    path = Path(path)
    if not path.is_file():
        raise D2maeError(f"resume checkpoint {path} does not exist; check the path or drop --resume")
    todo = ("give the resume.pt of a d2mae run, or drop --resume" if given else
            "delete it to start this run over (or put back the file the run wrote)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "unsupported global" not in str(exc).lower():  # not a pickle of allowed types: damaged, not unsafe
            raise D2maeError(f"resume checkpoint {path} cannot be read: it is damaged or not a checkpoint; {todo}"
                             ) from None
        raise D2maeError(f"resume checkpoint {path} cannot be read safely: it holds Python objects other than "
                         f"tensors and plain values, so it was not written by d2mae or was changed since; d2mae never "
                         f"loads such a file; {todo}") from None
    except Exception:  # noqa: BLE001 - torch raises many types for a damaged file
        raise D2maeError(f"resume checkpoint {path} cannot be read: it is damaged or not a checkpoint; {todo}"
                         ) from None
    if not isinstance(state, dict):
        raise D2maeError(f"resume checkpoint {path} does not hold a d2mae resume state; {todo}")
    return state


_PLAIN = (type(None), bool, int, float, str, torch.Tensor, torch.Size, torch.dtype, torch.device)


def _check_plain(obj: Any, where: str) -> None:
    """Refuse values that ``torch.load(weights_only=True)`` would not load (numpy arrays, custom classes)."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"{where}: key {key!r} is not a str or int")
            _check_plain(value, f"{where}.{key}")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            _check_plain(value, f"{where}[{i}]")
    elif not isinstance(obj, _PLAIN) or isinstance(obj, np.generic):
        raise TypeError(f"{where}: {type(obj).__name__} cannot be loaded with weights_only=True")


