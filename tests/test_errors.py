"""Every user mistake ends in one line naming the flag or file, and exit status 2, before anything is
written; nothing non-finite is ever saved or exported."""
import json

import pytest
import torch
from conftest import ROOT, TINY, TORCHRUN_NOTE, alpaca_file, meta_folder, one_error_line, read_log, run_train

import builtin_data
import checkpoint
import data
import sample
import train
from chat_template import record
from model import CheckpointError, ModelArgs, Transformer, load_meta, save_meta


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


def test_out_that_the_system_refuses(tmp_path, capsys):
    # /proc takes no new folder: a user is refused by the permission check, root (who passes every
    # permission check) at the run's first write; either way one line, before any work
    assert train.main([*TINY, "--out", "/proc/neftune-out", "--max-steps", "1"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("train.py: error: /proc/neftune-out: --out ") and ("cannot be created" in line
                                                                              or "not writable" in line), line


@pytest.mark.parametrize("case", ["file", "under_file"])
def test_out_that_cannot_be_a_folder(tmp_path, capsys, case):
    f = tmp_path / "a_file"
    f.write_text("keep")
    out = f if case == "file" else f / "sub"
    assert train.main([*TINY, "--out", str(out), "--max-steps", "1"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(out) in line and "is a file" in line and f.read_text() == "keep"


@pytest.mark.slow
@pytest.mark.parametrize("args, msg", [
    (["--lr", "nan"], "--lr must be"),  # the numbers: all checked by the same function, before the process group
    (["--out", "{tmp}/a_file"], "is a file, not a folder"),
])
def test_bad_input_under_torchrun_prints_once(tmp_path, args, msg):
    (tmp_path / "a_file").write_text("x")
    p = run_train(["--out", str(tmp_path / "o"), "--max-steps", "1", *[a.format(tmp=tmp_path) for a in args]], nproc=2,
                  check=False)
    assert p.returncode != 0 and msg in one_error_line(p.stderr)
    # the line comes first, says torchrun's report follows, and the report does (torchrun exits 1)
    ours = p.stderr.index("train.py: error:")
    assert p.stderr[ours:].splitlines()[0].endswith(TORCHRUN_NOTE) and p.returncode == 1
    assert ours < p.stderr.index("ChildFailedError")


@pytest.mark.slow
def test_data_error_writes_nothing_and_the_corrected_rerun_starts(tmp_path):
    # nothing, not even the demo tokenizer, is written into --out before the data is read: the rerun starts
    bad = tmp_path / "bad.json"
    bad.write_text('[{"instruction": "a", "output": ')
    out = tmp_path / "o"
    p = run_train(["--out", str(out), "--data", str(bad), "--max-steps", "1"], check=False)
    assert p.returncode == 2 and str(bad) in one_error_line(p.stderr)
    assert not out.exists()
    good = alpaca_file(tmp_path / "good.json", 40)
    run_train(["--out", str(out), "--data", str(good), "--max-steps", "1", "--batch-size", "8", "--micro-batch-size",
               "8"])
    assert [r["step"] for r in read_log(out)] == [1] and (out / "final" / "params.json").exists()
    assert not (out / "accuracy.json").exists()  # user data: no checkable answers assumed


def test_data_py_bad_batch_size(capsys):
    assert data.main([str(ROOT / "README.md"), "--tokenizer", "x", "--batch-size", "0"]) == 2
    assert one_error_line(capsys.readouterr().err,
                          "data.py").endswith("--batch-size must be a finite number >= 1, got 0")


def test_params_json_with_a_string_dim(tmp_path, capsys):
    torch.manual_seed(0)
    save_meta(Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=50, multiple_of=16)), tmp_path / "m",
              dtype=torch.float32)
    params = json.loads((tmp_path / "m" / "params.json").read_text())
    (tmp_path / "m" / "params.json").write_text(json.dumps(params | {"dim": "32"}))
    with pytest.raises(CheckpointError, match=r'params.json: "dim" must be an integer, got \'32\''):
        load_meta(tmp_path / "m")
    (tmp_path / "p.json").write_text(json.dumps([{"instruction": "hi"}]))
    builtin_data.builtin_tokenizer(tmp_path / "m" / "tokenizer.model")  # sample.py reads the tokenizer first
    code = sample.main(["--ckpt", str(tmp_path / "m"), "--prompts", str(tmp_path / "p.json"),
                        "--out", str(tmp_path / "o.json"), "--template", "alpaca"])
    assert code == 2 and '"dim" must be an integer' in one_error_line(capsys.readouterr().err, "sample.py")


@pytest.fixture
def tiny_ckpt(tmp_path):
    tok = builtin_data.builtin_tokenizer(tmp_path / "tokenizer.model", seed=3)
    torch.manual_seed(0)
    save_meta(Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=tok.n_words, multiple_of=16)),
              tmp_path / "ckpt", dtype=torch.float32)
    record(tmp_path / "ckpt", "alpaca")
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
        monkeypatch.setattr(torch, "empty", lambda *a,
                            **k: (_ for _ in ()).throw(AssertionError("Torch not compiled with CUDA enabled")))
    (tmp_path / "exists.json").write_text("[]")
    loads = []
    monkeypatch.setattr(sample.llama, "load_meta", lambda *a, **k: loads.append(1))  # nothing may reach the model
    argv = ["--ckpt", str(tiny_ckpt), "--prompts", str(tmp_path / "prompts.json"), "--out", str(tmp_path / "new.json"),
            *[a.format(tmp=tmp_path) for a in args]]
    code = sample.main(argv)
    line = one_error_line(capsys.readouterr().err, "sample.py")
    assert code == 2 and msg in line and loads == []
    assert (tmp_path / "exists.json").read_text() == "[]" and not (tmp_path / "new.json").exists()


