"""LLaMA-1/2/3.x, the network alone, and Meta's own checkpoint folders in and out.

    python sample.py --ckpt llama-2-7b/ --prompt "The capital of France is"   # what loads and runs it

Reads top to bottom like Meta's llama/model.py: ModelArgs (= params.json), RMSNorm, RoPE, the KV
cache, Attention (GQA), FeedForward (SwiGLU), the Transformer; then Meta's format at its simplest:
load_meta, save_meta. (Reading a rank's own rows of a checkpoint is checkpoint.py's.)
"""
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from checks import CheckpointError, atomic, config_dataclass, load_weights, read_json
from tokenizer import Tokenizer, copy_tokenizer, find_tokenizer  # noqa: F401 (`from model import Tokenizer`)


@dataclass
class ModelArgs:  # the fields of Meta's params.json, one to one, then the few that HF configs add
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None  # None = n_heads (no GQA); LLaMA-2-70B uses 8
    vocab_size: int = -1  # -1 = take it from the tokenizer / the embedding weight
    multiple_of: int = 256  # SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    use_scaled_rope: bool = False  # LLaMA-3.1/3.2: Meta's long-context RoPE frequency scaling, with
    rope_scaling_factor: float = 8.0  # apply_scaling's constants: Meta's code uses 8 for every model, HF's 3.2 says 32
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_context: int = 8192
    head_dim: Optional[int] = None  # None = dim // n_heads, as in every Meta model
    hidden_dim: Optional[int] = None  # the SwiGLU width when an HF config states one multiple_of cannot give


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32 (bf16 squares lose too much), cast back, then scale, as Meta does
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def scale_rope_frequencies(inv_freq, args):
    """LLaMA-3.1's context extension (apply_scaling in Meta's llama-models): wavelengths below original_context
    / high_freq_factor (2048 positions) are kept, those above original_context / low_freq_factor (8192) slowed
    `factor` times, and the band between interpolated linearly in original_context / wavelength."""
    lo, hi, old = args.rope_low_freq_factor, args.rope_high_freq_factor, args.rope_original_context
    smooth = ((old * inv_freq / (2 * math.pi) - lo) / (hi - lo)).clamp(0, 1)
    return (1 - smooth) * inv_freq / args.rope_scaling_factor + smooth * inv_freq


def rope_cos_sin(positions, args):
    """Angles position * theta^(-2i/head_dim) (RoFormer eq. 15) in fp32, as Meta's precompute_freqs_cis; per call
    from the positions (a few KB of work), so packed rows and left-padded batches pass their own."""
    hd = args.head_dim or args.dim // args.n_heads
    inv_freq = 1.0 / args.rope_theta ** (torch.arange(0, hd, 2, device=positions.device).float() / hd)
    if args.use_scaled_rope:
        inv_freq = scale_rope_frequencies(inv_freq, args)
    angles = positions.float()[..., None] * inv_freq  # (B, T, head_dim/2)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Meta's interleaved convention: features (2i, 2i+1) form one complex number that is rotated
    by angle i. Meta's weights are used as released (hf.py undoes HF's permutation of q and k)."""
    xr, xi = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (B, T, H, head_dim/2) each
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # broadcast over heads
    return torch.stack((xr * cos - xi * sin, xr * sin + xi * cos), dim=-1).flatten(-2).type_as(x)


class KVCache(nn.Module):
    """The static cache of generation (gpt-fast's): k, v (B, heads, slots, head_dim) at full length, written in place
    at slots given as a tensor: every decode step has the same shapes, one compiled graph serves them all."""

    def __init__(self, k, v):
        super().__init__()
        self.register_buffer("k", k, persistent=False)
        self.register_buffer("v", v, persistent=False)

    def update(self, slots, k, v):
        """slots (T,): the same slots in every row; (B, T): each row's own (continuous batching)."""
        if slots.dim() == 1:
            self.k[:, :, slots], self.v[:, :, slots] = k, v
        else:  # two advanced indices split by a slice put their dims first: (B, T, heads, head_dim)
            rows = torch.arange(k.shape[0], device=k.device)[:, None]
            self.k[rows, :, slots], self.v[rows, :, slots] = k.transpose(1, 2), v.transpose(1, 2)
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.n_heads, self.n_kv_heads = args.n_heads, args.n_kv_heads or args.n_heads
        self.head_dim = args.head_dim or args.dim // args.n_heads
        self.wq = nn.Linear(args.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, args.dim, bias=False)
        self.cache = None  # a KVCache while generating (Transformer.setup_cache)

    def forward(self, x, cos, sin, attn_mask, cache_pos, blocks=None):
        B, T, _ = x.shape
        q = apply_rope(self.wq(x).view(B, T, self.n_heads, self.head_dim), cos, sin)
        k = apply_rope(self.wk(x).view(B, T, self.n_kv_heads, self.head_dim), cos, sin)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, head_dim)
        # GQA: query head h reads KV head h // (n_heads / n_kv_heads), inside SDPA: no repeated K/V copies
        gqa = self.n_kv_heads != self.n_heads
        if cache_pos is None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None,
                                               enable_gqa=gqa)
        else:  # generating: this step's keys and values join the cache, then each block of rows (blocks:
            # [(rows, n)], Transformer.forward's cache_len) attends to the first n columns only, those its
            # longest row uses: decoding reads the cache from memory, so unused columns cost as much as used ones
            k, v = self.cache.update(cache_pos, k, v)
            y = torch.cat([F.scaled_dot_product_attention(q[r], k[r, :, :n], v[r, :, :n],
                                                          attn_mask=attn_mask[r, ..., :n], enable_gqa=gqa)
                           for r, n in blocks])
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


