"""LoRA (lora.py, train.py --lora-rank): exact step 0, low-rank merged deltas, adapters-only optimizer
and checkpoints, kill -9 and resume on 2 ranks, the merged export against the unmerged model, bad flags."""
import copy
import json
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from conftest import ENV, ROOT, TINY, kill_at_checkpoint, losses, meta_folder, read_log, run_train
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.device_mesh import init_device_mesh

import checkpoint
import lora
import recipes
import train
from model import ModelArgs, Transformer, load_meta

TARGETS = ["wq", "wv", "w2"]  # a subset, so that untouched matrices can be checked too
RANK = 2


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, multiple_of=16))


def test_step0_is_the_base_model_and_keys_keep_meta_names():
    base = tiny_model()
    x = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        want = base(x)
    m = lora.add_lora(copy.deepcopy(base), rank=4, alpha=16, dropout=0.1, seed=1)
    keys = set(m.state_dict())
    assert set(base.state_dict()) <= keys  # Meta's key names still load into the base
    adapters = keys - set(base.state_dict())
    linears = [f"attention.{n}" for n in ("wq", "wk", "wv", "wo")] + [f"feed_forward.{n}" for n in ("w1", "w2", "w3")]
    assert adapters == {f"layers.{i}.{lin}.{ab}" for i in range(2) for lin in linears for ab in ("lora_a", "lora_b")}
    assert {n for n, p in m.named_parameters() if p.requires_grad} == adapters
    for mode in (True, False):  # B = 0: exactly the base, with dropout on or off
        with torch.no_grad():
            assert torch.equal(m.train(mode)(x), want)
    wq = m.layers[0].attention.wq
    assert torch.count_nonzero(wq.lora_b) == 0 and torch.count_nonzero(wq.lora_a) == wq.lora_a.numel()
    # the same seed gives the same A (every rank builds the same adapters), another seed another A
    again = lora.add_lora(copy.deepcopy(base), rank=4, alpha=16, seed=1).layers[1].feed_forward.w2.lora_a
    other = lora.add_lora(copy.deepcopy(base), rank=4, alpha=16, seed=2).layers[1].feed_forward.w2.lora_a
    assert torch.equal(again, m.layers[1].feed_forward.w2.lora_a) and not torch.equal(again, other)


def test_side_path_and_merge_against_hand_computed_weights():
    base = tiny_model()
    m = lora.add_lora(copy.deepcopy(base), rank=3, alpha=6, targets=["wk", "w1"]).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g))
    x = torch.randn(5, 32, generator=g)
    wk = m.layers[1].attention.wk
    by_hand = x @ (base.layers[1].attention.wk.weight + 2.0 * wk.lora_b @ wk.lora_a).T  # scale alpha/r = 6/3
    assert torch.allclose(wk(x), by_hand, atol=1e-5)
    merged = lora.merge_state_dict(m.state_dict(), 2.0)
    assert set(merged) == set(base.state_dict())
    plain = tiny_model(seed=1)
    plain.load_state_dict(merged)
    tokens = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        assert torch.allclose(plain.eval()(tokens), m(tokens), atol=1e-5)


