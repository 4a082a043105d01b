"""LLaMA-1/2/3.x in one file, loading and saving Meta's own checkpoint folders.

    python model.py llama-2-7b/ --prompt "The capital of France is"

Reads top to bottom like Meta's llama/model.py: ModelArgs (= params.json), RMSNorm, RoPE,
Attention (GQA + KV cache), FeedForward (SwiGLU), the Transformer; then load_meta (merges
Meta's model-parallel shards) and save_meta (writes Meta's layout back). The tokenizer is in tokenizer.py.
"""
import argparse
import json
import math
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from tokenizer import CheckpointError, Tokenizer, find_tokenizer  # noqa: F401 (re-exported: `from model import Tokenizer`)


@dataclass
class ModelArgs:  # the fields of Meta's params.json, one to one
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
    use_scaled_rope: bool = False  # LLaMA-3.1/3.2: Meta's long-context RoPE frequency scaling

    @classmethod
    def from_dict(cls, d, source="params.json"):
        """Any other key could change the math (vision_*, quantization_args, moe_args, lora_args, a
        rope_scaling dict, ...) and silently wrong logits are the one outcome not allowed: refused.
        Only keys that change nothing are ignored: IGNORED_PARAMS, or a key whose value is null."""
        known = {f.name for f in fields(cls)}
        for k in sorted(set(d) - known - IGNORED_PARAMS):
            if d[k] is not None:
                raise CheckpointError(f"{source}: key {k!r} changes the model and is not implemented here")
        if not isinstance(d.get("use_scaled_rope", False), bool):
            raise CheckpointError(f"{source}: use_scaled_rope must be true or false, got {d['use_scaled_rope']!r}")
        for f in fields(cls):  # "dim": "256" would fail far away, in a tensor shape
            v, kind = d.get(f.name), float if "float" in str(f.type) else int
            if f.type is bool or v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float) if kind is float else int):
                raise CheckpointError(f"{source}: \"{f.name}\" must be {'a number' if kind is float else 'an integer'}, got {v!r}")
        return cls(**{k: v for k, v in d.items() if k in known})


# Meta's generation-time settings (their ModelArgs has them, some params.json files too): not the model.
IGNORED_PARAMS = {"max_batch_size"}


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32 (bf16 squares lose too much), cast back, then scale, as Meta does
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def scale_rope_frequencies(inv_freq, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, old_context=8192):
    """LLaMA-3.1's context extension (apply_scaling in Meta's llama-models, the same constants for
    every model with use_scaled_rope): rotations with wavelength below old_context/high_freq_factor
    (2048 positions) are kept, those above old_context/low_freq_factor (8192) slowed down `factor`
    times, and the band between interpolated linearly in old_context / wavelength."""
    wavelen = 2 * math.pi / inv_freq
    smooth = ((old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)).clamp(0, 1)
    return (1 - smooth) * inv_freq / factor + smooth * inv_freq


def rope_cos_sin(positions, head_dim, theta, scaled=False):
    """Rotation angles position * theta^(-2i/head_dim) (RoFormer eq. 15), in fp32 like Meta's
    precompute_freqs_cis; scaled: LLaMA-3.1's frequency scaling. Computed per call from the positions,
    so packed rows and left-padded generation batches simply pass their own positions; it is a few
    KB of work."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    if scaled:
        inv_freq = scale_rope_frequencies(inv_freq)
    angles = positions.float()[..., None] * inv_freq  # (B, T, head_dim/2)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Meta's interleaved convention: features (2i, 2i+1) form one complex number that is rotated
    by angle i. Meta's weights are used as released (no q/k permutation as in HF's conversion)."""
    xr, xi = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (B, T, H, head_dim/2) each
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # broadcast over heads
    return torch.stack((xr * cos - xi * sin, xr * sin + xi * cos), dim=-1).flatten(-2).type_as(x)


class KVCache:
    """Static cache for generation, allocated once at full length and written in place."""

    def __init__(self, batch_size, n_kv_heads, max_len, head_dim, dtype, device):
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def update(self, pos, k, v):
        if isinstance(pos, torch.Tensor):  # compiled decoding (sample.py): one slot given as a tensor, so
            self.k[:, :, pos] = k  # the graph is the same at every step; keys are the whole cache, and
            self.v[:, :, pos] = v  # the caller's mask hides the slots not yet written
            return self.k, self.v
        end = pos + k.shape[2]
        self.k[:, :, pos:end] = k
        self.v[:, :, pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]  # views: no copy, work linear in length


