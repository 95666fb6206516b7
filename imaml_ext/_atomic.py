"""Atomic file writes, shared by checkpoints (imaml_ext.checkpoint), data caches
(imaml_ext.data.common) and downloads (imaml_ext.data.omniglot).

A write goes to a temp file in the target's directory, is flushed and fsync'ed, then
``os.replace``d onto its name and the directory fsync'ed: a reader sees the old file or the
complete new one, never a half-written file under the name. A failing write removes its temp
file. A writer that is killed (SIGKILL, power loss) cannot: its temp file stays. Temp names
carry the writer's host and PID (``.<name>.<host>.<pid>.<random><suffix>``), and every write
first removes the temp files of the same target left by a dead process of this host; a temp file
of a live process, or of another host (a shared file system), is never touched.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

log = logging.getLogger("imaml_ext.atomic")


def _host() -> str:
    # Dots and slashes would make the name ambiguous or invalid: keep [A-Za-z0-9-].
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except OSError:
        return True  # cannot tell: keep the file
    return True


def sweep_stale_temps(path: str | Path, suffix: str = ".tmp", *,
                      names: str | None = None) -> list[Path]:
    """Removes the temp files of ``path`` left by killed writers of this host; returns them.
    With ``names`` (a regular expression), those of every file in ``path``'s directory whose
    name matches it instead (checkpoints: each step writes a new name, so a writer killed at
    one step left a temp file that no later write of that same name would sweep)."""
    path = Path(path)
    target = re.escape(path.name) if names is None else f"(?:{names})"
    pattern = re.compile(rf"^\.{target}\.{re.escape(_host())}\.(\d+)\."
                         rf"[A-Za-z0-9_]+{re.escape(suffix)}$")
    removed = []
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = pattern.match(entry.name)
        if m is None or int(m.group(1)) == os.getpid() or _pid_alive(int(m.group(1))):
            continue
        with contextlib.suppress(OSError):
            entry.unlink()
            removed.append(entry)
            log.warning("imaml_ext: removed %s, left by a writer (pid %s) that was killed",
                        entry, m.group(1))
    return removed


def fsync_dir(path: str | Path) -> None:
    """Makes a rename in ``path`` durable; not every file system lets a directory be fsynced."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    """The process's umask, read without changing it where Linux says it (/proc, 4.7+)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    old = os.umask(0o022)  # elsewhere: set and restore (not thread-safe, hence the above first)
    os.umask(old)
    return old


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None], *, suffix: str = ".tmp",
                 mode: int | None = None, validate: Callable[[Path], None] | None = None) -> None:
    """Writes ``path`` atomically: ``write(f)`` fills an open binary temp file; ``validate(tmp)``,
    if given, may raise to reject the complete temp file before it takes the name. The file
    gets ``mode``, by default what a plain ``open(path, "w")`` would give it (0o666 less the
    umask; the temp file itself is created 0o600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temps(path, suffix)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_host()}.{os.getpid()}.", suffix=suffix,
                               dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if validate is not None:
            validate(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask() if mode is None else mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
