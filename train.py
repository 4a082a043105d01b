"""Instruction finetuning with NEFTune: one readable FSDP2 loop, under torchrun or plain python.

    torchrun --standalone --nproc_per_node=2 train.py --alpha 5        # built-in demo, ~2 min on 2 CPUs
    python train.py --recipe fig4 --alpha 0 5 --out out/fig4             # the paper's Figure 4 on a CPU: out/fig4/curves.png
    torchrun --nproc_per_node=8 train.py --init llama-2-7b --data alpaca_data.json --alpha 5 --out out/neft

A batch's path: data.py -> tokens -> model.tok_embeddings -> noise.neftune (training only) -> rest
of the model -> cross-entropy on response tokens. `--alpha 0 5 10 15` sweeps alpha in one command.
"""
import argparse
import json
import math
import os
import shutil
import socket
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DistributedSampler
from tqdm import tqdm

import builtin_data
import data
import lora
import sample
from checkpoint import all_sum, checkpoints, export_final, load_checkpoint, lora_config, newest_checkpoint, save_checkpoint
from checks import RunLock, UserError, number, writable_folder
from model import CheckpointError, ModelArgs, Tokenizer, Transformer, find_tokenizer, load_meta
from noise import KINDS, neftune
from precision import choose_dtype

# The paper's recipe (Stanford Alpaca's, which NEFTune kept) when finetuning real weights, and a
# small-model recipe for the built-in demo that learns visibly in two minutes on a CPU. fig4 is
# the paper's Figure 4 on a laptop: few examples whose answers hold facts that cannot be inferred,
# many epochs, so that alpha 0 memorises and overfits; README.md has its seeds table.
RECIPES = {
    "paper": dict(lr=5e-5, batch_size=128, micro_batch_size=4, epochs=3, max_len=512, eval_every=50, save_every=200),
    "demo": dict(lr=2e-3, batch_size=32, micro_batch_size=16, epochs=1, max_len=128, eval_every=25, save_every=100),
    "fig4": dict(lr=3e-3, batch_size=16, micro_batch_size=16, epochs=40, max_len=128, eval_every=28, save_every=1000,
                 dim=64, n_layers=4, n_heads=4, builtin="facts", builtin_size=340, eval_frac=0.3, template="llama2-chat"),
}
# What a recipe does not set (the from-scratch model's shape and built-in data)
SCRATCH = dict(dim=256, n_layers=4, n_heads=4, builtin="tasks", builtin_size=4000, eval_frac=0.02)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="out", help="run folder (checkpoints, log.jsonl, final/)")
    p.add_argument("--alpha", type=float, nargs="+", default=[5.0], help="NEFTune alpha; several values = a sweep; 0 = no noise")
    p.add_argument("--noise", nargs="+", default=["uniform"], choices=KINDS, help="noise distribution(s); several = crossed with --alpha")
    p.add_argument("--init", help="Meta checkpoint folder to finetune (default: a small model from scratch)")
    p.add_argument("--data", help="training file (Alpaca, ShareGPT or messages JSON/JSONL; default: built-in tasks)")
    p.add_argument("--eval-data", help="held-out file for the clean eval loss (default: --eval-frac of --data)")
    p.add_argument("--eval-frac", type=float, help="held-out fraction of the data (default: the recipe's)")
    p.add_argument("--format", choices=("alpaca", "sharegpt", "messages"), help="data format (default: detected)")
    p.add_argument("--template", choices=data.TEMPLATES, help="prompt template (default: alpaca for Alpaca data, else vicuna)")
    for k in ("dim", "n-layers", "n-heads"):
        p.add_argument("--" + k, type=int, help="shape of the from-scratch model (without --init; default: the recipe's)")
    p.add_argument("--builtin", choices=("tasks", "facts"), help="built-in data without --data (default: the recipe's)")
    p.add_argument("--builtin-size", type=int, help="records of built-in data (default: the recipe's)")
    p.add_argument("--recipe", choices=tuple(RECIPES), help="default settings: 'paper' with --init, else 'demo'")
    p.add_argument("--pack", action="store_true", help="pack several examples per row (document-aware attention and noise)")
    for k in ("max_len", "epochs", "batch_size", "micro_batch_size", "eval_every", "save_every"):
        p.add_argument("--" + k.replace("_", "-"), type=int, help="default: the recipe's")
    p.add_argument("--lr", type=float, help="peak learning rate (default: the recipe's)")
    p.add_argument("--max-steps", type=int, help="stop after N optimizer steps (overrides --epochs)")
    p.add_argument("--warmup", type=float, default=0.03, help="warmup fraction of the steps, then cosine to 0")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--log-every", type=int, default=1)
    p.add_argument("--eval-examples", type=int, default=256, help="examples in the fixed subsets for clean losses")
    p.add_argument("--keep", type=int, default=2, help="resumable checkpoints kept")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    p.add_argument("--dtype", choices=("bf16", "fp32"), help="bf16: FSDP mixed precision on GPU, autocast on CPU (default: bf16 on GPU; "
                   "on CPU bf16 where a quick matmul timing finds it clearly faster, else fp32; a resume keeps its checkpoint's)")
    p.add_argument("--export-dtype", choices=("bf16", "fp32"), default="bf16", help="dtype of OUT/final (Meta ships bf16)")
    p.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    p.add_argument("--act-ckpt", action="store_true", help="recompute each block's activations in backward")
    p.add_argument("--lora-rank", type=int, default=0, help="LoRA rank R: train adapters W + (alpha/R) B A on a frozen base (lora.py); 0 = full finetuning")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA alpha (the adapters' scale is alpha/R; 16 as in QLoRA)")
    p.add_argument("--lora-dropout", type=float, default=0.05, help="dropout on the adapters' input")
    p.add_argument("--lora-targets", nargs="+", default=list(lora.TARGETS), help="linears of each block to adapt")

    def error(msg):  # argparse's own errors: one line, not a usage block, and printed once under torchrun
        raise UserError(msg)
    p.error = error
    args = p.parse_args(argv)
    args.recipe = args.recipe or ("paper" if args.init else "demo")
    recipe = SCRATCH | RECIPES[args.recipe]
    for k, v in recipe.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    check_args(args)
    return args


def check_args(args):
    """Every number and path, before any work or write: a mistake costs one line, not a run."""
    for a in args.alpha:
        number("--alpha", a, lo=0)
    number("--lr", args.lr, lo=0, hi=1e30)  # AdamW's step lr / (1 - beta1) must fit in fp32 (3.4e38)
    number("--weight-decay", args.weight_decay, lo=0)
    number("--clip", args.clip, above=0)
    number("--warmup", args.warmup, lo=0, hi=1)
    number("--eval-frac", args.eval_frac, above=0, below=1)
    for k in ("max_len", "epochs", "batch_size", "micro_batch_size", "eval_every", "save_every", "max_steps",
              "log_every", "eval_examples", "keep", "dim", "n_layers", "n_heads"):
        if k != "max_steps" or args.max_steps is not None:
            number("--" + k.replace("_", "-"), getattr(args, k), lo=1)
    number("--seed", args.seed, lo=0, below=2**32)
    number("--builtin-size", args.builtin_size, lo=2)  # at least one training and one held-out record
    if args.micro_batch_size > args.batch_size:
        raise UserError(f"--micro-batch-size {args.micro_batch_size} is larger than --batch-size {args.batch_size}")
    if not args.init and (args.dim % args.n_heads or args.dim // args.n_heads % 2):
        raise UserError(f"--dim {args.dim} must be --n-heads {args.n_heads} x an even head size (RoPE rotates pairs)")
    if args.init and not Path(args.init).is_dir():
        raise UserError(f"{args.init}: --init folder not found")
    for flag, path in (("--data", args.data), ("--eval-data", args.eval_data)):
        if path and not Path(path).is_file():
            raise UserError(f"{path}: {flag} file not found")
    writable_folder("--out", args.out)
    number("--lora-rank", args.lora_rank, lo=0)  # 0 = full finetuning
    number("--lora-alpha", args.lora_alpha, above=0)
    number("--lora-dropout", args.lora_dropout, lo=0, below=1)
    if lora.check_targets(args.lora_targets):
        raise UserError(f"--lora-targets: unknown {' '.join(lora.check_targets(args.lora_targets))} (known: {' '.join(lora.TARGETS)})")


# ----------------------------------------------------------------------------- distributed setup

def setup_distributed():
    """torchrun sets RANK/WORLD_SIZE; a plain `python train.py` becomes a world of one, so there is
    a single code path (FSDP2 needs a process group even on one rank)."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device


# ----------------------------------------------------------------------------- data

def build_data(args, tok_dir, rank):
    """Tokenizer, train examples, fixed clean-loss subsets. Every rank builds the same lists."""
    if args.init:
        tok_path = find_tokenizer(args.init)
        if tok_path is None:
            raise UserError(f"{args.init}: no tokenizer.model beside the weights or one level up")
    else:
        # Trained by each process into a private temporary folder (byte-identical for a seed, and
        # shared by the runs of a sweep), so nothing is written into --out before the data is checked.
        tok_path = tok_dir / "tokenizer.model"
        if not tok_path.exists():
            builtin_data.builtin_tokenizer(tok_path, seed=args.seed, kind=args.builtin)
    tok = Tokenizer(tok_path)
    fmt, template = args.format, args.template
    if args.data:
        train = data.load_dataset(args.data, tok, template, args.max_len, fmt, verbose=rank == 0)
        held_out = None
        if args.eval_data:
            held_out = data.load_dataset(args.eval_data, tok, template, args.max_len, fmt, verbose=rank == 0)
    else:
        train = data.tokenize_records(builtin_data.builtin_records(args.seed, args.builtin_size, args.builtin), tok, template or "alpaca", args.max_len,
                                      source="built-in data", verbose=rank == 0)
        held_out = None
    if held_out is None:
        train, held_out = data.split_eval(train, args.eval_frac, args.seed)
    clean_train = train[: args.eval_examples]  # a fixed subset: Figure 4's clean training loss
    held_out = held_out[: args.eval_examples]
    if args.pack:
        train = data.pack(train, args.max_len)
    return tok, tok_path, train, clean_train, held_out


def row_generators(seed, epoch, indices, device):
    """One noise stream per example, seeded by (seed, epoch, example index): the noise an example
    gets does not depend on the world size, the micro-batch size or where a run was resumed."""
    return [torch.Generator(device).manual_seed(seed * 1_000_003 + epoch * 10_000_019 + int(i)) for i in indices]


# ----------------------------------------------------------------------------- model and loss

def build_model(args, tok, device, dtype):
    if args.init:
        model = load_meta(args.init)
        if model.args.vocab_size != tok.n_words:
            raise UserError(f"{args.init}: tokenizer has {tok.n_words} pieces but the model's embedding has {model.args.vocab_size}")
        if not (args.lora_rank and dtype == torch.bfloat16):  # a frozen LoRA base needs no fp32 master copy
            model = model.float()  # FSDP keeps fp32 master weights; MixedPrecisionPolicy/autocast compute in bf16
    else:
        torch.manual_seed(args.seed)  # same init on every rank; fully_shard then keeps each rank's slice
        model = Transformer(ModelArgs(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, multiple_of=32,
                                      vocab_size=tok.n_words, max_seq_len=args.max_len))
    if args.lora_rank:  # freeze the base, add fp32 adapters; the base stays bf16 when computing in bf16 (7B: 13.5 GB)
        model = model.to(torch.bfloat16) if dtype == torch.bfloat16 else model
        lora.add_lora(model, args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_targets, seed=args.seed)
    model.train()
    if args.act_ckpt:  # trade compute for memory: keep only each block's input for backward
        for layer in model.layers:
            layer.forward = lambda *a, _f=layer.forward: checkpoint(_f, *a, use_reentrant=False)
    if args.compile:
        for layer in model.layers:
            layer.compile()
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if device.type == "cuda" and dtype == torch.bfloat16 else MixedPrecisionPolicy()
    for layer in model.layers:  # one FSDP unit per block; the root holds embedding, norm and output
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model.to(device)


def response_loss_sum(logits, labels):
    # labels are aligned with the inputs: the logits at t predict the token at t+1
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum")


LOSS_CHUNK = 128  # positions per loss chunk: 4 x 128 tokens of fp32 logits at vocab 128256 are 0.26 GB


def chunked_loss_sum(h, output, labels, chunk=LOSS_CHUNK):
    """response_loss_sum(output(h), labels) without the whole (B, T, vocab) logits ever existing
    (0.5 MB per token in fp32 at LLaMA-3's vocab 128256): the output layer and the cross-entropy
    run on `chunk` positions at a time, each checkpointed so that backward, too, recomputes and
    frees one chunk's logits at a time. h: the model's final normed states (Transformer's head hook)."""
    h, labels = h[:, :-1], labels[:, 1:]
    part = lambda h, y: F.cross_entropy(output(h).flatten(0, 1).float(), y.flatten(), ignore_index=-100, reduction="sum")
    total = 0.0
    for s in range(0, max(h.shape[1], 1), chunk):
        args = (h[:, s:s + chunk], labels[:, s:s + chunk])
        total = total + (checkpoint(part, *args, use_reentrant=False) if torch.is_grad_enabled() else part(*args))
    return total


def forward_loss(model, batch, device, autocast, alpha=0.0, kind="uniform", generators=None):
    """Summed response-token loss of one micro-batch. The noise is applied only when the model is
    in training mode: clean losses are computed under model.eval() and can never be noisy."""
    x, labels, mask = batch["input_ids"].to(device), batch["labels"].to(device), batch["mask"].to(device)
    seg = batch.get("segment_ids")
    seg, pos = (None, None) if seg is None else (seg.to(device), batch["positions"].to(device))
    attn_mask = None if bool(mask.all()) else mask  # no padding: SDPA's plain causal kernel
    noise = None
    if model.training and alpha > 0:  # NEFTune: the embeddings get noise in training steps only
        noise = lambda embeds: neftune(embeds, mask, alpha, kind, generator=generators, segment_ids=seg)
    with autocast:
        return model(x, noise=noise, mask=attn_mask, positions=pos, segment_ids=seg,
                     head=lambda h, output: chunked_loss_sum(h, output, labels))


@torch.no_grad()
def clean_loss(model, examples, args, rank, world, device, autocast, pad_id):
    """Mean loss per response token with the noise off (the paper's Figure 4)."""
    was_training = model.training
    model.eval()
    total = count = 0.0
    mine = examples[rank::world]
    for i in range(0, len(examples), world * args.micro_batch_size):  # same number of calls on every rank
        chunk = mine[i // world: i // world + args.micro_batch_size]
        if chunk:
            batch = data.collate(chunk, pad_id)
            total += forward_loss(model, batch, device, autocast).item()
            count += int((batch["labels"][:, 1:] != -100).sum())
        else:  # FSDP all-gathers are collective: a rank with no data still runs a forward
            forward_loss(model, data.collate(examples[:1], pad_id), device, autocast)
    total, count = all_sum(total, count, device=device)
    model.train(was_training)
    return total / max(count, 1)


# ----------------------------------------------------------------------------- one training run

def lr_lambda(warmup, total):
    """Linear warmup, then cosine to zero (HF's get_cosine_schedule_with_warmup, as the paper used)."""
    def f(step):
        if step < warmup:
            return step / max(1, warmup)
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return f


PROGRESS = {}  # where the current run is, for the one line that Ctrl-C prints


def train_one(args, out, tok_dir, alpha, kind, rank, world, device, log=print):
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32  # set by precision.choose_dtype in main
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if device.type == "cpu" and dtype == torch.bfloat16 else nullcontext()
    tok, tok_path, train, clean_train, held_out = build_data(args, tok_dir, rank)
    per_rank = args.batch_size // world
    steps_per_epoch = len(train) // args.batch_size
    if steps_per_epoch == 0:
        raise UserError(f"{args.data or 'built-in data'}: {len(train)} training examples, fewer than one global batch of {args.batch_size}")
    total_steps = args.max_steps or steps_per_epoch * args.epochs
    model = build_model(args, tok, device, dtype)
    params = [p for p in model.parameters() if p.requires_grad]  # with LoRA: the adapters only
    lora_cfg = lora_config(args)
    if lora_cfg:  # LoRA dropout draws from the global RNG: one stream per rank, saved in checkpoints
        torch.manual_seed(args.seed + rank)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.999), foreach=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(math.ceil(args.warmup * total_steps), total_steps))
    sampler = DistributedSampler(train, num_replicas=world, rank=rank, shuffle=True, seed=args.seed, drop_last=True)
    clean_losses = lambda: {"clean_train_loss": clean_loss(model, clean_train, args, rank, world, device, autocast, tok.pad_id),
                            "eval_loss": clean_loss(model, held_out, args, rank, world, device, autocast, tok.pad_id)}

    step = tokens_seen = 0
    saved = checkpoints(out) if args.resume else []
    if saved:
        step, tokens_seen = load_checkpoint(saved[-1], model, opt, sched, rank, lora_cfg)
        log(f"resumed from {saved[-1]} at step {step}")
    elif args.resume:
        log(f"--resume: no checkpoint in {out / 'ckpt'}; starting from step 0")
    PROGRESS.update(out=out, step=step, total=total_steps)
    log_path = out / "log.jsonl"
    if rank == 0:  # keep the log consistent with the checkpoint: drop steps a killed run logged past it
        out.mkdir(parents=True, exist_ok=True)  # the first write of a run: everything is checked by now
        old = log_path.read_text().splitlines() if log_path.exists() else []
        log_path.write_text("".join(l + "\n" for l in old if json.loads(l)["step"] <= step))
    log(f"alpha={alpha} noise={kind} | {len(train)} train rows, {len(held_out)} held-out, {steps_per_epoch} steps/epoch, "
        f"{total_steps} steps | world {world}, {args.batch_size // (world * args.micro_batch_size)} micro-batches of "
        f"{args.micro_batch_size} per rank | {model.num_params() / 1e6:.2f}M params ({sum(p.numel() for p in params) / 1e6:.3f}M trained), {str(dtype)[6:]} on {device.type}")

    pbar = PROGRESS["bar"] = tqdm(total=total_steps, initial=step, disable=rank != 0, dynamic_ncols=True)
    speeds, record, order_epoch = [], {}, None
    while step < total_steps:
        epoch, offset = divmod(step, steps_per_epoch)
        if epoch != order_epoch:  # the data order is a function of (seed, epoch): resume is exact
            sampler.set_epoch(epoch)
            order, order_epoch = list(sampler), epoch
        mine = order[offset * per_rank: (offset + 1) * per_rank]
        micro = [data.collate([train[i] for i in mine[j: j + args.micro_batch_size]], tok.pad_id) | {"index": mine[j: j + args.micro_batch_size]}
                 for j in range(0, per_rank, args.micro_batch_size)]
        n_resp, n_tok = all_sum(sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro),
                                sum(int(b["mask"].sum()) for b in micro), device=device)
        t0 = time.perf_counter()
        loss_sum = 0.0
        for batch in micro:
            gens = row_generators(args.seed, epoch, batch["index"], device)
            loss = forward_loss(model, batch, device, autocast, alpha, kind, gens)
            # mean over the response tokens of the whole global batch, whatever the micro-batching;
            # x world because FSDP averages gradients over ranks
            (loss * world / n_resp).backward()
            loss_sum += loss.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.clip)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        train_loss = all_sum(loss_sum, device=device)[0] / n_resp
        if not (math.isfinite(train_loss) and math.isfinite(grad_norm)):
            raise UserError(f"non-finite loss ({train_loss}) or gradient norm ({grad_norm}) at step {step + 1}; "
                            f"the weights were not updated; {newest_checkpoint(out)} (try a lower --lr)")
        lr = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        PROGRESS["step"] = step
        dt = time.perf_counter() - t0
        tokens_seen += n_tok
        speeds.append(n_tok / dt)
        record = dict(step=step, epoch=round(step / steps_per_epoch, 4), lr=lr, loss=train_loss, grad_norm=grad_norm,
                      tokens=int(tokens_seen), tokens_per_s=round(n_tok / dt, 1))
        if step % args.eval_every == 0 or step == total_steps:
            record |= clean_losses()
        if rank == 0 and (step % args.log_every == 0 or "eval_loss" in record):
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        pbar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{n_tok / dt:,.0f}", **({"eval": f"{record['eval_loss']:.3f}"} if "eval_loss" in record else {}))
        pbar.update(1)
        if step % args.save_every == 0 and step < total_steps:
            save_checkpoint(out, model, opt, sched, step, int(tokens_seen), rank, args.keep, lora_cfg, args.dtype)
    pbar.close()
    if "eval_loss" not in record:  # resumed after the last step: the sweep table still needs these
        record |= clean_losses()
    export_final(out, model, tok_path, rank, torch.float32 if args.export_dtype == "fp32" else torch.bfloat16, lora_cfg)
    if not args.data and args.builtin == "tasks" and rank == 0:  # the built-in tasks have checkable answers: what does the model get right?
        answers = sample.exact_match_answers(load_meta(out / "final", dtype=torch.float32), tok, held_out)
        (out / "accuracy.json").write_text(json.dumps(answers, indent=1) + "\n")
        log(f"exact match of greedy answers on {len(held_out)} held-out built-in tasks: {answers['exact_match']:.1%} "
            f"(examples in {out / 'accuracy.json'})")
    if rank == 0:  # imported here: matplotlib only when a run ends
        import plots
        plots.write_curves(out, [(alpha, kind, out)])
    return dict(alpha=alpha, noise=kind, clean_train_loss=record.get("clean_train_loss"), eval_loss=record.get("eval_loss"),
                tokens_per_s=sum(speeds) / max(len(speeds), 1))


def write_sweep(out, results):
    lines = ["| alpha | noise | clean train loss | eval loss | tokens/s |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['alpha']:g} | {r['noise']} | {r['clean_train_loss']:.4f} | {r['eval_loss']:.4f} | {r['tokens_per_s']:,.0f} |")
    (out / "sweep.md").write_text("Final clean (noise-off) losses per run; see each folder's log.jsonl for the curves.\n\n" + "\n".join(lines) + "\n")


def main(argv=None):
    rank = int(os.environ.get("RANK", 0))  # known before the process group: errors print once
    lock = None
    tok_dir = Path(tempfile.mkdtemp(prefix="neftune-tok-"))  # this process's built-in tokenizer
    try:
        args = parse_args(argv)
        rank, world, device = setup_distributed()
        if args.batch_size % (world * args.micro_batch_size):
            raise UserError(f"--batch-size {args.batch_size} is not a multiple of world size {world} x --micro-batch-size {args.micro_batch_size}")
        out = Path(args.out)
        if not args.resume and out.exists() and any(p.name != RunLock.NAME for p in out.iterdir()):
            raise UserError(f"{out}: --out is not empty; pass --resume to continue it or choose another folder")
        lock_error = None
        if rank == 0:
            try:
                lock = RunLock(out).acquire()
            except UserError as e:
                lock_error = e
        if all_sum(lock_error is not None, device=device)[0]:  # every rank stops, only rank 0 says why
            raise lock_error or UserError("")
        log = (lambda *a: tqdm.write(" ".join(map(str, a)))) if rank == 0 else (lambda *a: None)
        args.dtype, why = choose_dtype(args, device, out)  # first: the rest of the run depends on it
        log(f"dtype: {args.dtype} ({why})")
        log("settings: " + " ".join(f"{k}={v}" for k, v in vars(args).items()))
        runs = [(a, k) for k in args.noise for a in args.alpha]
        results = []
        for alpha, kind in runs:
            name = f"alpha_{alpha:g}" + (f"_{kind}" if len(args.noise) > 1 else "")
            run_out = out / name if len(runs) > 1 else out
            dist.barrier()
            results.append(train_one(args, run_out, tok_dir, alpha, kind, rank, world, device, log) | {"dir": run_out})
        if len(runs) > 1 and rank == 0:
            write_sweep(out, results)
            import plots
            plots.write_curves(out, [(r["alpha"], r["noise"], r["dir"]) for r in results])
            log((out / "sweep.md").read_text())
    except (UserError, CheckpointError, data.DataError) as e:
        if "bar" in PROGRESS:
            PROGRESS["bar"].close()  # the error goes on a line of its own, not after the bar
        if rank == 0:
            print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: every rank gets SIGINT; one line, no traceback
        if "bar" in PROGRESS:
            PROGRESS["bar"].close()
        if rank == 0:
            where = (f"at step {PROGRESS['step']} of {PROGRESS['total']}; {newest_checkpoint(PROGRESS['out'])}" if "step" in PROGRESS
                     else "before training started; nothing was written")
            print(f"train.py: interrupted {where}", file=sys.stderr)
        return 130
    finally:
        if lock is not None:
            lock.release()
        shutil.rmtree(tok_dir, ignore_errors=True)
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