def ffn_hidden_dim(args):
    if args.hidden_dim:
        return args.hidden_dim
    hidden = int(2 * 4 * args.dim / 3)  # SwiGLU keeps the 4*dim FFN's parameter count (Shazeer 2020)
    if args.ffn_dim_multiplier is not None:
        hidden = int(args.ffn_dim_multiplier * hidden)
    return args.multiple_of * math.ceil(hidden / args.multiple_of)


class FeedForward(nn.Module):
    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, ffn_hidden_dim(args))
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, attn_mask, cache_pos, blocks=None):
        h = x + self.attention(self.attention_norm(x), cos, sin, attn_mask, cache_pos, blocks)
        return h + self.feed_forward(self.ffn_norm(h))


def attention_mask(T, mask=None, segment_ids=None, cache_pos=None, cache_len=None):
    """None where causal attention is right (SDPA's fast kernels), else a (B, 1, T, keys) bool mask: key
    j is not after query i, is a real token (mask) and in i's document (segment_ids). With a KV cache
    the keys are its slots, the queries at cache_pos. Every query sees itself: no all-masked row (NaN)."""
    if cache_pos is None and mask is None and segment_ids is None:
        return None
    q = torch.arange(T, device=(mask if mask is not None else segment_ids).device) if cache_pos is None else cache_pos
    k = torch.arange(T if cache_pos is None else cache_len, device=q.device)
    allowed = k <= q[..., None]  # (T, keys), or (B, T, keys) where each row has its own cache_pos
    allowed = allowed[None] if allowed.dim() == 2 else allowed
    if mask is not None:
        allowed = allowed & mask[:, None, :].bool()
    if segment_ids is not None:
        allowed = allowed & (segment_ids[:, :, None] == segment_ids[:, None, :])
    return (allowed | (k == q[..., None]))[:, None]


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        if args.vocab_size <= 0:
            raise ValueError("ModelArgs.vocab_size must be set (load_meta fills it in from the weights)")
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        for m in self.modules():  # for training from scratch; load_meta overwrites it all
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def forward(self, tokens, *, noise=None, mask=None, positions=None, segment_ids=None, cache_pos=None, head=None,
                cache_len=None):
        """tokens (B, T) -> logits (B, T, vocab). noise (B, T, dim): NEFTune's, drawn by train.py and added to
        the token embeddings here, inside forward, where FSDP has gathered the embedding. mask (B, keys): real
        tokens of left-padded batches. positions (B, T): RoPE's (default 0..T-1 or the cache slots), restarted
        per document of a packed row (segment_ids). cache_pos (T,) or (B, T): these tokens' KV-cache slots
        while generating; cache_len: attend to the first cache_len slots only (eager decoding; a compiled
        step keeps the full, fixed shape), or [(rows, cache_len)] per block of rows, in order: the first rows
        attend to their own first cache_len slots, the next ones to theirs (sample.block_lengths).
        head(h, output) replaces the output layer: train.py's chunked loss."""
        h = self.tok_embeddings(tokens)
        if noise is not None:
            h = h + noise.to(h.dtype)
        B, T, _ = h.shape
        if positions is None:
            positions = (torch.arange(T, device=h.device) if cache_pos is None else cache_pos).expand(B, T)
        cos, sin = rope_cos_sin(positions, self.args)
        cache, blocks, keys = self.layers[0].attention.cache, [], None
        if cache is not None:  # (rows, columns) per block of rows: each attends to its own columns
            start = 0
            for rows, n in cache_len if isinstance(cache_len, list) else [(B, cache_len or cache.k.shape[2])]:
                blocks.append((slice(start, start + rows), n))
                start += rows
            keys = max(n for _, n in blocks)
        attn_mask = attention_mask(T, mask, segment_ids, cache_pos, keys)
        for layer in self.layers:
            h = layer(h, cos, sin, attn_mask, cache_pos, blocks)
        return self.output(self.norm(h)) if head is None else head(self.norm(h), self.output)

    def setup_cache(self, batch_size, max_len):
        """One static cache per layer, in the weights' dtype. A cache of this shape is kept and zeroed
        (a compiled step is built for its very buffers); another shape replaces it."""
        p, a = self.output.weight, self.layers[0].attention
        shape = (batch_size, a.n_kv_heads, max_len, a.head_dim)
        if a.cache is not None and a.cache.k.shape == shape and a.cache.k.dtype == p.dtype:
            for layer in self.layers:
                layer.attention.cache.k.zero_()
                layer.attention.cache.v.zero_()
            return
        self.clear_cache()  # free the old shape's cache before the new one is allocated
        for layer in self.layers:
            zeros = dict(dtype=p.dtype, device=p.device)
            layer.attention.cache = KVCache(torch.zeros(shape, **zeros), torch.zeros(shape, **zeros))

    def clear_cache(self):
        for layer in self.layers:
            layer.attention.cache = None

    @property
    def tied(self):  # one matrix as both the embedding and the output layer (LLaMA-3.2 1B/3B)
        return self.output.weight is self.tok_embeddings.weight

    def num_params(self):
        return sum(p.numel() for p in self.parameters())


