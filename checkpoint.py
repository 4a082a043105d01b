"""What a run writes and reads back: resumable DCP checkpoints (OUT/ckpt/step_*), the check that
no non-finite weights are ever written, and the Meta-format export of the finished model (OUT/final).
train.py calls these; nothing here runs on its own.
"""
import dataclasses
import json
import os
import shutil

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict, set_state_dict

import lora
from checks import UserError
from model import Transformer, save_meta


def all_sum(*xs, device):
    """Sums over ranks (here because check_finite needs it; train.py uses it for its batch counts)."""
    t = torch.tensor(xs, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def saved_dtype(out, device):
    """The dtype the run(s) in `out` started with, from their checkpoints' train_state.json (a sweep
    keeps one run per subfolder); None without a checkpoint."""
    states = [*out.glob("ckpt/step_*/train_state.json"), *out.glob("*/ckpt/step_*/train_state.json")]
    # checkpoints written before the dtype was recorded trained in the old default
    found = {json.loads(p.read_text()).get("dtype", "bf16" if device.type == "cuda" else "fp32") for p in states}
    if len(found) > 1:
        raise UserError(f"{out}: its checkpoints were trained in different dtypes ({', '.join(sorted(found))})")
    return found.pop() if found else None


def checkpoints(out):
    """Complete checkpoints, oldest first (a temporary .tmp-* folder is never one)."""
    return sorted(p for p in (out / "ckpt").glob("step_*") if (p / "train_state.json").exists())


def newest_checkpoint(out):
    """Where --resume would continue from, in words: for the messages of a run that stops."""
    saved = checkpoints(out)
    return f"--resume continues from {saved[-1]}" if saved else f"no checkpoint was saved in {out}: --resume starts over at step 0"


def check_finite(model, device, out, what):
    """Non-finite weights are never written: a diverged run would export NaNs that sample.py turns
    into "⁇ ⁇ ⁇". Each rank checks its own shards; the verdict is summed over ranks."""
    bad = sum(int(not torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()) for p in model.parameters())
    if all_sum(bad, device=device)[0]:
        raise UserError(f"non-finite weights {what}: not written; {newest_checkpoint(out)} (try a lower --lr)")


# With LoRA, checkpoints hold only the trainable adapters and their AdamW state: the frozen base is
# rebuilt on resume from --init (or from --seed without it). dcp.load fails on any planned key the
# checkpoint lacks, so strict=False only lets set_state_dict skip the frozen keys nobody planned.
TRAINABLE = StateDictOptions(ignore_frozen_params=True)
TRAINABLE_LOAD = StateDictOptions(ignore_frozen_params=True, strict=False)


def lora_config(args):
    """What re-applies the adapters; also recorded in checkpoints so --resume refuses other flags."""
    if not args.lora_rank:
        return None
    return dict(rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout, targets=list(args.lora_targets))


def save_checkpoint(out, model, opt, sched, step, tokens_seen, rank, keep, lora_cfg=None, dtype=None):
    """DCP: every rank writes its own shard. Written to a temporary folder, renamed when complete."""
    check_finite(model, next(model.parameters()).device, out, f"at step {step}")
    final = out / "ckpt" / f"step_{step:07d}"
    tmp = out / "ckpt" / f".tmp-step_{step:07d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, opt, options=TRAINABLE)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
    torch.save({"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}, tmp / f"rng_{rank}.pt")
    dist.barrier()
    if rank == 0:
        (tmp / "train_state.json").write_text(json.dumps({"step": step, "tokens": tokens_seen, "scheduler": sched.state_dict(),
                                                          "model_args": dataclasses.asdict(model.args), "lora": lora_cfg,
                                                          "dtype": dtype}))
        os.replace(tmp, final)
        for old in checkpoints(out)[:-keep]:
            shutil.rmtree(old)
    dist.barrier()


FLAGS = {"dim": "--dim", "n_layers": "--n-layers", "n_heads": "--n-heads", "max_seq_len": "--max-len", "vocab_size": "the tokenizer"}


def load_checkpoint(path, model, opt, sched, rank, lora_cfg=None):
    """Restore model, optimizer, scheduler and RNG from a checkpoint, after checking that this run
    has the checkpoint's model shape and LoRA settings (DCP would fail with pages of sizes)."""
    meta = json.loads((path / "train_state.json").read_text())
    if meta.get("lora") != lora_cfg:
        raise UserError(f"{path}: saved with LoRA settings {meta.get('lora')}, this run has {lora_cfg}; "
                        f"resume with the same --lora-* flags (and the same --init)")
    for k, v in meta.get("model_args", {}).items():  # a different shape would fail in DCP with pages of sizes
        if getattr(model.args, k) != v:
            raise UserError(f"{path}: the checkpoint has {k}={v} but this run has {k}={getattr(model.args, k)} "
                            f"({FLAGS.get(k, '--init')}); resume with the checkpoint's settings")
    model_sd, optim_sd = get_state_dict(model, opt, options=TRAINABLE)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"], options=TRAINABLE_LOAD)
    sched.load_state_dict(meta["scheduler"])
    rng_file = path / f"rng_{rank}.pt"
    if rng_file.exists():  # absent when resuming on more ranks than saved: nothing uses it anyway
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return meta["step"], meta["tokens"]


def export_final(out, model, tok_path, rank, dtype, lora_cfg=None):
    """Gather the shards into one Meta-format folder (model.save_meta) on rank 0. With LoRA: the
    merged model W + (alpha/R) B A, and the adapters alone in OUT/adapters.pth."""
    check_finite(model, next(model.parameters()).device, out, "at the end of training")
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        if lora_cfg:
            lora.save_adapters(out / "adapters.pth", full, **lora_cfg)
            full = lora.merge_state_dict(full, lora_cfg["alpha"] / lora_cfg["rank"], dtype)
        with torch.device("meta"):
            plain = Transformer(model.args)
        plain.load_state_dict(full, assign=True)
        if model.output.weight is model.tok_embeddings.weight:  # a tied model (load_meta) is exported tied
            plain.output.weight = plain.tok_embeddings.weight
        save_meta(plain, out / "final", tokenizer_path=tok_path, dtype=dtype)
    dist.barrier()
