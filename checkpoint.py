"""The sharded model and its weights in and out: lazy readers of Meta's and HF's folders that give
each rank its own rows, build_model (FSDP2, on the meta device for --init, each rank then filling
only its own rows), resumable DCP checkpoints (OUT/ckpt/step_*), the check that no non-finite weight
is ever written, and the gathered export of the finished model (OUT/final, Meta's layout; OUT/final_hf
with --export-hf). train.py calls these:

    torchrun --nproc_per_node=8 train.py --init llama-2-7b --data alpaca_data.json --alpha 5
"""
import dataclasses
import json
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

import chat_template
import hf
import lora
import qlora
from checks import UserError, atomic, read_json, remove
from model import SPLIT_DIM, ModelArgs, Transformer, check_shapes, meta_parts, write_meta

# ----------------------------------------------------------------------------- reading a rank's rows

@dataclass
class Weight:
    """One weight of a checkpoint on disk, in Meta's layout: read(start, end) gives rows start:end,
    reading only those from the memory-mapped file(s), so each rank of a sharded run reads its own rows."""
    shape: torch.Size
    read: Callable[[int, int], torch.Tensor]


def merged_weight(parts, dim):
    """The full tensor that Meta's model-parallel parts concatenate to, as rows on demand."""
    if dim is None or len(parts) == 1:  # norms are replicated in every part
        return Weight(parts[0].shape, lambda s, e: parts[0][s:e])
    if dim == 1:
        return Weight(torch.Size([parts[0].shape[0], sum(p.shape[1] for p in parts)]),
                      lambda s, e: torch.cat([p[s:e] for p in parts], dim=1))
    offsets = [0]
    for p in parts:
        offsets.append(offsets[-1] + p.shape[0])

    def rows(s, e):  # the parts are consecutive blocks of rows: take the overlap of each with s:e
        pieces = [p[max(s - o, 0):e - o] for p, o in zip(parts, offsets) if o < e and o + p.shape[0] > s]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)
    return Weight(torch.Size([offsets[-1], *parts[0].shape[1:]]), rows)


def meta_weights(ckpt_dir):
    """Meta's folder -> (ModelArgs, {key: Weight}, tied), checked against params.json, nothing read
    yet but the files' headers: Meta's model-parallel parts are never concatenated whole."""
    args, parts, tied, source = meta_parts(ckpt_dir)
    weights = {k: merged_weight(p, SPLIT_DIM.get(k.split(".")[-2])) for k, p in parts.items()}
    check_shapes(args, {k: w.shape for k, w in weights.items()}, tied, source)
    return args, weights, tied


def gather_rows(sl, rows):
    """Rows `rows` (any order) of a safetensors slice, reading only those: one read per run of
    consecutive rows (two per head of a permuted wq or wk)."""
    if len(rows) == 0:
        return sl[0:0]
    order = rows.argsort()
    s = rows[order]
    runs = torch.tensor_split(s, ((s[1:] != s[:-1] + 1).nonzero()[:, 0] + 1).tolist())
    return torch.cat([sl[int(r[0]):int(r[-1]) + 1] for r in runs])[order.argsort()]


def hf_weight(sl, heads=None):
    """One HF tensor in Meta's layout, rows on demand. Row r of Meta's wq/wk is one row of HF's: the
    HF row numbers put in Meta's order say which."""
    shape = torch.Size(sl.get_shape())
    if heads is None:
        return Weight(shape, lambda s, e: sl[s:e])
    hf_row = hf.to_meta_order(torch.arange(shape[0]), heads)
    return Weight(shape, lambda s, e: gather_rows(sl, hf_row[s:e]))


def hf_weights(folder):
    """An HF folder -> (ModelArgs, {Meta's key: Weight}, tied), checked against config.json with
    nothing read but the files' headers; the files are memory-mapped and each read takes its own rows."""
    args, tensors, tied, source = hf.hf_tensors(folder)
    weights = {k: hf_weight(sl, heads) for k, (sl, heads) in tensors.items()}
    check_shapes(args, {k: w.shape for k, w in weights.items()}, tied, source, config="config.json")
    return args, weights, tied


