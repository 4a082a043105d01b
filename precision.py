"""The training dtype, decided per machine from a measurement: bf16 on CUDA; on a CPU, bf16 autocast
only where a quick matmul timing finds it clearly faster than fp32; a resume keeps its checkpoint's.
train.py calls choose_dtype once, before anything else depends on the dtype:

    python train.py --alpha 5        # prints "dtype: bf16 (measured on this CPU: ...)" or fp32, and why
"""
import time

import torch
import torch.distributed as dist

from checkpoint import saved_dtype
from checks import UserError

BF16_MARGIN = 1.3  # bf16 autocast only where its matmul is clearly faster: it adds casts, and CPUs
# without bf16 units (AVX2 only) run bf16 matmuls ~100x slower than fp32


def matmul_flops(n=512, seconds=0.2):
    """Best FLOP/s of an n x n CPU matmul -> (fp32, bf16), timed in turn for ~`seconds` so that a
    shared machine slows both alike, after one warm-up product each (n = 512: the size class of
    the demo model's matmuls, 2048 rows x 256 x 704)."""
    pairs = [(torch.randn(n, n).to(dt), torch.randn(n, n).to(dt)) for dt in (torch.float32, torch.bfloat16)]
    best = [float("inf")] * len(pairs)
    for a, b in pairs:
        a @ b
    reps, start = 0, time.perf_counter()
    while reps < 2 or time.perf_counter() - start < seconds:
        for i, (a, b) in enumerate(pairs):
            t = time.perf_counter()
            a @ b
            best[i] = min(best[i], time.perf_counter() - t)
        reps += 1
    return tuple(2 * n ** 3 / t for t in best)


def pick_cpu_dtype(fp32_flops, bf16_flops):
    return "bf16" if bf16_flops > BF16_MARGIN * fp32_flops else "fp32"


def choose_dtype(args, device, out):
    """-> (dtype name, why). A resume keeps the dtype its checkpoint records; else --dtype; else bf16
    on CUDA; else the faster of bf16 autocast and fp32 on this CPU, measured (~0.2 s)."""
    saved = saved_dtype(out, device) if args.resume else None
    if saved:
        if args.dtype and args.dtype != saved:
            raise UserError(f"--dtype {args.dtype}: {out} was trained in {saved} (its train_state.json) and a resume "
                            f"keeps that dtype; drop --dtype or pass --dtype {saved}")
        return saved, "kept from the checkpoint being resumed"
    if args.dtype:
        return args.dtype, "--dtype"
    if getattr(args, "quantize", None):
        return "bf16", "--quantize nf4 computes in bf16"
    if device.type == "cuda":
        return "bf16", "CUDA default: FSDP mixed precision"
    flops = torch.tensor(matmul_flops(), dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(flops, 0)  # rank 0's figures: every rank must choose the same
    f32, b16 = flops.tolist()
    name = pick_cpu_dtype(f32, b16)
    return name, (f"measured on this CPU: 512^3 matmul bf16 {b16 / 1e9:.1f} vs fp32 {f32 / 1e9:.1f} GFLOP/s; "
                  f"bf16 autocast only if > {BF16_MARGIN}x fp32")
