"""QLoRA (Dettmers et al. 2023, arXiv 2305.14314): the frozen base's linear weights held in 4-bit NF4
under the LoRA adapters, through torchao's NF4Tensor (to_nf4, linear_nf4), as torchtune does.

    torchrun --nproc_per_node=1 train.py --init llama-2-7b --data alpaca_data.json --lora-rank 64 --quantize nf4

Imported only with --quantize: torchao is needed for nothing else. Each rank quantizes only its own
rows, as checkpoint.fill_shards reads them, yet holds exactly the rows of torchao's quantization of
the whole weight (fill_nf4), so FSDP2 all-gathers one consistent NF4 tensor and every world size
trains on the same base.
"""
import logging
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor

from checks import UserError
from lora import TARGETS, is_nf4  # noqa: F401 (qlora.is_nf4)

BLOCK = 64  # QLoRA's block: one absmax scaler per 64 weights
SCALER_BLOCK = 256  # torchao's default block of the double-quantized scalers (QLoRA's)
SPREAD = 8  # scaler blocks per weight we ask for, so that up to 8 ranks shard them alike (see scaler_block)
VERSION = "0.18.0"  # the torchao this was written against (requirements.txt)


@contextmanager
def _quiet(*names):
    """torchao's import warns through logging about CUDA kernels a CPU build cannot load: not ours to show."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def torchao_nf4():
    """torchao's NF4 module, or one line saying how to install it (checked before any work)."""
    try:
        with _quiet("torchao", "torch.utils._pytree"):
            from torchao.quantization.quantize_.workflows.nf4 import nf4_tensor
    except ImportError as e:
        raise UserError(f"--quantize nf4 needs torchao (pip install torchao=={VERSION}): {e}") from None
    return nf4_tensor


