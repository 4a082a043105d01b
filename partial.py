"""The resumable answers of sample.py --prompts: OUT.partial.jsonl, one JSON line per finished answer,
so that the same command after Ctrl-C or kill -9 answers only the prompts still missing.

    python sample.py --ckpt out/final --prompts alpaca_eval_instructions.json --out outputs.json   # killed? again
"""
import hashlib
import json
from pathlib import Path

from checks import UserError


class Partial:
    """The answers of an unfinished --prompts run, one JSON line each as they finish, beside --out
    (OUT.partial.jsonl): the same command run again after Ctrl-C or kill -9 answers only the prompts
    still missing, and the final --out equals an uninterrupted run's. The first line records the dtype
    and a key over everything the answers depend on (checkpoint, token ids, budgets, settings): other
    prompts or settings are refused, not mixed in."""

    def __init__(self, out):
        self.path = Path(f"{out}.partial.jsonl")
        self.header, self.done = None, {}
        if not self.path.exists():
            return
        raw = self.path.read_bytes()
        complete = raw[:raw.rfind(b"\n") + 1]  # a kill -9 may leave half a line at the end: dropped
        try:
            lines = [json.loads(x) for x in complete.decode("utf-8").splitlines()]
            self.done = {int(x["index"]): str(x["output"]) for x in lines[1:]}
        except (ValueError, KeyError, TypeError):
            lines = None
        if lines is None or lines and not (isinstance(lines[0], dict) and {"dtype", "key"} <= lines[0].keys()):
            raise UserError(f"{self.path}: not the answers of an unfinished sample.py run; delete it")
        self.header = lines[0] if lines else None  # killed before its first line: start afresh
        with open(self.path, "r+b") as f:
            f.truncate(len(complete))

    def start(self, dtype, key):
        if self.header is not None and self.header["key"] != key:
            raise UserError(f"{self.path}: holds answers of another command (other prompts, checkpoint or "
                            f"settings); run that command to finish it, or delete the file to start afresh")
        self.header = {"dtype": dtype, "key": key}

    def add(self, answer):
        """Append one answer ({"index", "output"}), after the header when the file is new. Written through
        to the kernel at once, so a killed process loses nothing; not fsync'd: the fsyncs held ~4% of an
        805-answer run's wall time (py-spy's samples), and only a crash of the machine loses unsynced lines."""
        lines = [answer] if self.path.exists() and self.path.stat().st_size else [self.header, answer]
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines))


def answers_key(ckpt, ids, budgets, settings, dtype):
    what = {"ckpt": str(Path(ckpt).resolve()), "ids": ids, "budgets": budgets, "dtype": dtype,
            **{k: v for k, v in settings.items() if k != "compile"}}  # a compiled step gives the same tokens
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=list).encode()).hexdigest()
