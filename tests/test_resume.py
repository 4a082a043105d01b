"""Resuming is exact: kill -9 or Ctrl-C and --resume reproduce the uninterrupted run bit for bit, across
epochs and packed rows, and a run refuses a folder it would corrupt (another shape, another live run)."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import (
    ENV,
    ROOT,
    TINY,
    alpaca_file,
    assert_same_run,
    kill_at_checkpoint,
    losses,
    one_error_line,
    read_log,
    run_train,
)

import checkpoint
from checks import RunLock


@pytest.mark.slow
def test_resume_with_another_shape_and_on_an_empty_folder(tmp_path):
    out = tmp_path / "o"
    p = run_train(["--out", str(out), "--resume", "--max-steps", "2", "--save-every", "1", "--batch-size", "8",
                   "--micro-batch-size", "8"])
    assert f"--resume: no checkpoint in {out / 'ckpt'}; starting from step 0" in p.stdout + p.stderr
    assert os.stat(out / "final").st_mode & 0o777 == 0o755  # like any folder, not mkdtemp's 0700
    acc = json.loads((out / "accuracy.json").read_text())  # the built-in tasks: exact match, reported
    assert acc["n"] == 16 and acc["exact_match"] == sum(a["correct"] for a in acc["answers"]) / 16
    assert f"{acc['exact_match']:.1%}" in p.stdout + p.stderr
    ckpt = checkpoint.checkpoints(out)[-1]
    for nproc in (1, 2):
        p = run_train(["--out", str(out), "--resume", "--dim", "32", "--max-steps", "3", "--batch-size", "8",
                       "--micro-batch-size", "4"],
                nproc=nproc, check=False)
        assert p.returncode != 0 and one_error_line(p.stderr).endswith(
            f"{ckpt}: the checkpoint has dim=64 but this run has dim=32 (--dim); resume with the checkpoint's settings")


@pytest.mark.slow
def test_a_second_run_on_the_same_out_is_refused_and_a_stale_lock_taken_over(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / RunLock.NAME).write_text(f"{socket.gethostname()} {os.getpid()}")  # this live pytest process holds it
    for nproc in (1, 2):
        p = run_train(["--out", str(out), "--max-steps", "1"], nproc=nproc, check=False)
        assert p.returncode != 0
        assert f"another run (pid {os.getpid()} on {socket.gethostname()})" in one_error_line(p.stderr)
    assert list(out.iterdir()) == [out / RunLock.NAME]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid now names no process
    (out / RunLock.NAME).write_text(f"{socket.gethostname()} {dead.pid}")
    run_train(["--out", str(out), "--max-steps", "1", "--batch-size", "8", "--micro-batch-size", "8"])
    assert (out / "final" / "params.json").exists() and not (out / RunLock.NAME).exists()  # released at exit


@pytest.mark.slow
@pytest.mark.parametrize("pack", [False, True])
def test_epochs_and_packing_two_ranks_equal_one(tmp_path, pack):
    # 3 epochs of 5 steps (or packed rows). Each epoch's data order and each example's noise are functions
    # of the seed, the epoch and the example, so 2 ranks with other micro-batches log the losses of 1 rank;
    # lr 0 keeps the weights fixed, so every difference would be in the data or the noise
    n, steps = (200, 4) if pack else (40, 15)
    train_file, eval_file = alpaca_file(tmp_path / "train.json", n), alpaca_file(tmp_path / "eval.json", 8, seed=1)
    common = ["--data", str(train_file), "--eval-data", str(eval_file), "--lr", "0", "--epochs", "3", "--batch-size",
              "8",
              *(["--pack", "--max-steps", str(steps)] if pack else [])]
    run_train(["--out", str(tmp_path / "one"), *common, "--micro-batch-size", "8"])
    run_train(["--out", str(tmp_path / "two"), *common, "--micro-batch-size", "2"], nproc=2)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == steps and (pack or read_log(tmp_path / "one")[-1]["epoch"] == 3.0)
    assert max(abs(a - b) / b for a, b in zip(one, two)) < 1e-5, (one, two)
    assert len(set(round(x, 6) for x in one)) == steps  # no repeated batch or noise across the epochs


@pytest.mark.slow
def test_ctrl_c_in_a_later_epoch_then_resume_is_exact(tmp_path):
    train_file, eval_file = alpaca_file(tmp_path / "train.json", 40), alpaca_file(tmp_path / "eval.json", 8, seed=1)
    common = ["--data", str(train_file), "--eval-data", str(eval_file), "--epochs", "3", "--batch-size", "8",
              "--micro-batch-size", "4", "--save-every", "3", "--export-dtype", "fp32"]
    ref = tmp_path / "ref"
    run_train(["--out", str(ref), *common])
    out = tmp_path / "int"
    # SIGINT at its default in the run, as in a terminal: a shell's background job (e.g. the tests started
    # with `&`) ignores it, and Python then never raises KeyboardInterrupt
    p = subprocess.Popen([sys.executable, "train.py", *TINY, "--out", str(out), *common], cwd=ROOT, env=ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    # step 6 or later: a poll starved of the cores can miss step 6's checkpoint before step 9's replaces it
    while not any(int(c.name.split("_")[1]) >= 6 for c in checkpoint.checkpoints(out)) and p.poll() is None \
            and time.time() < deadline:
        time.sleep(0.01)
    p.send_signal(signal.SIGINT)  # Ctrl-C, in the second or third epoch (5 steps per epoch)
    err = p.communicate(timeout=60)[1]
    assert p.returncode == 130, err[-2000:]
    ckpt = checkpoint.checkpoints(out)[-1]
    line = one_error_line(err.replace("train.py: interrupted", "train.py: error: interrupted"))
    assert line.endswith(f"of 15; --resume continues from {ckpt}") and not (out / "final").exists()
    assert not (out / RunLock.NAME).exists()
    r = run_train(["--out", str(out), "--resume", *common])
    step = int(ckpt.name.split("_")[1])
    assert step >= 6 and f"resumed from {ckpt} at step {step}" in r.stdout + r.stderr
    assert_same_run(out, ref)  # bit-identical, step for step


@pytest.mark.slow
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


@pytest.mark.slow
def test_kill_and_resume_is_exact(tmp_path):
    common = ["--max-steps", "10", "--batch-size", "8", "--micro-batch-size", "4", "--save-every", "2",
              "--export-dtype", "fp32"]
    ref = tmp_path / "ref"
    run_train(["--out", str(ref), *common])
    out = tmp_path / "killed"
    kill_at_checkpoint(["train.py", *TINY, "--out", out, *common], out)
    assert not (out / "final").exists()
    newest = checkpoint.checkpoints(out)[-1]
    step = int(newest.name.split("_")[1])
    r = run_train(["--out", str(out), "--resume", *common])
    # it really resumed, from the newest checkpoint: a silent restart from step 0 would match too
    assert step >= 2 and f"resumed from {newest} at step {step}" in r.stdout + r.stderr
    assert_same_run(out, ref)  # bit-identical on CPU, step for step
    assert [r["step"] for r in read_log(out)] == list(range(1, 11))


@pytest.mark.slow
def test_resume_of_a_finished_run_leaves_it_alone(tmp_path):
    out = tmp_path / "o"
    common = ["--out", str(out), "--max-steps", "3", "--batch-size", "8", "--micro-batch-size", "8", "--save-every",
              "2"]
    run_train(common)
    before = {p: p.stat().st_mtime_ns for p in (out / "final").iterdir()}
    log_before = (out / "log.jsonl").read_text()
    p = run_train([*common, "--resume"])
    assert f"--resume: {out} is complete (3 steps, {out / 'final'}); nothing to do" in p.stdout + p.stderr
    assert {q: q.stat().st_mtime_ns for q in (out / "final").iterdir()} == before
    assert (out / "log.jsonl").read_text() == log_before
    p = run_train([*common, "--resume", "--max-steps", "4"])  # a longer run continues from its checkpoint
    assert f"resumed from {out / 'ckpt' / 'step_0000002'} at step 2" in p.stdout + p.stderr
    assert [x["step"] for x in read_log(out)] == [1, 2, 3, 4]
