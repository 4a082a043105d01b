"""Runs as on a node of GPUs, here on CPU ranks: --init fills each rank's own rows and nothing more, the
gradient sync may wait for the last micro-batch, a non-finite held-out loss stops the run before its
export, and a device that cannot serve every process is one line."""
import pytest
import torch
from conftest import ROOT, alpaca_file, losses, meta_folder, one_error_line, run_script, run_train

import checkpoint
from model import load_meta

PROBE = '''
import sys, torch
import checkpoint, recipes, train
from model import find_tokenizer
from tokenizer import Tokenizer
folder, out = sys.argv[1], sys.argv[2]
rank, world, device, mesh = train.setup_distributed("cpu")
init = checkpoint.read_init(folder, Tokenizer(find_tokenizer(folder)))
reads = []
for key, w in init[1].items():  # every read is logged: which weight, which rows
    w.read = (lambda key, read: lambda s, e: reads.append((key, s, e)) or read(s, e))(key, w.read)
args = recipes.parse_args(["--init", folder, "--device", "cpu", "--lora-rank", "2", "--seed", "5"])
model = checkpoint.build_model(args, init, init[0].vocab_size, device, mesh, torch.float32)
local = {k: checkpoint.local(p).detach().clone() for k, p in model.state_dict(keep_vars=True).items()}
torch.save({"reads": reads, "local": local, "world": world}, f"{out}/rank{rank}.pt")
'''


@pytest.mark.slow
def test_init_fills_each_rank_with_its_own_rows_only(tmp_path):
    folder, _, _ = meta_folder(tmp_path)
    (tmp_path / "probe.py").write_text(PROBE)
    run_script(str(tmp_path / "probe.py"), [folder, tmp_path], nproc=2, env={"PYTHONPATH": str(ROOT)})
    full = load_meta(folder).state_dict()
    import lora
    base = load_meta(folder)
    lora.add_lora(base, 2, 16.0, 0.05, seed=5)
    adapters = {k: v for k, v in base.state_dict().items() if lora.is_adapter(k)}
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for r, g in enumerate(got):
        assert g["world"] == 2
        for key, s, e in g["reads"]:  # rank r read its own half of every weight's rows, and once
            rows = full[key].shape[0]
            half = -(-rows // 2)
            assert (s, e) == (min(r * half, rows), min((r + 1) * half, rows)), (r, key, s, e)
        assert sorted(k for k, _, _ in g["reads"]) == sorted(full)  # every weight, once
    for key in (*full, *adapters):  # and the two ranks' rows together are the whole weight
        whole = torch.cat([g["local"][key] for g in got])
        assert torch.equal(whole, (full | adapters)[key].float()), key


@pytest.mark.slow
def test_sync_on_the_last_micro_batch_gives_the_same_run(tmp_path):
    data = alpaca_file(tmp_path / "train.json", 48)
    common = ["--data", data, "--max-steps", "4", "--batch-size", "8", "--micro-batch-size", "2"]  # 2 per rank and step
    for mode in ("every", "last"):
        run_train(["--out", tmp_path / mode, *common, "--grad-sync", mode], nproc=2)
    every, last = losses(tmp_path / "every"), losses(tmp_path / "last")
    assert len(every) == 4 and max(abs(a - b) / a for a, b in zip(every, last)) < 1e-5, (every, last)
    assert every[0] != every[-1]  # it trained: later losses depend on the synced gradients


@pytest.mark.slow
def test_a_non_finite_held_out_loss_stops_the_run_before_the_export(tmp_path):
    # lr 1e30: the first update leaves finite weights of about 1e30, whose clean losses overflow
    out = tmp_path / "o"
    p = run_train(["--out", out, "--max-steps", "1", "--lr", "1e30", "--warmup", "0", "--batch-size", "8",
                   "--micro-batch-size", "8"], check=False)
    line = one_error_line(p.stderr)
    assert p.returncode == 2 and "non-finite clean losses" in line and "at step 1: nothing exported" in line, line
    assert not (out / "final").exists() and checkpoint.checkpoints(out) == []


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
@pytest.mark.parametrize("nproc", [1, 2])
def test_cuda_asked_for_on_a_machine_without_it(tmp_path, nproc):
    p = run_train(["--out", tmp_path / "o", "--max-steps", "1", "--device", "cuda"], nproc=nproc, check=False)
    line = one_error_line(p.stderr)
    assert p.returncode != 0 and line.endswith(f"{nproc} processes on this node but 0 CUDA device(s): start at most "
                                               "0 (torchrun --nproc_per_node) or pass --device cpu"), line
    assert not (tmp_path / "o").exists()
