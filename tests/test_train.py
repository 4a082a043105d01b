"""train.py end to end on a tiny model: ranks, accumulation, kill -9 and resume, export, sweep, errors."""
import json
import math
from contextlib import nullcontext

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import losses, meta_folder, read_log, run_train
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import builtin_data
import checkpoint
import data
import train
from model import ModelArgs, Tokenizer, Transformer, load_meta


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    out = tmp_path_factory.mktemp("r1") / "out"
    run_train(["--out", str(out), "--max-steps", "4", "--batch-size", "8", "--micro-batch-size", "4", "--export-dtype",
               "fp32"])
    return out


@pytest.mark.slow
def test_two_ranks_match_one_rank(one_rank, tmp_path):
    # same global batch of 8: 1 rank x 2 micro-batches of 4 vs 2 ranks x 2 micro-batches of 2;
    # noise is on (alpha 5): each example's noise is seeded by its index, so it is the same too
    out = tmp_path / "r2"
    run_train(["--out", str(out), "--max-steps", "4", "--batch-size", "8", "--micro-batch-size", "2"], nproc=2)
    a, b = losses(one_rank), losses(out)
    assert len(a) == len(b) == 4
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4 * max(a), (a, b)
    assert a[0] > a[-1]  # and it learns
    ea, eb = read_log(one_rank)[-1]["eval_loss"], read_log(out)[-1]["eval_loss"]
    assert math.isclose(ea, eb, rel_tol=1e-4)


@pytest.mark.slow
def test_grad_accumulation_equals_big_batch(one_rank, tmp_path):
    out = tmp_path / "big"  # one micro-batch of 8 instead of 2 x 4
    run_train(["--out", str(out), "--max-steps", "4", "--batch-size", "8", "--micro-batch-size", "8"])
    a, b = losses(one_rank), losses(out)
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4 * max(a), (a, b)
    ga, gb = [r["grad_norm"] for r in read_log(one_rank)], [r["grad_norm"] for r in read_log(out)]
    assert max(abs(x - y) / x for x, y in zip(ga, gb)) < 1e-3


@pytest.mark.slow
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
    assert math.isclose(total / count, read_log(one_rank)[-1]["eval_loss"], rel_tol=1e-5)


def test_noise_only_in_training_steps(monkeypatch):
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=50, multiple_of=16))
    x = torch.randint(3, 50, (2, 9))
    labels = x.clone()
    labels[:, :3] = -100
    batch = {"input_ids": x, "labels": labels, "mask": torch.ones_like(x, dtype=torch.bool)}
    calls = []
    real = train.neftune_noise
    monkeypatch.setattr(train, "neftune_noise", lambda *a, **k: calls.append(1) or real(*a, **k))
    from contextlib import nullcontext
    model.eval()
    clean = train.forward_loss(model, batch, "cpu", nullcontext(), alpha=5.0)
    direct = torch.nn.functional.cross_entropy(model(x)[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1),
                                               reduction="sum")
    assert calls == [] and torch.allclose(clean, direct)
    model.train()
    noisy = train.forward_loss(model, batch, "cpu", nullcontext(), alpha=5.0)
    assert calls == [1] and not torch.allclose(noisy, clean)
    assert torch.allclose(train.forward_loss(model, batch, "cpu", nullcontext(), alpha=0.0), clean)




@pytest.fixture
def world_of_one(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield init_device_mesh("cpu", (1,))
    dist.destroy_process_group()


def test_fsdp_bf16_blocks_see_fp32_rope_tables(world_of_one):
    # the CUDA bf16 policy, applied here on the CPU: weights are gathered in bf16, but the cos/sin tables
    # every block receives stay fp32 (FSDP's default cast_forward_inputs would make them bf16)
    mp = checkpoint.mixed_precision(torch.device("cuda"), torch.bfloat16)
    assert mp.param_dtype == torch.bfloat16 and mp.reduce_dtype == torch.float32
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=50, multiple_of=16))
    for layer in model.layers:
        fully_shard(layer, mesh=world_of_one, mp_policy=mp)
    fully_shard(model, mesh=world_of_one, mp_policy=mp)
    seen = []
    for layer in model.layers:
        layer.register_forward_pre_hook(lambda m, args: seen.append(tuple(a.dtype for a in args[:3])))
    model(torch.randint(0, 50, (2, 8))).float().sum().backward()
    assert seen == [(torch.bfloat16, torch.float32, torch.float32)] * 2  # (hidden states, cos, sin) per block


