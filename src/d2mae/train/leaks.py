"""The data-leak guard of fine-tuning: test images that were pre-training images, and identical images across splits."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

from d2mae.data.folds import Fold
from d2mae.data.labels import LabeledSet
from d2mae.io.artifacts import pretraining_hashes
from d2mae.runtime.errors import D2maeError
from d2mae.runtime.files import atomic_write_text


def leak_check(labeled: LabeledSet, folds: Sequence[Fold], hashes: Sequence[str], pretrained: str | Path | None,
               out: Path, strict: bool) -> dict[str, Any]:
    """Data-leak guard: test images that were pre-training images, and duplicate images across splits.

    Writes ``leak_pretraining.txt`` / ``duplicates_across_splits.txt`` into ``out`` when something is found; warns,
    or refuses with ``strict``.
    """
    report: dict[str, Any] = {"pretraining_hashes": None, "test_in_pretraining": 0, "duplicates_across_splits": 0}
    test_idx = sorted({int(i) for f in folds for i in f.test})
    problems = []
    if pretrained is not None:
        known, source = pretraining_hashes(pretrained)
        report["pretraining_hashes"] = source or None
        if known is None:
            print(f"note: {pretrained} records no pre-training image hashes, so the test images cannot be checked "
                  "against the pre-training data", file=sys.stderr)
        else:
            leaked = [labeled.refs[i] for i in test_idx if hashes[i] in known]
            report["test_in_pretraining"] = len(leaked)
            if leaked:
                atomic_write_text(out / "leak_pretraining.txt", "".join(f"{r}\n" for r in leaked))
                problems.append(f"{len(leaked)} of the {len(test_idx)} test images were pre-training images "
                                f"(list: {out / 'leak_pretraining.txt'})")
    by_hash: dict[str, list[int]] = {}
    for i, h in enumerate(hashes):
        by_hash.setdefault(h, []).append(i)
    dup_lines = []
    for f in folds:
        part = {int(i): name for name, idx in f.parts().items() for i in idx}
        for members in by_hash.values():
            if len(members) > 1 and len({part.get(i) for i in members} - {None}) > 1:
                dup_lines.append(f"fold {f.name}\t" + "\t".join(f"{part.get(i)}:{labeled.refs[i]}" for i in members))
    report["duplicates_across_splits"] = len(dup_lines)
    if dup_lines:
        atomic_write_text(out / "duplicates_across_splits.txt", "\n".join(dup_lines) + "\n")
        problems.append(f"{len(dup_lines)} group(s) of identical images (same content, other names) sit in different "
                        f"splits of a fold (list: {out / 'duplicates_across_splits.txt'})")
    for p in problems:
        if strict:
            raise D2maeError(f"data leak: {p}", option="strict")
        warnings.warn(f"possible data leak: {p}", stacklevel=2)
    return report
