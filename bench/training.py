"""The training parts of `python -m bench`: training tokens/s and MFU against the measured matmul
peak (train), NEFTune's cost against the same step without noise (noise), a LoRA step against full
finetuning (lora).

    python -m bench --only train noise lora
"""
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

import lora
from bench.decode import DTYPES, sync, timed
from model import ModelArgs, Transformer
from noise import neftune, neftune_noise

H100_BF16_PEAK = 989e12  # H100 SXM dense bf16 tensor-core FLOP/s, from NVIDIA's datasheet


def matmul_peak(dtype, device, max_n=4096):
    """Best sustained FLOP/s of a square torch.matmul: the size doubles from 512 while one product
    takes under a quarter second (a CPU without bf16 units would take minutes at 4096)."""
    best, n = 0.0, 512
    while n <= max_n:
        a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
        t = timed(lambda: a @ b, device, min_time=0.5)
        best = max(best, 2 * n ** 3 / t)
        if t > 0.25:
            break
        n *= 2
    return best


def model_flops_per_token(args, seq_len):
    """nanoGPT's estimate_mfu, after the PaLM paper (Chowdhery et al. 2022, appendix B): 6N for the
    weights' forward and backward, plus 12 * n_layers * dim * seq_len for attention's QK^T and AV."""
    with torch.device("meta"):  # parameter count without allocating the model
        n_params = Transformer(args).num_params()
    return 6 * n_params + 12 * args.n_layers * args.dim * seq_len


def train_step_fn(model, opt, tokens, mask, dtype, device, alpha):
    """One full training step as train.py runs it: embed, NEFTune, forward, loss, backward, AdamW."""
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()

    def step():
        with autocast:
            noise = neftune_noise(mask, model.args.dim, alpha) if alpha > 0 else None
            logits = model(tokens, noise=noise)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def bench_train(cfg, dtypes, compile_modes, device, seq_len, batch_size, min_time, peak_n=4096):
    """Tokens/s and MFU of full training steps (noise on, alpha 5) for each dtype x eager/compile."""
    args = ModelArgs(**cfg)
    flops_tok = model_flops_per_token(args, seq_len)
    out = {"config": {**cfg, "seq_len": seq_len, "batch_size": batch_size}, "flops_per_token": flops_tok, "runs": {}}
    peaks = {name: matmul_peak(DTYPES[name], device, peak_n) for name in {"fp32", *dtypes}}
    for name in dtypes:
        dtype, peak = DTYPES[name], peaks[name]
        out[f"matmul_peak_{name}_tflops"] = round(peak / 1e12, 4)
        if name == "bf16" and device.type == "cpu" and peak < peaks["fp32"]:
            out["runs"][name] = "skipped: this CPU's bf16 matmul is slower than fp32 (no AMX / AVX512-BF16 units)"
            continue
        for compiled in compile_modes:
            torch.manual_seed(0)
            model = Transformer(args).to(device).train()
            if compiled:
                for layer in model.layers:
                    layer.compile()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
            tokens = torch.randint(0, args.vocab_size, (batch_size, seq_len), device=device)
            mask = torch.ones_like(tokens, dtype=torch.bool)
            t = timed(train_step_fn(model, opt, tokens, mask, dtype, device, alpha=5.0), device, min_time=min_time,
                      min_reps=2)
            tok_s = batch_size * seq_len / t
            run = {"step_s": round(t, 6), "tokens_per_s": round(tok_s, 1), "mfu": round(tok_s * flops_tok / peak, 4)}
            if device.type == "cuda" and name == "bf16":
                run["mfu_vs_datasheet"] = round(tok_s * flops_tok / H100_BF16_PEAK, 4)
            out["runs"][name + ("+compile" if compiled else "")] = run
    return out


def bench_noise(cfg, device, seq_len, batch_size, rounds):
    """NEFTune's cost: neftune() alone and a full step with alpha 5 over alpha 0 (target < 1.01)."""
    args = ModelArgs(**cfg)
    torch.manual_seed(0)
    model = Transformer(args).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    tokens = torch.randint(0, args.vocab_size, (batch_size, seq_len), device=device)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    embeds = torch.randn(batch_size, seq_len, args.dim, device=device)
    t_noise = timed(lambda: neftune(embeds, mask, 5.0), device, min_time=0.5)
    steps = {a: train_step_fn(model, opt, tokens, mask, torch.float32, device, alpha=a) for a in (0.0, 5.0)}
    for fn in steps.values():
        fn()  # warm-up
    times = {0.0: [], 5.0: []}
    for _ in range(rounds):  # one step each in turn, so drift on a shared machine hits both alike
        for a, fn in steps.items():
            t = time.perf_counter()
            fn()
            sync(device)
            times[a].append(time.perf_counter() - t)
    t0, t5 = min(times[0.0]), min(times[5.0])
    return {"neftune_ms": round(1e3 * t_noise, 3), "step_ms_alpha0": round(1e3 * t0, 1),
            "step_ms_alpha5": round(1e3 * t5, 1),
            "neftune_over_step": round(t_noise / t0, 5), "step_ratio_alpha5_over_alpha0": round(t5 / t0, 4)}


def bench_lora(cfg, device, seq_len, batch_size, rounds, rank):
    """A LoRA step (rank r on all seven linears, base frozen, alpha 16, dropout 0.05) next to a full
    finetuning step at the same config, noise on: tokens/s (best of alternating steps, as in
    bench_noise), trainable parameters, and on GPU each one's peak memory above what was there
    before it was built. bf16 on GPU (LoRA's base held in bf16, as train.py does), fp32 on CPU."""
    args, dtype = ModelArgs(**cfg), torch.bfloat16 if device.type == "cuda" else torch.float32
    tokens = torch.randint(0, args.vocab_size, (batch_size, seq_len), device=device)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    out, steps = {"config": {**cfg, "seq_len": seq_len, "batch_size": batch_size, "rank": rank,
                             "dtype": str(dtype)[6:]}}, {}
    for name in ("full", "lora"):
        before = torch.cuda.memory_allocated() if device.type == "cuda" else 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        torch.manual_seed(0)
        model = Transformer(args)
        if name == "lora":
            lora.add_lora(model.to(dtype), rank, alpha=16, dropout=0.05)
        params = [p for p in model.to(device).train().parameters() if p.requires_grad]
        steps[name] = train_step_fn(model, torch.optim.AdamW(params, lr=1e-4, foreach=True), tokens, mask, dtype,
                                    device, alpha=5.0)
        steps[name]()  # warm-up, and the peak memory of a step
        out[name] = {"trainable_params": sum(p.numel() for p in params)}
        if device.type == "cuda":
            out[name]["peak_memory_gb"] = round((torch.cuda.max_memory_allocated() - before) / 1e9, 3)
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    for name in steps:
        out[name] |= {"step_s": round(min(times[name]), 6),
                      "tokens_per_s": round(batch_size * seq_len / min(times[name]), 1)}
    out["lora_over_full_tokens_per_s"] = round(out["lora"]["tokens_per_s"] / out["full"]["tokens_per_s"], 3)
    out["trainable_fraction"] = round(out["lora"]["trainable_params"] / out["full"]["trainable_params"], 5)
    return out
