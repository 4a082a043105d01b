"""model.py against a forward pass written here from plain tensor ops, Meta's checkpoint layout
(sharded, LLaMA-1's rope.freqs, bf16), the KV cache, padded batches, the tokenizer and bad input."""
import json
import math
import os
import shlex
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from conftest import call

import data
import sample
from model import (
    CheckpointError,
    ModelArgs,
    Tokenizer,
    Transformer,
    attention_mask,
    ffn_hidden_dim,
    load_meta,
    save_meta,
)

# GQA (8 query heads read 2 KV heads), ffn_dim_multiplier and a non-default rope_theta.
ARGS = ModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=97, multiple_of=32,
                 ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0)


def random_model(args=ARGS, seed=0):
    """Weights large enough that attention is far from uniform and every term moves the logits
    (the default std 0.02 init would make a wrong RoPE or GQA mapping nearly invisible)."""
    torch.manual_seed(seed)
    model = Transformer(args)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # RMSNorm gains: not all ones, so a missing gain shows
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif "tok_embeddings" in name:
                p.normal_(0, 1.0)
            else:
                p.normal_(0, 1.5 / math.sqrt(p.shape[1]))
    return model.eval()


def tokens_for(args, B, T, seed=1):
    return torch.randint(0, args.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


# ---- the reference forward, straight from Meta's llama/model.py conventions ----

def reference_logits(sd, args, tokens):
    B, T = tokens.shape
    H, hd = args.n_heads, args.dim // args.n_heads
    n_kv = args.n_kv_heads or H
    # precompute_freqs_cis: complex unit numbers e^(i * t * theta^(-2j/hd))
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))
    freqs_cis = torch.polar(torch.ones(T, hd // 2), torch.outer(torch.arange(T).float(), freqs))

    def rotary(x):  # apply_rotary_emb: features (2j, 2j+1) are one complex number
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * freqs_cis[None, :, None, :]).flatten(3)

    def rmsnorm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + args.norm_eps) * w

    causal = torch.full((T, T), float("-inf")).triu(1)
    h = sd["tok_embeddings.weight"][tokens]
    for i in range(args.n_layers):
        w = {k[len(f"layers.{i}."):]: v for k, v in sd.items() if k.startswith(f"layers.{i}.")}
        x = rmsnorm(h, w["attention_norm.weight"])
        q = rotary((x @ w["attention.wq.weight"].T).view(B, T, H, hd))
        k = rotary((x @ w["attention.wk.weight"].T).view(B, T, n_kv, hd))
        v = (x @ w["attention.wv.weight"].T).view(B, T, n_kv, hd)
        k, v = k.repeat_interleave(H // n_kv, dim=2), v.repeat_interleave(H // n_kv, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd) + causal
        out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(B, T, H * hd)
        h = h + out @ w["attention.wo.weight"].T
        x = rmsnorm(h, w["ffn_norm.weight"])
        gate, up = F.silu(x @ w["feed_forward.w1.weight"].T), x @ w["feed_forward.w3.weight"].T
        h = h + (gate * up) @ w["feed_forward.w2.weight"].T
    return rmsnorm(h, sd["norm.weight"]) @ sd["output.weight"].T


@torch.no_grad()
def test_forward_matches_reference():
    model = random_model()
    # dim 64, multiplier 1.3, multiple_of 32: int(1.3 * int(8 * 64 / 3)) = 221, rounded up to 224
    assert model.layers[0].feed_forward.w1.weight.shape == (224, 64)
    assert model.layers[0].attention.wk.weight.shape == (2 * 8, 64)  # 2 KV heads of head_dim 8
    tokens = tokens_for(ARGS, 3, 21)
    sd = model.state_dict()
    ref = reference_logits(sd, ARGS, tokens)
    got = model(tokens)
    assert got.shape == (3, 21, ARGS.vocab_size)
    assert ref.std() > 0.5  # logits of order one, so the tolerance below is a tight one
    assert (got - ref).abs().max() < 1e-4
    # The check can tell: theta 10000 instead of 500000, or the two KV heads swapped.
    assert (reference_logits(sd, replace(ARGS, rope_theta=10000.0), tokens) - ref).abs().max() > 1e-2
    swapped = {k: v.view(2, 8, -1).flip(0).reshape(v.shape) if ".wk." in k or ".wv." in k else v for k, v in sd.items()}
    assert (reference_logits(swapped, ARGS, tokens) - ref).abs().max() > 1e-2


def test_ffn_hidden_dim_matches_meta_sizes():
    assert ffn_hidden_dim(ModelArgs(dim=4096, multiple_of=256)) == 11008  # LLaMA-2-7B
    assert ffn_hidden_dim(ModelArgs(dim=5120, multiple_of=256)) == 13824  # LLaMA-2-13B
    assert ffn_hidden_dim(ModelArgs(dim=8192, ffn_dim_multiplier=1.3, multiple_of=4096)) == 28672  # 70B


# ---- Meta's checkpoint layout ----

SPLIT = {"tok_embeddings": 1, "wo": 1, "w2": 1, "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0}


def meta_params(args, **extra):
    d = {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads,
         "vocab_size": args.vocab_size, "multiple_of": args.multiple_of, "ffn_dim_multiplier": args.ffn_dim_multiplier,
         "norm_eps": args.norm_eps, "rope_theta": args.rope_theta}
    return {**{k: v for k, v in d.items() if v is not None}, **extra}


def write_meta(model, d, n_shards=1, params=None, rope_freqs=True):
    """Split as Meta's model-parallel ranks saved it: each rank's slice of every weight."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "params.json").write_text(json.dumps(params or meta_params(model.args)))
    sd = model.state_dict()
    for r in range(n_shards):
        shard = {}
        for k, v in sd.items():
            dim = SPLIT.get(k.split(".")[-2])
            shard[k] = v.clone() if dim is None else v.chunk(n_shards, dim=dim)[r].clone()
        if rope_freqs:  # LLaMA-1 stored its RoPE table in every shard; the loader must drop it
            shard["rope.freqs"] = torch.randn(model.args.dim // model.args.n_heads // 2)
        torch.save(shard, d / f"consolidated.{r:02d}.pth")
    return d


@torch.no_grad()
def test_sharded_checkpoints_load_to_identical_logits(tmp_path):
    args = replace(ARGS, n_kv_heads=4)  # 4 ranks each own one KV head, as in Meta's split
    model = random_model(args)
    tokens = tokens_for(args, 2, 9)
    want = model(tokens)
    for n in (1, 2, 4):
        d = write_meta(model, tmp_path / f"mp{n}", n_shards=n)
        if n == 2:  # the split really happened
            assert torch.load(d / "consolidated.01.pth")["tok_embeddings.weight"].shape == (args.vocab_size, 32)
        loaded = load_meta(d)
        assert loaded.args == args
        assert not loaded.training
        assert torch.equal(loaded(tokens), want), n


@torch.no_grad()
def test_save_meta_fp32_round_trip_is_exact(tmp_path):
    model = random_model()
    tokens = tokens_for(ARGS, 2, 11)
    save_meta(model, tmp_path / "ck", dtype=torch.float32)
    loaded = load_meta(tmp_path / "ck")
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys()
    assert all(torch.equal(sd[k], sd2[k]) and sd2[k].dtype == torch.float32 for k in sd)
    assert torch.equal(loaded(tokens), model(tokens))


META_KEYS = {"tok_embeddings.weight", "norm.weight", "output.weight"} | {
    f"layers.{i}.{k}.weight" for i in range(ARGS.n_layers) for k in (
        "attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1", "feed_forward.w2",
        "feed_forward.w3", "attention_norm", "ffn_norm")}


def test_save_meta_default_bf16_in_meta_layout(tmp_path):
    model = random_model(replace(ARGS, max_seq_len=512))
    out = save_meta(model, tmp_path / "ck")
    assert sorted(p.name for p in out.iterdir()) == ["consolidated.00.pth", "params.json"]
    sd = torch.load(out / "consolidated.00.pth", weights_only=True)
    assert set(sd) == META_KEYS
    assert all(v.dtype == torch.bfloat16 for v in sd.values())
    params = json.loads((out / "params.json").read_text())
    assert "max_seq_len" not in params
    assert params["rope_theta"] == 500000.0 and params["n_kv_heads"] == 2 and params["ffn_dim_multiplier"] == 1.3
    ModelArgs(max_seq_len=4096, **params)  # how Meta's code builds its args: no duplicate keyword
    loaded = load_meta(out)
    assert loaded.args == replace(ARGS, max_seq_len=ModelArgs.max_seq_len)
    assert loaded.output.weight.dtype == torch.bfloat16
    assert all(torch.equal(v, model.state_dict()[k].bfloat16()) for k, v in loaded.state_dict().items())


@torch.no_grad()
def test_save_meta_replaces_a_checkpoint_folder_whole(tmp_path, monkeypatch):
    old, new = random_model(seed=0), random_model(seed=1)
    d = write_meta(old, tmp_path / "ck", n_shards=2)  # a stale consolidated.01.pth must not survive
    save_meta(new, d, dtype=torch.float32)
    assert sorted(p.name for p in d.iterdir()) == ["consolidated.00.pth", "params.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temporary or old folders left
    tokens = tokens_for(ARGS, 1, 6)
    assert torch.equal(load_meta(d)(tokens), new(tokens))

    def crash(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        save_meta(old, d)
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]
    assert torch.equal(load_meta(d)(tokens), new(tokens))  # the previous checkpoint is intact
    monkeypatch.undo()

    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(CheckpointError, match="notes"):
        save_meta(new, other)
    assert [p.name for p in other.iterdir()] == ["keep.txt"]


# ---- KV cache and padding ----

@torch.no_grad()
def test_kv_cache_decoding_matches_full_forward():
    model = random_model()
    tokens = tokens_for(ARGS, 2, 13)
    full = model(tokens)
    model.setup_cache(2, 16)
    step = torch.cat([model(tokens[:, t:t + 1], cache_pos=torch.tensor([t])) for t in range(13)], dim=1)
    assert (step - full).abs().max() < 1e-5
    model.setup_cache(2, 16)  # prefill 5 tokens at once, then one at a time, with a mask over the whole cache
    real = torch.ones(2, 16, dtype=torch.bool)
    parts = [model(tokens[:, :5], cache_pos=torch.arange(5))]
    parts += [model(tokens[:, t:t + 1], cache_pos=torch.tensor([t]), mask=real) for t in range(5, 13)]
    assert (torch.cat(parts, dim=1) - full).abs().max() < 1e-5
    model.clear_cache()
    assert torch.equal(model(tokens), full)


@torch.no_grad()
def test_left_padded_cached_batch_matches_each_sequence_alone():
    model = random_model()
    prompt_lens, n_new = [6, 2, 4], 5
    seqs = [tokens_for(ARGS, 1, L + n_new, seed=10 + i)[0] for i, L in enumerate(prompt_lens)]
    alone = [model(s[None])[0] for s in seqs]
    P = max(prompt_lens)
    pad = torch.tensor([P - L for L in prompt_lens])
    B, S = len(seqs), P + n_new
    tokens = torch.zeros(B, S, dtype=torch.long)  # pad id 0, on the left
    for b, s in enumerate(seqs):
        tokens[b, pad[b]:] = s
    mask = torch.arange(S)[None] >= pad[:, None]
    positions = (torch.arange(S)[None] - pad[:, None])
    # The pad queries of the shortest prompt have no real key to see: they must still see
    # one key (themselves), or softmax over an all-masked row gives NaN on some backends.
    assert attention_mask(P, mask, None, torch.arange(P), S).any(-1).all()
    model.setup_cache(B, S)
    out = [model(tokens[:, :P], cache_pos=torch.arange(P), mask=mask, positions=positions[:, :P])]
    for t in range(P, S):
        out.append(model(tokens[:, t:t + 1], cache_pos=torch.tensor([t]), mask=mask, positions=positions[:, t:t + 1]))
    out = torch.cat(out, dim=1)
    model.clear_cache()
    for b in range(B):
        assert (out[b, pad[b]:] - alone[b]).abs().max() < 1e-5, b


@torch.no_grad()
def test_right_padded_batch_matches_each_sequence_alone():
    model = random_model()
    lens = [9, 3, 6]
    seqs = [tokens_for(ARGS, 1, L, seed=20 + i)[0] for i, L in enumerate(lens)]
    tokens = torch.zeros(3, 9, dtype=torch.long)
    mask = torch.zeros(3, 9, dtype=torch.bool)
    for b, s in enumerate(seqs):
        tokens[b, :len(s)], mask[b, :len(s)] = s, True
    out = model(tokens, mask=mask)
    assert torch.isfinite(out).all()  # padded queries see at least themselves: no NaN rows
    for b, s in enumerate(seqs):
        assert (out[b, :len(s)] - model(s[None])[0]).abs().max() < 1e-5, b


# ---- tokenizer ----

def test_tokenizer_round_trips_real_text(shared):
    tok = Tokenizer(shared / "tokenizers" / "mistral_v1_32k.model")
    assert (tok.n_words, tok.bos_id, tok.eos_id, tok.pad_id) == (32000, 1, 2, 0)
    records = json.loads((shared / "data" / "alpaca_en_demo.json").read_text())[:300]
    texts = [r[k] for r in records for k in ("instruction", "input", "output") if r[k]]
    assert len(texts) > 600
    for text in texts + ["naïve café — 東京 🦙", "  two leading spaces\n\ttab"]:
        ids = tok.encode(text, bos=True, eos=True)
        assert ids[0] == 1 and ids[-1] == 2 and 1 not in ids[1:-1] and 2 not in ids[1:-1]
        assert all(0 <= i < 32000 for i in ids)
        assert tok.decode(ids) == text
    assert tok.encode("hi", bos=False) == tok.sp.encode("hi")


# ---- bad input: one clear line that names the file ----

def one_line_error(fn, *args, **kw):
    with pytest.raises(CheckpointError) as e:
        fn(*args, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_no_params_json(tmp_path):
    msg = one_line_error(load_meta, tmp_path)
    assert str(tmp_path) in msg and "params.json" in msg


def test_shards_disagree_with_params(tmp_path):
    model = random_model()
    d = write_meta(model, tmp_path / "half", n_shards=2)
    (d / "consolidated.01.pth").unlink()  # only rank 0's half of a 2-way split
    msg = one_line_error(load_meta, d)
    assert str(d) in msg and "shape" in msg
    d = write_meta(model, tmp_path / "dim", params=meta_params(ARGS, dim=128))
    msg = one_line_error(load_meta, d)
    assert str(d) in msg and "params.json" in msg
    d = write_meta(model, tmp_path / "layers", params=meta_params(ARGS, n_layers=3))
    assert str(d) in one_line_error(load_meta, d)


def test_missing_middle_shard(tmp_path):
    d = write_meta(random_model(), tmp_path / "ck", n_shards=4)
    (d / "consolidated.01.pth").unlink()
    (d / "consolidated.03.pth").unlink()
    assert str(d / "consolidated.01.pth") in one_line_error(load_meta, d)


class RunsCode:
    """Unpickling this runs a shell command: torch.load(weights_only=False) would touch the file."""

    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.sentinel))}",)


@pytest.mark.parametrize("zipfile", [True, False])
def test_pickle_that_runs_code_is_refused_unrun(tmp_path, zipfile):
    model = random_model()
    d = write_meta(model, tmp_path / "ck")
    sentinel = tmp_path / "SENTINEL"
    state = {**model.state_dict(), "rope.freqs": RunsCode(sentinel)}
    torch.save(state, d / "consolidated.00.pth", _use_new_zipfile_serialization=zipfile)
    msg = one_line_error(load_meta, d)
    assert str(d / "consolidated.00.pth") in msg
    assert not sentinel.exists()
    torch.load(d / "consolidated.00.pth", weights_only=False)  # the payload is live: this runs it
    assert sentinel.exists()


def test_not_a_checkpoint_file(tmp_path):
    d = write_meta(random_model(), tmp_path / "ck")
    (d / "consolidated.00.pth").write_text("not weights")
    assert str(d / "consolidated.00.pth") in one_line_error(load_meta, d)


def test_tokenizer_size_disagrees_with_embedding(tmp_path, shared):
    d = write_meta(random_model(), tmp_path / "ck")
    tok = d / "tokenizer.model"
    tok.write_bytes((shared / "tokenizers" / "mistral_v1_32k.model").read_bytes())
    msg = one_line_error(load_meta, d)
    assert str(tok) in msg and "32000" in msg and "97" in msg


def test_tokenizer_file_that_is_not_sentencepiece(tmp_path):
    d = write_meta(random_model(), tmp_path / "ck")
    (d / "tokenizer.model").write_bytes(b"\x00garbage")
    assert str(d / "tokenizer.model") in one_line_error(load_meta, d)


def test_unknown_params_refused_and_vocab_taken_from_embedding(tmp_path):
    model = random_model()
    d = write_meta(model, tmp_path / "ck", params=meta_params(ARGS, vocab_size=-1, some_future_key=1))
    assert "some_future_key" in one_line_error(load_meta, d)  # it might change the math: never ignored
    (d / "params.json").write_text(json.dumps(meta_params(ARGS, vocab_size=-1, max_batch_size=32)))
    loaded = load_meta(d)
    assert loaded.args.vocab_size == 97
    tokens = tokens_for(ARGS, 1, 5)
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model(tokens))


# ---- loading from the command line: sample.py --ckpt DIR --prompt (model.py has no command line) ----

def run_cli(folder, *args):
    return call(sample.main, "--ckpt", folder, "--prompt", "Hello", "--template", "alpaca", "--device", "cpu",
                "--dtype", "fp32", *args)


def test_cli_bad_folder(tmp_path):
    d = write_meta(random_model(), tmp_path / "ck", n_shards=2)
    (d / "consolidated.01.pth").unlink()
    for folder in (d, tmp_path / "missing"):
        r = run_cli(folder)
        assert r.returncode == 2
        lines = r.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("sample.py: error:"), r.stderr
        assert str(folder) in lines[0]


def test_cli_good_folder(tmp_path, shared):
    args = ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=32000, multiple_of=32)
    model = random_model(args)
    tok_path = shared / "tokenizers" / "mistral_v1_32k.model"
    save_meta(model, tmp_path / "tiny", tokenizer_path=tok_path, dtype=torch.float32)
    r = run_cli(tmp_path / "tiny", "--max-new-tokens", 2, "--repetition-penalty", 1)
    assert r.returncode == 0, r.stderr
    n = 2 * 32000 * 32 + 4 * 32 * 32 + 3 * 32 * ffn_hidden_dim(args) + 3 * 32
    assert model.num_params() == n
    # the two greedy tokens after the Alpaca prompt, computed here from the model itself
    tok = Tokenizer(tok_path)
    ids = data.prompt_ids([{"role": "user", "content": "Hello"}], tok, "alpaca")
    for _ in range(2):
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert r.stdout.strip() == tok.decode(ids[-2:]).strip()
