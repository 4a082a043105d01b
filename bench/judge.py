"""The judging part of `python -m bench`: judge.py's tokens/s over batches planned as it plans them,
against a plain forward of the very same batches (the output layer on the last position only, as the
judge runs it), and against the full (B, T, vocab) logits a naive judge would compute.

    python -m bench --only judge                     # a random judge of SmolLM2-135M's width, 4 layers (~2 min)
    python -m bench --only judge --judge-layers 30 --judge-prompts 64 --device cuda
"""
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

import judge
from model import ModelArgs, Transformer

SMOLLM2_SHAPE = dict(dim=576, n_layers=4, n_heads=9, n_kv_heads=3, vocab_size=49152, hidden_dim=1536)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_judge(cfg=None, device="cpu", n_prompts=48, min_len=200, max_len=800, batch_tokens=8192, dtype="fp32",
                seed=0):
    """-> figures: the judge's tokens/s (judge.judge_prompts end to end: batching, collation, the last
    position's logits, the label sums, the cache's writes) and a plain forward's on the same batches."""
    device = torch.device(device)
    torch.manual_seed(seed)
    args = ModelArgs(**(cfg or SMOLLM2_SHAPE))
    model = Transformer(args).to(device).eval()
    bf16 = dtype == "bf16"
    if bf16 and device.type == "cuda":
        model = model.to(torch.bfloat16)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 and device.type == "cpu" else nullcontext()
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(min_len, max_len + 1, (n_prompts,), generator=g).tolist()
    prompts = {f"p{i:04d}": torch.randint(3, args.vocab_size, (n,), generator=g).tolist() for i, n in enumerate(lens)}
    forms = [[10, 11], [12, 13]]
    batches = [[prompts[k] for k in b] for b in judge.plan_batches(prompts, batch_tokens)]
    padded = sum(len(b) * max(map(len, b)) for b in batches)
    tokens = sum(lens)

    def forward(full):
        for b in batches:
            x = torch.zeros(len(b), max(map(len, b)), dtype=torch.long)
            for i, r in enumerate(b):
                x[i, :len(r)] = torch.tensor(r)
            x, last = x.to(device), torch.tensor([len(r) - 1 for r in b], device=device)
            with torch.no_grad(), autocast:
                model(x) if full else model(x, head=lambda h, out: out(h[torch.arange(len(b), device=device), last]))

    def judging():
        with tempfile.TemporaryDirectory() as tmp:
            judge.judge_prompts(model, prompts, forms, 0, device, autocast, Path(tmp) / "cache.jsonl", batch_tokens)

    def timed(f):
        sync(device)
        t = time.perf_counter()
        f()
        sync(device)
        return time.perf_counter() - t

    forward(False)  # warm-up: allocator, kernels
    # alternated, best of two each: a shared machine slows both alike
    t_judge, t_plain, t_full = (min(x) for x in zip(*[(timed(judging), timed(lambda: forward(False)),
                                                       timed(lambda: forward(True))) for _ in range(2)]))
    return {"model": {k: v for k, v in vars(args).items() if k in SMOLLM2_SHAPE}, "device": device.type, "dtype": dtype,
            "prompts": n_prompts, "tokens": tokens, "batches": len(batches),
            "padding": round(1 - tokens / padded, 4),
            "judge_tokens_per_s": round(tokens / t_judge, 1), "forward_tokens_per_s": round(tokens / t_plain, 1),
            "judge_over_forward": round(t_plain / t_judge, 3),
            "full_logits_forward_tokens_per_s": round(tokens / t_full, 1)}
