"""LLaMA-1/2/3.x in one file, and Meta's own checkpoint folders in and out.

    python model.py llama-2-7b/ --prompt "The capital of France is"

Reads top to bottom like Meta's llama/model.py: ModelArgs (= params.json), RMSNorm, RoPE, the KV
cache, Attention (GQA), FeedForward (SwiGLU), the Transformer; then Meta's format: meta_weights
(reads consolidated.NN.pth lazily, a block of rows at a time), load_meta, save_meta.
"""
import json
import math
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from checks import ArgumentParser, CheckpointError, atomic, number, run_main
from tokenizer import Tokenizer, copy_tokenizer, find_tokenizer  # noqa: F401 (`from model import Tokenizer`)

META_ROPE_SCALING = dict(rope_scaling_factor=8.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                         rope_original_context=8192)  # apply_scaling's constants in Meta's llama-models


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
    use_scaled_rope: bool = False  # LLaMA-3.1/3.2: Meta's long-context RoPE frequency scaling, with:
    rope_scaling_factor: float = 8.0  # Meta's code uses 8 for every model; HF's Llama-3.2 configs say 32
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_context: int = 8192
    head_dim: Optional[int] = None  # None = dim // n_heads, as in every Meta model
    hidden_dim: Optional[int] = None  # the SwiGLU width when an HF config states one multiple_of cannot give

    @classmethod
    def from_dict(cls, d, source="params.json"):
        """Another key could change the math (vision_*, moe_args, lora_args, ...): refused, since silently
        wrong logits are the one outcome not allowed. Ignored: max_batch_size and keys set to null."""
        known = {f.name for f in fields(cls)}
        for k in sorted(set(d) - known - {"max_batch_size"}):  # max_batch_size: Meta's generation setting
            if d[k] is not None:
                raise CheckpointError(f"{source}: key {k!r} changes the model and is not implemented here")
        for f in fields(cls):  # "dim": "256" would fail far away, in a tensor shape
            want = getattr(f.type, "__args__", (f.type,))[0]  # Optional[int] -> int
            v = d.get(f.name)
            if v is not None and (not isinstance(v, (int, float) if want is float else want)
                                  or isinstance(v, bool) != (want is bool)):
                kind = {bool: "true or false", int: "an integer"}.get(want, "a number")
                raise CheckpointError(f"{source}: \"{f.name}\" must be {kind}, got {v!r}")
        return cls(**{k: v for k, v in d.items() if k in known and v is not None})


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
    """LLaMA-3.1's context extension (apply_scaling in Meta's llama-models): rotations with wavelength
    below original_context / high_freq_factor (2048 positions) are kept, those above
    original_context / low_freq_factor (8192) are slowed down `factor` times, and the band between
    is interpolated linearly in original_context / wavelength."""
    lo, hi, old = args.rope_low_freq_factor, args.rope_high_freq_factor, args.rope_original_context
    smooth = ((old * inv_freq / (2 * math.pi) - lo) / (hi - lo)).clamp(0, 1)
    return (1 - smooth) * inv_freq / args.rope_scaling_factor + smooth * inv_freq


