"""The QLoRA parts of `python -m bench`: every worker's peak private memory of train.py --quantize nf4 on 2 ranks
(qlora_memory), a QLoRA step's tokens/s against a bf16 LoRA step of the same model (qlora_speed), and
the NF4 quantization error of a real model's linear weights, torchao's against bitsandbytes' where it
is installed (nf4_error, given an HF folder such as SmolLM2-135M-Instruct):

    python -m bench --only qlora_memory qlora_speed nf4_error --nf4-folder ../SmolLM2-135M-Instruct
"""
import copy
import shutil
import time
from pathlib import Path

import torch
import torch.nn as nn

import lora
import qlora
from bench import memory
from bench.training import train_step_fn
from model import ModelArgs, Transformer


def nf4_bytes(args):
    """Bytes of a model under --quantize nf4, counted from torchao's layout: per linear weight half a
    byte per parameter (two codes a byte), an int8 scaler per block of 64 and a bf16 factor per
    scaler block; every other weight in bf16."""
    with torch.device("meta"):
        model = Transformer(args)
    linear = {id(m.weight) for _, m in qlora.linears(model)}
    total = 0
    for p in model.parameters():
        if id(p) in linear:
            blocks = p.numel() // qlora.BLOCK
            total += p.numel() // 2 + blocks + 2 * (blocks // qlora.scaler_block(blocks))
        else:
            total += 2 * p.numel()
    return total, model.num_params()


def qlora_memory(cfg=memory.INIT_CFG, work="/tmp/neftune_bench_qlora", nproc=2, steps=2, seq_len=256,
                 micro_batch=2):
    """train.py --quantize nf4 --init on 2 ranks from a model in 2 bf16 model-parallel shards (the
    configuration of init_memory), LoRA rank 8 with --act-ckpt: each worker's peak RssAnon from start
    to exit, against its NF4 shard (goal: at most 1.3 x (0.53 bytes per parameter / ranks) + 0.45 GB;
    rank 0 may add the bf16 export it gathers), under glibc's default allocator and with
    MALLOC_MMAP_THRESHOLD_=65536 (init_memory says why). Then --resume from the first run's middle
    checkpoint, which quantizes the base again."""
    import builtin_data
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    args = ModelArgs(**cfg)
    ckpt = work / "init"
    if not (ckpt / "consolidated.01.pth").exists():
        memory.make_checkpoint(ckpt, args, n_shards=2)
    builtin_data.builtin_tokenizer(ckpt / "tokenizer.model", vocab_size=cfg["vocab_size"])
    data = memory.alpaca_records(work / "train.json", 64)
    counted, n_params = nf4_bytes(args)
    shard_gb = 0.53 * n_params / nproc / 1e9
    out = {"config": {**cfg, "n_params": n_params, "ranks": nproc, "seq_len": seq_len, "micro_batch": micro_batch},
           "nf4_shard_gb": round(shard_gb, 3), "nf4_shard_counted_gb": round(counted / nproc / 1e9, 3),
           "goal_gb": round(1.3 * shard_gb + 0.45, 3), "bf16_export_gb": round(2 * n_params / 1e9, 3)}
    run_dir = work / "run"
    flags = ["--init", ckpt, "--data", data, "--out", run_dir, "--lora-rank", "8", "--act-ckpt", "--quantize", "nf4",
             "--dtype", "bf16", "--device", "cpu", "--batch-size", nproc * micro_batch, "--micro-batch-size",
             micro_batch, "--max-len", seq_len, "--eval-examples", 4, "--eval-every", 1000, "--save-every", steps]
    for allocator, env in (("glibc_default", {}), ("mmap_threshold_64k", {"MALLOC_MMAP_THRESHOLD_": "65536"})):
        shutil.rmtree(run_dir, ignore_errors=True)
        # the first run saves a checkpoint at step `steps` and goes on to 2 x steps; --resume with a longer
        # run (a finished one would just stop) reads that checkpoint (adapters and AdamW state), quantizes
        # the base again and trains steps + 1 .. 3 x steps
        for name, extra in (("first", ["--max-steps", 2 * steps]), ("resume", ["--max-steps", 3 * steps, "--resume"])):
            peaks, seconds, _ = memory.sampled_run(memory.torchrun(nproc, *flags, *extra), env=env)
            r = {f"rank{r}_peak_rss_anon_gb": round(b / 1e9, 3) for r, b in sorted(peaks.items())}
            r |= {f"rank{r}_meets_goal": b / 1e9 <= out["goal_gb"] for r, b in sorted(peaks.items())}
            out[f"{allocator}_{name}"] = r | {"wall_s": round(seconds, 1)}
    return out


