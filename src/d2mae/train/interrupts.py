"""The exceptions a stop signal raises in training: the run state is on disk, and the command exits with 128 + the
signal."""

from __future__ import annotations

import signal
from pathlib import Path

from d2mae.runtime.errors import D2maeError


class Interrupted(Exception):
    """SIGTERM/SIGINT arrived during fine-tuning; the last finished epoch's state is on disk."""

    def __init__(self, signum: int, where: str) -> None:
        self.exit_code = 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name} {where}; continue with --resume")


class TrainingInterrupted(Exception):
    """SIGTERM/SIGINT arrived; a resume checkpoint was written. ``exit_code`` is 128 + the signal number."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None) -> None:
        self.signum = signum
        self.exit_code = 128 + signum
        self.step = step
        self.checkpoint = checkpoint
        name = signal.Signals(signum).name
        where = f"; checkpoint {checkpoint}, continue with --resume" if checkpoint else ""
        super().__init__(f"stopped by {name} after step {step}{where}")


class NonFiniteLossError(D2maeError):
    """The loss became NaN or infinite; the weights of that step were not applied."""
