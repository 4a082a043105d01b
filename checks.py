"""User mistakes end in one line: the number and path checks that train.py, sample.py and data.py run
before any work or write, and the lock that keeps two training runs out of one --out folder.
"""
import math
import os
import socket
from pathlib import Path


class UserError(Exception):
    """A mistake in the command line or the files it names: one line, exit status 2."""


def number(flag, x, lo=None, hi=None, above=None, below=None):
    """Raise UserError unless x is finite and lo <= x <= hi, above < x < below (the bounds given).
    NaN fails every comparison, so `alpha > 0` alone would let --alpha nan train the baseline."""
    ok = x is not None and math.isfinite(x)
    ok = ok and (lo is None or x >= lo) and (hi is None or x <= hi) and (above is None or x > above) and (below is None or x < below)
    if not ok:
        bounds = [f">= {lo}" if lo is not None else None, f"> {above}" if above is not None else None,
                  f"<= {hi}" if hi is not None else None, f"< {below}" if below is not None else None]
        raise UserError(f"{flag} must be a finite number {' and '.join(b for b in bounds if b)}, got {x}")


def writable_folder(flag, path):
    """A folder we will create or write into: not a file, and its nearest existing ancestor writable."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{path}: {flag} is a file, not a folder")
    existing = next(p for p in [path, *path.absolute().parents] if p.exists())
    if not existing.is_dir():
        raise UserError(f"{path}: {flag} cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{path}: {flag} is not writable (no write permission on {existing})")


def writable_file(flag, path, overwrite=False):
    """A file we will write at the end of a long job: check now that it can be, and refuse to replace
    an existing one unless asked to (an hours-long result is not lost to a forgotten --out)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: {flag} is a folder, not a file")
    if not path.absolute().parent.is_dir():
        raise UserError(f"{path}: {flag}'s folder does not exist")
    if not os.access(path.absolute().parent, os.W_OK | os.X_OK):
        raise UserError(f"{path}: {flag} is not writable (no write permission on its folder)")
    if path.exists() and not overwrite:
        raise UserError(f"{path}: {flag} exists; pass --overwrite to replace it")


class RunLock:
    """OUT/.lock holds "host pid" of the run's rank 0 while it runs. A second run on the same folder
    (say a --resume started while the killed run's workers still live) would otherwise collide with
    it at the next checkpoint rename; it stops with one line instead. A lock left by a process that
    no longer exists (kill -9) is taken over. A folder made for the lock is removed with it if the
    run wrote nothing else (it stopped on a mistake), so the corrected rerun is not refused."""
    NAME = ".lock"

    def __init__(self, out):
        self.path = Path(out) / self.NAME
        self.me = f"{socket.gethostname()} {os.getpid()}"

    def acquire(self):
        self.made_folder = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            host, _, pid = self.path.read_text().partition(" ")
            if host != socket.gethostname() or alive(int(pid or 0)):
                raise UserError(f"{self.path.parent}: another run (pid {pid} on {host}) is writing this --out; "
                                f"wait for it to end or stop it (its lock: {self.path})") from None
            tmp = self.path.with_name(f"{self.NAME}.{os.getpid()}")
            tmp.write_text(self.me)
            os.replace(tmp, self.path)  # stale: its process is gone
            return self
        with os.fdopen(fd, "w") as f:
            f.write(self.me)
        return self

    def release(self):
        try:
            if self.path.read_text() == self.me:
                self.path.unlink()
            if self.made_folder:
                self.path.parent.rmdir()  # fails, as it should, unless the folder is empty
        except OSError:
            pass


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return pid > 0
