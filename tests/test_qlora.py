"""QLoRA (qlora.py, train.py --quantize nf4): each rank's NF4 rows equal torchao's quantization of the
whole weight, the scaler block for shapes torchao's default refuses, the sharded model against the
dequantized base, the merged export, 2 ranks against 1, kill -9 and resume, and every refusal."""
import json
import sys

import pytest
import torch
import torch.distributed as dist
from conftest import ENV, TINY, kill_at_checkpoint, losses, meta_folder, one_error_line, read_log, run_train
from torch.distributed.device_mesh import init_device_mesh

import checkpoint
import lora
import qlora
import recipes
import train
from bench import qlora as bench_qlora
from model import ModelArgs, Transformer, load_meta, save_meta

pytest.importorskip("torchao")  # in requirements.txt, for --quantize only
nf4 = qlora.torchao_nf4()


def reference_nf4(w):
    """torchao's own NF4 of a whole weight, with qlora's scaler block."""
    return nf4.to_nf4(w.bfloat16(), qlora.BLOCK, qlora.scaler_block(w.numel() // qlora.BLOCK))


def test_finite_without_dequantizing():
    """qlora.finite reads an NF4 weight's block scalers only; the reference dequantizes the whole weight."""
    def case(spoil=None):
        t = reference_nf4(torch.randn(192, 576))
        if spoil:
            spoil(t)
        return qlora.finite(t), bool(torch.isfinite(t.get_original_weight()).all())
    assert case() == (True, True)
    assert case(lambda t: t.quantization_factor[3:4].zero_()) == (False, False)  # one scaler block -> inf
    assert case(lambda t: t.scaler_mean.fill_(float("nan"))) == (False, False)
    assert qlora.finite(torch.tensor([1.0, 2.0])) and not qlora.finite(torch.tensor([1.0, float("inf")]))


def test_base_linear_multiplies_nf4_a_quarter_of_the_rows_at_a_time(monkeypatch):
    """lora.base_linear on an NF4 weight: the same output as torchao's whole-weight linear (each output
    is the same row's dot products), each matmul against a quarter of the rows (a quarter of the
    dequantized temporary), and an input gradient within bf16 rounding of the exact one, as the whole
    weight's is (the quarters' gradients are summed in bf16)."""
    w = reference_nf4(torch.randn(512, 192))  # 1,536 blocks of 64, 8 scaler blocks of 192
    x = torch.randn(3, 5, 192, dtype=torch.bfloat16, requires_grad=True)
    dequantized = []
    original = type(w).get_original_weight
    monkeypatch.setattr(type(w), "get_original_weight", lambda t: dequantized.append(t.shape) or original(t))
    lora.base_linear(x, w)
    assert dequantized == [(512, 192)] and w.numel() < lora.NF4_SPLIT  # small weights go whole
    monkeypatch.setattr(lora, "NF4_SPLIT", w.numel())
    dequantized.clear()
    out = lora.base_linear(x, w)
    assert dequantized == [(128, 192)] * 4
    whole = torch.nn.functional.linear(x, w)
    assert dequantized[4:] == [(512, 192)] and torch.equal(out, whole)
    g = torch.randn_like(out)
    (got,), (ref,) = torch.autograd.grad(out, x, g), torch.autograd.grad(whole, x, g)
    assert dequantized[5:10] == [(128, 192)] * 4 + [(512, 192)]  # the backward dequantizes by quarters too
    exact = g.float().flatten(0, 1) @ w.get_original_weight().float()  # in fp32, as one sum
    scale = exact.abs().max()
    assert (ref.float().flatten(0, 1) - exact).abs().max() <= 2 ** -7 * scale  # one bf16 rounding
    assert (got.float().flatten(0, 1) - exact).abs().max() <= 2 ** -6 * scale  # four, and their sum
    assert not torch.equal(got, ref)
    plain = torch.randn(512, 192, dtype=torch.bfloat16)
    assert torch.equal(lora.base_linear(x, plain), torch.nn.functional.linear(x, plain))


def test_scaler_block_for_shapes_torchao_refuses():
    w = torch.randn(192, 576).bfloat16()  # SmolLM2-135M's k/v projections: 1,728 scalers
    with pytest.raises(AssertionError, match="divisible"):
        nf4.to_nf4(w)  # torchao's default scaler block of 256
    assert qlora.scaler_block(1728) == 216 and 1728 % 216 == 0
    assert qlora.scaler_block(4096 * 4096 // 64) == 256  # LLaMA's weights keep torchao's default
    assert qlora.scaler_block(11008 * 4096 // 64) == 256
    assert qlora.scaler_block(64) == 8  # 8 scaler blocks: 1, 2, 4 or 8 ranks shard them alike
    assert reference_nf4(w).get_original_weight().shape == w.shape


@pytest.mark.parametrize("shards", [1, 2, 4])
def test_each_shard_holds_the_rows_of_torchaos_whole_weight_quantization(shards):
    w = torch.randn(192, 576, generator=torch.Generator().manual_seed(0)).bfloat16() * 0.02
    whole = reference_nf4(w)
    sb = whole.scaler_block_size
    rows = w.chunk(shards)
    scalers = torch.cat([nf4.get_block_absmax(r.flatten(), qlora.BLOCK) for r in rows])
    start = 0
    for r in rows:
        codes, qs, factor, mean, table = qlora.nf4_shard(r, scalers, start, sb)
        n = r.numel() // qlora.BLOCK
        assert torch.equal(codes, nf4.to_nf4(r, qlora.BLOCK, sb).quantized_data)  # torchao's codes of these rows
        assert torch.equal(codes, whole.quantized_data[start * 32:(start + n) * 32])  # 2 codes a byte
        assert torch.equal(qs, whole.quantized_scalers[start:start + n])
        assert torch.equal(factor, whole.quantization_factor[start // sb:(start + n) // sb])
        assert torch.equal(mean, whole.scaler_mean) and torch.equal(table, whole.nf4)
        start += n


def test_check_shapes_names_the_weight():
    with torch.device("meta"):
        odd = Transformer(ModelArgs(dim=20, n_layers=1, n_heads=2, vocab_size=50, multiple_of=16))
        tiny = Transformer(ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=50, multiple_of=32))
    with pytest.raises(qlora.UserError, match=r"layers.0.attention.wq.weight \(20 x 20\) is not a whole number"):
        qlora.check_shapes(odd, 1)
    qlora.check_shapes(tiny, 2)
    with pytest.raises(qlora.UserError, match=r"wq.weight \(64 x 64, 8 scaler blocks\) does not split evenly over 3"):
        qlora.check_shapes(tiny, 3)


@pytest.fixture
def world_of_one(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield init_device_mesh("cpu", (1,))
    dist.destroy_process_group()


def test_sharded_model_holds_the_nf4_base_and_exports_it_plus_ba(tmp_path, world_of_one):
    folder, tok, base = meta_folder(tmp_path)
    args = recipes.parse_args(["--init", str(folder), "--lora-rank", "2", "--lora-targets", "wq", "w2",
                               "--quantize", "nf4", "--out", str(tmp_path / "o")])
    model = checkpoint.build_model(args, checkpoint.read_init(folder, tok), tok.n_words, torch.device("cpu"),
                                   world_of_one, torch.bfloat16)
    assert qlora.count(model) == (14, 7)  # NF4: 7 linears x 2 blocks, adapted or not; bf16: embedding, 5 norms, output
    base_sd = base.state_dict()
    for name, p in model.named_parameters():
        key = name.replace("_checkpoint_wrapped_module.", "")
        t = checkpoint.local(p)
        if lora.is_adapter(key):
            assert p.requires_grad and p.dtype == torch.float32
        elif key.split(".")[-2] in lora.TARGETS:  # every linear of every block: torchao's NF4 of the weight
            assert qlora.is_nf4(t) and not p.requires_grad, key
            assert torch.equal(t.get_original_weight(), reference_nf4(base_sd[key]).get_original_weight()), key
        else:  # embedding, norms, output: bf16
            assert torch.equal(t, base_sd[key].bfloat16()), key
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                checkpoint.local(p).copy_(torch.randn(p.shape, generator=g) * 0.1)
    cfg = checkpoint.lora_config(args)
    assert cfg["quantize"] == "nf4"
    merged = checkpoint.gathered_state(model, 0, torch.float32, cfg)
    sd = model.state_dict()
    for i in range(2):
        for key in (f"layers.{i}.attention.wq", f"layers.{i}.feed_forward.w2"):  # dequantized base + (alpha/r) B A
            w = reference_nf4(base_sd[key + ".weight"]).get_original_weight().float()
            ba = checkpoint.local(sd[key + ".lora_b"]).float() @ checkpoint.local(sd[key + ".lora_a"]).float()
            assert torch.equal(merged[key + ".weight"], w + 8.0 * ba), key
        wk = f"layers.{i}.attention.wk.weight"  # not adapted: the dequantized base, as it trained
        assert torch.equal(merged[wk], reference_nf4(base_sd[wk]).get_original_weight().float())
    # the sharded model computes what the merged plain model does (bf16 compute: a loose bound)
    plain = Transformer(base.args)
    plain.load_state_dict({k: v for k, v in merged.items() if not lora.is_adapter(k)})
    tokens = torch.randint(3, tok.n_words, (2, 12), generator=g)
    with torch.no_grad():
        want, got = plain.eval()(tokens), model.eval()(tokens).float()
    assert (got - want).abs().max() < 0.05 * want.abs().max(), (got - want).abs().max()


@pytest.mark.parametrize("flags, msg", [
    (["--quantize", "nf4", "--init", "{init}"], "--quantize nf4 needs --lora-rank R"),
    (["--quantize", "nf4", "--lora-rank", "4"], "--quantize nf4 needs --init"),
    (["--quantize", "nf4", "--lora-rank", "4", "--init", "{init}", "--dtype", "fp32"], "drop --dtype fp32"),
    (["--quantize", "nf4", "--lora-rank", "4", "--init", "{init}", "--dtype", "bf16", "--compile"],
     "--compile with --quantize nf4 is not supported"),
    (["--quantize", "nf4", "--lora-rank", "4", "--init", "{odd}", "--dtype", "bf16", "--check"],
     "is not a whole number of NF4 blocks"),
    (["--quantize", "nf5", "--lora-rank", "4", "--init", "{init}"], "invalid choice: 'nf5'"),
])
def test_refusals_one_line_exit_2(tmp_path, capsys, flags, msg):
    folder, tok, _ = meta_folder(tmp_path)
    odd = tmp_path / "odd"  # dim 20: a 20 x 20 wq is not whole blocks of 64
    save_meta(Transformer(ModelArgs(dim=20, n_layers=1, n_heads=2, vocab_size=tok.n_words, multiple_of=16)), odd,
              tokenizer_path=tok.path)
    out = tmp_path / "o"
    flags = [f.format(init=folder, odd=odd) for f in flags]
    assert train.main([*TINY, "--out", str(out), *flags]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("train.py: error:") and msg in lines[0], lines
    assert not out.exists()


def test_torchao_missing_is_one_line(tmp_path, capsys, monkeypatch):
    folder, _, _ = meta_folder(tmp_path)
    monkeypatch.setitem(sys.modules, "torchao.quantization.quantize_.workflows.nf4", None)  # import fails
    assert train.main([*TINY, "--out", str(tmp_path / "o"), "--init", str(folder), "--lora-rank", "2",
                       "--quantize", "nf4", "--dtype", "bf16"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("train.py: error: --quantize nf4 needs torchao (pip install torchao==0.18.0)"), err
    assert len(err.splitlines()) == 1


# ---- train.py under torchrun: the tiny Meta model of conftest, 2 ranks

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("qlora")
    ckpt, _, base = meta_folder(root)
    recs = [{"instruction": f"Add {i} and {i + 1}.", "input": "", "output": f"{i} + {i + 1} = {2 * i + 1}"}
            for i in range(48)]
    (root / "train.json").write_text(json.dumps(recs))
    (root / "eval.json").write_text(json.dumps([{"instruction": f"What is {i} + 3?", "output": f"{i + 3}"}
                                                for i in range(4)]))
    flags = ["--init", str(ckpt), "--data", str(root / "train.json"), "--eval-data", str(root / "eval.json"),
             "--lora-rank", "2", "--quantize", "nf4", "--dtype", "bf16", "--batch-size", "8", "--micro-batch-size",
             "2", "--export-dtype", "fp32"]
    return root, base, flags


@pytest.mark.slow
def test_two_ranks_quantize_as_one(setup):
    # lr 0: the adapters stay B = 0, so OUT/final is the dequantized base itself, and must not depend on
    # the world size; lr 0 keeps the losses comparable too (they differ only in summation order)
    root, base, flags = setup
    common = [*flags, "--lr", "0", "--max-steps", "2", "--lora-dropout", "0"]
    run_train(["--out", str(root / "one"), *common])
    two = run_train(["--out", str(root / "two"), *common], nproc=2)
    # torch reports, at exit, collectives whose outputs were never waited for: rank 1's dropped NF4 export gathers
    assert "unwaited collective" not in two.stderr, two.stderr[-2000:]
    a, b = (torch.load(root / o / "final" / "consolidated.00.pth", weights_only=True) for o in ("one", "two"))
    for k, w in base.state_dict().items():
        want = reference_nf4(w).get_original_weight() if k.split(".")[-2] in lora.TARGETS else w.bfloat16()
        assert torch.equal(a[k], want.float()) and torch.equal(b[k], a[k]), k
    one, two = losses(root / "one"), losses(root / "two")
    assert max(abs(x - y) / y for x, y in zip(one, two)) < 1e-3, (one, two)


@pytest.fixture(scope="module")
def ref(setup):
    """2 ranks, 6 steps, checkpoints every 2, dropout on: the uninterrupted QLoRA run."""
    root, _, flags = setup
    common = [*flags, "--lr", "2e-2", "--lora-dropout", "0.1", "--max-steps", "6", "--save-every", "2",
              "--eval-every", "3"]
    run_train(["--out", str(root / "ref"), *common, "--export-hf"], nproc=2)
    return root / "ref", common


@pytest.mark.slow
def test_loss_falls_and_export_is_the_dequantized_base_plus_ba(setup, ref):
    _, base, _ = setup
    out, _ = ref
    log = read_log(out)
    evals = [r["eval_loss"] for r in log if "eval_loss" in r]
    assert log[-1]["loss"] < log[0]["loss"] and evals[-1] < evals[0], log
    saved = torch.load(out / "adapters.pth", weights_only=True)
    assert saved["quantize"] == "nf4" and saved["rank"] == 2
    final = torch.load(out / "final" / "consolidated.00.pth", weights_only=True)
    for k, w in base.state_dict().items():
        stem = k.rsplit(".", 1)[0]
        if k.split(".")[-2] in lora.TARGETS:
            a, b = saved["adapters"][stem + ".lora_a"], saved["adapters"][stem + ".lora_b"]
            want = reference_nf4(w).get_original_weight().float() + 8.0 * (b @ a)
            assert torch.equal(final[k], want) and b.abs().sum() > 0, k
        else:
            assert torch.equal(final[k], w.bfloat16().float()), k
    import hf  # the HF export holds the same model
    tokens = torch.randint(3, base.args.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(hf.load_any(out / "final_hf")(tokens), load_meta(out / "final")(tokens), atol=1e-4)


@pytest.mark.slow
def test_kill_and_resume_is_exact_and_another_quantize_is_refused(ref):
    ref_out, common = ref
    out = ref_out.parent / "killed"
    kill_at_checkpoint(["train.py", *TINY, "--out", out, *common], out, nproc=2)
    assert not (out / "final").exists()
    run_train(["--out", str(out), "--resume", *common], nproc=2)  # the base is quantized again, alike
    assert losses(out) == losses(ref_out)
    for f in ("final/consolidated.00.pth", "adapters.pth"):
        a, b = (torch.load(o / f, weights_only=True) for o in (out, ref_out))
        a, b = (d.get("adapters", d) for d in (a, b))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    plain = [f for f in common if f not in ("--quantize", "nf4")]
    p = run_train(["--out", str(ref_out), "--resume", *plain], check=False, env=ENV)
    assert p.returncode == 2 and "saved by a run with --quantize nf4, this run has --quantize (none)" in \
        one_error_line(p.stderr)


def test_bench_counts_the_nf4_bytes_torchao_holds():
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=100, multiple_of=32)
    counted, n_params = bench_qlora.nf4_bytes(args)
    torch.manual_seed(0)
    model = bench_qlora.quantized(Transformer(args).bfloat16())
    held = 0
    for p in model.parameters():
        if qlora.is_nf4(p):  # the codes, the int8 scalers and their factors (the mean and table: a few bytes)
            held += sum(t.numel() * t.element_size() for t in (p.quantized_data, p.quantized_scalers,
                                                                 p.quantization_factor))
        else:
            held += p.numel() * p.element_size()
    assert n_params == Transformer(args).num_params() and counted == held