class Attention(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_kv_heads or args.n_heads
        self.head_dim = args.dim // args.n_heads
        self.wq = nn.Linear(args.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, args.dim, bias=False)
        self.cache = None  # a KVCache while generating (Transformer.setup_cache), else None

    def forward(self, x, cos, sin, attn_mask, cache_pos):
        B, T, _ = x.shape
        q = apply_rope(self.wq(x).view(B, T, self.n_heads, self.head_dim), cos, sin)
        k = apply_rope(self.wk(x).view(B, T, self.n_kv_heads, self.head_dim), cos, sin)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
        if self.cache is not None:
            k, v = self.cache.update(cache_pos, k, v)
        if self.n_kv_heads != self.n_heads:  # GQA: query head h reads KV head h // n_rep (Meta's repeat_kv)
            n_rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
        # no mask: causal within the block, or one new token that may see every cached key
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None and T > 1)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


def ffn_hidden_dim(args):
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


def attention_mask(T, start, mask, segment_ids, device):
    """None when SDPA needs no mask (a plain causal batch, or one decoded token without padding:
    its fast kernels), else a (B, 1, T, start+T) bool mask, True where query i may attend to key j:
    causal, not a padding key (mask), same document (segment_ids). Every query may see itself,
    so padding rows never become all-masked (NaN)."""
    if mask is None and segment_ids is None and (start == 0 or T == 1):
        return None
    q_idx = torch.arange(start, start + T, device=device)[:, None]
    k_idx = torch.arange(start + T, device=device)[None, :]
    allowed = (k_idx <= q_idx)[None]  # (1, T, S)
    if mask is not None:  # (B, S): True at real tokens
        allowed = allowed & mask[:, None, :].bool()
    if segment_ids is not None:  # (B, T), packed rows: no attention across documents
        allowed = allowed & (segment_ids[:, :, None] == segment_ids[:, None, :])
    return (allowed | (k_idx == q_idx))[:, None]


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

    def forward(self, tokens, *, noise=None, mask=None, positions=None, segment_ids=None, cache_pos=0, head=None):
        """tokens (B, T) -> logits (B, T, vocab). `noise` is a function applied to the input
        embeddings (B, T, dim) before the first block: that is where NEFTune adds its noise
        (train.py). It is a hook rather than a separate call so FSDP sees one forward.
        mask: (B, start+T) bool, True at real tokens (right- or left-padded batches).
        positions: (B, T) RoPE positions (default start..start+T-1); packed rows restart them
        per document together with segment_ids (B, T). cache_pos: where these T tokens go in the
        KV cache while generating (setup_cache); a 1-element tensor for a compiled decode step
        (fast_decode.decode_step), which then needs `positions` and a mask over the whole cache.
        head(h, output) replaces the output layer on the final normed states h: train.py computes
        the loss there, chunk by chunk, so (B, T, vocab) logits never exist whole (a hook inside
        forward, again, so that FSDP gathers the output)."""
        h = self.tok_embeddings(tokens)
        if noise is not None:
            h = noise(h)
        B, T, _ = h.shape
        if positions is None:
            positions = torch.arange(cache_pos, cache_pos + T, device=h.device).expand(B, T)
        cos, sin = rope_cos_sin(positions, self.args.dim // self.args.n_heads, self.args.rope_theta, self.args.use_scaled_rope)
        if isinstance(cache_pos, torch.Tensor):  # static-shape decoding: mask (B, cache length) is final
            attn_mask = mask[:, None, None, :]
        else:
            attn_mask = attention_mask(T, cache_pos, mask, segment_ids, h.device)
        for layer in self.layers:
            h = layer(h, cos, sin, attn_mask, cache_pos)
        return self.output(self.norm(h)) if head is None else head(self.norm(h), self.output)

    def setup_cache(self, batch_size, max_len, dtype=None, device=None):
        p = self.output.weight
        for layer in self.layers:
            a = layer.attention
            a.cache = KVCache(batch_size, a.n_kv_heads, max_len, a.head_dim, dtype or p.dtype, device or p.device)

    def clear_cache(self):
        for layer in self.layers:
            layer.attention.cache = None

    def num_params(self):
        return sum(p.numel() for p in self.parameters())


# How Meta's model-parallel code split each weight across consolidated.NN.pth (fairscale layers):
# ParallelEmbedding and RowParallelLinear (wo, w2) along dim 1, ColumnParallelLinear along dim 0.
SPLIT_DIM = {"tok_embeddings": 1, "wo": 1, "w2": 1, "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0}


def load_weights(path):
    """torch.load that never executes code from the file, and maps it instead of reading it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # UnpicklingError (code in the pickle), RuntimeError (not a zip checkpoint), ...
        why = "refusing a pickle that is not plain weights" if "weights_only" in str(e).lower() or "Unsupported" in str(e) else str(e).splitlines()[0]
        raise CheckpointError(f"{path}: not a weights-only PyTorch checkpoint ({why})") from None


def merge_shards(shards, paths):
    if len(shards) == 1:
        return shards[0]
    keys = set(shards[0])
    for s, p in zip(shards[1:], paths[1:]):
        if set(s) != keys:
            raise CheckpointError(f"{p}: its keys differ from {paths[0].name}'s")
    merged = {}
    for k in list(shards[0]):  # a copy: the loop pops from shards[0]
        dim = SPLIT_DIM.get(k.split(".")[-2])
        parts = [s.pop(k) for s in shards]  # pop: let each shard's piece go once merged
        merged[k] = parts[0] if dim is None else torch.cat(parts, dim=dim)  # norms are replicated
    return merged


def load_meta(ckpt_dir, dtype=None, device="cpu"):
    """Meta's folder (params.json + consolidated.NN.pth) -> Transformer in eval mode. The model is
    built on the meta device and the mmap'd tensors are assigned, so memory holds the weights once."""
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
    state = merge_shards([load_weights(p) for p in paths], paths)
    state.pop("rope.freqs", None)  # LLaMA-1 stored its RoPE table; we compute it
    # Tied output layer (LLaMA-3.2 1B/3B were trained so, as HF's tie_word_embeddings finetunes them):
    # no output.weight, as in some exports, or one equal to the embedding, as in Meta's 3.2 files
    emb, out = state.get("tok_embeddings.weight"), state.get("output.weight")
    tied = emb is not None and (out is None or (out.shape == emb.shape and torch.equal(out, emb)))
    if tied:
        state["output.weight"] = emb
    if args.vocab_size <= 0:
        if "tok_embeddings.weight" not in state:
            raise CheckpointError(f"{paths[0]}: no tok_embeddings.weight")
        args.vocab_size = state["tok_embeddings.weight"].shape[0]
    with torch.device("meta"):
        model = Transformer(args)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{paths[0]}: keys disagree with params.json (missing {missing[:3]}, unexpected {unexpected[:3]})")
    for k, shape in expected.items():
        if state[k].shape != shape:
            raise CheckpointError(f"{ckpt_dir}: {k} has shape {tuple(state[k].shape)} across {len(paths)} shard(s) "
                                  f"but params.json implies {tuple(shape)}")
    tok_path = find_tokenizer(ckpt_dir)
    if tok_path is not None:
        n_words = Tokenizer(tok_path).n_words
        if n_words != args.vocab_size:
            raise CheckpointError(f"{tok_path}: tokenizer has {n_words} pieces but the embedding has {args.vocab_size} rows")
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    model.load_state_dict(state, assign=True)
    if tied:  # one Parameter in two places: trained as one, and save_meta writes both keys
        model.output.weight = model.tok_embeddings.weight
    return model.to(device).eval()


def save_meta(model, out_dir, tokenizer_path=None, dtype=torch.bfloat16):
    """Write params.json + consolidated.00.pth (Meta's key names, one shard) [+ tokenizer.model],
    readable by Meta's own code and every converter of Meta's layout. Everything is written into a
    temporary sibling folder and renamed into place, so a crash never leaves a half-written folder."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "params.json").exists():
        raise CheckpointError(f"{out_dir}: exists and is not a checkpoint folder; refusing to replace it")
    args = asdict(model.args)
    # Meta's ModelArgs(max_seq_len=..., **params) would fail on a duplicate max_seq_len, and
    # LLaMA-2's code knows no rope_theta: write only what Meta's own params.json files contain.
    params = {k: v for k, v in args.items() if k not in ("max_seq_len", "rope_theta") and v is not None}
    if args["rope_theta"] != 10000.0:
        params["rope_theta"] = args["rope_theta"]
    if not args["use_scaled_rope"]:  # LLaMA-1/2's code knows no such key either
        params.pop("use_scaled_rope")
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    if model.output.weight is model.tok_embeddings.weight:  # tied: one tensor under both of Meta's names
        state["output.weight"] = state["tok_embeddings.weight"]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        (tmp / "params.json").write_text(json.dumps(params, indent=2) + "\n")
        torch.save(state, tmp / "consolidated.00.pth")
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, tmp / "tokenizer.model")
        tmp.chmod(0o755)  # mkdtemp makes it 0700; a checkpoint folder is read by others like any folder
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


@torch.no_grad()
def main(argv=None):
    p = argparse.ArgumentParser(description="Load a Meta-format LLaMA folder, print its shape and greedy continuation.")
    p.add_argument("ckpt_dir")
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--tokens", type=int, default=16, help="greedy tokens to generate (no cache: a quick check)")
    a = p.parse_args(argv)
    try:
        model = load_meta(a.ckpt_dir)
        tok_path = find_tokenizer(a.ckpt_dir)
        if tok_path is None:
            raise CheckpointError(f"{a.ckpt_dir}: no tokenizer.model beside the weights or one level up")
        tok = Tokenizer(tok_path)
    except CheckpointError as e:
        print(f"model.py: error: {e}", file=sys.stderr)
        return 2
    print(f"{a.ckpt_dir}: {model.num_params() / 1e6:.1f}M parameters, {model.args}")
    ids = tok.encode(a.prompt)
    for _ in range(a.tokens):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    print(tok.decode(ids))
    return 0


if __name__ == "__main__":
    sys.exit(main())
