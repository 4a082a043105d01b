"""Issue 13's speed paths: the compiled decode step (same tokens, one compile per batch shape), the
CPU training dtype chosen by a measurement and kept across a resume, and CUDA variants (skipped
without CUDA) of the generation and training smoke tests."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

import builtin_data
import precision
import sample
import train
from model import ModelArgs, Transformer, save_meta
from sample import generate
from test_sample import PROMPTS, one_thread, tiny_model  # noqa: F401 (one_thread: an autouse fixture)

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def graphs():
    return counters["stats"]["unique_graphs"]


# ---- Part 1: the compiled decode step ----

@pytest.fixture(scope="module")
def compiled(one_thread):
    """One tiny model and its first compiled call (a left-padded batch of 4): compiling is the slow part."""
    model = tiny_model()
    before = graphs()
    out = generate(model, PROMPTS, 12, repetition_penalty=1.2, compile=True)
    return model, out, graphs() - before


def test_compiled_greedy_equals_eager_left_padded(compiled):
    model, out, n_graphs = compiled
    assert n_graphs == 1  # fullgraph=True: one graph, no breaks
    assert out == generate(model, PROMPTS, 12, repetition_penalty=1.2)
    assert all(len(o) == 12 for o in out) and len({tuple(o) for o in out}) == len(out)  # rows differ: a real check
    assert all(layer.attention.cache is None for layer in model.layers)  # a training forward never sees the cache


def test_compiled_eos_and_budgets_equal_eager(compiled):
    model = compiled[0]
    eos = compiled[1][0][4]  # a token row 0 chooses: it then stops there
    budgets = [12, 3, 7, 12]
    got = generate(model, PROMPTS, budgets, eos_id=eos, compile=True)
    assert got == generate(model, PROMPTS, budgets, eos_id=eos)
    assert len(got[0]) == 4 and len(got[1]) <= 3


def test_one_compile_per_batch_shape(compiled):
    model = compiled[0]
    before = graphs()
    # same batch size, other prompt lengths and budgets within the cache bucket: the same graph
    generate(model, [p[:3] for p in PROMPTS], 9, compile=True)
    generate(model, PROMPTS[::-1], 20, compile=True)
    assert graphs() == before
    # a new batch size compiles once, then is reused
    ref = generate(model, PROMPTS[2:3], 10)
    assert generate(model, PROMPTS[2:3], 10, compile=True) == ref
    assert generate(model, PROMPTS[2:3], 10, compile=True) == ref
    assert graphs() == before + 1
    # a cache longer than one bucket is another shape: one more compile
    long = generate(model, PROMPTS[2:3], sample.CACHE_BUCKET, compile=True)
    assert graphs() == before + 2
    assert long == generate(model, PROMPTS[2:3], sample.CACHE_BUCKET)


def test_cli_compile_gives_the_same_answer(tmp_path, capsys):
    tok = builtin_data.builtin_tokenizer(tmp_path / "tok" / "tokenizer.model")
    ckpt = save_meta(tiny_model(vocab_size=tok.n_words), tmp_path / "run" / "final", tokenizer_path=tok.path)
    texts = []
    for extra in ([], ["--compile"]):
        assert sample.main(["--ckpt", str(ckpt), "--prompt", "Name three rivers.", "--max-new-tokens", "10", *extra]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and texts[0].strip()


# ---- Part 1b: the CPU training dtype ----

def test_pick_cpu_dtype_needs_a_clear_win():
    f32 = 2e11
    assert precision.pick_cpu_dtype(f32, 4.4e11) == "bf16"  # CPU with bf16 units (the EPYC: 0.44 vs 0.20 TFLOP/s)
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
    with pytest.raises(train.UserError, match=r"--dtype bf16: .*run was trained in fp32"):
        precision.choose_dtype(ns(resume=True, dtype="bf16"), cpu, tmp_path / "run")
    assert precision.choose_dtype(ns(), cpu, tmp_path / "run")[0] == "bf16"  # not resuming: measured
    fake_checkpoint(tmp_path / "sweep" / "alpha_5", 4, "fp32")  # a sweep: one run per subfolder
    assert precision.choose_dtype(ns(resume=True), cpu, tmp_path / "sweep")[0] == "fp32"
    fake_checkpoint(tmp_path / "old", 3, None)  # written before the dtype was recorded: the old CPU default
    assert precision.choose_dtype(ns(resume=True), cpu, tmp_path / "old")[0] == "fp32"
    fake_checkpoint(tmp_path / "sweep" / "alpha_0", 4, "bf16")
    with pytest.raises(train.UserError, match="different dtypes"):
        precision.choose_dtype(ns(resume=True), cpu, tmp_path / "sweep")


def train_run(args):
    cmd = [sys.executable, "train.py", "--dim", "32", "--n-layers", "1", "--n-heads", "2", "--max-len", "64",
           "--eval-examples", "8", "--eval-every", "100", "--batch-size", "8", "--micro-batch-size", "8", *args]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)


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


# ---- CUDA variants (skipped without CUDA): bf16 generation, NCCL world of one, CUDA RNG in resume ----

@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_compiled_generation(dtype):
    model = tiny_model().to("cuda", dtype)
    before = graphs()
    got = generate(model, PROMPTS, 8, repetition_penalty=1.2, compile=True)  # mode "reduce-overhead": a CUDA graph
    again = generate(model, PROMPTS, 8, repetition_penalty=1.2, compile=True)  # replays the same graph
    ref = generate(model, PROMPTS, 8, repetition_penalty=1.2)
    assert graphs() - before == 1 and got == again
    if dtype == torch.float32:
        assert got == ref
    else:  # eager rounds each bf16 op, the compiled step fuses them: the first (prefilled) token always agrees
        assert [g[0] for g in got] == [r[0] for r in ref]
        assert all(len(g) == 8 and 0 <= min(g) and max(g) < 97 for g in got)


@cuda
def test_cuda_train_bf16_nccl_resume(tmp_path):
    common = ["--out", str(tmp_path / "run"), "--max-steps", "4", "--save-every", "2", "--seed", "3"]
    losses = lambda: [json.loads(l)["loss"] for l in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    r = train_run(common)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.splitlines()[0].startswith("dtype: bf16 (CUDA default")
    assert "bfloat16 on cuda" in r.stdout and "world 1" in r.stdout  # NCCL process group of one
    rng = torch.load(tmp_path / "run" / "ckpt" / "step_0000002" / "rng_0.pt", weights_only=True)
    assert rng["cuda"] is not None and rng["cuda"].dtype == torch.uint8  # the CUDA RNG state is saved
    full = losses()
    r = train_run([*common, "--resume"])  # the newest checkpoint is step 2: steps 3 and 4 again
    assert r.returncode == 0, r.stderr[-2000:]
    assert "kept from the checkpoint" in r.stdout.splitlines()[0] and "at step 2" in r.stdout
    again = losses()
    assert len(full) == len(again) == 4 and again[:2] == full[:2]
    # bf16 on CUDA: atomics in attention's backward may reorder sums, so close rather than bit-equal
    assert max(abs(x - y) for x, y in zip(full, again)) < 1e-2 * max(full), (full, again)
    assert (tmp_path / "run" / "final" / "consolidated.00.pth").is_file()
