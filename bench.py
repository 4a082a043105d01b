"""Speed and memory against the machine's own limits, measured in the same run: training tokens/s
and MFU, NEFTune's cost, decode tokens/s against memory bandwidth, load_meta's peak memory, the loss's peak
memory at LLaMA-3's vocabulary (whole logits vs chunked), LoRA against full finetuning, and LoRA's
memory for LLaMA-2-7B (lora_memory).

    python bench.py                  # everything (~5 min on 2 CPU cores); --only train noise decode load loss decode1 lora lora_memory
    python bench.py --only train --compile --dtypes fp32 bf16
    python bench.py --only train --preset tinyllama --seq-len 2048 --batch-size 4 --dtypes bf16 --compile   # GPU: MFU
    python bench.py --only decode1 --preset llama2-7b --decode1-dtypes bf16 --new-tokens 128             # GPU: 7B decode
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

import lora
from model import ModelArgs, Transformer, load_meta, save_meta
from noise import neftune
from sample import generate

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
H100_BF16_PEAK = 989e12  # H100 SXM dense bf16 tensor-core FLOP/s, from NVIDIA's datasheet


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, min_time=1.0, min_reps=3):
    """Best time of fn() over repeats lasting at least min_time seconds (after one warm-up call):
    the best, not the mean, because a shared machine only ever slows a run down."""
    fn()
    sync(device)
    best, reps, start = float("inf"), 0, time.perf_counter()
    while reps < min_reps or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
        reps += 1
    return best


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


def copy_bandwidth(device, nbytes=1 << 30):
    """Bytes/s of a large tensor copy, counting the read and the write: the bandwidth limit of decoding."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    return 2 * nbytes / timed(lambda: dst.copy_(src), device, min_time=0.5)


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
            noise = (lambda e: neftune(e, mask, alpha)) if alpha > 0 else None
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
            t = timed(train_step_fn(model, opt, tokens, mask, dtype, device, alpha=5.0), device, min_time=min_time, min_reps=2)
            tok_s = batch_size * seq_len / t
            run = {"step_s": round(t, 4), "tokens_per_s": round(tok_s, 1), "mfu": round(tok_s * flops_tok / peak, 4)}
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
    return {"neftune_ms": round(1e3 * t_noise, 3), "step_ms_alpha0": round(1e3 * t0, 1), "step_ms_alpha5": round(1e3 * t5, 1),
            "neftune_over_step": round(t_noise / t0, 5), "step_ratio_alpha5_over_alpha0": round(t5 / t0, 4)}


def bench_decode(cfg, device, dtype_name, new_tokens, prompt_len, batch_sizes, nocache_tokens, copy_mb=1024):
    """Decode tokens/s through sample.generate against the memory-bandwidth limit (every token reads
    every weight once: bandwidth / weight bytes), and against a loop without the KV cache."""
    dtype = DTYPES[dtype_name]
    args = ModelArgs(**cfg)
    torch.manual_seed(0)
    model = Transformer(args).to(device, dtype).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bw = copy_bandwidth(device, copy_mb << 20)
    out = {"config": cfg, "dtype": dtype_name, "n_params": model.num_params(), "weight_gb": round(weight_bytes / 1e9, 3),
           "copy_bandwidth_gb_s": round(bw / 1e9, 2), "bandwidth_limit_tokens_per_s_batch1": round(bw / weight_bytes, 2)}
    prompts = lambda b: torch.randint(3, args.vocab_size, (b, prompt_len), generator=torch.Generator().manual_seed(0)).tolist()
    for b in batch_sizes:
        generate(model, prompts(b), 2)  # warm-up
        sync(device)
        t0 = time.perf_counter()
        generate(model, prompts(b), new_tokens)
        sync(device)
        tok_s = b * new_tokens / (time.perf_counter() - t0)
        out[f"tokens_per_s_batch{b}"] = round(tok_s, 2)
        if b == 1:
            out["fraction_of_bandwidth_limit_batch1"] = float(f"{tok_s / (bw / weight_bytes):.3g}")  # 3 digits, even when tiny
    # no cache: every step runs the whole sequence again, so its cost grows with the length
    ids = torch.tensor(prompts(1), device=device)
    with torch.inference_mode():
        t0 = time.perf_counter()
        for _ in range(nocache_tokens):
            ids = torch.cat([ids, model(ids)[:, -1:].argmax(-1)], dim=1)
        sync(device)
    nocache = nocache_tokens / (time.perf_counter() - t0)
    out["nocache_tokens_per_s_batch1"] = round(nocache, 2)
    out["cache_speedup_batch1"] = round(out["tokens_per_s_batch1"] / nocache, 2)
    return out