def read_init(folder, tok):
    """--init -> (ModelArgs, {key: Weight}, tied): Meta's layout (params.json) or a Hugging Face
    folder (config.json), read lazily: each rank later reads only its own rows. tok: the tokenizer the
    run found there, whose size must be the embedding's."""
    init = hf_weights(folder) if hf.is_hf_folder(folder) else meta_weights(folder)
    tok.check_vocab(init[0].vocab_size, folder)
    return init


def local(p):
    """This rank's rows of a weight that fully_shard sharded (a DTensor), or the whole tensor."""
    return p.to_local() if isinstance(p, DTensor) else p


def shard_rows(p):
    """(start, end): the rows of the full weight that this rank holds. FSDP2 shards dim 0 the way
    torch.chunk does: ceil(rows / world) each, the last ranks holding fewer or none."""
    if not isinstance(p, DTensor):
        return 0, p.shape[0]
    world, rank = p.device_mesh.size(), p.device_mesh.get_local_rank()
    per = -(-p.shape[0] // world)
    start = min(rank * per, p.shape[0])
    return start, min(start + per, p.shape[0])


@torch.no_grad()
def fill_shards(model, weights, extra=None, fill=None):
    """Copy each rank's rows of every weight into the sharded model, one weight at a time, reading
    only those rows from the memory-mapped checkpoint (Weight): no rank ever holds the whole
    model, nor a second copy of its own shard (copy_ converts the dtype in place). extra: full
    tensors for what the checkpoint lacks (the LoRA adapters' initial values). fill(p, rows): the
    copy, where it is more than copy_ (qlora.fill_nf4 quantizes the rows of NF4 weights)."""
    for key, p in model.state_dict(keep_vars=True).items():
        if key == "output.weight" and p is model.tok_embeddings.weight:
            continue  # tied: filled as the embedding
        start, end = shard_rows(p)
        rows = weights[key].read(start, end) if key in weights else extra[key][start:end]
        fill(p, rows) if fill else local(p).copy_(rows)


def mixed_precision(device, dtype):
    """FSDP's policy. On CUDA in bf16: bf16 compute from fp32 master weights, gradients reduced in fp32.
    Inputs are never cast: the RoPE tables (cos, sin) stay fp32 in every block, as in generation (a
    bf16 table loses the angle's low bits at long positions), and the activations are bf16 already.
    On a CPU, bf16 is autocast instead (train_one)."""
    bf16 = torch.bfloat16 if device.type == "cuda" and dtype == torch.bfloat16 else None
    return MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=bf16 and torch.float32, cast_forward_inputs=False)


def build_model(args, init, vocab_size, device, mesh, dtype):
    """The model, sharded by FSDP2 over `mesh`, one unit per block and the root holding the embedding,
    norm and output. From --init (init = read_init's triple) it is built on the meta device, sharded,
    and each rank then fills only its own rows from the checkpoint: no rank holds the whole model."""
    base_dtype = torch.bfloat16 if args.lora_rank and dtype == torch.bfloat16 else torch.float32  # a frozen
    # LoRA base computed in bf16 needs no fp32 master copy (7B: 13.5 GB instead of 27); else fp32 masters
    if init is None:
        torch.manual_seed(args.seed)  # same init on every rank; fully_shard then keeps each rank's slice
        model = Transformer(ModelArgs(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, multiple_of=32,
                                      vocab_size=vocab_size, max_seq_len=args.max_len)).to(base_dtype)
    else:
        margs, weights, tied = init
        with torch.device("meta"):
            model = Transformer(margs).to(base_dtype)
        if tied:  # one matrix for both (LLaMA-3.2 1B/3B): trained as one, exported under both names
            model.output.weight = model.tok_embeddings.weight
    if args.lora_rank:
        lora.add_lora(model, args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_targets, seed=args.seed)
    quantize = getattr(args, "quantize", None)
    if quantize:  # QLoRA: NF4 before fully_shard, so that FSDP2 shards it as NF4
        qlora.quantize_meta(model, mesh.size())
    adapters = lora.initial_adapters(model, args.seed) if args.lora_rank and init else None
    model.train()
    mp = mixed_precision(device, dtype)
    ignored = qlora.unsharded(model, mesh) if quantize else None
    for i, layer in enumerate(model.layers):
        if args.act_ckpt:  # keep only each block's input for backward, recompute the rest
            layer = model.layers[i] = checkpoint_wrapper(layer)
        if args.compile:
            layer.compile()
        fully_shard(layer, mesh=mesh, mp_policy=mp, ignored_params=ignored)
    fully_shard(model, mesh=mesh, mp_policy=mp, ignored_params=ignored)
    if init is None:
        return model.to(device)
    model.to_empty(device=device)
    fill_shards(model, weights, adapters, qlora.fill_nf4 if quantize else None)
    return model


