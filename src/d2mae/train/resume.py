"""Continuing a stopped run: one rule for which settings must stay the same, for pre-training and fine-tuning.

A resumed run must compute what the uninterrupted run would have: every option that changes results (a config
field not marked ``volatile``, :func:`d2mae.runtime.options.result_fields`) must have its saved value. Volatile
options — where and how a run executes and what it logs (device, precision, workers, progress, checkpoint
intervals, output folder) — may change. The process count must stay the same, since it sets how batches are split.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from d2mae.runtime.errors import D2maeError
from d2mae.runtime.options import result_fields


def settings_diff(saved: Mapping[str, Any], current: Any, skip: Iterable[str] = ()) -> list[str]:
    """``"name: saved → now"`` for each result-changing option of the config ``current`` whose saved value differs
    (options the saved run did not record, and those in ``skip``, are not compared)."""
    skip = set(skip)
    out = []
    for name in result_fields(type(current)):
        if name in skip or name not in saved:
            continue
        now = getattr(current, name)
        if saved[name] != now:
            out.append(f"{name}: {saved[name]!r} → {now!r}")
    return out


def check_resumable(where: str | Path, diffs: list[str]) -> None:
    """Refuse to resume ``where`` when its settings differ (``diffs``: :func:`settings_diff` and any others)."""
    if diffs:
        more = f" and {len(diffs) - 3} more" if len(diffs) > 3 else ""
        raise D2maeError(f"cannot resume {where}: the run's settings differ ({'; '.join(diffs[:3])}{more}); resume "
                         "with the original settings or choose a new output folder", option="resume")


def resume_file(resume: str | None, out: Path, name: str) -> Path | None:
    """The checkpoint a ``resume`` value points to: ``None``/``no`` (none), ``auto`` (``out/name`` if it exists),
    or a checkpoint file or a run folder holding ``name``."""
    if resume is None or str(resume).lower() in ("", "none", "no", "false"):
        return None
    if str(resume).lower() in ("auto", "true", "yes"):
        path = out / name
        return path if path.is_file() else None
    path = Path(resume)
    if path.is_dir():
        path = path / name
    if not path.is_file():
        raise D2maeError(f"{path} does not exist; give a {name} file, a run folder, or auto", option="resume")
    return path


def read_image_hashes(path: Path) -> dict[str, str]:
    """``{image: sha256}`` of a hash list (``sha256  image`` per line, as ``pretrain_hashes.txt``)."""
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        digest, _, ref = line.partition("  ")
        if ref:
            out[ref] = digest
    return out


def check_same_images(path: Path, refs: Sequence[str], hashes: Sequence[str]) -> None:
    """Refuse to resume when an image's content changed since the run started (its sha256 in ``path`` differs):
    the resumed run would mix two versions of it, and the recorded hash would no longer be the image's."""
    if not path.is_file():
        return
    recorded = read_image_hashes(path)
    changed = [r for r, h in zip(refs, hashes) if r in recorded and recorded[r] != h]
    if changed:
        more = f" and {len(changed) - 1} more" if len(changed) > 1 else ""
        raise D2maeError(f"cannot resume: {changed[0]}{more} changed since this run started (sha256 differs from "
                         f"{path}); put the original back, or start a new run in another folder", option="resume")
