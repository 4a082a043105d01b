"""Issue 10: every user mistake ends in one line and exit status 2, nothing broken is ever written, and
the run-state paths (Ctrl-C, a second run on the same --out, resume across epochs, --pack) are exact."""
import json
import math
import re
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import builtin_data
import checkpoint
import data
import sample
import train
from checks import RunLock
from model import CheckpointError, ModelArgs, Tokenizer, Transformer, load_meta, save_meta
from noise import neftune

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--dim", "64", "--n-layers", "2", "--n-heads", "4", "--max-len", "128", "--dtype", "fp32",
        "--eval-examples", "16", "--eval-every", "2", "--lr", "3e-3", "--seed", "7"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def run(args, nproc=1, check=True, **kw):
    cmd = [sys.executable, "train.py", *TINY, *args]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train.py", *TINY, *args]
    p = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"train.py failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return p


def log(out):
    return [json.loads(l) for l in (Path(out) / "log.jsonl").read_text().splitlines()]


def one_error_line(stderr, prog="train.py"):
    """The lines before torchrun's own report: exactly one, ours, and no traceback anywhere in them."""
    end = stderr.rfind("\nTraceback (most recent call last):", 0, stderr.find("ChildFailedError"))  # the launcher's own
    ours = stderr[:end] if "ChildFailedError" in stderr and end >= 0 else stderr
    lines = [l.split("\r")[-1] for l in ours.splitlines()]
    # not torch's C++ or torchrun's logging lines ("[W...", "W1127 ..."), not the progress bar
    lines = [l for l in lines if l.strip() and "[W" not in l[:4] and not re.match(r" *\d+%\||[EWI]\d{4} ", l)]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), stderr[-3000:]
    assert stderr.count(f"{prog}: error:") == 1 and "Traceback" not in ours, stderr[-3000:]
    return lines[0]


def alpaca_file(path, n, seed=0):
    """n short built-in tasks as an Alpaca JSON file (checkable answers, fixed by seed)."""
    recs = [{"instruction": m[0]["content"], "input": m[0]["input"], "output": m[1]["content"]}
            for m in builtin_data.builtin_records(seed=seed, n=n)]
    path.write_text(json.dumps(recs))
    return path


# ----------------------------------------------------------------------------- numbers and paths

