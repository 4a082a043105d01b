"""The memory parts of `python -m bench`: load_meta's peak resident memory (load), the loss's peak memory at LLaMA-3's
vocabulary, whole logits vs chunked (loss), LoRA's GPU memory for LLaMA-2-7B (lora_memory), and two
torchrun runs of train.py whose workers' private memory is sampled from start to exit: --init loading
each rank's shard (init_memory) and the gradient-sync choice (grad_sync). Each measurement runs in a
fresh process (a spawned child, or torchrun's workers), so its peak is its own:

    python -m bench --only load loss lora_memory init_memory grad_sync
"""
import json
import multiprocessing
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

import builtin_data
import lora
import train
from model import SPLIT_DIM, ModelArgs, Transformer, load_meta, save_meta

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
def make_checkpoint(out_dir, args=LOAD_ARGS, seed=0, n_shards=1):
    """A random bf16 model in Meta's layout, holding the weights once: built on the meta device,
    given bf16 storage, filled in place, then written by save_meta (a bf16 -> bf16 no-op cast), or
    split into n_shards model-parallel files the way Meta's are (model.SPLIT_DIM).
    Weights are copied from a 16M-entry random pool, rotated between copies: drawing 1.1B normal
    numbers would take ~20 s on 2 cores, and their values do not matter to a memory benchmark."""
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
    out_dir = save_meta(model, out_dir, dtype=torch.bfloat16)
    if n_shards > 1:
        state = model.state_dict()
        for i in range(n_shards):
            part = {k: v.chunk(n_shards, SPLIT_DIM[k.split(".")[-2]])[i].clone() if k.split(".")[-2] in SPLIT_DIM
                    else v for k, v in state.items()}
            torch.save(part, out_dir / f"consolidated.{i:02d}.pth")
    return out_dir


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


def in_child(fn, *args, env=None):
    """fn(*args) in a freshly spawned Python process (its memory figures are its own), -> its result."""
    saved = dict(os.environ)
    os.environ.update(env or {})  # read by the child's C library at start-up
    try:
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            return pool.apply(fn, args)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def load_child(ckpt_dir):
    """In a fresh process: the loader's peak RSS alone. Summing every parameter reads each mmap'd
    page, so pages that were mapped but never read cannot flatter the result."""
    base = peak_rss_bytes()  # torch and model.py imported, nothing loaded
    t0 = time.perf_counter()
    model = load_meta(ckpt_dir)
    t1 = time.perf_counter()
    with torch.no_grad():
        checksum = sum(float(p.sum()) for p in model.parameters())
    t2 = time.perf_counter()
    return {"baseline_rss": base, "peak_rss": peak_rss_bytes(), "load_s": t1 - t0, "touch_s": t2 - t1,
            "n_params": model.num_params(), "dtype": str(model.output.weight.dtype), "checksum": checksum}


def bench_load(load_dir="/tmp/neftune_bench_ckpt", args=LOAD_ARGS):
    """Peak resident memory of load_meta over the checkpoint's size, measured in a child process.
    (peak - baseline) / size near 1.0 means the weights are held once (mmap'd, no casts or copies)."""
    t0 = time.perf_counter()
    ckpt_dir, generated = cached_checkpoint(load_dir, args)
    gen_s = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in ckpt_dir.glob("consolidated.*.pth"))
    child = in_child(load_child, str(ckpt_dir))
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


LOSS_CFG = dict(dim=256, n_layers=2, n_heads=4, vocab_size=128256,
                multiple_of=256)  # a tiny model, LLaMA-3's vocabulary


def loss_child(mode, cfg, batch_size, seq_len):
    """In a fresh process: peak RSS of one forward + backward of the loss on a random micro-batch,
    either from whole (B, T, vocab) logits or as train.forward_loss computes it, chunk by chunk."""
    torch.manual_seed(0)
    model = Transformer(ModelArgs(**cfg)).train()
    x = torch.randint(0, cfg["vocab_size"], (batch_size, seq_len))
    batch = {"input_ids": x, "labels": x, "mask": torch.ones_like(x, dtype=torch.bool)}
    base = peak_rss_bytes()  # model and inputs in memory, nothing computed
    t0 = time.perf_counter()
    if mode == "full_logits":
        loss = train.response_loss_sum(model(x), x)
    else:
        loss = train.forward_loss(model, batch, torch.device("cpu"), nullcontext())
    loss.backward()
    return {"baseline_rss": base, "peak_rss": peak_rss_bytes(), "s": time.perf_counter() - t0, "loss": loss.item()}