def check_finite(model, out, what):
    """Non-finite weights are never written: a diverged run would export NaNs that sample.py turns
    into "⁇ ⁇ ⁇". Each rank checks its own shards; the verdict is summed over ranks."""
    bad = sum(int(not qlora.finite(local(p))) for p in model.parameters())
    bad = torch.tensor(bad, device=next(model.parameters()).device)
    dist.all_reduce(bad)
    if bad.item():
        raise UserError(f"non-finite weights {what}: not written; {newest_checkpoint(out)} (try a lower --lr)")


def saved_dtype(out, device):
    """The dtype the run(s) in `out` started with, from their checkpoints' train_state.json (a sweep
    keeps one run per subfolder); None without a checkpoint."""
    states = [*out.glob("ckpt/step_*/train_state.json"), *out.glob("*/ckpt/step_*/train_state.json")]
    found = {read_json(p, expect=dict).get("dtype") for p in states}
    if None in found:
        raise UserError(f"{out}: a checkpoint there records no dtype in its train_state.json: not this code's")
    if len(found) > 1:
        raise UserError(f"{out}: its checkpoints were trained in different dtypes ({', '.join(sorted(found))})")
    return found.pop() if found else None


def checkpoints(out):
    """Complete checkpoints, oldest first (a temporary .tmp-* folder is never one)."""
    return sorted(p for p in (out / "ckpt").glob("step_*") if (p / "train_state.json").exists())


def newest_checkpoint(out):
    """Where --resume would continue from, in words: for the messages of a run that stops."""
    saved = checkpoints(out)
    if not saved:
        return f"no checkpoint was saved in {out}: --resume starts over at step 0"
    return f"--resume continues from {saved[-1]}"


# With LoRA, checkpoints hold only the trainable adapters and their AdamW state: the frozen base is
# re-read on resume from --init (or rebuilt from --seed without it). dcp.load fails on any planned key
# the checkpoint lacks, so strict=False only lets set_state_dict skip the frozen keys nobody planned.
TRAINABLE = StateDictOptions(ignore_frozen_params=True)
TRAINABLE_LOAD = StateDictOptions(ignore_frozen_params=True, strict=False)


def lora_config(args):
    """What re-applies the adapters; also recorded in checkpoints so --resume refuses other flags."""
    if not args.lora_rank:
        return None
    quantize = {"quantize": args.quantize} if getattr(args, "quantize", None) else {}  # QLoRA's base: NF4
    return dict(rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout, targets=list(args.lora_targets),
                **quantize)


def save_checkpoint(out, model, opt, sched, step, tokens_seen, rank, keep, lora_cfg=None, dtype=None):
    """DCP: every rank writes its own shard into one temporary folder, renamed when complete."""
    check_finite(model, out, f"at step {step}")
    final = out / "ckpt" / f"step_{step:07d}"
    tmp = out / "ckpt" / f".tmp-step_{step:07d}"  # one name that every rank knows
    model_sd, optim_sd = get_state_dict(model, opt, options=TRAINABLE)
    if rank == 0:
        final.parent.mkdir(parents=True, exist_ok=True)
    with atomic(final, folder=True, tmp=tmp) if rank == 0 else nullcontext(tmp) as tmp:
        dist.barrier()  # rank 0 has made the folder
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
        rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
        torch.save(rng, tmp / f"rng_{rank}.pt")
        dist.barrier()  # every rank has written
        if rank == 0:
            (tmp / "train_state.json").write_text(json.dumps({
                "step": step, "tokens": tokens_seen, "scheduler": sched.state_dict(),
                "model_args": dataclasses.asdict(model.args), "lora": lora_cfg, "dtype": dtype}))
    if rank == 0:
        for old in checkpoints(out)[:-keep]:
            remove(old)
    dist.barrier()