@pytest.mark.parametrize("args, msg", [
    (["--alpha", "nan"], "--alpha must be a finite number >= 0, got nan"),
    (["--alpha", "5", "inf"], "--alpha must be a finite number"),
    (["--lr", "nan"], "--lr must be"),
    (["--lr=-1e-4"], "--lr must be"),
    (["--lr", "abc"], "argument --lr: invalid float value: 'abc'"),
    (["--lr", "inf"], "--lr must be"),
    (["--weight-decay=-0.1"], "--weight-decay"),
    (["--clip", "0"], "--clip must be a finite number > 0"),
    (["--warmup", "-1"], "--warmup"),
    (["--warmup", "1.5"], "--warmup"),
    (["--eval-frac", "nan"], "--eval-frac"),
    (["--eval-frac", "1"], "--eval-frac"),
    (["--micro-batch-size", "0"], "--micro-batch-size must be a finite number >= 1, got 0"),
    (["--batch-size", "0"], "--batch-size"),
    (["--eval-every", "0"], "--eval-every"),
    (["--save-every", "0"], "--save-every"),
    (["--max-steps", "0"], "--max-steps"),
    (["--max-steps", "-1"], "--max-steps"),
    (["--keep", "0"], "--keep"),
    (["--log-every", "0"], "--log-every"),
    (["--eval-examples", "0"], "--eval-examples"),
    (["--epochs", "0"], "--epochs"),
    (["--max-len", "0"], "--max-len"),
    (["--seed", "-1"], "--seed"),
    (["--n-layers", "0"], "--n-layers"),
    (["--dim", "30", "--n-heads", "4"], "--dim 30 must be --n-heads 4 x an even head size"),
    (["--dim", "36", "--n-heads", "4"], "--dim 36 must be"),
    (["--batch-size", "8", "--micro-batch-size", "16"], "--micro-batch-size 16 is larger than --batch-size 8"),
    (["--eval-data", "no_such.jsonl"], "no_such.jsonl: --eval-data file not found"),
])
def test_bad_number_one_line_before_anything_is_written(tmp_path, capsys, args, msg):
    # checked in parse_args, before the process group or any file: in-process is the same code path
    out = tmp_path / "o"
    assert train.main([*TINY, "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert one_error_line(err) and msg in err, err
    assert not out.exists()


@pytest.mark.parametrize("case", ["file", "under_file"])
def test_out_that_cannot_be_a_folder(tmp_path, capsys, case):
    f = tmp_path / "a_file"
    f.write_text("keep")
    out = f if case == "file" else f / "sub"
    assert train.main([*TINY, "--out", str(out), "--max-steps", "1"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(out) in line and "is a file" in line and f.read_text() == "keep"


@pytest.mark.parametrize("args, msg", [
    (["--lr", "nan"], "--lr must be"),  # the numbers: all checked by the same function, before the process group
    (["--out", "{tmp}/a_file"], "is a file, not a folder"),
])
def test_bad_input_under_torchrun_prints_once(tmp_path, args, msg):
    (tmp_path / "a_file").write_text("x")
    p = run(["--out", str(tmp_path / "o"), "--max-steps", "1", *[a.format(tmp=tmp_path) for a in args]], nproc=2, check=False)
    assert p.returncode != 0 and msg in one_error_line(p.stderr)


def test_data_error_writes_nothing_and_the_corrected_rerun_starts(tmp_path):
    # the demo tokenizer used to be written into --out before the data was read: the rerun was refused
    bad = tmp_path / "bad.json"
    bad.write_text('[{"instruction": "a", "output": ')
    out = tmp_path / "o"
    p = run(["--out", str(out), "--data", str(bad), "--max-steps", "1"], check=False)
    assert p.returncode == 2 and str(bad) in one_error_line(p.stderr)
    assert not out.exists()
    good = alpaca_file(tmp_path / "good.json", 40)
    run(["--out", str(out), "--data", str(good), "--max-steps", "1", "--batch-size", "8", "--micro-batch-size", "8"])
    assert [r["step"] for r in log(out)] == [1] and (out / "final" / "params.json").exists()
    assert not (out / "accuracy.json").exists()  # user data: no checkable answers assumed


def test_data_py_bad_batch_size(capsys):
    assert data.main([str(ROOT / "README.md"), "--tokenizer", "x", "--batch-size", "0"]) == 2
    assert one_error_line(capsys.readouterr().err, "data.py").endswith("--batch-size must be a finite number >= 1, got 0")


def test_params_json_with_a_string_dim(tmp_path, capsys):
    torch.manual_seed(0)
    save_meta(Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=50, multiple_of=16)), tmp_path / "m", dtype=torch.float32)
    params = json.loads((tmp_path / "m" / "params.json").read_text())
    (tmp_path / "m" / "params.json").write_text(json.dumps(params | {"dim": "32"}))
    with pytest.raises(CheckpointError, match=r'params.json: "dim" must be an integer, got \'32\''):
        load_meta(tmp_path / "m")
    (tmp_path / "p.json").write_text(json.dumps([{"instruction": "hi"}]))
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", str(tmp_path / "m"), "--prompts", str(tmp_path / "p.json"), "--out", str(tmp_path / "o.json")])
    assert e.value.code == 2 and '"dim" must be an integer' in one_error_line(capsys.readouterr().err, "sample.py")


# ----------------------------------------------------------------------------- sample.py

@pytest.fixture
def tiny_ckpt(tmp_path):
    tok = builtin_data.builtin_tokenizer(tmp_path / "tokenizer.model", seed=3)
    torch.manual_seed(0)
    save_meta(Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=tok.n_words, multiple_of=16)),
              tmp_path / "ckpt", dtype=torch.float32)
    (tmp_path / "prompts.json").write_text(json.dumps([{"instruction": "What is 2 + 3?"}]))
    return tmp_path / "ckpt"