def test_sample_overwrite_replaces_outputs(tmp_path, tiny_ckpt):
    out = tmp_path / "outputs.json"
    out.write_text("[]")
    assert sample.main(["--ckpt", str(tiny_ckpt), "--prompts", str(tmp_path / "prompts.json"), "--out", str(out),
                        "--max-new-tokens", "3", "--overwrite"]) == 0
    assert [r["instruction"] for r in json.loads(out.read_text())] == ["What is 2 + 3?"]


@pytest.mark.slow
def test_non_finite_weights_are_never_saved_or_exported(tmp_path):
    # lr 0 keeps the +inf: the loss guard sees nothing wrong; the weight check before saving must
    ckpt = meta_folder(tmp_path, poison=True)[0]
    train_file = alpaca_file(tmp_path / "train.json", 40)
    out = tmp_path / "o"
    p = run_train(["--init", str(ckpt), "--data", str(train_file), "--out", str(out), "--lr", "0", "--max-steps", "2",
             "--save-every", "1", "--batch-size", "8", "--micro-batch-size", "8"], check=False)
    line = one_error_line(p.stderr)
    assert p.returncode == 2 and "non-finite weights at step 1: not written; no checkpoint was saved" in line
    assert not (out / "final").exists() and checkpoint.checkpoints(out) == []
    p = run_train(["--init", str(ckpt), "--data", str(train_file), "--out", str(tmp_path / "o2"), "--lr", "0",
                   "--max-steps", "1",
             "--batch-size", "8", "--micro-batch-size", "8"],
             check=False)  # no checkpoint on the way: the export refuses
    assert p.returncode == 2 and "non-finite weights at the end of training" in one_error_line(p.stderr)
    assert not (tmp_path / "o2" / "final").exists()


# ---- train.py --check: every check the run makes before its first write, and no write ----

def check_run(capsys, *args):
    code = train.main([*TINY, "--builtin-size", "200", "--check", *args])
    return code, capsys.readouterr()


def test_check_refuses_what_the_run_refuses(tmp_path, capsys, monkeypatch):
    out = tmp_path / "o"
    code, cap = check_run(capsys, "--out", str(out))  # the control: a new folder is fine
    assert code == 0 and "--check: fine" in cap.out and not out.exists()
    # 1. a folder that holds a run, without --resume
    out.mkdir()
    (out / "log.jsonl").write_text("")
    code, cap = check_run(capsys, "--out", str(out))
    assert code == 2 and "--out is not empty; pass --resume" in one_error_line(cap.err)
    # 2. a global batch that torchrun's world size does not divide
    monkeypatch.setenv("WORLD_SIZE", "3")
    code, cap = check_run(capsys, "--out", str(tmp_path / "o2"), "--batch-size", "8", "--micro-batch-size", "2")
    assert code == 2 and "is not a multiple of world size 3" in one_error_line(cap.err)
    monkeypatch.delenv("WORLD_SIZE")
    # 3. --resume of a run saved with other LoRA settings
    saved = out / "ckpt" / "step_0000002"
    saved.mkdir(parents=True)
    lora_cfg = {"rank": 4, "alpha": 16.0, "dropout": 0.0, "targets": ["wq", "wv"]}
    (saved / "train_state.json").write_text(json.dumps({"step": 2, "lora": lora_cfg, "dtype": "fp32"}))
    code, cap = check_run(capsys, "--out", str(out), "--resume")
    assert code == 2 and "saved with LoRA settings" in one_error_line(cap.err)
    assert sorted(p.name for p in out.rglob("*")) == ["ckpt", "log.jsonl", "step_0000002", "train_state.json"]