def rope_cos_sin(positions, args):
    """Rotation angles position * theta^(-2i/head_dim) (RoFormer eq. 15), in fp32 like Meta's
    precompute_freqs_cis. Computed per call from the positions, so packed rows and left-padded
    generation batches simply pass their own positions; it is a few KB of work."""
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
    """The static cache of generation (gpt-fast's): allocated once at its full length, and each step
    writes its keys and values in place at the slots given as a tensor, so every decode step has the
    same shapes and one compiled graph serves them all. Slots not yet written are masked."""

    def __init__(self, batch_size, n_kv_heads, max_len, head_dim, dtype, device):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, slots, k, v):
        """slots (T,): the same cache columns for every row; or (B, T): each row's own columns, for
        continuous batching, where every row is at its own point of its own answer."""
        if slots.dim() == 1:
            self.k[:, :, slots] = k
            self.v[:, :, slots] = v
        else:  # advanced indices split by a slice put their dims first: (B, T, heads, head_dim)
            rows = torch.arange(k.shape[0], device=k.device)[:, None]
            self.k[rows, :, slots] = k.transpose(1, 2)
            self.v[rows, :, slots] = v.transpose(1, 2)
        return self.k, self.v

    def row(self, i):
        """Row i alone as a batch-1 cache whose buffers are views of this one's: whatever is written
        into it lands in row i, in place (a new prompt is prefilled into one slot of a running batch)."""
        view = KVCache.__new__(KVCache)
        nn.Module.__init__(view)
        view.register_buffer("k", self.k[i:i + 1], persistent=False)
        view.register_buffer("v", self.v[i:i + 1], persistent=False)
        return view


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

    def forward(self, x, cos, sin, attn_mask, cache_pos):
        B, T, _ = x.shape
        q = apply_rope(self.wq(x).view(B, T, self.n_heads, self.head_dim), cos, sin)
        k = apply_rope(self.wk(x).view(B, T, self.n_kv_heads, self.head_dim), cos, sin)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, head_dim)
        if cache_pos is not None:  # generating: this step's keys and values join the cache
            k, v = self.cache.update(cache_pos, k, v)
            n = attn_mask.shape[-1]  # the columns in use (Transformer.forward's cache_len): skip the rest
            k, v = k[:, :, :n], v[:, :, :n]
        # GQA: query head h reads KV head h // (n_heads / n_kv_heads), inside SDPA: no repeated K/V copies
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None,
                                           enable_gqa=self.n_kv_heads != self.n_heads)
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

    def forward(self, x, cos, sin, attn_mask, cache_pos):
        h = x + self.attention(self.attention_norm(x), cos, sin, attn_mask, cache_pos)
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
        self.apply(self._init_weights)  # for training from scratch; load_meta overwrites it all

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def forward(self, tokens, *, noise=None, mask=None, positions=None, segment_ids=None, cache_pos=None, head=None,
                cache_len=None):
        """tokens (B, T) -> logits (B, T, vocab). noise (B, T, dim): NEFTune's, added to the token
        embeddings (train.py draws it; added here, inside forward, so that FSDP gathers the embedding).
        mask (B, keys): True at real tokens, for left-padded batches (generation). positions (B, T):
        RoPE positions (default 0..T-1 or the cache slots); packed rows restart them per document,
        with segment_ids. cache_pos (T,) or (B, T): the KV-cache slots of these tokens while generating;
        cache_len: attend to the cache's first cache_len columns only (default: all of them; eager
        decoding passes the columns in use, a compiled step keeps the full, fixed shape).
        head(h, output) replaces the output layer: train.py computes the loss there, chunk by chunk."""
        h = self.tok_embeddings(tokens)
        if noise is not None:
            h = h + noise.to(h.dtype)
        B, T, _ = h.shape
        if positions is None:
            positions = (torch.arange(T, device=h.device) if cache_pos is None else cache_pos).expand(B, T)
        cos, sin = rope_cos_sin(positions, self.args)
        cache = self.layers[0].attention.cache
        keys = None if cache is None else cache_len or cache.k.shape[2]
        attn_mask = attention_mask(T, mask, segment_ids, cache_pos, keys)
        for layer in self.layers:
            h = layer(h, cos, sin, attn_mask, cache_pos)
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
            layer.attention.cache = KVCache(*shape[:2], max_len, a.head_dim, p.dtype, p.device)

    def clear_cache(self):
        for layer in self.layers:
            layer.attention.cache = None

    @contextmanager
    def cache_row(self, i):
        """Inside this block the model is a batch-1 model whose cache is row i of the static cache
        (KVCache.row): how continuous batching prefills a new prompt into a freed slot, the other
        rows untouched."""
        whole = [layer.attention.cache for layer in self.layers]
        for layer, cache in zip(self.layers, whole):
            layer.attention.cache = cache.row(i)
        try:
            yield self
        finally:
            for layer, cache in zip(self.layers, whole):
                layer.attention.cache = cache

    def num_params(self):
        return sum(p.numel() for p in self.parameters())


# ----------------------------------------------------------------------------- Meta's format