@pytest.mark.parametrize("args, msg", [
    (["--max-new-tokens", "-5"], "--max-new-tokens must be a finite number >= 1, got -5"),
    (["--max-length", "0"], "--max-length"),
    (["--top-p", "0"], "--top-p must be a finite number > 0 and <= 1, got 0.0"),
    (["--top-p", "1.5"], "--top-p"),
    (["--top-p", "nan"], "--top-p"),
    (["--temperature", "-1"], "--temperature"),
    (["--temperature", "inf"], "--temperature"),
    (["--repetition-penalty", "0"], "--repetition-penalty"),
    (["--repetition-penalty", "nan"], "--repetition-penalty"),
    (["--batch-size", "0"], "--batch-size"),
    (["--limit", "0"], "--limit"),
    (["--device", "cuda"], "--device cuda: not usable here"),
    (["--device", "nonsense"], "--device nonsense: not usable here"),
    (["--ckpt", "{tmp}/missing"], "missing: --ckpt folder not found"),
    (["--out", "{tmp}"], "--out is a folder, not a file"),
    (["--out", "{tmp}/exists.json"], "exists.json: --out exists; pass --overwrite to replace it"),
    (["--out", "{tmp}/no/dir.json"], "--out's folder does not exist"),
])
def test_sample_mistakes_one_line_before_loading(tmp_path, tiny_ckpt, capsys, monkeypatch, args, msg):
    if args[:2] == ["--device", "cuda"] and torch.cuda.is_available():
        monkeypatch.setattr(torch, "empty", lambda *a, **k: (_ for _ in ()).throw(AssertionError("Torch not compiled with CUDA enabled")))
    (tmp_path / "exists.json").write_text("[]")
    loads = []
    monkeypatch.setattr(sample.llama, "load_meta", lambda *a, **k: loads.append(1))  # nothing may reach the model
    argv = ["--ckpt", str(tiny_ckpt), "--prompts", str(tmp_path / "prompts.json"), "--out", str(tmp_path / "new.json"),
            *[a.format(tmp=tmp_path) for a in args]]
    with pytest.raises(SystemExit) as e:
        sample.main(argv)
    line = one_error_line(capsys.readouterr().err, "sample.py")
    assert e.value.code == 2 and msg in line and loads == []
    assert (tmp_path / "exists.json").read_text() == "[]" and not (tmp_path / "new.json").exists()


def test_sample_overwrite_replaces_outputs(tmp_path, tiny_ckpt):
    out = tmp_path / "outputs.json"
    out.write_text("[]")
    assert sample.main(["--ckpt", str(tiny_ckpt), "--prompts", str(tmp_path / "prompts.json"), "--out", str(out),
                        "--max-new-tokens", "3", "--overwrite"]) == 0
    assert [r["instruction"] for r in json.loads(out.read_text())] == ["What is 2 + 3?"]


def test_sampling_at_temperature_half_matches_the_tempered_softmax():
    # logits (2, 1, 0) at T = 0.5: p proportional to exp(4), exp(2), exp(0), by hand
    expected = torch.tensor([math.exp(4), math.exp(2), 1.0])
    expected /= expected.sum()  # 0.8668, 0.1173, 0.0159
    n = 40000
    logits = torch.tensor([[2.0, 1.0, 0.0]]).expand(n, 3)
    seen = torch.zeros(n, 3, dtype=torch.bool)
    draws = sample.next_token(logits, seen, 0.5, 1.0, 1.0, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=3).double() / n
    # 4 standard errors of a binomial proportion: fails for a wrong temperature (T=1 gives 0.665)
    assert torch.all((freq - expected.double()).abs() < 4 * (expected * (1 - expected) / n).sqrt().double() + 1e-9), freq
    # the same seeded draw, done independently: multinomial over the sorted tempered distribution
    g = torch.Generator().manual_seed(0)
    ref = torch.multinomial(expected.expand(n, 3).contiguous(), 1, generator=g)[:, 0]  # already sorted descending
    assert torch.equal(draws, ref)


