"""One writer per output folder: a lock file that a second run is refused by, and that a dead run's successor
takes over.

Every command that writes a run folder (pretrain, obs, finetune, evaluate, compare, export, experiment, phantoms,
demo) holds ``FOLDER/.d2mae.lock`` while it works. Taking it first checks that the folder can be written at all (a
probe file written and removed), so a read-only or full disk, or a path below a regular file, is one clear line
before any work. The lock holds the owner's pid, host, process start time and command:

* free → taken (created with ``O_EXCL``: of two runs starting together exactly one gets it);
* held by a live process → refused, naming the owner and the lock file;
* held by a process of this host that is gone (killed, crashed) → taken over, with a note;
* held by another host → refused (this host cannot tell whether that run is alive).

Under torchrun only rank 0 takes the lock; the other ranks get its result (or its error).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from d2mae.runtime.distributed import DistContext, on_main
from d2mae.runtime.errors import D2maeError, os_error_message

LOCK_NAME = ".d2mae.lock"
_HELD: dict[str, int] = {}  # lock files this process holds, and how many nested holders (an experiment's stages)


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux ``/proc``), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]  # field 22 of stat, counted after the command name


def _alive(owner: dict[str, Any]) -> bool:
    pid = int(owner.get("pid", -1))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    started = owner.get("proc_start")
    return started is None or _start_time(pid) in (None, started)


def check_writable(folder: Path, option: str = "out") -> None:
    """Create ``folder`` if needed and write and remove a probe file in it; any failure is one clear line."""
    if folder.exists() and not folder.is_dir():
        raise D2maeError(f"{folder} exists and is not a folder; choose another path", option=option)
    probe = folder / f".d2mae-probe-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as fh:
            fh.write(b"d2mae")
            fh.flush()
            os.fsync(fh.fileno())
        probe.unlink()
    except OSError as exc:
        with contextlib.suppress(OSError):
            probe.unlink()
        raise D2maeError(f"{folder} cannot be written ({os_error_message(exc)})", option=option) from None


def _read(path: Path) -> dict[str, Any] | None:
    for _ in range(3):  # a lock being written right now: give its owner a moment
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return data if isinstance(data, dict) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            time.sleep(0.05)
    return {}


def acquire(folder: str | Path, command: str, option: str = "out") -> Path:
    """Take ``folder``'s lock for ``command`` (see the module docstring); returns the lock file."""
    folder = Path(folder)
    check_writable(folder, option)
    path = folder / LOCK_NAME
    if _HELD.get(str(path)):
        _HELD[str(path)] += 1
        return path
    me = {"pid": os.getpid(), "host": socket.gethostname(), "proc_start": _start_time(os.getpid()),
          "command": command, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _read(path)
            if owner is None:
                continue  # released meanwhile
            if owner.get("host") not in (None, me["host"]):
                raise D2maeError(f"{folder} is in use by d2mae {owner.get('command', '?')} on host {owner['host']} "
                                 f"(pid {owner.get('pid')}, since {owner.get('started', '?')}); wait for it, or "
                                 f"choose another folder; if that run is gone, delete {path}", option=option)
            if owner and _alive(owner):
                raise D2maeError(f"{folder} is in use by another d2mae {owner.get('command', '?')} (pid "
                                 f"{owner.get('pid')}, since {owner.get('started', '?')}; lock {path}); wait for it "
                                 "to finish, or choose another folder", option=option)
            print(f"note: taking over the lock of a d2mae {owner.get('command', 'run')} that is no longer running "
                  f"(pid {owner.get('pid', '?')}, since {owner.get('started', '?')}): {path}", file=sys.stderr)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            continue
        except OSError as exc:
            raise D2maeError(f"{folder} cannot be locked ({os_error_message(exc)})", option=option) from None
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(me, fh)
        _HELD[str(path)] = 1
        return path
    raise D2maeError(f"{folder}: could not take its lock {path} (another run keeps taking it); try again",
                     option=option)


def release(path: Path) -> None:
    """Remove a lock this process holds, when its outermost holder lets go (another's is left alone)."""
    depth = _HELD.get(str(path), 0)
    if depth > 1:
        _HELD[str(path)] = depth - 1
        return
    _HELD.pop(str(path), None)
    owner = _read(path)
    if owner is not None and owner.get("pid") == os.getpid():
        with contextlib.suppress(OSError):
            path.unlink()


@contextlib.contextmanager
def output_lock(folder: str | Path, command: str, ctx: DistContext | None = None, option: str = "out"
                ) -> Iterator[None]:
    """Hold ``folder``'s lock for the block (rank 0 takes it; every rank gets its result or its error)."""
    ctx = ctx or DistContext()
    path = on_main(ctx, lambda: str(acquire(folder, command, option)))
    try:
        yield
    finally:
        if ctx.is_main:
            release(Path(path))
