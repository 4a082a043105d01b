"""Instruction finetuning with NEFTune: one readable FSDP2 loop, under torchrun or plain python.

    torchrun --standalone --nproc_per_node=2 train.py --alpha 5     # the built-in demo, ~1-2 min on 2 CPU cores
    python train.py --recipe fig4 --alpha 0 5 --out out/fig4          # the paper's Figure 4 on a CPU
    torchrun --nproc_per_node=8 train.py --init llama-2-7b --data alpaca_data.json --alpha 5 --out out/neft

A batch's path: data.collate (input_ids, labels, mask) -> forward_loss: noise.neftune_noise (training
steps only) -> the model, which adds it to the token embeddings -> cross-entropy on the response tokens.
"""
import json
import math
import os
import shutil
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DistributedSampler
from tqdm import tqdm

import builtin_data
import checkpoint as ckpt
import data
import qlora
from checks import RunLock, UserError, run_main
from data import IGNORE
from launch import acquire_lock, all_sum, setup_distributed
from model import Tokenizer, Transformer, find_tokenizer
from noise import neftune_noise
from precision import choose_dtype
from recipes import BUILTIN_ONLY, SCRATCH_ONLY, parse_args

# ----------------------------------------------------------------------------- data

def build_data(args, tok_dir, verbose):
    """Tokenizer, train examples, fixed clean-loss subsets. Every rank builds the same lists."""
    if args.init:
        tok_path = find_tokenizer(args.init, required=True)
    else:
        # Trained by each process into a private temporary folder (byte-identical for a seed, and
        # shared by the runs of a sweep), so nothing is written into --out before the data is checked.
        tok_path = tok_dir / "tokenizer.model"
        if not tok_path.exists():
            builtin_data.builtin_tokenizer(tok_path, seed=args.seed, kind=args.builtin)
    tok = Tokenizer(tok_path)
    if args.data:
        train = data.load_dataset(args.data, tok, args.template, args.max_len, args.format, verbose)
    else:
        records = builtin_data.builtin_records(args.seed, args.builtin_size, args.builtin)
        train = data.tokenize_records(records, tok, args.template, args.max_len, "built-in data", verbose)
    if args.eval_data:
        held_out = data.load_dataset(args.eval_data, tok, args.template, args.max_len, args.format, verbose)
    else:
        train, held_out = data.split_eval(train, args.eval_frac, args.seed)
    clean_train = train[: args.eval_examples]  # a fixed subset: Figure 4's clean training loss
    held_out = held_out[: args.eval_examples]
    if args.pack:
        train = data.pack(train, args.max_len)
    return tok, tok_path, train, clean_train, held_out


def resolve_template(args):
    """--template, else the --init folder's own chat template, else the data's default (alpaca for Alpaca
    records and the built-in data, vicuna for chats): set once, so the settings line says which."""
    if args.template is None and args.init:
        args.template = data.recorded_template(args.init)
    if args.template is None:
        args.template = data.default_template(data.read_format(args.data, args.format)[1]) if args.data else "alpaca"


def steps_per_epoch(args, train):
    """Optimizer steps in one pass over the data: drop_last, so a run needs one whole global batch."""
    if len(train) < args.batch_size:
        raise UserError(f"{args.data or 'built-in data'}: {len(train)} training examples, "
                        f"fewer than one global batch of {args.batch_size}")
    return len(train) // args.batch_size


def row_generators(seed, epoch, indices, device):
    """One noise stream per example, seeded by (seed, epoch, example index): the noise an example
    gets does not depend on the world size, the micro-batch size or where a run was resumed. The two
    primes keep the three numbers apart: within a run every (epoch, example) has a seed of its own
    as long as the data holds fewer than 10,000,019 examples."""
    return [torch.Generator(device).manual_seed(seed * 1_000_003 + epoch * 10_000_019 + int(i)) for i in indices]


# ----------------------------------------------------------------------------- model and loss

