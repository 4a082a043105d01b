"""train.py end to end on a tiny model: ranks, accumulation, kill -9 and resume, export, sweep, errors."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import builtin_data
import checkpoint
import data
import train
from model import ModelArgs, Tokenizer, Transformer, load_meta, save_meta

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--dim", "64", "--n-layers", "2", "--n-heads", "4", "--max-len", "128", "--dtype", "fp32",
        "--eval-examples", "16", "--eval-every", "2", "--lr", "3e-3", "--seed", "7"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def run(args, nproc=1, check=True):
    cmd = [sys.executable, "train.py", *TINY, *args]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train.py", *TINY, *args]
    p = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"train.py failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return p


def log(out):
    return [json.loads(l) for l in (Path(out) / "log.jsonl").read_text().splitlines()]


def losses(out):
    return [r["loss"] for r in log(out)]


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    out = tmp_path_factory.mktemp("r1") / "out"
    run(["--out", str(out), "--max-steps", "4", "--batch-size", "8", "--micro-batch-size", "4", "--export-dtype", "fp32"])
    return out


def test_two_ranks_match_one_rank(one_rank, tmp_path):
    # same global batch of 8: 1 rank x 2 micro-batches of 4 vs 2 ranks x 2 micro-batches of 2;
    # noise is on (alpha 5): each example's noise is seeded by its index, so it is the same too
    out = tmp_path / "r2"
    run(["--out", str(out), "--max-steps", "4", "--batch-size", "8", "--micro-batch-size", "2"], nproc=2)
    a, b = losses(one_rank), losses(out)
    assert len(a) == len(b) == 4
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4 * max(a), (a, b)
    assert a[0] > a[-1]  # and it learns
    ea, eb = log(one_rank)[-1]["eval_loss"], log(out)[-1]["eval_loss"]
    assert math.isclose(ea, eb, rel_tol=1e-4)


def test_grad_accumulation_equals_big_batch(one_rank, tmp_path):
    out = tmp_path / "big"  # one micro-batch of 8 instead of 2 x 4
    run(["--out", str(out), "--max-steps", "4", "--batch-size", "8", "--micro-batch-size", "8"])
    a, b = losses(one_rank), losses(out)
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4 * max(a), (a, b)
    ga, gb = [r["grad_norm"] for r in log(one_rank)], [r["grad_norm"] for r in log(out)]
    assert max(abs(x - y) / x for x, y in zip(ga, gb)) < 1e-3


def test_export_loads_with_same_losses(one_rank):
    # the final clean losses in the log were computed on the trained (sharded) model; recompute
    # them on the exported Meta-format checkpoint and its tokenizer
    final = one_rank / "final"
    assert json.loads((final / "params.json").read_text())["dim"] == 64
    model = load_meta(final)
    tok = Tokenizer(final / "tokenizer.model")
    examples = data.tokenize_records(builtin_data.builtin_records(seed=7), tok, "alpaca", 128, verbose=False)
    train_ex, held_out = data.split_eval(examples, 0.02, 7)
    total = count = 0.0
    with torch.no_grad():
        for i in range(0, 16, 4):
            b = data.collate(held_out[i:i + 4], tok.pad_id)
            total += train.response_loss_sum(model(b["input_ids"], mask=b["mask"]), b["labels"]).item()
            count += int((b["labels"][:, 1:] != -100).sum())
    assert math.isclose(total / count, log(one_rank)[-1]["eval_loss"], rel_tol=1e-5)


def test_noise_only_in_training_steps(monkeypatch):
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=50, multiple_of=16))
    x = torch.randint(3, 50, (2, 9))
    labels = x.clone()
    labels[:, :3] = -100
    batch = {"input_ids": x, "labels": labels, "mask": torch.ones_like(x, dtype=torch.bool)}
    calls = []
    real = train.neftune
    monkeypatch.setattr(train, "neftune", lambda *a, **k: calls.append(1) or real(*a, **k))
    from contextlib import nullcontext
    model.eval()
    clean = train.forward_loss(model, batch, "cpu", nullcontext(), alpha=5.0)
    direct = torch.nn.functional.cross_entropy(model(x)[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1), reduction="sum")
    assert calls == [] and torch.allclose(clean, direct)
    model.train()
    noisy = train.forward_loss(model, batch, "cpu", nullcontext(), alpha=5.0)
    assert calls == [1] and not torch.allclose(noisy, clean)
    assert torch.allclose(train.forward_loss(model, batch, "cpu", nullcontext(), alpha=0.0), clean)


def test_kill_and_resume_is_exact(tmp_path):
    common = ["--max-steps", "10", "--batch-size", "8", "--micro-batch-size", "4", "--save-every", "2", "--export-dtype", "fp32"]
    ref = tmp_path / "ref"
    run(["--out", str(ref), *common])
    out = tmp_path / "killed"
    p = subprocess.Popen([sys.executable, "train.py", *TINY, "--out", str(out), *common], cwd=ROOT, env=ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "ckpt" / "step_0000002").exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)  # kill -9: no chance to clean up
    p.wait()
    assert p.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (out / "final").exists()
    newest = checkpoint.checkpoints(out)[-1]
    step = int(newest.name.split("_")[1])
    r = run(["--out", str(out), "--resume", *common])
    # it really resumed, from the newest checkpoint: a silent restart from step 0 would match too
    assert step >= 2 and f"resumed from {newest} at step {step}" in r.stdout + r.stderr
    assert losses(out) == losses(ref)  # bit-identical on CPU, step for step
    assert [r["step"] for r in log(out)] == list(range(1, 11))
    a = torch.load(out / "final" / "consolidated.00.pth", weights_only=True)
    b = torch.load(ref / "final" / "consolidated.00.pth", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sweep_writes_folders_and_table(tmp_path):
    out = tmp_path / "sweep"
    run(["--out", str(out), "--alpha", "0", "5", "--max-steps", "2", "--batch-size", "8", "--micro-batch-size", "8"])
    rows = [l for l in (out / "sweep.md").read_text().splitlines() if l.startswith("| ") and l[2].isdigit()]
    assert len(rows) == 2
    for row, a in zip(rows, ("0", "5")):
        last = log(out / f"alpha_{a}")[-1]
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[0] == a and float(cells[2]) == pytest.approx(last["clean_train_loss"], abs=1e-4)
        assert float(cells[3]) == pytest.approx(last["eval_loss"], abs=1e-4)
        assert (out / f"alpha_{a}" / "final" / "consolidated.00.pth").exists()
    # same data order and init: the first step's loss differs only by the noise, and alpha 0 is clean
    l0, l5 = log(out / "alpha_0")[0], log(out / "alpha_5")[0]
    assert l0["tokens"] == l5["tokens"] and l0["loss"] != l5["loss"]


@pytest.mark.parametrize("args, msg", [
    (["--alpha", "-1"], "--alpha must be a finite number >= 0"),
    (["--init", "no/such/dir"], "no/such/dir: --init folder not found"),
    (["--data", "no_such.json"], "no_such.json: --data file not found"),
    (["--batch-size", "6", "--micro-batch-size", "4"], "not a multiple"),
])
def test_bad_input_one_line_exit_2(tmp_path, args, msg):
    p = run(["--out", str(tmp_path / "o"), "--max-steps", "1", *args], check=False)
    assert p.returncode == 2, p.stderr
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("train.py: error:") and msg in lines[0], p.stderr


def test_refuses_non_empty_out_and_stops_on_nan(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    p = run(["--out", str(out), "--max-steps", "1"], check=False)
    assert p.returncode == 2 and "not empty" in p.stderr and (out / "precious.txt").read_text() == "keep me"
    # an absurd learning rate overflows the weights after the first update: the run must stop with
    # a clear message and keep the last good checkpoint, with finite weights
    nan = tmp_path / "nan"
    p = run(["--out", str(nan), "--max-steps", "20", "--lr", "1e30", "--warmup", "0", "--save-every", "1",
             "--batch-size", "8", "--micro-batch-size", "8"], check=False)
    assert p.returncode == 2 and "non-finite loss" in p.stderr, p.stderr[-2000:]
    ckpts = checkpoint.checkpoints(nan)
    assert f"--resume continues from {ckpts[-1]}" in p.stderr  # names the checkpoint that exists
    assert ckpts and not (nan / "final").exists()
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    dcp_to_torch_save(ckpts[-1], tmp_path / "last.pt")
    sd = torch.load(tmp_path / "last.pt", weights_only=True)["model"]
    assert all(torch.isfinite(v).all() for v in sd.values())


def _meta_folder(root, vocab_extra=0):
    """A tiny model in Meta's layout: weights in root/tiny/, tokenizer.model one level up."""
    tok = builtin_data.builtin_tokenizer(root / "tokenizer.model", seed=3)
    torch.manual_seed(0)
    m = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.n_words + vocab_extra, multiple_of=32))
    save_meta(m, root / "tiny", dtype=torch.float32)
    return root / "tiny", tok, m


