"""A mistake costs one line, never a run or a file: the error family every script raises, the wrapper
every script's main runs under, the number and path checks done before any work, the write that is
never seen half done, and the lock that keeps two training runs out of one --out folder. Every script
uses it; what it does shows in any mistake:

    python train.py --alpha nan       # train.py: error: --alpha must be a finite number >= 0, got nan (exit 2)
"""
import argparse
import json
import math
import os
import shutil
import socket
import sys
import time
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path

import torch


class UserError(Exception):
    """A mistake in the command line or in a file it names: one line, exit status 2."""


class CheckpointError(UserError):
    """A checkpoint or tokenizer file that cannot be used; the message names it."""


class DataError(UserError):
    """A data file that cannot be used; the message names it and the record."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose own errors (a missing value, a bad choice) end like ours: one line, not a usage block."""

    def error(self, message):
        raise UserError(message)


def run_main(prog, main, argv=None):
    """Run main(argv) -> exit status: a UserError prints `prog: error: ...` and gives 2, Ctrl-C prints
    one line and gives 130, never a traceback. Under torchrun only rank 0 speaks, and says that
    torchrun's own report of the stopped workers comes next (torchrun then exits 1 itself)."""
    rank = int(os.environ.get("RANK", 0))
    after = " (torchrun's report of the stopped workers follows)" if "TORCHELASTIC_RUN_ID" in os.environ else ""
    try:
        return main(argv) or 0
    except SystemExit as e:  # --help
        return e.code or 0
    except UserError as e:
        line, status = f"{prog}: error: {e}", 2
    except KeyboardInterrupt as e:  # main may raise it again with where it stopped as its message
        line, status = f"{prog}: interrupted{' ' + str(e) if str(e) else ''}", 130
    if rank == 0:
        print(line + after, file=sys.stderr, flush=True)
    elif after:  # let rank 0's line out first: torchrun stops every worker once it sees one gone
        time.sleep(1)
    return status


def number(flag, x, lo=None, hi=None, above=None, below=None):
    """Raise UserError unless x is finite and lo <= x <= hi, above < x < below (the bounds given).
    NaN fails every comparison, so `alpha > 0` alone would let --alpha nan train the baseline."""
    ok = x is not None and math.isfinite(x)
    ok = ok and (lo is None or x >= lo) and (hi is None or x <= hi)
    ok = ok and (above is None or x > above) and (below is None or x < below)
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


def make_folder(flag, path):
    """mkdir -p, or one line: root passes every permission check, so a folder the system refuses (/proc/x)
    is only found out here."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{path}: {flag} cannot be created ({e.strerror or e})") from None


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


def read_json(path, error=UserError, expect=None, jsonl=False):
    """The JSON value in `path` (with jsonl=True, JSONL too: one value a line, read as a list), checked to
    be an `expect` (dict or list) where given; anything else is `error` in one line naming the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"{path}: cannot read ({str(e).splitlines()[0]})") from None
    try:
        value = json.loads(text)
        if jsonl and isinstance(value, dict) and len(text.strip().splitlines()) == 1:
            value = [value]  # JSONL with a single record
    except json.JSONDecodeError as e:
        if not jsonl or text.lstrip().startswith("["):
            raise error(f"{path}: not a JSON file (invalid JSON at line {e.lineno}: {e.msg})") from None
        value = []
        for lineno, line in enumerate(text.splitlines(), 1):
            try:
                value += [json.loads(line)] if line.strip() else []
            except json.JSONDecodeError as e:
                raise error(f"{path}: invalid JSON on line {lineno} (JSONL: one record per line): {e.msg}") from None
    if expect is not None and not isinstance(value, expect):
        want = {dict: "a JSON object", list: "a JSON list of records or JSONL" if jsonl else "a JSON list"}[expect]
        raise error(f"{path}: expected {want}, got one JSON {type(value).__name__}")
    return value


def config_value(config, key, path, kind, default=None):
    """config[key] as a `kind` (bool, int or float: an int is a float too, a bool is neither), or
    CheckpointError naming the key and file: "dim": "256" would fail far away, in a tensor shape.
    null or absent means `default`, as in transformers."""
    v = default if config.get(key) is None else config[key]
    ok = isinstance(v, bool) if kind is bool else isinstance(v, (int, float) if kind is float else kind)
    if v is not None and not (ok and (kind is bool or not isinstance(v, bool))):
        what = {bool: "true or false", int: "an integer"}.get(kind, "a number")
        raise CheckpointError(f'{path}: "{key}" must be {what}, got {v!r}')
    return v


def load_weights(path):
    """torch.load of a weights file that never executes code from it and maps it instead of reading it;
    anything else is one line naming the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # UnpicklingError (code in the pickle), RuntimeError (not a zip checkpoint), ...
        pickled = "weights_only" in str(e).lower() or "Unsupported" in str(e)
        why = "refusing a pickle that is not plain weights" if pickled else str(e).splitlines()[0]
        raise CheckpointError(f"{path}: not a weights-only PyTorch checkpoint ({why})") from None


def config_dataclass(cls, d, source, ignored=()):
    """A config dict (params.json) -> the dataclass cls whose fields it sets, each value checked against its
    field's type. Another key could change the math (vision_*, moe_args, lora_args, ...): refused, since
    silently wrong logits are the one outcome not allowed. Ignored: the keys `ignored` and keys set to null."""
    known = {f.name for f in fields(cls)}
    for k in sorted(set(d) - known - set(ignored)):
        if d[k] is not None:
            raise CheckpointError(f"{source}: key {k!r} changes the model and is not implemented here")
    for f in fields(cls):
        config_value(d, f.name, source, getattr(f.type, "__args__", (f.type,))[0])  # Optional[int] -> int
    return cls(**{k: v for k, v in d.items() if k in known and v is not None})


def remove(path):
    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)


def check_replace(path, marker):
    """A folder that holds files may be replaced only if it holds `marker` too (a checkpoint of that kind,
    e.g. params.json): a mistyped output path never deletes someone's data. atomic(marker=...) checks it;
    a long job checks it first, before its work."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir()) and not (path / marker).exists()):
        raise CheckpointError(f"{path}: exists and is not a checkpoint folder; refusing to replace it")


@contextmanager
def atomic(path, folder=False, tmp=None, marker=None):
    """Yield a temporary name beside `path` to write into (a fresh folder when folder=True); when the
    block ends without an error it is renamed onto `path` (a folder already there is replaced whole),
    else removed. So a crash or Ctrl-C never leaves a half-written file or folder: readers see the old
    one or the new one. tmp: the temporary name, when other processes must know it (DCP's ranks).
    marker: see check_replace."""
    path = Path(path)
    if marker:
        check_replace(path, marker)
    tmp = Path(tmp) if tmp else path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if tmp.exists():
        remove(tmp)  # left by a killed run
    if folder:
        tmp.mkdir(parents=True)
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():  # a rename cannot replace a folder that holds files
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        if tmp.exists():
            remove(tmp)
        raise


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
        make_folder("--out", self.path.parent)  # the run's first write: the checks let it through, the system may not
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            host, _, pid = self.path.read_text().partition(" ")
            if host != socket.gethostname() or alive(int(pid or 0)):
                raise UserError(f"{self.path.parent}: another run (pid {pid} on {host}) is writing this --out; "
                                f"wait for it to end or stop it (its lock: {self.path})") from None
            with atomic(self.path) as tmp:  # stale: its process is gone
                tmp.write_text(self.me)
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