def bench_lora(cfg, device, seq_len, batch_size, rounds, rank):
    """A LoRA step (rank r on all seven linears, base frozen, alpha 16, dropout 0.05) next to a full
    finetuning step at the same config, noise on: tokens/s (best of alternating steps, as in
    bench_noise), trainable parameters, and on GPU each one's peak memory above what was there
    before it was built. bf16 on GPU (LoRA's base held in bf16, as train.py does), fp32 on CPU."""
    args, dtype = ModelArgs(**cfg), torch.bfloat16 if device.type == "cuda" else torch.float32
    tokens = torch.randint(0, args.vocab_size, (batch_size, seq_len), device=device)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    out, steps = {"config": {**cfg, "seq_len": seq_len, "batch_size": batch_size, "rank": rank, "dtype": str(dtype)[6:]}}, {}
    for name in ("full", "lora"):
        before = torch.cuda.memory_allocated() if device.type == "cuda" else 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        torch.manual_seed(0)
        model = Transformer(args)
        if name == "lora":
            lora.add_lora(model.to(dtype), rank, alpha=16, dropout=0.05)
        params = [p for p in model.to(device).train().parameters() if p.requires_grad]
        steps[name] = train_step_fn(model, torch.optim.AdamW(params, lr=1e-4, foreach=True), tokens, mask, dtype, device, alpha=5.0)
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
        out[name] |= {"step_s": round(min(times[name]), 4), "tokens_per_s": round(batch_size * seq_len / min(times[name]), 1)}
    out["lora_over_full_tokens_per_s"] = round(out["lora"]["tokens_per_s"] / out["full"]["tokens_per_s"], 3)
    out["trainable_fraction"] = round(out["lora"]["trainable_params"] / out["full"]["trainable_params"], 5)
    return out