FLAGS = {"dim": "--dim", "n_layers": "--n-layers", "n_heads": "--n-heads", "max_seq_len": "--max-len",
         "vocab_size": "the tokenizer"}


def check_lora(path, lora_cfg):
    """The checkpoint's train_state.json, after checking that it was saved with these LoRA settings."""
    meta = read_json(path / "train_state.json", expect=dict)
    saved_q, this_q = ((cfg or {}).get("quantize") for cfg in (meta.get("lora"), lora_cfg))
    if saved_q != this_q:  # the base the adapters were trained on: NF4-dequantized, or not
        raise UserError(f"{path}: saved by a run with --quantize {saved_q or '(none)'}, this run has --quantize "
                        f"{this_q or '(none)'}; resume with the run's --quantize")
    if meta.get("lora") != lora_cfg:
        raise UserError(f"{path}: saved with LoRA settings {meta.get('lora')}, this run has {lora_cfg}; "
                        f"resume with the same --lora-* flags (and the same --init)")
    return meta


def load_checkpoint(path, model, opt, sched, rank, lora_cfg=None):
    """Restore model, optimizer, scheduler and RNG from a checkpoint, after checking that this run
    has the checkpoint's model shape and LoRA settings (DCP would fail with pages of sizes)."""
    meta = check_lora(path, lora_cfg)
    for k, v in meta.get("model_args", {}).items():
        if getattr(model.args, k, v) != v:
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


@torch.no_grad()
def gathered_state(model, rank, dtype, lora_cfg=None):
    """The whole model on rank 0 in `dtype`, gathered one weight at a time (every rank takes part in
    each all-gather; the others get None): rank 0 holds the export plus one full fp32 weight, never a
    second copy of the model. With LoRA each adapted W becomes W + (alpha/R) B A, summed in fp32 from
    the master weight and cast once; the adapters themselves are kept, in fp32, under their own keys."""
    sd = model.state_dict()
    tied = model.output.weight is model.tok_embeddings.weight
    state, pending = {}, {}
    for key, p in sd.items():
        if key == "output.weight" and tied:
            state[key] = state.get("tok_embeddings.weight")  # one tensor under both of Meta's names
            continue
        full = p.full_tensor() if isinstance(p, DTensor) else p
        if rank != 0:
            qlora.wait_gathered(full)  # dropped unused, an NF4 all-gather's parts would stay until exit
            continue
        stem = key.rsplit(".", 1)[0]
        if lora_cfg and f"{stem}.lora_a" in sd:  # an adapted linear: weight, lora_a, lora_b, in this order
            pending[key] = full.float().cpu()
            if key.endswith(".lora_b"):  # the one merge (lora.py); the adapters are kept beside it
                part = {k: pending.pop(k) for k in (f"{stem}.weight", f"{stem}.lora_a", key)}
                state |= lora.merge_state_dict(part, lora_cfg["alpha"] / lora_cfg["rank"], dtype)
                state |= lora.lora_state_dict(part)
            continue
        state[key] = full.to("cpu", dtype).contiguous()
    return state if rank == 0 else None


def export_final(out, model, tok_path, rank, dtype, lora_cfg=None, export_hf=False, template=None):
    """OUT/final in Meta's layout (and OUT/final_hf, HF's, with export_hf=True), written by rank 0 from
    the gathered weights, each recording the chat template trained with (chat_template.record).
    With LoRA: the merged model, and the adapters alone in OUT/adapters.pth."""
    check_finite(model, out, "at the end of training")
    state = gathered_state(model, rank, dtype, lora_cfg)
    if rank == 0:
        if lora_cfg:
            lora.save_adapters(out / "adapters.pth", state, **lora_cfg)
            state = {k: v for k, v in state.items() if not lora.is_adapter(k)}
        write_meta(state, model.args, out / "final", tokenizer_path=tok_path,
                   extra=lambda folder: chat_template.record(folder, template))
        if export_hf:
            hf.write_hf(state, model.args, out / "final_hf", tokenizer_path=tok_path, template=template)
    dist.barrier()