def test_right_padded_batch_needs_no_attention_mask():
    # causal attention never looks right, so the padding after a row's tokens changes nothing before it:
    # every response token's loss is the same without a mask (forward_loss passes none: SDPA's fast path)
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=50, multiple_of=16)).eval()
    rows = [torch.randint(3, 50, (n,)).tolist() for n in (9, 4, 6)]
    examples = [{"input_ids": r, "labels": [data.IGNORE] * 2 + r[2:]} for r in rows]
    batch = data.collate(examples, pad_id=0)
    assert not batch["mask"].all()
    with torch.no_grad():
        masked = model(batch["input_ids"], mask=batch["mask"])
        plain = model(batch["input_ids"])
        per_token = [F.cross_entropy(x[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), reduction="none")
                     for x in (masked, plain)]
        summed = train.forward_loss(model, batch, "cpu", nullcontext())
    real = batch["labels"][:, 1:].flatten() != data.IGNORE
    assert real.sum() == sum(len(r) - 2 for r in rows)  # labels from position 2 on
    assert torch.allclose(per_token[0][real], per_token[1][real], atol=1e-6)
    assert torch.allclose(summed, per_token[0][real].sum(), rtol=1e-6)


@pytest.mark.slow
def test_sweep_writes_folders_and_table(tmp_path):
    out = tmp_path / "sweep"
    run_train(["--out", str(out), "--alpha", "0", "5", "--max-steps", "2", "--batch-size", "8", "--micro-batch-size",
               "8"])
    rows = [r for r in (out / "sweep.md").read_text().splitlines() if r.startswith("| ") and r[2].isdigit()]
    assert len(rows) == 2
    for row, a in zip(rows, ("0", "5")):
        last = read_log(out / f"alpha_{a}")[-1]
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[0] == a and float(cells[2]) == pytest.approx(last["clean_train_loss"], abs=1e-4)
        assert float(cells[3]) == pytest.approx(last["eval_loss"], abs=1e-4)
        assert (out / f"alpha_{a}" / "final" / "consolidated.00.pth").exists()
    # same data order and init: the first step's loss differs only by the noise, and alpha 0 is clean
    l0, l5 = read_log(out / "alpha_0")[0], read_log(out / "alpha_5")[0]
    assert l0["tokens"] == l5["tokens"] and l0["loss"] != l5["loss"]


@pytest.mark.slow
@pytest.mark.parametrize("args, msg", [
    (["--alpha", "-1"], "--alpha must be a finite number >= 0"),
    (["--init", "no/such/dir"], "no/such/dir: --init folder not found"),
    (["--data", "no_such.json"], "no_such.json: --data file not found"),
    (["--batch-size", "6", "--micro-batch-size", "4"], "not a multiple"),
])
def test_bad_input_one_line_exit_2(tmp_path, args, msg):
    p = run_train(["--out", str(tmp_path / "o"), "--max-steps", "1", *args], check=False)
    assert p.returncode == 2, p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("train.py: error:") and msg in lines[0], p.stderr


