"""What the tests share: the repo's paths, a tiny train.py configuration and ways to run the scripts,
small Meta-format folders and data files, and the ../shared fixture. ../shared (real data beside the
checkout) is optional: tests that need it skip, except under CI=true, where a missing ../shared fails
them (a CI that skips them tests less than it says)."""
import base64
import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))  # the scripts live flat at the repo root

import builtin_data  # noqa: E402 (after the path is set)
from model import ModelArgs, Transformer, save_meta  # noqa: E402
from tokenizer import PAT_STR, Tokenizer  # noqa: E402

# A from-scratch model small enough for a CPU test, in fp32 and on the CPU whatever the machine has
TINY = ["--dim", "64", "--n-layers", "2", "--n-heads", "4", "--max-len", "128", "--dtype", "fp32", "--device", "cpu",
        "--eval-examples", "16", "--eval-every", "2", "--lr", "3e-3", "--seed", "7"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
TORCHRUN_NOTE = " (torchrun's report of the stopped workers follows)"


@pytest.fixture
def shared():
    if not (SHARED / "README.md").is_file():
        if os.environ.get("CI") == "true":
            pytest.fail("../shared is not beside the checkout, and CI=true: tests that need it must run")
        pytest.skip("../shared is not beside the checkout")
    return SHARED


def command(script, args, nproc=1):
    """python SCRIPT ARGS, or the same under torchrun with nproc workers."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    return [sys.executable, *launcher, script, *map(str, args)]


def run_script(script, args, nproc=1, check=True, timeout=300, env=None, **kw):
    p = subprocess.run(command(script, args, nproc), cwd=ROOT, env=ENV | (env or {}), capture_output=True, text=True,
                       timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{script} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return p


def call(main, *args):
    """A script's main(argv) in this process, as a subprocess would report it: .returncode, .stdout, .stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def run_train(args, nproc=1, check=True, **kw):
    """train.py with the TINY settings first (later flags override them)."""
    return run_script("train.py", [*TINY, *args], nproc, check, **kw)


def kill_at_checkpoint(script_args, out, nproc=1, step=2):
    """Start `script_args` (train.py and its flags) in a session of its own, and kill -9 it (torchrun
    and every worker at once) as soon as OUT/ckpt/step_<step> exists: a crash with no chance to clean up."""
    p = subprocess.Popen(command(script_args[0], script_args[1:], nproc), cwd=ROOT, env=ENV, start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 200
    while not (Path(out) / "ckpt" / f"step_{step:07d}").exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL, "the run finished before it could be killed"


def assert_same_run(out, ref):
    """Two runs bit-identical: the same loss at every step and the same exported weights."""
    assert losses(out) == losses(ref)
    a, b = (torch.load(Path(o) / "final" / "consolidated.00.pth", weights_only=True) for o in (out, ref))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def read_log(out, baseline=False):
    """OUT/log.jsonl's records of the training steps; baseline=True: with the step-0 evaluation first."""
    records = [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]
    return records if baseline else [r for r in records if r["step"] > 0]


def losses(out):
    return [r["loss"] for r in read_log(out)]


def one_error_line(stderr, prog="train.py"):
    """The lines before torchrun's own report: exactly one, ours, and no traceback anywhere in them.
    Returned without the note that says torchrun's report follows."""
    end = stderr.rfind("\nTraceback (most recent call last):", 0, stderr.find("ChildFailedError"))  # the launcher's own
    ours = stderr[:end] if "ChildFailedError" in stderr and end >= 0 else stderr
    lines = [line.split("\r")[-1] for line in ours.splitlines()]
    # not torch's C++ or torchrun's logging lines ("[W...", "W1127 ..."), not the progress bar
    lines = [line for line in lines if line.strip() and "[W" not in line[:4] and not re.match(r" *\d+%\||[EWI]\d{4} ",
                                                                                              line)]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), stderr[-3000:]
    assert stderr.count(f"{prog}: error:") == 1 and "Traceback" not in ours, stderr[-3000:]
    return lines[0].removesuffix(TORCHRUN_NOTE)


def alpaca_file(path, n, seed=0):
    """n short built-in tasks as an Alpaca JSON file (checkable answers, fixed by seed)."""
    recs = [{"instruction": m[0]["content"], "input": m[0]["input"], "output": m[1]["content"]}
            for m in builtin_data.builtin_records(seed=seed, n=n)]
    path.write_text(json.dumps(recs))
    return path


def meta_folder(root, vocab_extra=0, poison=False, n_kv_heads=2):
    """A tiny model in Meta's layout: weights in root/tiny/, the built-in tokenizer one level up (as
    Meta's download puts it). poison: +inf in the embedding row of the byte <0xFF>, which no ASCII
    text uses, so every loss stays finite. -> (folder, tokenizer, model)"""
    tok = builtin_data.builtin_tokenizer(root / "tokenizer.model", seed=3)
    torch.manual_seed(0)
    m = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads,
                              vocab_size=tok.n_words + vocab_extra,
                              multiple_of=32))
    if poison:
        with torch.no_grad():
            m.tok_embeddings.weight[tok.sp.piece_to_id("<0xFF>"), 0] = float("inf")
    save_meta(m, root / "tiny", dtype=torch.float32)
    return root / "tiny", tok, m