def saved_activation_bytes(args, rank, dropout, batch_size, seq_len):
    """Bytes autograd keeps for backward in one LoRA step, measured with saved_tensors_hooks on a
    2-layer model of args' width under bf16 autocast, LoRA on all seven linears: (the second block,
    the rest: the first block, which keeps less as its input needs no grad, the output and the
    loss). Storages count once; weights are not activations."""
    torch.manual_seed(0)
    model = lora.add_lora(Transformer(ModelArgs(**{**args.__dict__, "n_layers": 2})).to(torch.bfloat16), rank, 16, dropout).train()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    where, saved = ["rest"], {}
    last = model.layers[-1]  # the first block sees an input that needs no grad, so it keeps less
    last.register_forward_pre_hook(lambda m, a: where.__setitem__(0, "block"))
    last.register_forward_hook(lambda m, a, o: where.__setitem__(0, "rest"))

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in weights:
            saved[s.data_ptr()] = (where[0], s.nbytes())
        return t
    tokens = torch.randint(0, args.vocab_size, (batch_size, seq_len))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        F.cross_entropy(model(tokens)[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())
    block = sum(n for w, n in saved.values() if w == "block")
    return block, sum(n for _, n in saved.values()) - block


def lora_memory(cfg, rank, micro_batch, seq_len, dropout=0.05):
    """GPU memory of LoRA training for a LLaMA shape (default: LLaMA-2-7B) on one GPU: the bf16 base,
    fp32 adapters with their gradients and AdamW's two moments (16 bytes each), and the activations
    of one micro-batch, measured by saved_activation_bytes at that batch and length on two blocks:
    blocks 2..n_layers each keep what the second one does. --act-ckpt keeps each block's bf16 input
    and recomputes one block at a time. Allocator slack and temporaries come on top."""
    args = ModelArgs(**cfg)
    with torch.device("meta"):
        model = lora.add_lora(Transformer(args), rank, 16)
    base = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    adapters = model.num_params() - base
    block, rest = saved_activation_bytes(args, rank, dropout, micro_batch, seq_len)
    acts, acts_ckpt = (args.n_layers - 1) * block + rest, args.n_layers * 2 * args.dim * micro_batch * seq_len + block + rest
    gb = lambda b: round(b / 1e9, 2)
    out = {"config": {**cfg, "rank": rank, "micro_batch": micro_batch, "seq_len": seq_len, "dropout": dropout},
           "base_bf16_gb": gb(2 * base), "adapter_params": adapters, "adapters_grads_adamw_gb": gb(16 * adapters),
           "activations_per_block_gb": gb(block), "activations_first_block_and_output_gb": gb(rest),
           "activations_gb": gb(acts), "activations_act_ckpt_gb": gb(acts_ckpt),
           "total_gb": gb(2 * base + 16 * adapters + acts), "total_act_ckpt_gb": gb(2 * base + 16 * adapters + acts_ckpt)}
    out["full_finetune_weights_grads_adamw_gb"] = gb(16 * base)  # fp32 master + grad + 2 moments, before activations
    return out



def bench_decode1(cfg, device, dtype_names, new_tokens, prompt_len, rounds, copy_mb, profile=False):
    """Batch-1 decode, eager and compiled (generate(compile=True)), per weight dtype, against the copy-
    bandwidth limit and against the model's own mat-vecs run alone (what the BLAS allows: if that is
    near the decode speed, the mat-vec is the wall). Tokens/s = N / time of generate(N tokens), the
    prompt's prefill included as in bench_decode. Every measurement takes turns within each round,
    best of the rounds, so a shared machine slows them alike."""
    args = ModelArgs(**cfg)
    prompt = torch.randint(3, args.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0)).tolist()
    src = torch.ones(copy_mb << 18, device=device)  # copy_mb MiB of fp32
    dst = torch.empty_like(src)
    out = {"config": cfg, "prompt_len": prompt_len, "new_tokens": new_tokens, "threads": torch.get_num_threads()}
    for name in dtype_names:
        torch.manual_seed(0)
        with torch.device(device):  # a 7B model is initialised where it runs, not on the host
            model = Transformer(args).to(DTYPES[name]).eval()
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        linears = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
        xs = {n: torch.randn(1, n, device=device, dtype=DTYPES[name]) for n in {w.shape[1] for w in linears}}
        t0 = time.perf_counter()
        generate(model, prompt, 2, compile=True)
        compile_s = time.perf_counter() - t0
        fns = {"copy": lambda: dst.copy_(src), "matvecs": lambda: [F.linear(xs[w.shape[1]], w) for w in linears]}
        for c in (False, True):
            fns["compiled" if c else "eager"] = lambda c=c: generate(model, prompt, new_tokens, compile=c)
        best = dict.fromkeys(fns, float("inf"))
        with torch.inference_mode():
            for fn in fns.values():  # warm-up
                fn()
            for _ in range(rounds):
                for k, fn in fns.items():
                    sync(device)
                    t = time.perf_counter()
                    fn()
                    sync(device)
                    best[k] = min(best[k], time.perf_counter() - t)
        limit = 2 * src.numel() * 4 / best["copy"] / weight_bytes
        r = {"weight_gb": round(weight_bytes / 1e9, 3), "copy_bandwidth_gb_s": round(2 * src.numel() * 4 / best["copy"] / 1e9, 2),
             "bandwidth_limit_tokens_per_s": round(limit, 1), "compile_s": round(compile_s, 1),
             "matvecs_only_tokens_per_s": round(1 / best["matvecs"], 1),
             "matvecs_gb_s": round(sum(w.numel() * w.element_size() for w in linears) / best["matvecs"] / 1e9, 2)}
        for mode in ("eager", "compiled"):
            tok_s = new_tokens / best[mode]
            r[f"{mode}_tokens_per_s"] = round(tok_s, 1)
            r[f"{mode}_fraction_of_limit"] = round(tok_s / limit, 3)
        out[name] = r
        if profile:  # where a compiled step's time goes: expect the BLAS mat-vecs (aten::mm / addmm) on top
            from torch.profiler import ProfilerActivity, profile as torch_profile
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            for c in (False, True):
                with torch_profile(activities=acts) as prof:
                    generate(model, prompt, 32, compile=c)
                print(f"== decode1 profile, {name}, {'compiled' if c else 'eager'}, 32 tokens")
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    return out

