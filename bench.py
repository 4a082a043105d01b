"""Speed and memory against the machine's own limits, measured in the same run. Here: training tokens/s
and MFU, NEFTune's cost, LoRA against full finetuning, and the command line over every part; the
decoding parts are in bench_decode.py, the memory parts in bench_memory.py.

    python bench.py                  # everything (~12 min on 2 CPU cores); --only PART ... picks (--help lists them)
    python bench.py --only train --compile --dtypes fp32 bf16
    python bench.py --only train --preset tinyllama --seq-len 2048 --batch-size 4 --dtypes bf16 --compile   # GPU: MFU
    python bench.py --only decode1 --preset llama2-7b --decode1-dtypes bf16 --new-tokens 128   # GPU: 7B decode
"""
import argparse
import json
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

import bench_generate
import bench_memory
import lora
from bench_decode import DTYPES, bench_decode, bench_decode1, sync, timed
from bench_memory import LLAMA2_7B, LOAD_CFG, LOSS_CFG, bench_load, bench_loss, lora_memory
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


TRAIN_CFG = dict(dim=512, n_layers=8, n_heads=8, vocab_size=32000, multiple_of=256)  # the default config
DECODE_CFG = dict(dim=768, n_layers=12, n_heads=12, vocab_size=32000, multiple_of=256)  # ~134M parameters


# Real shapes for the GPU runs: TinyLlama-1.1B (training MFU at seq 2048) and LLaMA-2-7B (batch-1 decode)
PRESETS = {"tinyllama": dict(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, vocab_size=32000, multiple_of=256),
           "llama2-7b": dict(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, multiple_of=256)}


def size_cfg(cfg, a, preset=True):
    cfg = PRESETS[a.preset] if a.preset and preset else cfg
    return {**cfg, **{k: v for k, v in (("dim", a.dim), ("n_layers", a.n_layers), ("n_heads", a.n_heads),
                                        ("vocab_size", a.vocab)) if v}}


PARTS = {
    "train": lambda a, d: bench_train(size_cfg(TRAIN_CFG, a), a.dtypes, [False, True] if a.compile else [False], d,
                                      a.seq_len, a.batch_size, a.min_time, a.peak_n),
    "noise": lambda a, d: bench_noise(size_cfg(TRAIN_CFG, a), d, a.seq_len, a.batch_size, a.noise_rounds),
    "decode": lambda a, d: bench_decode(size_cfg(DECODE_CFG, a), d, a.decode_dtype, a.new_tokens,
                                        a.prompt_len, a.decode_batches, a.nocache_tokens, a.copy_mb),
    "load": lambda a, d: bench_load(a.load_dir, ModelArgs(**size_cfg(LOAD_CFG, a, preset=False))),
    "loss": lambda a, d: bench_loss(size_cfg(LOSS_CFG, a, preset=False), a.loss_batch_size, a.seq_len),
    "lora": lambda a, d: bench_lora(size_cfg(TRAIN_CFG, a), d, a.seq_len, a.batch_size, a.noise_rounds, a.lora_rank),
    "lora_memory": lambda a, d: lora_memory(size_cfg(LLAMA2_7B, a, preset=False), a.lora_rank, a.lora_micro_batch,
                                            a.lora_seq_len),
    "init_memory": lambda a, d: bench_memory.init_memory(size_cfg(bench_memory.INIT_CFG, a, preset=False)),
    "grad_sync": lambda a, d: bench_memory.grad_sync(size_cfg(bench_memory.GRAD_SYNC_CFG, a, preset=False)),
    "slots": lambda a, d: bench_generate.bench_slots(size_cfg(DECODE_CFG, a), d, a.decode_dtype, a.slots_prompts,
                                                     a.slots_batch, a.new_tokens, a.compile),
    "decode1": lambda a, d: bench_decode1(size_cfg(DECODE_CFG, a), d, a.decode1_dtypes, a.new_tokens,
                                          a.prompt_len, a.decode1_rounds, a.copy_mb, a.profile),
}


def machine(device):
    if device.type == "cuda":
        return {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown") if Path("/proc/cpuinfo").exists() else "unknown"
    capability = torch.backends.cpu.get_cpu_capability()
    return {"device": f"CPU {cpu}, {torch.get_num_threads()} threads, capability {capability}",
            "torch": torch.__version__}


def main(argv=None):
    p = argparse.ArgumentParser(description="Benchmarks of the NEFTune reference implementation.")
    p.add_argument("--only", nargs="+", choices=list(PARTS), default=list(PARTS), help="parts to run (default: all)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["fp32", "bf16"],
                   help="training dtypes (bf16 = autocast)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd blocks")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--min-time", type=float, default=10.0, help="seconds of timed training steps per variant")
    p.add_argument("--noise-rounds", type=int, default=6,
                   help="alternating steps timed: alpha 0 / 5 (noise), full / LoRA (lora)")
    p.add_argument("--preset", choices=list(PRESETS),
                   help="model shape of the train, noise, decode and decode1 parts (--dim etc. still override)")
    p.add_argument("--dim", type=int, help="override the model width (tiny runs: tests)")
    p.add_argument("--n-layers", type=int)
    p.add_argument("--n-heads", type=int)
    p.add_argument("--vocab", type=int)
    p.add_argument("--decode-dtype", choices=list(DTYPES), default="bf16" if torch.cuda.is_available() else "fp32")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--decode-batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--slots-prompts", type=int, default=64, help="slots: prompts of uneven budgets up to --new-tokens")
    p.add_argument("--slots-batch", type=int, default=16, help="slots: the number of slots = the static batch size")
    p.add_argument("--decode1-dtypes", nargs="+", choices=list(DTYPES), default=["fp32", "bf16"],
                   help="weight dtypes of the batch-1 eager-vs-compiled decode part")
    p.add_argument("--decode1-rounds", type=int, default=5, help="alternating rounds of the decode1 part (best of)")
    p.add_argument("--profile", action="store_true",
                   help="decode1: print a torch.profiler table of eager and compiled decoding")
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
    a = p.parse_args(argv)
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