# ----------------------------------------------------------------------------- the demo's accuracy

def test_exact_match_by_hand():
    answers = ["3 + 4 = 7", " 1, 2, 3\n", None, "yes", "5 - 2 = 4"]
    refs = ["3 + 4 = 7", "1, 2, 3", "12", "no", "5 - 2 = 3"]
    assert sample.exact_match(answers, refs) == 2 / 5  # right: the first two (ends' spaces ignored)


def test_exact_match_answers_on_examples(tmp_path):
    # a scripted model: it says the first example's reference, then EOS, whatever it is asked
    tok = builtin_data.builtin_tokenizer(tmp_path / "tokenizer.model", seed=1)
    recs = [[{"role": "user", "content": "How many times does the letter 'e' appear in the word 'tree'?", "input": ""},
             {"role": "assistant", "content": "2"}],
            [{"role": "user", "content": "What is 2 + 2?", "input": ""}, {"role": "assistant", "content": "2 + 2 = 4"}]]
    examples = data.tokenize_records(recs, tok, "alpaca", 128, verbose=False)
    start = examples[0]["labels"].index(next(l for l in examples[0]["labels"] if l != data.IGNORE))
    script = examples[0]["input_ids"][start:]  # "2" then EOS
    assert script[-1] == tok.eos_id and tok.decode(script[:-1]) == "2"
    torch.manual_seed(0)
    m = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=tok.n_words, multiple_of=16))
    calls = []
    m.output.register_forward_hook(lambda mod, inp, out: calls.append(1) or torch.nn.functional.one_hot(
        torch.full(out.shape[:-1], script[min(len(calls), len(script)) - 1]), out.shape[-1]).float())
    r = sample.exact_match_answers(m, tok, examples)
    assert [a["answer"] for a in r["answers"]] == ["2", "2"] and [a["reference"] for a in r["answers"]] == ["2", "2 + 2 = 4"]
    assert r["exact_match"] == 0.5 and [a["correct"] for a in r["answers"]] == [True, False]
    assert r["answers"][1]["prompt"].endswith("What is 2 + 2?\n\n### Response:")


# ----------------------------------------------------------------------------- run state

def meta_folder(root, poison=False):
    """A tiny model in Meta's layout with the built-in tokenizer beside it. poison: +inf in the
    embedding row of the byte <0xFF>, which no ASCII text uses, so every loss stays finite."""
    tok = builtin_data.builtin_tokenizer(root / "tokenizer.model", seed=3)
    torch.manual_seed(0)
    m = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=tok.n_words, multiple_of=32))
    if poison:
        with torch.no_grad():
            m.tok_embeddings.weight[tok.sp.piece_to_id("<0xFF>"), 0] = float("inf")
    save_meta(m, root / "tiny", dtype=torch.float32)
    return root / "tiny"


def test_non_finite_weights_are_never_saved_or_exported(tmp_path):
    # lr 0 keeps the +inf: the loss guard sees nothing wrong; the weight check before saving must
    ckpt = meta_folder(tmp_path, poison=True)
    train_file = alpaca_file(tmp_path / "train.json", 40)
    out = tmp_path / "o"
    p = run(["--init", str(ckpt), "--data", str(train_file), "--out", str(out), "--lr", "0", "--max-steps", "2",
             "--save-every", "1", "--batch-size", "8", "--micro-batch-size", "8"], check=False)
    line = one_error_line(p.stderr)
    assert p.returncode == 2 and "non-finite weights at step 1: not written; no checkpoint was saved" in line
    assert not (out / "final").exists() and checkpoint.checkpoints(out) == []
    p = run(["--init", str(ckpt), "--data", str(train_file), "--out", str(tmp_path / "o2"), "--lr", "0", "--max-steps", "1",
             "--batch-size", "8", "--micro-batch-size", "8"], check=False)  # no checkpoint on the way: the export refuses
    assert p.returncode == 2 and "non-finite weights at the end of training" in one_error_line(p.stderr)
    assert not (tmp_path / "o2" / "final").exists()