def test_finetune_meta_checkpoint_with_eval_file(tmp_path):
    ckpt, tok, init = _meta_folder(tmp_path)
    recs = [{"instruction": f"Add {i} and {i + 1}.", "input": "", "output": f"{i} + {i + 1} = {2 * i + 1}"} for i in range(40)]
    held = [{"instruction": f"What is {i} + 3?", "output": f"{i} + 3 = {i + 3}"} for i in range(6)]
    (tmp_path / "train.json").write_text(json.dumps(recs))
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held))
    # lr 0: the weights stay those of --init, so the logged clean eval loss must equal the loss of
    # the checkpoint's model on the eval file, computed here directly
    p = run(["--init", str(ckpt), "--data", str(tmp_path / "train.json"), "--eval-data", str(tmp_path / "eval.jsonl"),
             "--out", str(tmp_path / "o"), "--max-steps", "2", "--batch-size", "8", "--micro-batch-size", "4", "--lr", "0"])
    settings = next(l for l in p.stdout.splitlines() + p.stderr.splitlines() if l.startswith("settings:"))
    assert "epochs=3 " in settings and "save_every=200 " in settings  # the paper recipe with --init
    examples = data.load_dataset(tmp_path / "eval.jsonl", tok, "alpaca", 128, verbose=False)
    b = data.collate(examples, tok.pad_id)
    with torch.no_grad():
        direct = train.response_loss_sum(init(b["input_ids"], mask=b["mask"]), b["labels"]).item()
    n = int((b["labels"][:, 1:] != -100).sum())
    assert math.isclose(log(tmp_path / "o")[-1]["eval_loss"], direct / n, rel_tol=1e-5)


def test_tokenizer_that_does_not_match_the_model(tmp_path):
    ckpt, _, _ = _meta_folder(tmp_path, vocab_extra=8)
    (tmp_path / "train.json").write_text(json.dumps([{"instruction": "a", "output": "b"}] * 16))
    p = run(["--init", str(ckpt), "--data", str(tmp_path / "train.json"), "--out", str(tmp_path / "o"),
             "--batch-size", "8", "--micro-batch-size", "4"], check=False)
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert p.returncode == 2 and len(lines) == 1 and "tokenizer.model" in lines[0] and "1008" in lines[0], p.stderr


def test_error_under_torchrun_is_printed_once_and_nothing_hangs(tmp_path):
    p = run(["--out", str(tmp_path / "o"), "--batch-size", "6", "--micro-batch-size", "4"], nproc=2, check=False)
    # every rank exits 2; torchrun itself then reports the failed children and exits 1
    assert p.returncode != 0 and p.stderr.count("train.py: error:") == 1, p.stderr[-2000:]
    assert "world size 2" in p.stderr