# ---- generation on a tiny random model

PROMPTS = [[1, 5, 7, 9, 11], [1, 20], [1, 3, 4, 5, 6, 7, 8, 9, 10, 30, 40, 41, 42, 43, 44, 45, 46], [1]]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models: a second thread only adds synchronisation, and CI machines are often shared.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_model(seed=0, vocab_size=97):
    torch.manual_seed(seed)
    # n_kv_heads < n_heads so the cache is also exercised with GQA
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab_size, multiple_of=16))
    # Training's std-0.02 init leaves attention nearly uniform, blind to positions and padding
    # mistakes; unit-variance weights make every token and position change the answer.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 1.0 if name == "tok_embeddings.weight" else p.shape[1] ** -0.5)
    return model.eval()


def train_run(args):
    """train.py without TINY's --dtype and --device: the run chooses (test_cuda.py runs it on a GPU too)."""
    return run_script("train.py", ["--dim", "32", "--n-layers", "1", "--n-heads", "2", "--max-len", "64",
                                   "--eval-examples",
                                   "8", "--eval-every", "100", "--batch-size", "8", "--micro-batch-size", "8", *args],
                      check=False)


# ---- tokenizers made here: a ChatML byte-level BPE (SmolLM2's layout), a LLaMA-3 tiktoken file

CHATML = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2, as in SmolLM2's tokenizer
# made-up text with the traps: runs of spaces (leading, inner, trailing), tabs, newlines, CRLF, digits,
# unicode outside any small vocabulary, text that looks like a control token
MADE_UP = ["Hello world", "a  b   c    d     e", "  two leading", "trailing  ", " ", "   ", "\t tab\t\tstop\t",
           "line\nbreak\n\n  indented\r\nwindows\n", "12345 67.890 1e-9 3,141,592",
           "naïve café — “quotes” ½ ① 🙂 日本語", "def f(x):\n    return x  # comment\n\n\n", "ﬁne ligature",
           "▁ already a meta space", "", "I'LL pay 12345!!\n\n  ok", "<s> </s> <unk> [INST]",
           "<|eot_id|><|begin_of_text|> <|im_start|>user\nhi<|im_end|>"]
CORPUS = ("A quick brown fox jumps over the lazy dog, twice: 12345 and 67890. Naïve café owners said “hello”.\n"
          "def add(a, b):\n    return a + b  # spaces matter\n\tTabbed line.\nsystem user assistant Be brief. Hi! "
          "Hello! What is 2+2? It is 4. Don't stop; we'll see, they're here.\n\n")


def write_bpe(path, text, vocab_size):
    """A LLaMA-3-format tokenizer.model from tiktoken's own (pure Python) trainer and Meta's regex, as in
    test_llama3.py."""
    from tiktoken._educational import bpe_train

    ranks = bpe_train(text, vocab_size, PAT_STR, visualise=None)
    by_rank = sorted(ranks.items(), key=lambda x: x[1])
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in by_rank))
    return path


@pytest.fixture(scope="module")
def chatml_bpe():
    """A byte-level BPE trained here with the tokenizers library, ChatML's tokens added (SmolLM2's layout)."""
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    records = builtin_data.builtin_records(seed=0, n=300)
    lines = [m["content"] + " " + m.get("input", "") for r in records for m in r] + MADE_UP + [CORPUS] * 5
    hf.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=500, special_tokens=CHATML, show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return hf


def hf_folder(folder, hf, tokenizer_config=None, generation_config=None):
    folder.mkdir(parents=True, exist_ok=True)
    hf.save(str(folder / "tokenizer.json"))
    for name, config in (("tokenizer_config.json", tokenizer_config), ("generation_config.json", generation_config)):
        if config is not None:
            (folder / name).write_text(json.dumps(config))
    return folder / "tokenizer.json"


@pytest.fixture(scope="module")
def llama3_tok(tmp_path_factory):  # a LLaMA-3 tiktoken file from tiktoken's own trainer and Meta's regex
    records = builtin_data.builtin_records(seed=0, n=120)
    text = "\n".join(m["content"] + " " + m.get("input", "") for r in records for m in r) + CORPUS
    return Tokenizer(write_bpe(tmp_path_factory.mktemp("llama3") / "tokenizer.model", text, vocab_size=600))


def uneven_prompts(n=23, vocab=97, seed=0):
    """Prompts of 1 to ~60 tokens and budgets of 1 to 40: slots free up at very different steps."""
    g = torch.Generator().manual_seed(seed)
    lens = [1 + int(x) for x in torch.randint(0, 60, (n,), generator=g)]
    prompts = [[1] + torch.randint(3, vocab, (n - 1,), generator=g).tolist() for n in lens]
    budgets = [1 + int(x) for x in torch.randint(0, 40, (n,), generator=g)]
    return prompts, budgets