def bench_loss(cfg, batch_size, seq_len):
    """Peak memory of the loss's forward + backward above the model's own, whole logits vs chunked
    (train.LOSS_CHUNK positions at a time, each checkpointed), each in its own child process."""
    logits_gb = batch_size * seq_len * cfg["vocab_size"] * 4 / 1e9
    out = {"config": {**cfg, "batch_size": batch_size, "seq_len": seq_len}, "fp32_logits_gb": round(logits_gb, 3)}
    for mode in ("full_logits", "chunked"):
        # glibc would keep freed blocks and hide what is live; mmap'd blocks go back at free, so
        # with this threshold the peak RSS is the peak of live tensors
        child = in_child(loss_child, mode, cfg, batch_size, seq_len, env={"MALLOC_MMAP_THRESHOLD_": "65536"})
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
    model = lora.add_lora(Transformer(ModelArgs(**{**args.__dict__, "n_layers": 2})).to(torch.bfloat16), rank, 16,
                          dropout).train()
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
    acts = (args.n_layers - 1) * block + rest
    acts_ckpt = args.n_layers * 2 * args.dim * micro_batch * seq_len + block + rest

    def gb(b):
        return round(b / 1e9, 2)
    out = {"config": {**cfg, "rank": rank, "micro_batch": micro_batch, "seq_len": seq_len, "dropout": dropout},
           "base_bf16_gb": gb(2 * base), "adapter_params": adapters, "adapters_grads_adamw_gb": gb(16 * adapters),
           "activations_per_block_gb": gb(block), "activations_first_block_and_output_gb": gb(rest),
           "activations_gb": gb(acts), "activations_act_ckpt_gb": gb(acts_ckpt),
           "total_gb": gb(2 * base + 16 * adapters + acts),
           "total_act_ckpt_gb": gb(2 * base + 16 * adapters + acts_ckpt)}
    out["full_finetune_weights_grads_adamw_gb"] = gb(16 * base)  # fp32 master + grad + 2 moments, before activations
    return out


# ----------------------------------------------------------------------------- torchrun runs of train.py

def rss_anon(pid):
    """Private resident memory of a process (RssAnon of /proc/PID/status), in bytes; 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def workers(root_pid):
    """{pid: rank} of the train.py processes below root_pid (torchrun's workers), from /proc."""
    found = {}
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            text = status.read_text()
            ppid = int(next(line.split()[1] for line in text.splitlines() if line.startswith("PPid:")))
            if ppid == root_pid or ppid in found:
                env = (status.parent / "environ").read_bytes().split(b"\0")
                rank = next((int(e[5:]) for e in env if e.startswith(b"RANK=")), None)
                if rank is not None:
                    found[int(status.parent.name)] = rank
        except (OSError, StopIteration, ValueError):
            continue
    return found


def sampled_run(cmd, every=0.02, env=None):
    """Run cmd (torchrun ...) and sample its workers' RssAnon until it exits -> (peak bytes per rank,
    seconds, stderr's tail). Sampling every 20 ms: a short spike could slip between two samples."""
    peaks, t0 = {}, time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, cwd=Path(__file__).resolve().parents[1],
                             env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})))
        ranks = {}
        while p.poll() is None:
            ranks |= workers(p.pid)
            for pid, rank in ranks.items():
                peaks[rank] = max(peaks.get(rank, 0), rss_anon(pid))
            time.sleep(every)
        err.seek(0)
        tail = err.read()[-2000:]
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{tail}")
    return peaks, time.perf_counter() - t0, tail


def alpaca_records(path, n):
    """n built-in tasks as an Alpaca file: data that needs no download (and no accuracy check at the end)."""
    recs = [{"instruction": m[0]["content"], "input": m[0]["input"], "output": m[1]["content"]}
            for m in builtin_data.builtin_records(seed=0, n=n)]
    Path(path).write_text(json.dumps(recs))
    return path


INIT_CFG = dict(dim=1024, n_layers=24, n_heads=16, vocab_size=1000, multiple_of=256)  # ~310M parameters


def torchrun(nproc, *args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train.py",
            *map(str, args)]