# A LLaMA-shaped model of 1.11B parameters: 2.2 GB in bf16, the size class of TinyLlama-1.1B.
LOAD_CFG = dict(dim=2048, n_layers=19, n_heads=16, vocab_size=32000, multiple_of=256)
LOAD_ARGS = ModelArgs(**LOAD_CFG)


def peak_rss_bytes():
    """This process's peak resident memory. On Linux, VmHWM of /proc/self/status: getrusage's
    ru_maxrss is carried over fork + exec, so a child of a parent that once held the whole model
    (bench_load right after generating it) would report the parent's peak as its own."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux, bytes on macOS (close enough)


@torch.no_grad()
def make_checkpoint(out_dir, args=LOAD_ARGS, seed=0):
    """A random bf16 model in Meta's layout, holding the weights once: built on the meta device,
    given bf16 storage, filled in place, then written by save_meta (a bf16 -> bf16 no-op cast).
    Weights are copied from a 16M-entry random pool, rotated between copies: drawing 1.1B normal
    numbers would take ~20 s on 2 cores, and their values do not matter to a load benchmark."""
    with torch.device("meta"):
        model = Transformer(args)
    model = model.to(torch.bfloat16).to_empty(device="cpu")
    pool = (0.02 * torch.randn(1 << 24, generator=torch.Generator().manual_seed(seed))).bfloat16()
    for p in model.parameters():
        if p.ndim == 1:  # RMSNorm gains
            p.fill_(1.0)
            continue
        flat = p.view(-1)
        for start in range(0, flat.numel(), pool.numel()):
            n = min(pool.numel(), flat.numel() - start)
            flat[start:start + n] = pool[:n]
            pool = pool.roll(7919)
    return save_meta(model, out_dir, dtype=torch.bfloat16)


def cached_checkpoint(out_dir, args=LOAD_ARGS):
    """Reuse out_dir if it already holds this model (save_meta writes folders atomically, so a
    params.json there means a complete checkpoint), else generate it."""
    out_dir = Path(out_dir)
    params = out_dir / "params.json"
    if params.is_file() and (out_dir / "consolidated.00.pth").is_file():
        saved = json.loads(params.read_text())
        if all(saved.get(k) == getattr(args, k) for k in ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of")):
            return out_dir, False
    return make_checkpoint(out_dir, args), True


def load_child(ckpt_dir):
    """Runs in a fresh process: its peak RSS is the loader's alone. Summing every parameter
    reads each mmap'd page, so pages that were mapped but never read cannot flatter the result."""
    base = peak_rss_bytes()  # torch and model.py imported, nothing loaded
    t0 = time.perf_counter()
    model = load_meta(ckpt_dir)
    t1 = time.perf_counter()
    with torch.no_grad():
        checksum = sum(float(p.sum()) for p in model.parameters())
    t2 = time.perf_counter()
    print(json.dumps({"baseline_rss": base, "peak_rss": peak_rss_bytes(), "load_s": t1 - t0, "touch_s": t2 - t1,
                      "n_params": model.num_params(), "dtype": str(model.output.weight.dtype),
                      "checksum": checksum}))


def bench_load(load_dir="/tmp/neftune_bench_ckpt", args=LOAD_ARGS):
    """Peak resident memory of load_meta over the checkpoint's size, measured in a child process.
    (peak - baseline) / size near 1.0 means the weights are held once (mmap'd, no casts or copies)."""
    t0 = time.perf_counter()
    ckpt_dir, generated = cached_checkpoint(load_dir, args)
    gen_s = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in ckpt_dir.glob("consolidated.*.pth"))
    r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_load-child", str(ckpt_dir)],
                       capture_output=True, text=True, check=True)
    child = json.loads(r.stdout.strip().splitlines()[-1])
    return {
        "ckpt_dir": str(ckpt_dir),
        "generated": generated,
        "generate_s": round(gen_s, 2),
        "n_params": child["n_params"],
        "dtype": child["dtype"],
        "size_gb": round(size / 1e9, 3),
        "baseline_rss_gb": round(child["baseline_rss"] / 1e9, 3),
        "peak_rss_gb": round(child["peak_rss"] / 1e9, 3),
        "ratio": round((child["peak_rss"] - child["baseline_rss"]) / size, 3),  # target < 1.3
        "raw_ratio": round(child["peak_rss"] / size, 3),
        "load_s": round(child["load_s"], 3),
        "touch_s": round(child["touch_s"], 3),
    }