LOSS_CHUNK = 128  # positions per loss chunk: 4 x 128 tokens of fp32 logits at vocab 128256 are 0.26 GB


def response_loss_sum(logits, labels):
    # labels are aligned with the inputs: the logits at t predict the token at t+1
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE,
                           reduction="sum")


def chunked_loss_sum(h, output, labels, chunk=LOSS_CHUNK):
    """response_loss_sum(output(h), labels) without the whole (B, T, vocab) logits ever existing
    (0.5 MB per token in fp32 at LLaMA-3's vocab 128256): the output layer and the cross-entropy
    run on `chunk` positions at a time, each checkpointed so that backward, too, recomputes and
    frees one chunk's logits at a time. h: the model's final normed states (Transformer's head hook)."""
    h, labels = h[:, :-1], labels[:, 1:]

    def part(h, y):
        return F.cross_entropy(output(h).flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE, reduction="sum")
    total = 0.0
    for s in range(0, max(h.shape[1], 1), chunk):
        args = (h[:, s:s + chunk], labels[:, s:s + chunk])
        total = total + (checkpoint(part, *args, use_reentrant=False) if torch.is_grad_enabled() else part(*args))
    return total


def forward_loss(model, batch, device, autocast, alpha=0.0, kind="uniform", generators=None):
    """Summed response-token loss of one micro-batch. The noise is drawn only in training mode:
    clean losses are computed under model.eval() and can never be noisy. A right-padded batch needs
    no attention mask (causal attention never looks at the padding after a token: SDPA's flash
    kernel), packed rows keep their documents apart through segment_ids."""
    x, labels, mask = batch["input_ids"].to(device), batch["labels"].to(device), batch["mask"].to(device)
    seg = batch.get("segment_ids")
    seg, pos = (None, None) if seg is None else (seg.to(device), batch["positions"].to(device))
    noise = None
    if model.training and alpha > 0:  # NEFTune: alpha / sqrt(L d) * Uniform(-1, 1), L per sequence (noise.py)
        noise = neftune_noise(mask, model.args.dim, alpha, kind, generators, segment_ids=seg)
    with autocast:
        return model(x, noise=noise, positions=pos, segment_ids=seg,
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
            count += int((batch["labels"][:, 1:] != IGNORE).sum())
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
SMALL_EVAL = 50  # held-out examples below which a run says its held-out loss is noisy


def finished(out, total_steps):
    """The log's records if the run in `out` already ended at total_steps and exported OUT/final."""
    if not (out / "final" / "params.json").exists() or not (out / "log.jsonl").exists():
        return None
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return log if log and log[-1]["step"] == total_steps else None


def train_one(args, out, tok_dir, alpha, kind, rank, world, device, mesh, log=print):
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32  # set by precision.choose_dtype in main
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if device.type == "cpu" and dtype == torch.bfloat16 \
        else nullcontext()
    tok, tok_path, train, clean_train, held_out = build_data(args, tok_dir, verbose=rank == 0)
    per_rank = args.batch_size // world
    epoch_steps = steps_per_epoch(args, train)
    total_steps = args.max_steps or epoch_steps * args.epochs
    done = finished(out, total_steps) if args.resume else None
    if done:  # a finished run is left alone, not trained again from its last checkpoint
        for saved in ckpt.checkpoints(out)[-1:]:
            ckpt.check_lora(saved, ckpt.lora_config(args))
        log(f"--resume: {out} is complete ({total_steps} steps, {out / 'final'}); nothing to do")
        last = [r for r in done if "eval_loss" in r][-1]
        speeds = [r["tokens_per_s"] for r in done if "tokens_per_s" in r]  # the step-0 evaluation has none
        return dict(alpha=alpha, noise=kind, clean_train_loss=last["clean_train_loss"], eval_loss=last["eval_loss"],
                    tokens_per_s=sum(speeds) / max(len(speeds), 1))
    init = ckpt.read_init(args.init, tok) if args.init else None
    model = ckpt.build_model(args, init, tok.n_words, device, mesh, dtype)
    params = [p for p in model.parameters() if p.requires_grad]  # with LoRA: the adapters only
    lora_cfg = ckpt.lora_config(args)
    if lora_cfg:  # LoRA dropout draws from the global RNG: one stream per rank, saved in checkpoints
        torch.manual_seed(args.seed + rank)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.999), foreach=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(math.ceil(args.warmup * total_steps), total_steps))
    sampler = DistributedSampler(train, num_replicas=world, rank=rank, shuffle=True, seed=args.seed, drop_last=True)

    def clean_losses(step):  # a non-finite one ends the run like a non-finite training loss: nothing exported
        losses = {name: clean_loss(model, examples, args, rank, world, device, autocast, tok.pad_id)
                  for name, examples in (("clean_train_loss", clean_train), ("eval_loss", held_out))}
        if not all(math.isfinite(v) for v in losses.values()):
            raise UserError(f"non-finite clean losses {losses} at step {step}: nothing exported; "
                            f"{ckpt.newest_checkpoint(out)} (try a lower --lr)")
        return losses

    step = tokens_seen = 0
    saved = ckpt.checkpoints(out) if args.resume else []
    if saved:
        step, tokens_seen = ckpt.load_checkpoint(saved[-1], model, opt, sched, rank, lora_cfg)
        log(f"resumed from {saved[-1]} at step {step}")
    elif args.resume:
        log(f"--resume: no checkpoint in {out / 'ckpt'}; starting from step 0")
    PROGRESS.update(out=out, step=step, total=total_steps)
    log_path = out / "log.jsonl"
    if rank == 0:  # keep the log consistent with the checkpoint: drop steps a killed run logged past it
        out.mkdir(parents=True, exist_ok=True)  # the first write of a run: everything is checked by now
        old = log_path.read_text().splitlines() if log_path.exists() and step else []
        log_path.write_text("".join(line + "\n" for line in old if json.loads(line)["step"] <= step))
    trained = sum(p.numel() for p in params)
    nf4 = " | {} weights in NF4 (every linear of every block), {} in bf16".format(*qlora.count(model)) \
        if args.quantize else ""
    log(f"alpha={alpha} noise={kind} | {len(train)} train rows, {len(held_out)} held-out, {epoch_steps} "
        f"steps/epoch, {total_steps} steps | world {world}, {per_rank // args.micro_batch_size} micro-batches of "
        f"{args.micro_batch_size} per rank | {model.num_params() / 1e6:.2f}M params ({trained / 1e6:.3f}M trained), "
        f"{str(dtype)[6:]} on {device.type}{nf4}")

    if len(held_out) < SMALL_EVAL:
        cut = ", and --eval-examples" if len(held_out) == args.eval_examples else ""
        log(f"warning: the held-out loss is measured on {len(held_out)} examples, under {SMALL_EVAL}: it is noisy "
            f"(raise --eval-frac or give --eval-data{cut})")
    if step == 0:  # the loss before finetuning: the pretrained (or initial) model's baseline, at step 0
        record = dict(step=0, epoch=0.0, tokens=0) | clean_losses(0)
        if rank == 0:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
    pbar = PROGRESS["bar"] = tqdm(total=total_steps, initial=step, disable=rank != 0, dynamic_ncols=True)
    speeds, record, order_epoch = [], {}, None  # a run ends with its last step's clean losses
    while step < total_steps:
        epoch, offset = divmod(step, epoch_steps)
        if epoch != order_epoch:  # the data order is a function of (seed, epoch): resume is exact
            sampler.set_epoch(epoch)
            order, order_epoch = list(sampler), epoch
        mine = order[offset * per_rank: (offset + 1) * per_rank]
        micro = [mine[j: j + args.micro_batch_size] for j in range(0, per_rank, args.micro_batch_size)]
        batches = [data.collate([train[i] for i in idx], tok.pad_id) for idx in micro]
        n_resp, n_tok = all_sum(sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches),
                                sum(int(b["mask"].sum()) for b in batches), device=device)
        t0 = time.perf_counter()
        loss_sum = 0.0
        for j, (idx, batch) in enumerate(zip(micro, batches)):
            if args.grad_sync == "last":  # reduce-scatter once per step, after the last micro-batch
                model.set_requires_gradient_sync(j == len(micro) - 1)
            gens = row_generators(args.seed, epoch, idx, device)
            loss = forward_loss(model, batch, device, autocast, alpha, kind, gens)
            # the mean over the response tokens of the whole global batch, whatever the micro-batching;
            # x world because FSDP averages gradients over ranks
            (loss * world / n_resp).backward()
            loss_sum += loss.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.clip)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        train_loss = all_sum(loss_sum, device=device)[0] / n_resp
        if not (math.isfinite(train_loss) and math.isfinite(grad_norm)):
            raise UserError(f"non-finite loss ({train_loss}) or gradient norm ({grad_norm}) at step {step + 1}; "
                            f"the weights were not updated; {ckpt.newest_checkpoint(out)} (try a lower --lr)")
        lr = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        PROGRESS["step"] = step
        dt = time.perf_counter() - t0
        tokens_seen += n_tok
        speeds.append(n_tok / dt)
        record = dict(step=step, epoch=round(step / epoch_steps, 4), lr=lr, loss=train_loss, grad_norm=grad_norm,
                      tokens=int(tokens_seen), tokens_per_s=round(n_tok / dt, 1), step_s=round(dt, 3))
        if step % args.eval_every == 0 or step == total_steps:
            record |= clean_losses(step)
        if rank == 0 and (step % args.log_every == 0 or "eval_loss" in record):
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        shown = {"eval": f"{record['eval_loss']:.3f}"} if "eval_loss" in record else {}
        pbar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{n_tok / dt:,.0f}", **shown)
        pbar.update(1)
        if step % args.save_every == 0 and step < total_steps:
            ckpt.save_checkpoint(out, model, opt, sched, step, int(tokens_seen), rank, args.keep, lora_cfg, args.dtype)
    pbar.close()
    if "eval_loss" not in record:  # resumed after the last step: the sweep table still needs these
        record |= clean_losses(step)
    export = torch.float32 if args.export_dtype == "fp32" else torch.bfloat16
    ckpt.export_final(out, model, tok_path, rank, export, lora_cfg, export_hf=args.export_hf, template=args.template)
    if not args.data and args.builtin == "tasks" and rank == 0:  # checkable answers: what does the model get right?
        score = builtin_data.write_accuracy(out / "final", tok, held_out, out / "accuracy.json", device)
        log(f"exact match of greedy answers on {len(held_out)} held-out built-in tasks: {score:.1%}")
    if rank == 0:
        import plots  # here, not at the top: matplotlib is 24 MB of every worker's memory, and only rank 0 draws
        plots.write_curves(out, [(alpha, kind, out)])
        log(f"wrote {out / 'final'} (sample.py --ckpt {out / 'final'})"
            + (f", {out / 'final_hf'}" if args.export_hf else "") + f", {out / 'log.jsonl'}, {out / 'curves.png'}"
            + (f", {out / 'accuracy.json'}" if (out / "accuracy.json").exists() else ""))
    return dict(alpha=alpha, noise=kind, clean_train_loss=record.get("clean_train_loss"),
                eval_loss=record.get("eval_loss"), tokens_per_s=sum(speeds) / max(len(speeds), 1))