def init_memory(cfg=INIT_CFG, work="/tmp/neftune_bench_init", nproc=2, steps=2, seq_len=256, micro_batch=2):
    """train.py --init on 2 ranks from a model in 2 bf16 model-parallel shards, LoRA rank 8 with
    --act-ckpt in fp32: each worker's peak RssAnon from start to exit, against its fp32 shard (the
    goal: at most 1.3x that + 0.4 GB; rank 0 may add the bf16 export it gathers). Then --resume of the
    same run for 2 more steps, which re-reads the frozen base."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    args = ModelArgs(**cfg)
    ckpt = work / "init"
    if not (ckpt / "consolidated.01.pth").exists():
        make_checkpoint(ckpt, args, n_shards=2)
    builtin_data.builtin_tokenizer(ckpt / "tokenizer.model", vocab_size=cfg["vocab_size"])
    data = alpaca_records(work / "train.json", 64)
    with torch.device("meta"):
        n_params = Transformer(args).num_params()
    shard_gb = 4 * n_params / nproc / 1e9
    out = {"config": {**cfg, "n_params": n_params, "ranks": nproc, "seq_len": seq_len, "micro_batch": micro_batch},
           "fp32_shard_gb": round(shard_gb, 3), "goal_gb": round(1.3 * shard_gb + 0.4, 3),
           "bf16_export_gb": round(2 * n_params / 1e9, 3)}
    run_dir = work / "run"
    flags = ["--init", ckpt, "--data", data, "--out", run_dir, "--lora-rank", "8", "--act-ckpt", "--dtype", "fp32",
             "--device", "cpu", "--batch-size", nproc * micro_batch, "--micro-batch-size", micro_batch,
             "--max-len", seq_len, "--eval-examples", 4, "--eval-every", 1000, "--save-every", steps]
    # glibc keeps the freed blocks of FSDP's per-block all-gathers on the CPU (small allocations land in
    # them, so the next block's cannot reuse them): RssAnon then stays near its high-water mark. With
    # large blocks served by mmap (MALLOC_MMAP_THRESHOLD_) a free returns them and RssAnon follows the
    # live tensors. Both are measured; on a GPU the all-gathers are device memory and neither applies.
    for allocator, env in (("glibc_default", {}), ("mmap_threshold_64k", {"MALLOC_MMAP_THRESHOLD_": "65536"})):
        shutil.rmtree(run_dir, ignore_errors=True)
        for name, extra in (("first", ["--max-steps", steps]), ("resume", ["--max-steps", 2 * steps, "--resume"])):
            peaks, seconds, _ = sampled_run(torchrun(nproc, *flags, *extra), env=env)
            r = {f"rank{r}_peak_rss_anon_gb": round(b / 1e9, 3) for r, b in sorted(peaks.items())}
            r |= {f"rank{r}_over_shard": round(b / 1e9 / shard_gb, 2) for r, b in sorted(peaks.items())}
            out[f"{allocator}_{name}"] = r | {"wall_s": round(seconds, 1)}
    return out


GRAD_SYNC_CFG = dict(dim=512, n_layers=8, n_heads=8)  # from scratch, the built-in tokenizer (vocab 1000)


def grad_sync(cfg=GRAD_SYNC_CFG, work="/tmp/neftune_bench_sync", nproc=2, steps=8, micro=4, micro_batch=2, seq_len=128,
              rounds=2):
    """--grad-sync every vs last on `nproc` CPU ranks, `micro` micro-batches per rank and step. Speed: the
    median tokens/s of the steps after the first, best of `rounds` runs taken in turn, under glibc's
    default allocator. Memory: each worker's peak RssAnon in one more run each with glibc returning
    freed blocks at once (init_memory says why), so that it follows the live tensors; that setting
    slows small allocations, so it is not used for the speed. every reduce-scatters after each
    micro-batch and keeps 1/world of the gradients; last keeps whole unsharded gradients until the
    step's last micro-batch and reduce-scatters once."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    data = alpaca_records(work / "train.json", 400)
    out = {"config": {**cfg, "ranks": nproc, "micro_batches_per_rank": micro, "micro_batch": micro_batch,
                      "seq_len": seq_len, "steps": steps}}

    def run(mode, env=None):
        run_dir = work / mode
        shutil.rmtree(run_dir, ignore_errors=True)
        flags = ["--dim", cfg["dim"], "--n-layers", cfg["n_layers"], "--n-heads", cfg["n_heads"], "--data", data,
                 "--out", run_dir, "--dtype", "fp32", "--device", "cpu", "--grad-sync", mode, "--max-steps", steps,
                 "--batch-size", nproc * micro * micro_batch, "--micro-batch-size", micro_batch, "--max-len", seq_len,
                 "--eval-every", 1000, "--eval-examples", 4, "--save-every", 1000]
        peaks, _, _ = sampled_run(torchrun(nproc, *flags), env=env)
        logged = (run_dir / "log.jsonl").read_text().splitlines()[1:]  # the first step pays the warm-up
        speeds = sorted(json.loads(line)["tokens_per_s"] for line in logged)
        return speeds[len(speeds) // 2], peaks

    best = {"every": 0, "last": 0}
    for _ in range(rounds):
        for mode in best:
            best[mode] = max(best[mode], run(mode)[0])
    for mode in best:
        _, peaks = run(mode, env={"MALLOC_MMAP_THRESHOLD_": "65536"})
        out[mode] = {"median_tokens_per_s": best[mode],
                     **{f"rank{r}_peak_live_rss_anon_gb": round(b / 1e9, 3) for r, b in sorted(peaks.items())}}
    return out
