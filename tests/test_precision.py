"""The CPU training dtype: bf16 autocast only where a matmul timing finds it clearly faster, recorded in
each checkpoint and kept by --resume."""
import json

import pytest
import torch
from conftest import train_run

import precision
from checks import UserError


def test_pick_cpu_dtype_needs_a_clear_win():
    f32 = 2e11
    assert precision.pick_cpu_dtype(f32, 4.4e11) == "bf16"  # bf16 units (an AVX-512-BF16 EPYC: 0.44 vs 0.20 TFLOP/s)
    assert precision.pick_cpu_dtype(f32, 1.2e9) == "fp32"  # AVX2 only: bf16 ~100x slower
    assert precision.pick_cpu_dtype(f32, f32 * precision.BF16_MARGIN) == "fp32"  # faster, but not clearly
    assert precision.pick_cpu_dtype(f32, f32 * precision.BF16_MARGIN * 1.01) == "bf16"


def ns(**kw):
    return type("Args", (), {"resume": False, "dtype": None, **kw})()


@pytest.mark.parametrize("flops,expected", [((2e11, 4.4e11), "bf16"), ((2e11, 1.2e9), "fp32")])
def test_choose_dtype_from_mocked_timings(monkeypatch, tmp_path, flops, expected):
    monkeypatch.setattr(precision, "matmul_flops", lambda: flops)
    name, why = precision.choose_dtype(ns(), torch.device("cpu"), tmp_path)
    assert name == expected
    assert f"bf16 {flops[1] / 1e9:.1f} vs fp32 {flops[0] / 1e9:.1f} GFLOP/s" in why  # the figures behind it
    assert precision.choose_dtype(ns(dtype="fp32"), torch.device("cpu"), tmp_path) == ("fp32", "--dtype")


def fake_checkpoint(run_dir, step, dtype):
    d = run_dir / "ckpt" / f"step_{step:07d}"
    d.mkdir(parents=True)
    (d / "train_state.json").write_text(json.dumps({"step": step} | ({"dtype": dtype} if dtype else {})))


def test_resume_keeps_the_checkpoints_dtype(monkeypatch, tmp_path):
    monkeypatch.setattr(precision, "matmul_flops", lambda: (2e11, 4.4e11))  # a fresh run would pick bf16
    cpu = torch.device("cpu")
    fake_checkpoint(tmp_path / "run", 2, "fp32")
    assert precision.choose_dtype(ns(resume=True), cpu, tmp_path / "run")[0] == "fp32"
    assert precision.choose_dtype(ns(resume=True, dtype="fp32"), cpu, tmp_path / "run")[0] == "fp32"
    with pytest.raises(UserError, match=r"--dtype bf16: .*run was trained in fp32"):
        precision.choose_dtype(ns(resume=True, dtype="bf16"), cpu, tmp_path / "run")
    assert precision.choose_dtype(ns(), cpu, tmp_path / "run")[0] == "bf16"  # not resuming: measured
    fake_checkpoint(tmp_path / "sweep" / "alpha_5", 4, "fp32")  # a sweep: one run per subfolder
    assert precision.choose_dtype(ns(resume=True), cpu, tmp_path / "sweep")[0] == "fp32"
    fake_checkpoint(tmp_path / "other", 3, None)  # a train_state.json without a dtype: not this code's
    with pytest.raises(UserError, match="records no dtype"):
        precision.choose_dtype(ns(resume=True), cpu, tmp_path / "other")
    fake_checkpoint(tmp_path / "sweep" / "alpha_0", 4, "bf16")
    with pytest.raises(UserError, match="different dtypes"):
        precision.choose_dtype(ns(resume=True), cpu, tmp_path / "sweep")


@pytest.mark.slow
def test_train_records_and_resumes_its_dtype(tmp_path):
    out = tmp_path / "run"
    r = train_run(["--out", str(out), "--dtype", "bf16", "--max-steps", "2", "--save-every", "1"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.splitlines()[0] == "dtype: bf16 (--dtype)"  # the run's first line
    assert "bfloat16 on cpu" in r.stdout
    assert json.loads(next(out.glob("ckpt/step_0000001/train_state.json")).read_text())["dtype"] == "bf16"
    r = train_run(["--out", str(out), "--resume", "--dtype", "fp32", "--max-steps", "3", "--save-every", "1"])
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "drop --dtype or pass --dtype bf16" in r.stderr
    r = train_run(["--out", str(out), "--resume", "--max-steps", "3", "--save-every", "1"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.splitlines()[0] == "dtype: bf16 (kept from the checkpoint being resumed)"
    assert "resumed from" in r.stdout and "bfloat16 on cpu" in r.stdout
    assert json.loads(next(out.glob("ckpt/step_0000002/train_state.json")).read_text())["dtype"] == "bf16"
