"""What a run says: progress lines from rank 0, and training metrics (one JSON line per record always,
TensorBoard event files as well when it is installed).

``metrics.jsonl`` is the record every other part of d2mae reads (the experiment report's curves, ``evaluate``); the
TensorBoard copy is for people who watch runs there (``pip install "d2mae[tensorboard]"``, then
``tensorboard --logdir OUT/tensorboard``). A resumed run first drops the records after its resume point from both,
so a curve never shows the interrupted stretch twice.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Mapping

from d2mae.runtime.distributed import DistContext
from d2mae.runtime.errors import D2maeError
from d2mae.runtime.files import atomic_write_text, check_replaceable, record_written

TENSORBOARD_CHOICES = ("auto", "on", "off")
TENSORBOARD_HELP = ("also write TensorBoard event files to OUT/tensorboard: auto (when the tensorboard package is "
                    "installed), on (required) or off; metrics.jsonl is written always")


def say(ctx: DistContext | None, message: str) -> None:
    """A progress line or note on stderr, from rank 0 only (every process when ``ctx`` is ``None``)."""
    if ctx is None or ctx.is_main:
        print(message, file=sys.stderr, flush=True)


def read_jsonl(path: str | Path, strict: bool = False) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file, one JSON object per line.

    ``strict``: a line that is not a JSON object is a :class:`D2maeError` naming the file and line; otherwise it is
    skipped (the last line of a killed run may be cut short). No file gives no records, or an error when strict.
    """
    path = Path(path)
    if not path.is_file():
        if strict:
            raise D2maeError(f"metrics file {path} does not exist")
        return []
    out = []
    for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            if strict:
                raise D2maeError(f"metrics file {path}, line {no}: not valid JSON ({exc.msg})") from None
            continue
        if isinstance(rec, dict):
            out.append(rec)
        elif strict:
            raise D2maeError(f"metrics file {path}, line {no}: expected a JSON object per line")
    return out


def tensorboard_writer(mode: str, log_dir: Path, purge_step: int | None = None) -> Any:
    """A ``SummaryWriter`` for ``log_dir``, or ``None`` (mode ``off``, or ``auto`` without tensorboard installed).

    ``purge_step``: on resume, TensorBoard hides events logged at or after this step by the interrupted run.
    """
    if mode not in TENSORBOARD_CHOICES:
        raise D2maeError(f"unknown value '{mode}'; use auto, on or off", option="tensorboard")
    if mode == "off":
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        if mode == "on":
            raise D2maeError("is on, but the tensorboard package is not installed; install it with "
                             "pip install \"d2mae[tensorboard]\" (or turn it off)", option="tensorboard") from None
        return None
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


class MetricsLog:
    """Append records to a JSONL file and, when a TensorBoard writer is given, each numeric field as a scalar.

    Args:
        path: the ``metrics.jsonl`` file.
        step_key: the record field that orders records (``step`` for pre-training, ``epoch`` for fine-tuning).
        tensorboard: ``auto``/``on``/``off`` (see :func:`tensorboard_writer`).
        tb_dir: where the event files go.
        resume_at: the step (or epoch) the run continues after (0 for a new run): later records are dropped from
            the JSONL file and hidden in TensorBoard, so a resumed curve never shows the interrupted stretch twice.
        tag: prefix of the TensorBoard tags (``pretrain/loss``, ``fold_1/val_macro_f1``).
    """

    def __init__(self, path: Path, step_key: str, tensorboard: str = "auto", tb_dir: Path | None = None,
                 resume_at: int = 0, tag: str = "") -> None:
        self.path, self.step_key, self.tag = Path(path), step_key, tag
        check_replaceable(self.path)
        trim_jsonl(self.path, step_key, resume_at)
        record_written(self.path)  # appended to below, not through atomic_writer
        tb_dir = tb_dir or self.path.parent / "tensorboard"
        self.writer = tensorboard_writer(tensorboard, tb_dir, resume_at + 1)
        if self.writer is not None:
            record_written(tb_dir, folder=True)  # the event files TensorBoard names itself

    def write(self, record: Mapping[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
        if self.writer is not None:
            step = int(record[self.step_key])
            for key, value in record.items():
                if key != self.step_key and isinstance(value, (int, float)) and not isinstance(value, bool) \
                        and math.isfinite(value):
                    self.writer.add_scalar(f"{self.tag}/{key}" if self.tag else key, value, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def trim_jsonl(path: Path, key: str, last: int) -> None:
    """Keep the records whose ``key`` is ≤ ``last``; drop later ones and any half-written line."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and int(record.get(key, 0)) <= last:
            keep.append(line)
    atomic_write_text(path, "".join(f"{line}\n" for line in keep))