# ----------------------------------------------------------------------------- Meta's format

# How Meta's model-parallel code split each weight across consolidated.NN.pth (fairscale layers):
# ParallelEmbedding and RowParallelLinear (wo, w2) along dim 1, ColumnParallelLinear along dim 0.
SPLIT_DIM = {"tok_embeddings": 1, "wo": 1, "w2": 1, "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0}


def meta_parts(ckpt_dir):
    """Meta's folder -> (ModelArgs, {key: [its model-parallel parts]}, tied, source), memory-mapped, nothing
    read but headers. tied: no output.weight, or one equal to the embedding (LLaMA-3.2 1B/3B): one matrix."""
    ckpt_dir = Path(ckpt_dir)
    params_path = ckpt_dir / "params.json"
    if not params_path.is_file():
        raise CheckpointError(f"{ckpt_dir}: no params.json (expected Meta's layout: params.json + consolidated.NN.pth)")
    params = read_json(params_path, CheckpointError, expect=dict)
    args = config_dataclass(ModelArgs, params, params_path, ignored=("max_batch_size",))  # Meta's generation setting
    paths = sorted(ckpt_dir.glob("consolidated.*.pth"))
    if not paths:
        raise CheckpointError(f"{ckpt_dir}: no consolidated.NN.pth weight files")
    shards = [load_weights(p) for p in paths]
    for i, (s, p) in enumerate(zip(shards, paths)):
        if p.name != f"consolidated.{i:02d}.pth":
            raise CheckpointError(f"{ckpt_dir / f'consolidated.{i:02d}.pth'}: missing shard ({len(paths)} found)")
        if set(s) != set(shards[0]):
            raise CheckpointError(f"{p}: its keys differ from {paths[0].name}'s")
    parts = {k: [s[k] for s in shards] for k in shards[0] if k != "rope.freqs"}  # LLaMA-1's RoPE table
    emb, out = parts.get("tok_embeddings.weight"), parts.get("output.weight")
    tied = emb is not None and (out is None or all(torch.equal(a, b) for a, b in zip(out, emb)))
    if tied:
        parts.pop("output.weight", None)
    args.vocab_size = emb[0].shape[0] if args.vocab_size <= 0 and emb else args.vocab_size  # split on dim 1
    return args, parts, tied, f"{ckpt_dir} ({len(paths)} shard(s))"


def check_shapes(args, shapes, tied, source, config="params.json"):
    """Keys and shapes ({key: torch.Size}) against the model args (from `config`) describe: one line, not pages."""
    if args.vocab_size <= 0:
        raise CheckpointError(f"{source}: no tok_embeddings.weight")
    with torch.device("meta"):
        expected = {k: v.shape for k, v in Transformer(args).state_dict().items()}
    expected.pop("output.weight") if tied else None
    missing, unexpected = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{source}: keys disagree with {config} "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for k, shape in expected.items():
        if shapes[k] != shape:
            raise CheckpointError(f"{source}: {k} has shape {tuple(shapes[k])} but {config} implies {tuple(shape)}")


def build(args, state, tied, dtype=None, device="cpu", tok_dir=None, source="the checkpoint", config="params.json"):
    """A Transformer in eval mode holding `state` (whole tensors, Meta's keys), shapes and tokenizer checked
    first: built on the meta device and given the (memory-mapped) tensors, so memory holds them once."""
    check_shapes(args, {k: v.shape for k, v in state.items()}, tied, source, config)
    if tok_dir is not None and find_tokenizer(tok_dir) is not None:
        Tokenizer(find_tokenizer(tok_dir)).check_vocab(args.vocab_size, source)
    with torch.device("meta"):
        model = Transformer(args)
    state = name_tied(state, tied)
    model.load_state_dict({k: v if dtype is None else v.to(dtype) for k, v in state.items()}, assign=True)
    if tied:
        model.output.weight = model.tok_embeddings.weight
    return model.to(device).eval()


def name_tied(state, tied):
    """A tied model's state dict: output.weight is the embedding tensor itself (Meta's files name it twice)."""
    return state | {"output.weight": state["tok_embeddings.weight"]} if tied else state


def load_meta(ckpt_dir, dtype=None, device="cpu"):
    """Meta's folder (params.json + consolidated.NN.pth, model-parallel parts concatenated) -> Transformer."""
    args, parts, tied, source = meta_parts(ckpt_dir)
    dims = {k: SPLIT_DIM.get(k.split(".")[-2]) for k in parts}  # None: a norm, the same in every part
    state = {k: p[0] if dims[k] is None else torch.cat(p, dim=dims[k]) for k, p in parts.items()}
    return build(args, state, tied, dtype, device, tok_dir=ckpt_dir, source=source)


def meta_params(args):
    """params.json as Meta's files have it: the shape always, other keys only where they differ from
    LLaMA-1/2's defaults (HF's RoPE numbers, head_dim, hidden_dim: extra keys Meta's code ignores), and
    no max_seq_len (Meta's ModelArgs(max_seq_len=..., **params) would fail on it)."""
    d, default = asdict(args), asdict(ModelArgs())
    shape = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier", "norm_eps")
    return {k: v for k, v in d.items() if k != "max_seq_len" and v is not None and (k in shape or v != default[k])}


def write_meta(state, args, out_dir, tokenizer_path=None, extra=None):
    """params.json + consolidated.00.pth [+ the tokenizer] [+ what extra(folder) writes], whole or not at all."""
    with atomic(out_dir, folder=True, marker="params.json") as tmp:
        (tmp / "params.json").write_text(json.dumps(meta_params(args), indent=2) + "\n")
        torch.save(state, tmp / "consolidated.00.pth")
        if tokenizer_path is not None:
            copy_tokenizer(tokenizer_path, tmp)
        if extra is not None:
            extra(tmp)
    return out_dir


def model_state(model, dtype=None):
    """The model's weights on the CPU, in `dtype` if given; a tied output under both of Meta's names."""
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    return name_tied(state, model.tied)


def save_meta(model, out_dir, tokenizer_path=None, dtype=torch.bfloat16, extra=None):
    """A model in Meta's layout, readable by Meta's own code and every converter of Meta's layout."""
    return write_meta(model_state(model, dtype), model.args, out_dir, tokenizer_path, extra)