def test_resume_with_another_shape_and_on_an_empty_folder(tmp_path):
    out = tmp_path / "o"
    p = run(["--out", str(out), "--resume", "--max-steps", "2", "--save-every", "1", "--batch-size", "8", "--micro-batch-size", "8"])
    assert f"--resume: no checkpoint in {out / 'ckpt'}; starting from step 0" in p.stdout + p.stderr
    assert os.stat(out / "final").st_mode & 0o777 == 0o755  # like any folder, not mkdtemp's 0700
    acc = json.loads((out / "accuracy.json").read_text())  # the built-in tasks: exact match, reported
    assert acc["n"] == 16 and acc["exact_match"] == sum(a["correct"] for a in acc["answers"]) / 16
    assert f"{acc['exact_match']:.1%}" in p.stdout + p.stderr
    ckpt = checkpoint.checkpoints(out)[-1]
    for nproc in (1, 2):
        p = run(["--out", str(out), "--resume", "--dim", "32", "--max-steps", "3", "--batch-size", "8", "--micro-batch-size", "4"],
                nproc=nproc, check=False)
        assert p.returncode != 0 and one_error_line(p.stderr).endswith(
            f"{ckpt}: the checkpoint has dim=64 but this run has dim=32 (--dim); resume with the checkpoint's settings")


def test_a_second_run_on_the_same_out_is_refused_and_a_stale_lock_taken_over(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / RunLock.NAME).write_text(f"{socket.gethostname()} {os.getpid()}")  # this live pytest process holds it
    for nproc in (1, 2):
        p = run(["--out", str(out), "--max-steps", "1"], nproc=nproc, check=False)
        assert p.returncode != 0 and f"another run (pid {os.getpid()} on {socket.gethostname()})" in one_error_line(p.stderr)
    assert list(out.iterdir()) == [out / RunLock.NAME]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid now names no process
    (out / RunLock.NAME).write_text(f"{socket.gethostname()} {dead.pid}")
    run(["--out", str(out), "--max-steps", "1", "--batch-size", "8", "--micro-batch-size", "8"])
    assert (out / "final" / "params.json").exists() and not (out / RunLock.NAME).exists()  # released at exit


def expected_losses(out, train_file, n_steps, batch, pack=False, alpha=5.0, seed=7):
    """Each step's training loss of an lr-0 run, computed without train.py: the data order of epoch e
    is DistributedSampler's randperm seeded by seed + e, and example i's noise in epoch e is drawn
    from a generator seeded seed * 1_000_003 + e * 10_000_019 + i (README: "seed, epoch, index")."""
    tok = Tokenizer(out / "final" / "tokenizer.model")
    model = load_meta(out / "final")  # lr 0: the exported weights are the initial ones
    rows = data.load_dataset(train_file, tok, None, 128, verbose=False)
    rows = data.pack(rows, 128) if pack else rows
    per_epoch = len(rows) // batch
    losses = []
    for step in range(n_steps):
        epoch, k = divmod(step, per_epoch)
        idx = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed + epoch)).tolist()[k * batch:(k + 1) * batch]
        b = data.collate([rows[i] for i in idx], tok.pad_id)
        gens = [torch.Generator().manual_seed(seed * 1_000_003 + epoch * 10_000_019 + i) for i in idx]
        seg = b.get("segment_ids")
        with torch.no_grad():
            logits = model(b["input_ids"], mask=b["mask"], positions=b.get("positions"), segment_ids=seg,
                           noise=lambda e: neftune(e, b["mask"], alpha, "uniform", generator=gens, segment_ids=seg))
        losses.append(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), b["labels"][:, 1:].flatten()).item())
    return losses


