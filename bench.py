"""Benchmarks, nanoGPT-style: each part is one function returning a dict; main() runs the chosen
parts, prints a table and writes bench.json.

    python bench.py --only load     # peak memory and time of load_meta on a 2.2 GB checkpoint
"""
import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from model import ModelArgs, Transformer, load_meta, save_meta

# A LLaMA-shaped model of 1.11B parameters: 2.2 GB in bf16, the size class of TinyLlama-1.1B.
LOAD_ARGS = ModelArgs(dim=2048, n_layers=19, n_heads=16, vocab_size=32000, multiple_of=256)


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


def bench_load(load_dir="/tmp/neftune_bench_ckpt"):
    """Peak resident memory of load_meta over the checkpoint's size, measured in a child process.
    (peak - baseline) / size near 1.0 means the weights are held once (mmap'd, no casts or copies)."""
    t0 = time.perf_counter()
    ckpt_dir, generated = cached_checkpoint(load_dir)
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


PARTS = {"load": lambda a: bench_load(a.load_dir)}


def main(argv=None):
    p = argparse.ArgumentParser(description="Benchmarks of the NEFTune reference implementation.")
    p.add_argument("--only", nargs="+", choices=list(PARTS), default=list(PARTS), help="parts to run (default: all)")
    p.add_argument("--load-dir", default="/tmp/neftune_bench_ckpt",
                   help="cache folder for the generated checkpoint of the load bench (reused if present)")
    p.add_argument("--out", default="bench.json", help="results, merged into the file's existing parts")
    p.add_argument("--_load-child", dest="load_child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.load_child:
        return load_child(a.load_child)
    results = {name: PARTS[name](a) for name in a.only}
    for name, res in results.items():
        print(f"== {name}")
        for k, v in res.items():
            print(f"  {k:<16} {v}")
    out = Path(a.out)
    old = json.loads(out.read_text()) if out.is_file() else {}
    out.write_text(json.dumps({**old, **results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