@pytest.mark.slow
def test_refuses_non_empty_out_and_stops_on_nan(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    p = run_train(["--out", str(out), "--max-steps", "1"], check=False)
    assert p.returncode == 2 and "not empty" in p.stderr and (out / "precious.txt").read_text() == "keep me"
    # an absurd learning rate overflows the weights after the first update: the run must stop with
    # a clear message and keep the last good checkpoint, with finite weights
    nan = tmp_path / "nan"
    p = run_train(["--out", str(nan), "--max-steps", "20", "--lr", "1e30", "--warmup", "0", "--save-every", "1",
             "--batch-size", "8", "--micro-batch-size", "8"], check=False)
    assert p.returncode == 2 and "non-finite loss" in p.stderr, p.stderr[-2000:]
    ckpts = checkpoint.checkpoints(nan)
    assert f"--resume continues from {ckpts[-1]}" in p.stderr  # names the checkpoint that exists
    assert ckpts and not (nan / "final").exists()
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    dcp_to_torch_save(ckpts[-1], tmp_path / "last.pt")
    sd = torch.load(tmp_path / "last.pt", weights_only=True)["model"]
    assert all(torch.isfinite(v).all() for v in sd.values())


@pytest.mark.slow
def test_finetune_meta_checkpoint_with_eval_file(tmp_path):
    ckpt, tok, init = meta_folder(tmp_path)
    recs = [{"instruction": f"Add {i} and {i + 1}.", "input": "",
             "output": f"{i} + {i + 1} = {2 * i + 1}"} for i in range(40)]
    held = [{"instruction": f"What is {i} + 3?", "output": f"{i} + 3 = {i + 3}"} for i in range(6)]
    (tmp_path / "train.json").write_text(json.dumps(recs))
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held))
    # the step-0 evaluation is before any update: the logged clean eval loss there must equal the loss
    # of the checkpoint's model on the eval file, computed here directly
    p = run_train(["--init", str(ckpt), "--data", str(tmp_path / "train.json"), "--eval-data",
                   str(tmp_path / "eval.jsonl"),
             "--out", str(tmp_path / "o"), "--max-steps", "2", "--batch-size", "8", "--micro-batch-size", "4", "--lr",
             "1e-2"])
    settings = next(line for line in p.stdout.splitlines() + p.stderr.splitlines() if line.startswith("settings:"))
    assert "epochs=3 " in settings and "save_every=200 " in settings  # the paper recipe with --init
    assert " template=alpaca " in settings  # a Meta folder records none: the data's default
    assert "warning: the held-out loss is measured on 6 examples, under 50" in p.stdout + p.stderr
    examples = data.load_dataset(tmp_path / "eval.jsonl", tok, "alpaca", 128, verbose=False)
    b = data.collate(examples, tok.pad_id)
    with torch.no_grad():
        direct = train.response_loss_sum(init(b["input_ids"], mask=b["mask"]), b["labels"]).item()
    n = int((b["labels"][:, 1:] != -100).sum())
    log = read_log(tmp_path / "o", baseline=True)
    assert [r["step"] for r in log] == [0, 1, 2] and "loss" not in log[0]
    assert math.isclose(log[0]["eval_loss"], direct / n, rel_tol=1e-5)
    assert not math.isclose(log[-1]["eval_loss"], direct / n, rel_tol=1e-3)  # and training moved it
    assert json.loads((tmp_path / "o" / "final" / "template.json").read_text()) == {"template": "alpaca"}


@pytest.mark.slow
def test_tokenizer_that_does_not_match_the_model(tmp_path):
    ckpt, _, _ = meta_folder(tmp_path, vocab_extra=8)
    (tmp_path / "train.json").write_text(json.dumps([{"instruction": "a", "output": "b"}] * 16))
    p = run_train(["--init", str(ckpt), "--data", str(tmp_path / "train.json"), "--out", str(tmp_path / "o"),
             "--batch-size", "8", "--micro-batch-size", "4"], check=False)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2 and len(lines) == 1 and "tokenizer.model" in lines[0] and "1008" in lines[0], p.stderr


@pytest.mark.slow
def test_error_under_torchrun_is_printed_once_and_nothing_hangs(tmp_path):
    p = run_train(["--out", str(tmp_path / "o"), "--batch-size", "6", "--micro-batch-size", "4"], nproc=2, check=False)
    # every rank exits 2; torchrun itself then reports the failed children and exits 1
    assert p.returncode != 0 and p.stderr.count("train.py: error:") == 1, p.stderr[-2000:]
    assert "world size 2" in p.stderr