LOSS_CFG = dict(dim=256, n_layers=2, n_heads=4, vocab_size=128256, multiple_of=256)  # a tiny model, LLaMA-3's vocabulary


def loss_child(spec):
    """Runs in a fresh process: peak RSS of one forward + backward of the loss on a random micro-batch,
    either from whole (B, T, vocab) logits (train.py before chunking) or as train.forward_loss does it."""
    import train

    s = json.loads(spec)
    torch.manual_seed(0)
    model = Transformer(ModelArgs(**s["cfg"])).train()
    x = torch.randint(0, s["cfg"]["vocab_size"], (s["batch_size"], s["seq_len"]))
    batch = {"input_ids": x, "labels": x, "mask": torch.ones_like(x, dtype=torch.bool)}
    base = peak_rss_bytes()  # model and inputs in memory, nothing computed
    t0 = time.perf_counter()
    if s["mode"] == "full_logits":
        loss = train.response_loss_sum(model(x), x)
    else:
        loss = train.forward_loss(model, batch, torch.device("cpu"), nullcontext())
    loss.backward()
    print(json.dumps({"baseline_rss": base, "peak_rss": peak_rss_bytes(), "s": time.perf_counter() - t0, "loss": loss.item()}))


def bench_loss(cfg, batch_size, seq_len):
    """Peak memory of the loss's forward + backward above the model's own, whole logits vs chunked
    (train.LOSS_CHUNK positions at a time, each checkpointed), each in its own child process."""
    logits_gb = batch_size * seq_len * cfg["vocab_size"] * 4 / 1e9
    out = {"config": {**cfg, "batch_size": batch_size, "seq_len": seq_len}, "fp32_logits_gb": round(logits_gb, 3)}
    for mode in ("full_logits", "chunked"):
        spec = json.dumps({"mode": mode, "cfg": cfg, "batch_size": batch_size, "seq_len": seq_len})
        # glibc would keep freed blocks and hide what is live; mmap'd blocks go back at free, so
        # with this threshold the peak RSS is the peak of live tensors
        r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_loss-child", spec], capture_output=True,
                           text=True, check=True, env=dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536"))
        child = json.loads(r.stdout.strip().splitlines()[-1])
        out[f"{mode}_peak_above_model_gb"] = round((child["peak_rss"] - child["baseline_rss"]) / 1e9, 3)
        out[f"{mode}_s"] = round(child["s"], 3)
        out[f"{mode}_loss"] = child["loss"]
    return out


TRAIN_CFG = dict(dim=512, n_layers=8, n_heads=8, vocab_size=32000, multiple_of=256)  # the default config
LLAMA2_7B = dict(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, multiple_of=256)
DECODE_CFG = dict(dim=768, n_layers=12, n_heads=12, vocab_size=32000, multiple_of=256)  # ~134M parameters


# Real shapes for the GPU runs: TinyLlama-1.1B (training MFU at seq 2048) and LLaMA-2-7B (batch-1 decode)
PRESETS = {"tinyllama": dict(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, vocab_size=32000, multiple_of=256),
           "llama2-7b": dict(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, multiple_of=256)}


def size_cfg(cfg, a, preset=True):
    cfg = PRESETS[a.preset] if a.preset and preset else cfg
    return {**cfg, **{k: v for k, v in (("dim", a.dim), ("n_layers", a.n_layers), ("n_heads", a.n_heads), ("vocab_size", a.vocab)) if v}}