def scaler_block(n_blocks):
    """The block of the double-quantized scalers for a weight of n_blocks blocks of 64. torchao's 256
    must divide n_blocks, else to_nf4 raises: SmolLM2-135M's 192 x 576 key/value projections have 1,728
    scalers. Take the largest block <= 256 that divides n_blocks into a multiple of 8 scaler blocks
    (256 for every LLaMA-2/3 weight; 216 for SmolLM2's k/v), else the largest that divides n_blocks:
    smaller blocks only keep the scalers more precisely. Fixed by the shape, not the world size, so
    that 1, 2, 4 or 8 ranks quantize alike."""
    divisors = [d for d in range(SCALER_BLOCK, 0, -1) if n_blocks % d == 0]
    return next((d for d in divisors if n_blocks // d % SPREAD == 0), divisors[0])


def linears(model):
    """(name, module) of every linear that --quantize holds in NF4: all seven of each block,
    adapted or not. The embedding, norms and output layer stay in bf16."""
    for i, layer in enumerate(model.layers):
        for part, parent in (("attention", layer.attention), ("feed_forward", layer.feed_forward)):
            for name in TARGETS:
                if hasattr(parent, name):
                    yield f"layers.{i}.{part}.{name}", getattr(parent, name)


def check_shapes(model, world):
    """One line for a weight torchao cannot take, before anything is read: its size must be whole
    blocks of 64, and FSDP2 splits an NF4 tensor only evenly, whole scaler blocks to each rank."""
    for name, m in linears(model):
        rows, cols = m.weight.shape
        if rows * cols % BLOCK:
            raise UserError(f"--quantize nf4: {name}.weight ({rows} x {cols}) is not a whole number of NF4 "
                            f"blocks of {BLOCK}; this model cannot be quantized")
        n_scalers = rows * cols // BLOCK // scaler_block(rows * cols // BLOCK)
        if rows % world or n_scalers % world:
            raise UserError(f"--quantize nf4: {name}.weight ({rows} x {cols}, {n_scalers} scaler blocks) does not "
                            f"split evenly over {world} ranks; run on a number of ranks that divides both")


def quantize_meta(model, world):
    """Replace, in place, every linear weight of a model built on the meta device by an NF4 tensor of
    the same shape (nothing computed yet: fill_nf4 fills each rank's shard), before fully_shard, so
    that FSDP2 shards and all-gathers them as NF4. The weights must be bf16. -> how many."""
    check_shapes(model, world)
    nf4 = torchao_nf4()
    for _, m in linears(model):
        w = m.weight
        m.weight = nn.Parameter(nf4.to_nf4(w, BLOCK, scaler_block(w.numel() // BLOCK)), requires_grad=False)
    return sum(1 for _ in linears(model))


def unsharded(model, mesh):
    """The parameters fully_shard must leave alone: on one rank, the NF4 weights. FSDP2's one-rank
    shortcut copies each weight's all-gather input into a plain tensor (torch 2.13), which an NF4
    tensor is not; with nothing to shard, the weights simply stay outside FSDP. None on more ranks."""
    return {p for p in model.parameters() if is_nf4(p)} if mesh.size() == 1 else None


def count(model):
    """(frozen weights in NF4, frozen weights kept in bf16): for the run's summary line."""
    frozen = [p.to_local() if isinstance(p, DTensor) else p for p in model.parameters() if not p.requires_grad]
    quantized = sum(is_nf4(p) for p in frozen)
    return quantized, len(frozen) - quantized


def finite(t):
    """Whether every value of t is finite; for NF4 without dequantizing it (a temporary 7x the weight's
    bf16 size, through int64 codes): an NF4 value is one of 16 constants in [-1, 1] times its block's
    scaler, so the weight is finite where its block scalers are."""
    if is_nf4(t):
        t = t.dequantize_scalers(t.quantized_scalers, t.quantization_factor, t.scaler_block_size)
    return bool(torch.isfinite(t).all())


def wait_gathered(t):
    """Wait for the parts of an NF4 tensor that DTensor.full_tensor all-gathered; anything else is left
    alone (its all-gather has been waited for). torchao gathers an NF4 tensor's three inner tensors as
    AsyncCollectiveTensors, waited for at their first use: a rank that drops the gathered weight unused
    (every rank but 0 in the export) would leave them in torch's registry of unwaited collectives until
    the process exits, the whole NF4 model (0.16 GB at 310M parameters) kept for nothing."""
    if is_nf4(t):
        torch.ops._c10d_functional.wait_tensor(t)  # torchao's NF4 waits for each of its parts


def nf4_shard(rows, scalers, start, scaler_block_size):
    """NF4 of `rows` (a block-aligned slice of a weight, starting at block `start`) equal to those rows
    of torchao's to_nf4 of the whole weight: the 4-bit codes depend on each block's own absmax only,
    but the double quantization of the scalers uses their mean over the whole weight. scalers: the
    whole weight's block absmaxes (torchao's get_block_absmax). -> (codes, quantized scalers, their
    quantization factors, the scalers' mean, the NF4 table)."""
    nf4 = torchao_nf4()
    q = nf4.to_nf4(rows.contiguous(), BLOCK, scaler_block_size)  # the codes; its scalers are local
    # block 1 on the absmaxes is the identity (|s| = s): torchao's double quantization of the whole
    # weight's scalers, computed as to_nf4 of that weight computes it, bit for bit
    qs, factor, mean = nf4.NF4Tensor.double_quantize_scalers(scalers, 1, scaler_block_size)
    n = rows.numel() // BLOCK
    return (q.quantized_data, qs[start:start + n], factor[start // scaler_block_size:(start + n) // scaler_block_size],
            mean, q.nf4)


@torch.no_grad()
def fill_nf4(p, rows):
    """checkpoint.fill_shards' copy for an NF4 weight: this rank quantizes its own rows (FSDP2's dim-0
    shard, cast to the weight's bf16) after an all-gather of every rank's block absmaxes, 1/64 of
    the weight's size; any other weight is copied as it is."""
    # the DTensor's own local tensor: to_local() returns a new NF4 wrapper (of the same inner tensors)
    shard = p._local_tensor if isinstance(p, DTensor) else p
    if not is_nf4(shard):
        return shard.copy_(rows)
    nf4 = torchao_nf4()
    rows = rows.to(shard.device, shard.dtype)  # quantized where the weight lives: on the GPU with CUDA
    mine = nf4.get_block_absmax(rows.flatten(), BLOCK)
    if isinstance(p, DTensor) and p.device_mesh.size() > 1:  # even shards (check_shapes): equal sizes
        group = p.device_mesh.get_group()
        parts = [torch.empty_like(mine, dtype=torch.float32) for _ in range(p.device_mesh.size())]
        dist.all_gather(parts, mine.float(), group=group)  # fp32 carries bf16 exactly, and gloo takes it
        scalers, start = torch.cat(parts).to(mine.dtype), p.device_mesh.get_local_rank() * mine.numel()
    else:
        scalers, start = mine, 0
    codes, qs, factor, mean, table = nf4_shard(rows, scalers, start, shard.scaler_block_size)
    for name, value in (("quantized_data", codes), ("quantized_scalers", qs), ("quantization_factor", factor)):
        getattr(shard, name).copy_(value)  # the sharded parts, in place where to_empty put them
    shard.scaler_mean, shard.nf4 = mean, table  # unsharded: to_empty leaves them on the meta device
    return shard
