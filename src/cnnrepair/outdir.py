"""An output folder written as one unit: checked first, staged beside it, published by one rename.

A command's results (a repaired model and its certificate, a points set, a report) must never be
half-written, must never be mixed with another run's, and must never replace a file that this run
did not write. :class:`OutputDir` gives that:

* ``check()`` (before any work) refuses a folder that holds files the command does not write, a
  folder that holds the command's earlier results unless ``overwrite``, and any input file that
  lies inside the folder under a name the command writes (the input would be replaced);
* while the command runs it holds a lock beside the folder (``.NAME.cnnrepair.lock``, an advisory
  ``flock``: a second run into the same folder is refused at once; a crashed run leaves no stale
  lock, since the kernel releases it);
* the results are written into a staging folder beside it (``.NAME.staging-*``) and published by
  renaming that folder into place, so a reader sees all of them or none; on any error, Ctrl-C or a
  full disk the staging folder is removed and nothing else is touched. With ``overwrite`` the earlier
  results (only files this command writes, checked again under the lock) are moved aside by one
  rename and removed after the new ones are in place.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from cnnrepair.errors import CnnRepairError

try:  # POSIX; elsewhere the lock is an exclusively created file
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


class FolderLock:
    """An advisory ``flock`` on ``.NAME.cnnrepair.lock`` beside a folder: one run at a time writes into it.

    The kernel releases the lock when its process dies, so a crash leaves no stale lock (the file may
    stay; the next run reuses it). The file is removed on release only if this run created it."""

    def __init__(self, folder: Path, busy: str):
        self.path = folder.parent / f".{folder.name}.cnnrepair.lock"
        self.busy = busy
        self._fd: int | None = None
        self._created = False

    def probe(self) -> None:
        """Raise CnnRepairError now if another run holds the lock (nothing is created)."""
        if self._fd is not None or fcntl is None or not self.path.exists():
            return
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise CnnRepairError(self.busy) from None
        finally:
            os.close(fd)

    def acquire(self) -> None:
        """Take the lock or raise CnnRepairError at once (never waits)."""
        if fcntl is None:  # pragma: no cover - Windows: an exclusively created file
            try:
                self._fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                self._created = True
            except FileExistsError:
                raise CnnRepairError(self.busy) from None
            return
        for _ in range(5):
            existed = self.path.exists()
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise CnnRepairError(self.busy) from None
            try:  # the holder before us may have removed the file while we waited: lock the file that is there now
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._fd, self._created = fd, not existed
                return
            os.close(fd)
        raise CnnRepairError(self.busy)

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            if self._created:
                self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)
            self._fd = None


class OutputDir:
    """Results folder ``out`` of one command; ``owns(name)`` says which file names the command writes."""

    def __init__(self, out: Path, owns: Callable[[str], bool], overwrite: bool = False, inputs: Sequence[Path | None] = (),
                 what: str = "results"):
        self.out = Path(out)
        self.owns = owns
        self.overwrite = overwrite
        self.inputs = [Path(p) for p in inputs if p is not None]
        self.what = what
        self.staging: Path | None = None
        self.lock = FolderLock(self.out, f"--out {self.out}: another cnnrepair run is writing there (lock .{self.out.name}."
                                         "cnnrepair.lock); wait for it to finish or choose another --out")
        self._made: list[Path] = []

    # -- checks -------------------------------------------------------------------------------------
    def _entries(self) -> list[str]:
        try:
            return sorted(e for e in os.listdir(self.out) if not e.startswith(f".{self.out.name}."))
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise CnnRepairError(f"--out {self.out}: cannot read the folder ({exc.strerror}); choose another --out") from None

    def check(self, again: bool = False) -> None:
        """Raise CnnRepairError if writing into ``out`` could replace or mix with files this run did not write."""
        out = self.out
        if out.exists() and not out.is_dir():
            raise CnnRepairError(f"--out {out} is a file; give a folder")
        if out.name in ("", ".", ".."):
            raise CnnRepairError(f"--out {out}: give a folder of its own (a new name), not '.' or '..'")
        real = os.path.realpath(out)
        for path in self.inputs:
            if os.path.realpath(path.parent) == real:
                raise CnnRepairError(f"the input {path} lies inside --out {out}; choose another --out (a run never writes beside "
                                     "its own inputs)")
        entries = self._entries()
        foreign = [e for e in entries if not self.owns(e)]
        if foreign:
            shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
            raise CnnRepairError(f"--out {out} holds files this command did not write ({shown}); give a new or empty folder")
        if entries and not self.overwrite:
            shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
            if again:
                raise CnnRepairError(f"--out {out}: another run wrote {self.what} there while this one ran ({shown}); nothing "
                                     "of this run was written: choose another --out or pass --overwrite")
            raise CnnRepairError(f"--out {out} already holds {shown} from an earlier run; choose another --out or pass --overwrite")
        if not again:
            self.lock.probe()  # another run holds the lock now: say so before any work
            writable = next((p for p in [out, *out.parents] if p.exists()), None)
            if writable is not None and not os.access(writable, os.W_OK | os.X_OK):
                raise CnnRepairError(f"--out {out}: {writable} is not writable; choose another --out")

    # -- the run ------------------------------------------------------------------------------------
    def __enter__(self) -> Path:
        self.check()
        try:
            self._make_parents()
            self.lock.acquire()
            self.check(again=True)
            self.staging = Path(self._mkdtemp())
        except BaseException:
            self._finish(ok=False)
            raise
        return self.staging

    def __exit__(self, exc_type, exc, tb) -> None:
        ok = False
        try:
            if exc_type is None:
                self._publish()
                ok = True
        finally:
            self._finish(ok)

    def _finish(self, ok: bool) -> None:
        if not ok and self.staging is not None and self.staging.exists():
            shutil.rmtree(self.staging, ignore_errors=True)  # a folder this run made, holding only what it wrote
        self.staging = None
        self.lock.release()
        if not ok:
            for p in reversed(self._made):  # folders this run made for --out, empty again
                try:
                    p.rmdir()
                except OSError:
                    break
        self._made = []

    def _make_parents(self) -> None:
        missing = [p for p in [self.out.parent, *self.out.parent.parents] if not p.exists()]
        for p in reversed(missing):
            try:
                p.mkdir()
            except FileExistsError:
                continue
            self._made.append(p)

    def _mkdtemp(self) -> str:
        import tempfile

        path = tempfile.mkdtemp(prefix=f".{self.out.name}.staging-", dir=self.out.parent)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(path, 0o777 & ~umask)  # mkdtemp makes it private; the published folder gets the usual permissions
        return path

    def _publish(self) -> None:
        self.check(again=True)
        old = None
        if self._entries():  # earlier results, replaced on purpose (--overwrite): moved aside by one rename
            old = self.out.parent / f".{self.out.name}.old-{secrets.token_hex(4)}"
            os.rename(self.out, old)
        try:
            os.rename(self.staging, self.out)  # onto a missing or empty folder: one atomic step
        except OSError as exc:
            if old is not None:
                os.rename(old, self.out)
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise CnnRepairError(f"--out {self.out}: another run wrote there while this one ran; nothing of this run was "
                                     "written: choose another --out") from None
            raise
        self.staging = None
        if old is not None:
            for name in os.listdir(old):
                if self.owns(name):  # checked under the lock: the folder held only this command's files
                    os.unlink(old / name)
            try:
                old.rmdir()
            except OSError:
                pass


def names(*exact: str, suffixes: Sequence[str] = (), prefixes: Sequence[str] = ()) -> Callable[[str], bool]:
    """A test for the file names a command writes: ``exact`` names, or a prefix with one of ``suffixes``."""
    exact_set = set(exact)

    def owns(name: str) -> bool:
        return name in exact_set or any(name.startswith(p) and any(name.endswith(s) for s in suffixes) for p in prefixes) or (
            not prefixes and any(name.endswith(s) for s in suffixes))

    return owns


def disk_error(exc: OSError, where: Path) -> CnnRepairError:
    """The one-line error for a failed write (full disk, read-only or missing folder)."""
    if exc.errno == errno.ENOSPC:
        return CnnRepairError(f"no space left on the device while writing into {where}; free some space or choose another --out "
                              "(nothing was written)")
    name = exc.filename or where
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return CnnRepairError(f"{name}: permission denied ({exc.strerror}); choose another --out or fix the permissions "
                              "(nothing was written)")
    return CnnRepairError(f"{name}: {exc.strerror or type(exc).__name__} (nothing was written)")
