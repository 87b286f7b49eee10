"""Files a run writes whole or not at all.

``mlflow-preproc run -o OUT`` writes its outputs (and rejects) to a temporary file beside the
target and renames it over the target only when the run ends normally. A run that fails (a
missing input, a bad model) or is stopped (Ctrl-C, SIGTERM) leaves the file that was there
before as it was, never a truncated or half-written one; the rename is atomic because both
names are in one folder.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
from collections.abc import Iterable, Iterator
from typing import IO


class InputOverwritten(ValueError):
    """An output path names one of the run's inputs."""


class CannotWrite(ValueError):
    """The folder of an output cannot take a new file; the message says which and why."""


def refuse_inputs_as_outputs(inputs: Iterable[str],
                             outputs: Iterable[tuple[str, str, str]]) -> None:
    """Raise :class:`InputOverwritten` if an output ``(what, path, fix)`` is one of ``inputs``
    (``-`` is stdin), by name or by file (a symlink, another spelling of the path)."""
    for what, path, fix in outputs:
        if any(where != "-" and _same_file(where, path) for where in inputs):
            raise InputOverwritten(f"{what} {path} is also an input; {fix}")


def _same_file(a: str, b: str) -> bool:
    if os.path.abspath(a) == os.path.abspath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist: not the same file
        return False


class PendingFile:
    """A temporary file beside ``path`` that becomes ``path`` on :meth:`commit`.

    Created on the first :meth:`open` only, so a run that writes nothing creates nothing.
    """

    def __init__(self, path: str):
        self.path = path
        self._tmp: str | None = None
        self._file: IO[bytes] | None = None

    def open(self) -> IO[bytes]:
        """The temporary file, open for binary writing."""
        if self._file is None:
            folder, name = os.path.split(os.path.abspath(self.path))
            try:
                fd, self._tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".partial",
                                                 dir=folder)
            except OSError as exc:
                fix = "create it" if isinstance(exc, FileNotFoundError) else \
                    "write somewhere this user may, or fix the folder's permissions"
                raise CannotWrite(f"cannot write {self.path}: {exc.strerror} (the folder "
                                  f"{folder}); {fix}") from None
            self._file = os.fdopen(fd, "wb")
        return self._file

    @property
    def opened(self) -> bool:
        return self._file is not None

    def commit(self) -> None:
        """Flush the temporary file to disk and rename it over ``path``."""
        if self._file is None:
            return
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        _copy_mode(self.path, self._tmp)
        os.replace(self._tmp, self.path)
        self._file = self._tmp = None

    def discard(self) -> None:
        """Remove the temporary file; ``path`` stays as it was."""
        if self._file is not None:
            self._file.close()
            with contextlib.suppress(FileNotFoundError):
                os.remove(self._tmp)
        self._file = self._tmp = None


def _copy_mode(target: str, tmp: str) -> None:
    # mkstemp makes a 0600 file: give the new file the old one's mode, or what a plain
    # open() would have given it.
    if os.path.exists(target):
        shutil.copymode(target, tmp)
        return
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)


@contextlib.contextmanager
def replaced_when_done(path: str) -> Iterator[IO[bytes]]:
    """A binary file whose content replaces ``path`` when the block ends normally; when it
    raises (KeyboardInterrupt included), ``path`` is left as it was and nothing else stays."""
    pending = PendingFile(path)
    stream = pending.open()
    try:
        yield stream
    except BaseException:
        pending.discard()
        raise
    pending.commit()


class Terminated(BaseException):
    """SIGTERM, raised where the run is, so that its temporary files are removed."""

    exit_code = 128 + signal.SIGTERM


@contextlib.contextmanager
def terminate_by_exception() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` (as Ctrl-C raises
    KeyboardInterrupt) instead of ending the process where it stands."""
    def terminated(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