@pytest.mark.parametrize("pack", [False, True])
def test_epochs_and_packing_against_an_independent_loop(tmp_path, pack):
    # 3 epochs of 5 steps (or packed rows, 2 micro-batches): every logged loss must be the one computed above
    n, steps = (200, 4) if pack else (40, 15)
    train_file, eval_file = alpaca_file(tmp_path / "train.json", n), alpaca_file(tmp_path / "eval.json", 8, seed=1)
    out = tmp_path / "o"
    run(["--out", str(out), "--data", str(train_file), "--eval-data", str(eval_file), "--lr", "0", "--epochs", "3",
         "--batch-size", "8", "--micro-batch-size", "4" if pack else "8", "--export-dtype", "fp32",
         *(["--pack", "--max-steps", str(steps)] if pack else [])])
    got = [r["loss"] for r in log(out)]
    assert len(got) == steps and (pack or log(out)[-1]["epoch"] == 3.0)
    want = expected_losses(out, train_file, steps, 8, pack=pack)
    assert max(abs(a - b) / b for a, b in zip(got, want)) < 1e-5, (got, want)
    assert len(set(round(x, 6) for x in got)) == steps  # no repeated batch or noise across the epochs


def test_ctrl_c_in_a_later_epoch_then_resume_is_exact(tmp_path):
    train_file, eval_file = alpaca_file(tmp_path / "train.json", 40), alpaca_file(tmp_path / "eval.json", 8, seed=1)
    common = ["--data", str(train_file), "--eval-data", str(eval_file), "--epochs", "3", "--batch-size", "8",
              "--micro-batch-size", "4", "--save-every", "3", "--export-dtype", "fp32"]
    ref = tmp_path / "ref"
    run(["--out", str(ref), *common])
    out = tmp_path / "int"
    p = subprocess.Popen([sys.executable, "train.py", *TINY, "--out", str(out), *common], cwd=ROOT, env=ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "ckpt" / "step_0000006").exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    p.send_signal(signal.SIGINT)  # Ctrl-C, in the second epoch (5 steps per epoch)
    err = p.communicate(timeout=60)[1]
    assert p.returncode == 130, err[-2000:]
    ckpt = checkpoint.checkpoints(out)[-1]
    line = one_error_line(err.replace("train.py: interrupted", "train.py: error: interrupted"))
    assert line.endswith(f"of 15; --resume continues from {ckpt}") and not (out / "final").exists()
    assert not (out / RunLock.NAME).exists()
    r = run(["--out", str(out), "--resume", *common])
    step = int(ckpt.name.split("_")[1])
    assert step >= 6 and f"resumed from {ckpt} at step {step}" in r.stdout + r.stderr
    assert [x["loss"] for x in log(out)] == [x["loss"] for x in log(ref)]  # bit-identical, step for step
    a = torch.load(out / "final" / "consolidated.00.pth", weights_only=True)
    b = torch.load(ref / "final" / "consolidated.00.pth", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ctrl_c_under_torchrun_prints_one_line(tmp_path):
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *TINY,
           "--out", str(out), "--batch-size", "8", "--micro-batch-size", "4", "--save-every", "2", "--max-steps", "400"]
    p = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    deadline = time.time() + 120
    while not (out / "ckpt" / "step_0000002").exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the launcher and both workers get it
    err = p.communicate(timeout=120)[1]
    assert err.count("train.py: interrupted at step") == 1, err[-3000:]
    assert f"of 400; --resume continues from {checkpoint.checkpoints(out)[-1]}" in err
    assert "KeyboardInterrupt" not in err, err[-3000:]
