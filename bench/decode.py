"""The decoding parts of `python -m bench`: decode tokens/s through sample.generate against the memory-bandwidth limit
and against recomputing without the KV cache (decode), and batch-1 decoding eager, compiled and as
generate(compile=True) picks, against the copy bandwidth and the model's own mat-vecs (decode1).

    python -m bench --only decode decode1
"""
import time

import torch
import torch.nn.functional as F

import fast_decode
from model import ModelArgs, Transformer
from sample import generate

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


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


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device, nbytes=1 << 30):
    """Bytes/s of a large tensor copy, counting the read and the write: the bandwidth limit of decoding."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    return 2 * nbytes / timed(lambda: dst.copy_(src), device, min_time=0.5)


def bench_decode(cfg, device, dtype_name, new_tokens, prompt_len, batch_sizes, nocache_tokens, copy_mb=1024):
    """Decode tokens/s through sample.generate against the memory-bandwidth limit (every token reads
    every weight once: bandwidth / weight bytes), and against a loop without the KV cache."""
    dtype = DTYPES[dtype_name]
    args = ModelArgs(**cfg)
    torch.manual_seed(0)
    model = Transformer(args).to(device, dtype).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bw = copy_bandwidth(device, copy_mb << 20)
    out = {"config": cfg, "dtype": dtype_name, "n_params": model.num_params(), "weight_gb": round(weight_bytes / 1e9,
                                                                                                  3),
           "copy_bandwidth_gb_s": round(bw / 1e9, 2), "bandwidth_limit_tokens_per_s_batch1": round(bw / weight_bytes,
                                                                                                   2)}
    def prompts(b):
        return torch.randint(3, args.vocab_size, (b, prompt_len), generator=torch.Generator().manual_seed(0)).tolist()
    for b in batch_sizes:
        generate(model, prompts(b), 2)  # warm-up
        sync(device)
        t0 = time.perf_counter()
        generate(model, prompts(b), new_tokens)
        sync(device)
        tok_s = b * new_tokens / (time.perf_counter() - t0)
        out[f"tokens_per_s_batch{b}"] = round(tok_s, 2)
        if b == 1:
            # 3 significant digits, even when tiny
            out["fraction_of_bandwidth_limit_batch1"] = float(f"{tok_s / (bw / weight_bytes):.3g}")
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

def bench_decode1(cfg, device, dtype_names, new_tokens, prompt_len, rounds, copy_mb, profile=False):
    """Batch-1 decode per weight dtype: eager; compiled as fast_decode compiles it (on a CPU with its
    mat-vec and attention decompositions); on a CPU also a plain torch.compile of the same step, the
    measurement behind those private decompositions; and `auto`, what generate(compile=True) gives
    (on a CPU the faster of compiled and eager, timed on the first steps). Against the copy-bandwidth
    limit and the model's own mat-vecs run alone (what the BLAS allows: if that is near the decode
    speed, the mat-vec is the wall). Tokens/s = N / time of generate(N tokens), the prompt's prefill
    included. Every measurement takes turns within each round, best of the rounds, so a shared
    machine slows them alike."""
    args = ModelArgs(**cfg)
    prompt = torch.randint(3, args.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0)).tolist()
    src = torch.ones(copy_mb << 18, device=device)  # copy_mb MiB of fp32
    dst = torch.empty_like(src)
    out = {"config": cfg, "prompt_len": prompt_len, "new_tokens": new_tokens, "threads": torch.get_num_threads()}
    steps = {"compiled": fast_decode.compiled_step(device)}
    if device.type == "cpu":  # a wrapper with its own code object: dynamo caches by code, not by backend
        steps["compiled_plain"] = torch.compile(lambda *a: fast_decode.decode_step(*a), fullgraph=True, dynamic=False)
    for name in dtype_names:
        torch.manual_seed(0)
        with torch.device(device):  # a 7B model is initialised where it runs, not on the host
            model = Transformer(args).to(DTYPES[name]).eval()
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        linears = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
        xs = {n: torch.randn(1, n, device=device, dtype=DTYPES[name]) for n in {w.shape[1] for w in linears}}
        fns = {"copy": lambda: dst.copy_(src), "matvecs": lambda: [F.linear(xs[w.shape[1]], w) for w in linears],
               "eager": lambda: generate(model, prompt, new_tokens),
               "auto": lambda: generate(model, prompt, new_tokens, compile=True)}
        for mode, step in steps.items():
            fns[mode] = lambda step=step: forced_generate(model, prompt, new_tokens, step)
        compile_s = {}
        for mode in ("auto", *steps):  # the first calls compile: timed apart
            t0 = time.perf_counter()
            fns[mode]()
            compile_s[mode] = round(time.perf_counter() - t0, 1)
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
        r = {"weight_gb": round(weight_bytes / 1e9, 3),
             "copy_bandwidth_gb_s": round(2 * src.numel() * 4 / best["copy"] / 1e9, 2),
             "bandwidth_limit_tokens_per_s": round(limit, 1), "first_call_s": compile_s,
             "matvecs_only_tokens_per_s": round(1 / best["matvecs"], 1),
             "matvecs_gb_s": round(sum(w.numel() * w.element_size() for w in linears) / best["matvecs"] / 1e9, 2)}
        for mode in ("eager", *steps, "auto"):
            tok_s = new_tokens / best[mode]
            r[f"{mode}_tokens_per_s"] = round(tok_s, 1)
            r[f"{mode}_fraction_of_limit"] = round(tok_s / limit, 3)
        out[name] = r
        if profile:  # where a step's time goes: expect the BLAS mat-vecs (aten::mm / addmm) on top
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as torch_profile
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            for mode in ("eager", *steps):
                with torch_profile(activities=acts) as prof:
                    fns[mode]()
                print(f"== decode1 profile, {name}, {mode}, {new_tokens} tokens")
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    return out


def forced_generate(model, prompt, n, step):
    """generate(compile=True) with its decode step fixed to `step` (no CPU timing in between), the
    static cache set up as in use: for measuring one step."""
    real = fast_decode.step_function

    def step_function(model, batch_size, cache_len, compile):
        real(model, batch_size, cache_len, compile)
        return step
    fast_decode.step_function = step_function
    try:
        return generate(model, prompt, n, compile=True)
    finally:
        fast_decode.step_function = real