def check_before_writing(args, world):
    """The checks of a run's folder and world that come before its first write: run() makes them on
    every rank, --check with the world that WORLD_SIZE (torchrun) gives, or 1."""
    if args.batch_size % (world * args.micro_batch_size):
        raise UserError(f"--batch-size {args.batch_size} is not a multiple of world size {world} "
                        f"x --micro-batch-size {args.micro_batch_size}")
    out = Path(args.out)
    if not args.resume and out.exists() and any(p.name != RunLock.NAME for p in out.iterdir()):
        raise UserError(f"{out}: --out is not empty; pass --resume to continue it or choose another folder")
    for run_out in [out, *out.glob("alpha_*")] if args.resume else []:  # a sweep resumes each of its runs
        saved = ckpt.checkpoints(run_out)
        if saved:
            ckpt.check_lora(saved[-1], ckpt.lora_config(args))
    return out


def check_only(args, tok_dir):
    """--check: every check a run makes before its first write, without a process group or a write."""
    out = check_before_writing(args, int(os.environ.get("WORLD_SIZE", 1)))
    if args.resume:  # a --dtype other than the checkpoint's
        choose_dtype(args, torch.device(args.device or "cpu"), out)
    tok, _, train, _, held_out = build_data(args, tok_dir, verbose=True)
    what = f"the built-in {args.builtin} data"
    if args.init:
        margs = ckpt.read_init(args.init, tok)[0]
        what = f"{args.init} ({margs.n_layers} layers, dim {margs.dim})"
        if args.quantize:  # the shapes torchao takes, on one rank (a torchrun launch checks its own world)
            with torch.device("meta"):
                qlora.check_shapes(Transformer(margs), 1)
    steps_per_epoch(args, train)
    print(f"train.py: --check: fine: {what}, {len(train)} training rows, {len(held_out)} held out, "
          f"template {args.template}")