@pytest.mark.parametrize("args, msg", [
    (["--lora-rank", "-1"], "--lora-rank must be a finite number >= 0"),
    (["--lora-rank", "4", "--lora-alpha", "0"], "--lora-alpha must be a finite number > 0,"),
    (["--lora-rank", "4", "--lora-alpha", "nan"], "--lora-alpha must be a finite number > 0,"),
    (["--lora-rank", "4", "--lora-alpha", "inf"], "--lora-alpha must be a finite number > 0,"),
    (["--lora-rank", "4", "--lora-dropout", "1"], "--lora-dropout must be a finite number >= 0 and < 1"),
    (["--lora-rank", "4", "--lora-dropout", "-0.1"], "--lora-dropout must be a finite number >= 0 and < 1"),
    (["--lora-rank", "4", "--lora-dropout", "nan"], "--lora-dropout must be a finite number >= 0 and < 1"),
    (["--lora-rank", "4", "--lora-targets", "wq", "wx"], "--lora-targets: unknown wx"),
])
def test_bad_lora_flags_one_line_exit_2(tmp_path, capsys, args, msg):
    out = tmp_path / "o"
    assert train.main(["--out", str(out), *args]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("train.py: error:") and msg in lines[0], lines
    assert not out.exists()  # checked before any work or write


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_build_model_freezes_the_base_in_the_compute_dtype(tmp_path, dtype):
    # bf16 compute: the frozen base is held in bf16 (no fp32 copy), the adapters in fp32
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        args = recipes.parse_args(["--dim", "32", "--n-layers", "1", "--n-heads", "2", "--lora-rank", "2",
                                 "--lora-targets", "wo", "w1"])
        mesh = init_device_mesh("cpu", (1,))
        model = checkpoint.build_model(args, None, 50, torch.device("cpu"), mesh, dtype)
        for name, p in model.named_parameters():
            adapter = lora.is_adapter(name)
            assert p.requires_grad == adapter and p.dtype == (torch.float32 if adapter else dtype), name
        assert sum(lora.is_adapter(n) for n, _ in model.named_parameters()) == 4
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    ckpt, tok, base = meta_folder(root)
    recs = [{"instruction": f"Add {i} and {i + 1}.", "input": "",
             "output": f"{i} + {i + 1} = {2 * i + 1}"} for i in range(48)]
    (root / "train.json").write_text(json.dumps(recs))
    (root / "eval.json").write_text(json.dumps([{"instruction": f"What is {i} + 3?",
                                                 "output": f"{i + 3}"} for i in range(4)]))
    flags = ["--init", str(ckpt), "--data", str(root / "train.json"), "--eval-data", str(root / "eval.json"),
             "--lr", "2e-2", "--lora-rank", str(RANK), "--lora-dropout", "0.1", "--lora-targets", *TARGETS]
    return root, ckpt, base, flags


@pytest.fixture(scope="module")
def ref(setup):
    """2 ranks, 8 steps, checkpoints every 2: the uninterrupted run."""
    root, _, _, flags = setup
    common = [*flags, "--max-steps", "8", "--batch-size", "8", "--micro-batch-size", "2", "--save-every", "2",
              "--export-dtype", "fp32"]
    run_train(["--out", str(root / "ref"), *common], nproc=2)
    return root / "ref", common


@pytest.mark.slow
def test_kill_and_resume_is_exact_on_two_ranks(ref):
    ref_out, common = ref
    out = ref_out.parent / "killed"
    kill_at_checkpoint(["train.py", *TINY, "--out", out, *common], out, nproc=2)  # torchrun and both ranks
    assert not (out / "final").exists()
    run_train(["--out", str(out), "--resume", *common], nproc=2)
    assert losses(out) == losses(ref_out)  # bit-identical, dropout included
    assert [r["step"] for r in read_log(out)] == list(range(1, 9))
    for f in ("final/consolidated.00.pth", "adapters.pth"):
        a, b = (torch.load(o / f, weights_only=True) for o in (out, ref_out))
        a, b = (d.get("adapters", d) for d in (a, b))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # resuming with other LoRA settings is refused before anything is loaded
    p = run_train(["--out", str(out), "--resume", *common, "--lora-rank", "4"], check=False)
    assert p.returncode == 2 and "resume with the same --lora-* flags" in p.stderr, p.stderr[-2000:]


@pytest.mark.slow
def test_checkpoint_and_optimizer_hold_only_adapters(ref):
    ref_out, _ = ref
    dcp_to_torch_save(checkpoint.checkpoints(ref_out)[-1], ref_out.parent / "last.pt")
    sd = torch.load(ref_out.parent / "last.pt", weights_only=True)
    want = {f"layers.{i}.{'feed_forward' if t == 'w2' else 'attention'}.{t}.{ab}"
            for i in range(2) for t in TARGETS for ab in ("lora_a", "lora_b")}
    assert set(sd["model"]) == want  # no frozen base in the checkpoint: it is re-read from --init
    assert set(sd["optim"]["state"]) == want  # AdamW state only for the adapters
    for k in want:
        assert sd["optim"]["state"][k]["exp_avg"].shape == sd["model"][k].shape
        assert sd["optim"]["state"][k]["exp_avg_sq"].abs().sum() > 0  # they were trained
    ranks = {v.shape[0] if k.endswith("lora_a") else v.shape[1] for k, v in sd["model"].items()}
    assert ranks == {RANK}


@pytest.mark.slow
def test_merged_weights_differ_only_in_targets_by_rank_r(setup, ref):
    _, _, base, _ = setup
    ref_out, _ = ref
    merged = torch.load(ref_out / "final" / "consolidated.00.pth", weights_only=True)
    base_sd = base.state_dict()
    assert set(merged) == set(base_sd)
    changed = 0
    for k, w in base_sd.items():
        if k.split(".")[-2] in TARGETS:
            s = torch.linalg.svdvals((merged[k] - w).double())
            assert s[0] > 1e-3, k  # the adapter moved
            assert (s > 1e-5 * s[0]).sum() <= RANK, (k, s[:RANK + 2])
            changed += 1
        else:  # embeddings, norms, the output layer and the untargeted linears: untouched, bit for bit
            assert torch.equal(merged[k], w), k
    assert changed == 2 * len(TARGETS)


@pytest.mark.slow
def test_export_reproduces_the_unmerged_model(setup, ref):
    _, ckpt, _, _ = setup
    ref_out, _ = ref
    saved = torch.load(ref_out / "adapters.pth", weights_only=True)
    assert (saved["rank"], saved["alpha"], saved["targets"]) == (RANK, 16.0, TARGETS)
    unmerged = lora.load_adapters(load_meta(ckpt), ref_out / "adapters.pth").eval()  # base + adapters, side path
    merged = load_meta(ref_out / "final")  # Meta's layout: nothing LoRA-specific left
    assert sum(v.numel() for v in saved["adapters"].values()) < 0.1 * merged.num_params()
    tokens = torch.randint(3, merged.args.vocab_size, (3, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = unmerged(tokens), merged(tokens)
    assert (a - b).abs().max() < 1e-4


@pytest.mark.slow
def test_alpha_sweep_with_lora_and_a_bf16_base(setup):
    root, _, base, flags = setup
    out = root / "sweep"
    run_train(["--out", str(out), *flags, "--alpha", "0", "5", "--max-steps", "2", "--batch-size", "8",
               "--micro-batch-size", "8",
         "--dtype", "bf16"])
    assert (out / "sweep.md").exists()
    l0, l5 = read_log(out / "alpha_0")[0], read_log(out / "alpha_5")[0]
    assert l0["tokens"] == l5["tokens"] and l0["loss"] != l5["loss"]  # same data, the noise differs
    for a in ("0", "5"):
        final = torch.load(out / f"alpha_{a}" / "final" / "consolidated.00.pth", weights_only=True)
        # with a bf16 base (see test_build_model_...): untargeted weights are the base's, rounded once to bf16
        assert torch.equal(final["layers.0.attention.wk.weight"], base.layers[0].attention.wk.weight.bfloat16())
        assert not torch.equal(final["layers.0.attention.wq.weight"], base.layers[0].attention.wq.weight.bfloat16())


@pytest.mark.slow
def test_bench_lora_counts_trainable_parameters(tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, "-m", "bench", "--only", "lora", "lora_memory", "--dim", "64", "--n-layers", "2",
                    "--n-heads", "4",
                    "--vocab", "256", "--seq-len", "32", "--batch-size", "2", "--min-time", "0.1", "--lora-rank", "4",
                    "--lora-micro-batch", "2", "--lora-seq-len", "32", "--out", str(out)], cwd=ROOT, env=ENV,
                    check=True, capture_output=True, timeout=300)
    r = json.loads(out.read_text())
    # dim 64, FFN hidden 256: rank 4 x (in + out) for wq wk wv wo (64 + 64) and w1 w2 w3 (64 + 256), per block
    adapters = 2 * 4 * (4 * 128 + 3 * 320)
    full = 2 * 256 * 64 + 2 * (4 * 64 * 64 + 3 * 64 * 256 + 2 * 64) + 64
    b = r["lora"]
    assert b["lora"]["trainable_params"] == adapters and b["full"]["trainable_params"] == full
    assert b["lora"]["tokens_per_s"] > 0 and b["full"]["tokens_per_s"] > 0
    assert b["trainable_fraction"] == round(adapters / full, 5)
    assert r["lora_memory"]["adapter_params"] == adapters