def quantized(model):
    """model with every linear weight of every block replaced by torchao's NF4 of it, as train.py holds it."""
    nf4 = qlora.torchao_nf4()
    for _, m in qlora.linears(model):
        w = m.weight.detach()
        m.weight = nn.Parameter(nf4.to_nf4(w, qlora.BLOCK, qlora.scaler_block(w.numel() // qlora.BLOCK)),
                                requires_grad=False)
    return model


def qlora_speed(cfg, seq_len, batch_size, rounds, rank):
    """A QLoRA step (NF4 base, rank-r adapters on all seven linears, bf16 autocast) against a bf16
    LoRA step of the same model on this device, alternating, best of `rounds`: tokens/s. And the
    price itself: the time to dequantize every linear weight once (a step does it in the forward and
    again in the backward: linear_nf4 keeps the NF4 weight, not its bf16 copy)."""
    args = ModelArgs(**cfg)
    tokens = torch.randint(0, args.vocab_size, (batch_size, seq_len))
    mask = torch.ones_like(tokens, dtype=torch.bool)
    torch.manual_seed(0)
    base = lora.add_lora(Transformer(args).to(torch.bfloat16), rank, alpha=16, dropout=0.05).train()
    models = {"lora_bf16": base, "qlora_nf4": quantized(copy.deepcopy(base))}
    steps = {}
    for name, model in models.items():
        params = [p for p in model.parameters() if p.requires_grad]
        steps[name] = train_step_fn(model, torch.optim.AdamW(params, lr=1e-4, foreach=True), tokens, mask,
                                    torch.bfloat16, torch.device("cpu"), alpha=5.0)
        steps[name]()  # warm-up
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    weights = [m.weight for _, m in qlora.linears(models["qlora_nf4"])]
    deq = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for w in weights:
            w.get_original_weight()
        deq.append(time.perf_counter() - t0)
    out = {"config": {**cfg, "seq_len": seq_len, "batch_size": batch_size, "rank": rank, "compute": "bf16 autocast"}}
    for name in steps:
        best = min(times[name])
        out[name] = {"step_s": round(best, 4), "tokens_per_s": round(batch_size * seq_len / best, 1)}
    ratio = out["qlora_nf4"]["tokens_per_s"] / out["lora_bf16"]["tokens_per_s"]
    out["qlora_over_lora_tokens_per_s"] = round(ratio, 3)
    out["dequantize_all_linears_once_s"] = round(min(deq), 4)
    out["two_dequantizations_share_of_qlora_step"] = round(2 * min(deq) / out["qlora_nf4"]["step_s"], 3)
    return out


def nf4_error(folder):
    """Mean |W - dequant(W)| over every linear weight of an HF folder's model (weighted by size):
    torchao's NF4 as train.py --quantize nf4 holds it (blocks of 64, double-quantized scalers), and
    bitsandbytes' NF4 with QLoRA's settings (blocksize 64, compress_statistics) where it is installed;
    also the mean |W| for scale. Each weight is quantized from its bf16 rounding, as train.py does."""
    import hf
    model = hf.load_any(folder)
    try:
        import bitsandbytes.functional as bnb
    except ImportError as e:
        bnb, why = None, f"not installed ({e})"
    nf4 = qlora.torchao_nf4()
    sums = {"torchao": 0.0, "bitsandbytes": 0.0, "abs_w": 0.0}
    n = 0
    for name, m in qlora.linears(model):
        w = m.weight.detach().bfloat16()
        q = nf4.to_nf4(w, qlora.BLOCK, qlora.scaler_block(w.numel() // qlora.BLOCK))
        sums["torchao"] += (w.float() - q.get_original_weight().float()).abs().sum().item()
        if bnb is not None:
            packed, state = bnb.quantize_4bit(w.float(), blocksize=64, compress_statistics=True, quant_type="nf4")
            sums["bitsandbytes"] += (w.float() - bnb.dequantize_4bit(packed, state).float()).abs().sum().item()
        sums["abs_w"] += w.float().abs().sum().item()
        n += w.numel()
    out = {"folder": str(folder), "linear_params": n, "mean_abs_w": sums["abs_w"] / n,
           "torchao_mean_abs_error": sums["torchao"] / n}
    if bnb is not None:
        import bitsandbytes
        out |= {"bitsandbytes": bitsandbytes.__version__, "bitsandbytes_mean_abs_error": sums["bitsandbytes"] / n}
    else:
        out["bitsandbytes"] = why
    return out