@dataclass
class Weight:
    """One weight of a checkpoint on disk, in Meta's layout: read(start, end) gives rows start:end,
    reading only those from the memory-mapped file(s), so each rank of a sharded run reads its own rows."""
    shape: torch.Size
    read: Callable[[int, int], torch.Tensor]


# How Meta's model-parallel code split each weight across consolidated.NN.pth (fairscale layers):
# ParallelEmbedding and RowParallelLinear (wo, w2) along dim 1, ColumnParallelLinear along dim 0.
SPLIT_DIM = {"tok_embeddings": 1, "wo": 1, "w2": 1, "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0}


def load_weights(path):
    """torch.load that never executes code from the file, and maps it instead of reading it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # UnpicklingError (code in the pickle), RuntimeError (not a zip checkpoint), ...
        pickled = "weights_only" in str(e).lower() or "Unsupported" in str(e)
        why = "refusing a pickle that is not plain weights" if pickled else str(e).splitlines()[0]
        raise CheckpointError(f"{path}: not a weights-only PyTorch checkpoint ({why})") from None


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
    yet but the files' headers. tied: no output.weight, or one equal to the embedding (LLaMA-3.2 1B/3B
    were trained so, as HF's tie_word_embeddings finetunes them): the model keeps one matrix."""
    ckpt_dir = Path(ckpt_dir)
    params_path = ckpt_dir / "params.json"
    if not params_path.is_file():
        raise CheckpointError(f"{ckpt_dir}: no params.json (expected Meta's layout: params.json + consolidated.NN.pth)")
    try:
        params = json.loads(params_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{params_path}: invalid JSON ({e})") from None
    args = ModelArgs.from_dict(params, source=str(params_path))
    paths = sorted(ckpt_dir.glob("consolidated.*.pth"))
    if not paths:
        raise CheckpointError(f"{ckpt_dir}: no consolidated.NN.pth weight files")
    for i, p in enumerate(paths):
        if p.name != f"consolidated.{i:02d}.pth":
            raise CheckpointError(f"{ckpt_dir / f'consolidated.{i:02d}.pth'}: missing shard ({len(paths)} found)")
    shards = [load_weights(p) for p in paths]
    for s, p in zip(shards[1:], paths[1:]):
        if set(s) != set(shards[0]):
            raise CheckpointError(f"{p}: its keys differ from {paths[0].name}'s")
    state = {k: [s[k] for s in shards] for k in shards[0] if k != "rope.freqs"}  # LLaMA-1's RoPE table
    emb, out = state.get("tok_embeddings.weight"), state.pop("output.weight", None)
    tied = emb is not None and (out is None or all(torch.equal(a, b) for a, b in zip(out, emb)))
    if not tied and out is not None:
        state["output.weight"] = out
    weights = {k: merged_weight(parts, SPLIT_DIM.get(k.split(".")[-2])) for k, parts in state.items()}
    if args.vocab_size <= 0 and emb is not None:
        args.vocab_size = weights["tok_embeddings.weight"].shape[0]
    check_weights(args, weights, tied, f"{ckpt_dir} ({len(paths)} shard(s))")
    return args, weights, tied


def check_weights(args, weights, tied, source, config="params.json"):
    """Keys and shapes against the model that args (read from `config`) describe, before anything is read."""
    if args.vocab_size <= 0:
        raise CheckpointError(f"{source}: no tok_embeddings.weight")
    with torch.device("meta"):
        expected = {k: v.shape for k, v in Transformer(args).state_dict().items()}
    expected.pop("output.weight") if tied else None
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{source}: keys disagree with {config} "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for k, shape in expected.items():
        if weights[k].shape != shape:
            raise CheckpointError(f"{source}: {k} has shape {tuple(weights[k].shape)} "
                                  f"but {config} implies {tuple(shape)}")


def build(args, weights, tied, dtype=None, device="cpu", tok_dir=None):
    """A Transformer in eval mode holding `weights`: built on the meta device and given the tensors
    (memory-mapped, for a one-file checkpoint), so memory holds the weights once."""
    tok_path = find_tokenizer(tok_dir) if tok_dir is not None else None
    n_words = Tokenizer(tok_path).n_words if tok_path is not None else args.vocab_size
    if n_words != args.vocab_size:
        raise CheckpointError(f"{tok_path}: tokenizer has {n_words} pieces but the embedding has "
                              f"{args.vocab_size} rows")
    with torch.device("meta"):
        model = Transformer(args)
    state = {k: w.read(0, w.shape[0]) for k, w in weights.items()}
    if tied:
        state["output.weight"] = state["tok_embeddings.weight"]
    model.load_state_dict({k: v if dtype is None else v.to(dtype) for k, v in state.items()}, assign=True)
    if tied:  # one Parameter in two places: trained as one, and save_meta writes both keys
        model.output.weight = model.tok_embeddings.weight
    return model.to(device).eval()


def is_hf_folder(folder):
    """A Hugging Face folder (config.json, safetensors: hf.py reads it) rather than Meta's (params.json)."""
    return (Path(folder) / "config.json").is_file() and not (Path(folder) / "params.json").is_file()


def load_meta(ckpt_dir, dtype=None, device="cpu"):
    """Meta's folder (params.json + consolidated.NN.pth, model-parallel shards merged) -> Transformer."""
    return build(*meta_weights(ckpt_dir), dtype=dtype, device=device, tok_dir=ckpt_dir)


def meta_params(args):
    """params.json as Meta's files have it: no max_seq_len (Meta's ModelArgs(max_seq_len=..., **params)
    would fail on it), rope_theta and use_scaled_rope only where LLaMA-1/2's code would differ. HF's
    RoPE numbers, head_dim or hidden_dim are extra keys that load_meta reads and Meta's code does not."""
    d, default = asdict(args), asdict(ModelArgs())
    keep = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier", "norm_eps"}
    params = {k: v for k, v in d.items() if k in keep and v is not None}
    params |= {k: d[k] for k in ("rope_theta", "use_scaled_rope", "head_dim", "hidden_dim") if d[k] != default[k]}
    if args.use_scaled_rope:
        params |= {k: d[k] for k, v in META_ROPE_SCALING.items() if d[k] != v}
    return params


def write_meta(state, args, out_dir, tokenizer_path=None):
    """params.json + consolidated.00.pth (Meta's key names, one shard) [+ the tokenizer] into a
    temporary folder renamed into place: a crash never leaves a half-written checkpoint."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "params.json").exists():
        raise CheckpointError(f"{out_dir}: exists and is not a checkpoint folder; refusing to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with atomic(out_dir, folder=True) as tmp:
        (tmp / "params.json").write_text(json.dumps(meta_params(args), indent=2) + "\n")
        torch.save(state, tmp / "consolidated.00.pth")
        if tokenizer_path is not None:
            copy_tokenizer(tokenizer_path, tmp)
    return out_dir


def save_meta(model, out_dir, tokenizer_path=None, dtype=torch.bfloat16):
    """A model in Meta's layout, readable by Meta's own code and every converter of Meta's layout.
    A tied output layer is written under both of Meta's names, as one tensor."""
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    if model.output.weight is model.tok_embeddings.weight:
        state["output.weight"] = state["tok_embeddings.weight"]
    return write_meta(state, model.args, out_dir, tokenizer_path)


@torch.no_grad()
def run(argv):
    p = ArgumentParser(prog="model.py", description="Load a LLaMA folder, print its shape and greedy continuation.")
    p.add_argument("ckpt_dir", help="Meta's layout (params.json, consolidated.NN.pth) or a Hugging Face folder")
    p.add_argument("--prompt", default="The capital of France is", help="text to continue")
    p.add_argument("--tokens", type=int, default=16, help="greedy tokens to generate (no cache: a quick check)")
    a = p.parse_args(argv)
    number("--tokens", a.tokens, lo=1)
    import hf  # here, not at the top: hf.py imports this file
    model = hf.load_any(a.ckpt_dir)
    tok = Tokenizer(find_tokenizer(a.ckpt_dir, required=True))
    print(f"{a.ckpt_dir}: {model.num_params() / 1e6:.1f}M parameters, {model.args}")
    ids = tok.encode(a.prompt)
    for _ in range(a.tokens):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    print(tok.decode(ids))


def main(argv=None):
    return run_main("model.py", run, argv)


if __name__ == "__main__":
    sys.exit(main())