PARTS = {
    "train": lambda a, d: bench_train(size_cfg(TRAIN_CFG, a), a.dtypes, [False, True] if a.compile else [False], d,
                                      a.seq_len, a.batch_size, a.min_time, a.peak_n),
    "noise": lambda a, d: bench_noise(size_cfg(TRAIN_CFG, a), d, a.seq_len, a.batch_size, a.noise_rounds),
    "decode": lambda a, d: bench_decode(size_cfg(DECODE_CFG, a), d, a.decode_dtype, a.new_tokens,
                                        a.prompt_len, a.decode_batches, a.nocache_tokens, a.copy_mb),
    "load": lambda a, d: bench_load(a.load_dir, ModelArgs(**size_cfg(LOAD_CFG, a, preset=False))),
    "loss": lambda a, d: bench_loss(size_cfg(LOSS_CFG, a, preset=False), a.loss_batch_size, a.seq_len),
    "lora": lambda a, d: bench_lora(size_cfg(TRAIN_CFG, a), d, a.seq_len, a.batch_size, a.noise_rounds, a.lora_rank),
    "lora_memory": lambda a, d: lora_memory(size_cfg(LLAMA2_7B, a, preset=False), a.lora_rank, a.lora_micro_batch, a.lora_seq_len),
    "decode1": lambda a, d: bench_decode1(size_cfg(DECODE_CFG, a), d, a.decode1_dtypes, a.new_tokens,
                                          a.prompt_len, a.decode1_rounds, a.copy_mb, a.profile),
}


def machine(device):
    if device.type == "cuda":
        return {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), "unknown") if Path("/proc/cpuinfo").exists() else "unknown"
    return {"device": f"CPU {cpu}, {torch.get_num_threads()} threads, capability {torch.backends.cpu.get_cpu_capability()}",
            "torch": torch.__version__}


def main(argv=None):
    p = argparse.ArgumentParser(description="Benchmarks of the NEFTune reference implementation.")
    p.add_argument("--only", nargs="+", choices=list(PARTS), default=list(PARTS), help="parts to run (default: all)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["fp32", "bf16"], help="training dtypes (bf16 = autocast)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd blocks")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--min-time", type=float, default=10.0, help="seconds of timed training steps per variant")
    p.add_argument("--noise-rounds", type=int, default=6, help="alternating steps timed: alpha 0 / 5 (noise), full / LoRA (lora)")
    p.add_argument("--preset", choices=list(PRESETS), help="model shape of the train, noise, decode and decode1 parts (--dim etc. still override)")
    p.add_argument("--dim", type=int, help="override the model width (tiny runs: tests)")
    p.add_argument("--n-layers", type=int)
    p.add_argument("--n-heads", type=int)
    p.add_argument("--vocab", type=int)
    p.add_argument("--decode-dtype", choices=list(DTYPES), default="bf16" if torch.cuda.is_available() else "fp32")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--decode-batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--decode1-dtypes", nargs="+", choices=list(DTYPES), default=["fp32", "bf16"],
                   help="weight dtypes of the batch-1 eager-vs-compiled decode part")
    p.add_argument("--decode1-rounds", type=int, default=5, help="alternating rounds of the decode1 part (best of)")
    p.add_argument("--profile", action="store_true", help="decode1: print a torch.profiler table of eager and compiled decoding")
    p.add_argument("--nocache-tokens", type=int, default=256, help="tokens of the no-cache reference loop")
    p.add_argument("--peak-n", type=int, default=4096, help="largest square size for the matmul peak")
    p.add_argument("--copy-mb", type=int, default=1024, help="size of the bandwidth-measuring copy")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--load-dir", default="/tmp/neftune_bench_ckpt",
                   help="cache folder for the generated checkpoint of the load bench (reused if present)")
    p.add_argument("--lora-rank", type=int, default=16, help="LoRA rank of the lora and lora_memory parts")
    p.add_argument("--lora-micro-batch", type=int, default=4, help="lora_memory: micro-batch (LLaMA-2-7B by default)")
    p.add_argument("--lora-seq-len", type=int, default=512, help="lora_memory: sequence length")
    p.add_argument("--out", default="bench.json", help="results, merged into the file's existing parts")
    p.add_argument("--loss-batch-size", type=int, default=4, help="micro-batch of the loss-memory bench (x --seq-len)")
    p.add_argument("--_load-child", dest="load_child", help=argparse.SUPPRESS)
    p.add_argument("--_loss-child", dest="loss_child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.load_child:
        return load_child(a.load_child)
    if a.loss_child:
        return loss_child(a.loss_child)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    results = {"machine": machine(device)}
    for name in a.only:
        results[name] = PARTS[name](a, device)
        print(f"== {name}")
        for k, v in results[name].items():
            print(f"  {k:<36} {v}")
    out = Path(a.out)
    old = json.loads(out.read_text()) if out.is_file() else {}
    out.write_text(json.dumps({**old, **results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
