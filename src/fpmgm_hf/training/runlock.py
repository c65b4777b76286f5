"""One run per output folder: a lock file that holds the owner's pid.

    with run_lock(os.path.join(out, LOCK_NAME)):
        ...  # a second run on the same folder raises OutputLockedError naming the first run's pid

The lock itself is a kernel lock (`fcntl.flock`) on that file, so it ends with its process however the process
ends, SIGKILL included. A lock file left behind by a killed run is therefore stale: it is detected as such (the
flock is free, and the pid it names is reported as no longer running) and taken over. The file records pid,
host, start time and command line for the messages. Where `fcntl` is missing (Windows), a lock file whose pid is
not alive counts as stale. Standard library only.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from contextlib import contextmanager

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

logger = logging.getLogger(__name__)

LOCK_NAME = ".fpmgm-run.lock"
_FOLDER_LOCK = ".{}.fpmgm.lock"  # beside the folder, not in it: a folder replaced by an atomic swap keeps its lock


def folder_lock_path(folder) -> str:
    """The one lock file of an output folder that every tool writing there holds (`fpmgm-train --out`, the
    converter's `--output`, `fpmgm-eval sweep --out`): a hidden sibling `.NAME.fpmgm.lock`."""
    parent, name = os.path.split(os.path.abspath(os.fspath(folder)).rstrip(os.sep))
    return os.path.join(parent, _FOLDER_LOCK.format(name))


def folder_lock(folder, enabled: bool = True):
    """`run_lock` on `folder_lock_path(folder)`: one writer per output folder, across tools."""
    return run_lock(folder_lock_path(folder), enabled)


class OutputLockedError(RuntimeError):
    """Another live run holds the output folder's lock."""


def pid_alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by another user
        return True
    return True


def _owner(text: str) -> dict:
    try:
        info = json.loads(text)
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}


def _describe(info: dict) -> str:
    if not info:
        return "an unknown process (the lock file is empty)"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("started", 0)))
    return f"pid {info.get('pid')} on {info.get('host')}, started {started}: {info.get('command', '?')}"


def _locked_folder(path: str) -> str:
    """The folder a lock file guards: NAME for `.NAME.fpmgm.lock`, else the lock's own folder."""
    parent, base = os.path.split(path)
    if base.startswith(".") and base.endswith(".fpmgm.lock"):
        return os.path.join(parent, base[1:-len(".fpmgm.lock")])
    return parent or "."


def _refuse(path: str, info: dict) -> OutputLockedError:
    return OutputLockedError(
        f"{_locked_folder(path)} is in use by another run ({_describe(info)}); lock file {path}. Wait for "
        "that run to finish, or give this one a different output folder. (A lock whose run was killed is taken "
        "over automatically.)")


def _my_info() -> bytes:
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
            "command": " ".join(sys.argv)[:500]}
    return json.dumps(info).encode()


def _acquire_flock(path: str) -> int:
    for _ in range(20):  # retried only while a finishing owner unlinks the file under us
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: by a live process, since the kernel drops the locks of dead ones
            info = _owner(os.pread(fd, 1 << 16, 0).decode(errors="replace"))
            os.close(fd)
            raise _refuse(path, info) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        previous = _owner(os.pread(fd, 1 << 16, 0).decode(errors="replace"))
        if previous:
            state = "still running, but not holding the lock" if pid_alive(previous.get("pid")) else "not running"
            logger.warning("%s: taking over a stale lock of %s (%s).", path, _describe(previous), state)
        os.ftruncate(fd, 0)
        os.pwrite(fd, _my_info(), 0)
        return fd
    raise OutputLockedError(f"{path}: could not take the lock (the file keeps being replaced).")


def _acquire_pidfile(path: str) -> int:  # pragma: no cover - without fcntl
    for _ in range(20):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            with open(path) as f:
                info = _owner(f.read())
            if pid_alive(info.get("pid")):
                raise _refuse(path, info) from None
            logger.warning("%s: taking over a stale lock of %s (not running).", path, _describe(info))
            os.remove(path)
            continue
        os.write(fd, _my_info())
        return fd
    raise OutputLockedError(f"{path}: could not take the lock.")


@contextmanager
def run_lock(path, enabled: bool = True):
    """Hold the lock file `path` for the `with` block (a no-op when `enabled` is False, e.g. on the non-main
    processes of a distributed run). Raises `OutputLockedError` naming the live owner."""
    if not enabled:
        yield None
        return
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd = _acquire_flock(path) if fcntl is not None else _acquire_pidfile(path)
    try:
        yield path
    finally:
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                os.remove(path)  # still ours: remove it while holding the lock
        except OSError:
            pass
        os.close(fd)  # releases the flock
