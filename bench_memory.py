"""The memory benchmarks of bench.py: load_meta's peak resident memory (load), the loss's peak
memory at LLaMA-3's vocabulary, whole logits vs chunked (loss), and LoRA's GPU memory for LLaMA-2-7B
(lora_memory). Run through bench.py, which also runs the children that measure in a fresh process:

    python bench.py --only load loss lora_memory
"""
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

# The children are launched through bench.py's hidden --_load-child / --_loss-child flags
BENCH = Path(__file__).resolve().with_name("bench.py")

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
    r = subprocess.run([sys.executable, str(BENCH), "--_load-child", str(ckpt_dir)],
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
        r = subprocess.run([sys.executable, str(BENCH), "--_loss-child", spec], capture_output=True,
                           text=True, check=True, env=dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536"))
        child = json.loads(r.stdout.strip().splitlines()[-1])
        out[f"{mode}_peak_above_model_gb"] = round((child["peak_rss"] - child["baseline_rss"]) / 1e9, 3)
        out[f"{mode}_s"] = round(child["s"], 3)
        out[f"{mode}_loss"] = child["loss"]
    return out


# lora_memory's default shape
LLAMA2_7B = dict(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, multiple_of=256)


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