def run(argv):
    tok_dir = Path(tempfile.mkdtemp(prefix="neftune-tok-"))  # this process's built-in tokenizer
    lock = None
    try:
        args = parse_args(argv)
        resolve_template(args)
        if args.check:
            return check_only(args, tok_dir)
        rank, world, device, mesh = setup_distributed(args.device)
        out = check_before_writing(args, world)
        lock = acquire_lock(out, rank, device)

        def log(*a):
            if rank == 0:
                tqdm.write(" ".join(map(str, a)))
        args.dtype, why = choose_dtype(args, device, out)  # first: the rest of the run depends on it
        log(f"dtype: {args.dtype} ({why})")
        unused = (SCRATCH_ONLY if args.init else ()) + (BUILTIN_ONLY if args.data else ())  # the recipe's, not used
        log("settings: " + " ".join(f"{k}={v}" for k, v in vars(args).items() if v is not None and k not in unused))
        runs = [(a, k) for k in args.noise for a in args.alpha]
        results = []
        for alpha, kind in runs:
            name = f"alpha_{alpha:g}" + (f"_{kind}" if len(args.noise) > 1 else "")
            run_out = out / name if len(runs) > 1 else out
            dist.barrier()
            results.append(train_one(args, run_out, tok_dir, alpha, kind, rank, world, device, mesh, log)
                           | {"dir": run_out})
        if len(runs) > 1 and rank == 0:
            import plots  # only rank 0 draws (train_one says why here)
            plots.write_sweep(out, results)
            plots.write_curves(out, [(r["alpha"], r["noise"], r["dir"]) for r in results])
            log((out / "sweep.md").read_text() + f"wrote {out / 'sweep.md'} and {out / 'curves.png'}")
    except KeyboardInterrupt:  # Ctrl-C: every rank gets SIGINT; run_main prints where it stopped
        where = (f"at step {PROGRESS['step']} of {PROGRESS['total']}; {ckpt.newest_checkpoint(PROGRESS['out'])}"
                 if "step" in PROGRESS else "before training started; nothing was written")
        raise KeyboardInterrupt(where) from None
    finally:
        if "bar" in PROGRESS:
            PROGRESS["bar"].close()  # an error goes on a line of its own, not after the bar
        if lock is not None:
            lock.release()
        shutil.rmtree(tok_dir, ignore_errors=True)
        if dist.is_initialized():
            dist.destroy_process_group()


def main(argv=None):
    return run_main("train.py", run, argv)


if __name__ == "__main__":
    sys.exit(main())
