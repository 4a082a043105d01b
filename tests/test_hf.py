"""hf.py against what is written here by hand: HF folders made with safetensors.torch.save_file from
hand-permuted tensors and a hand-written config.json (both of transformers' key styles), and HF's own
forward pass from plain tensor ops (RoPE by rotating halves), reading only config.json and the
safetensors; transformers itself where it is installed; train.py --init / --export-hf and sample.py."""
import base64
import json
import math
from dataclasses import replace

import pytest
import safetensors
import torch
import torch.nn.functional as F
from conftest import (
    TINY,
    alpaca_file,
    call,
    kill_at_checkpoint,
    losses,
    meta_folder,
    one_error_line,
    read_log,
    run_train,
)
from safetensors.torch import load_file, save_file

import builtin_data
import checkpoint
import data
import hf
import model
import sample
from checks import CheckpointError
from hf_tokenizer import write_hf_tokenizer
from model import ModelArgs, Transformer, load_meta, save_meta
from tokenizer import PAT_STR, Tokenizer

# dim 64, head_dim 16 (wide enough for all three bands of LLaMA-3.1's RoPE scaling), GQA, Llama-3.2's factor 32
ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=100, multiple_of=256, norm_eps=1e-5,
                 rope_theta=500000.0, use_scaled_rope=True, rope_scaling_factor=32.0)
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}


def random_model(args=ARGS, tied=False, seed=0):
    """Weights large enough that attention is far from uniform: a wrong permutation moves the logits."""
    torch.manual_seed(seed)
    m = Transformer(args)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p) if p.ndim == 1 else torch.randn_like(p) / math.sqrt(p.shape[1]))
    if tied:
        m.output.weight = m.tok_embeddings.weight
    return m.eval()


# ---- an HF folder by hand ----

def hand_permute(w, heads):
    """convert_llama_weights_to_hf.py's permute, row by row: HF's row c*hd/2 + i of a head holds Meta's
    row 2i + c (the pair (2i, 2i+1) that Meta rotates together becomes HF's i and i + hd/2)."""
    hd = w.shape[0] // heads
    return w[[h * hd + 2 * i + c for h in range(heads) for c in (0, 1) for i in range(hd // 2)]]


def hand_tensors(m):
    """The state dict under HF's names, q and k permuted, no lm_head when tied."""
    a, sd = m.args, m.state_dict()
    out = {"model.embed_tokens.weight": sd["tok_embeddings.weight"], "model.norm.weight": sd["norm.weight"]}
    if m.output.weight is not m.tok_embeddings.weight:
        out["lm_head.weight"] = sd["output.weight"]
    names = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
             "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
             "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj", "feed_forward.w3": "mlp.up_proj",
             "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    heads = {"attention.wq": a.n_heads, "attention.wk": a.n_kv_heads or a.n_heads}
    for i in range(a.n_layers):
        for meta, name in names.items():
            w = sd[f"layers.{i}.{meta}.weight"]
            out[f"model.layers.{i}.{name}.weight"] = (hand_permute(w, heads[meta]) if meta in heads else w).contiguous()
    return out


def hand_config(args, style="4.x", tied=False):
    c = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": args.dim,
         "intermediate_size": model.ffn_hidden_dim(args), "num_hidden_layers": args.n_layers,
         "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_kv_heads or args.n_heads,
         "hidden_act": "silu", "rms_norm_eps": args.norm_eps, "vocab_size": args.vocab_size,
         "max_position_embeddings": 131072, "tie_word_embeddings": tied, "attention_bias": False, "mlp_bias": False,
         "bos_token_id": 1, "eos_token_id": 2, "initializer_range": 0.02, "use_cache": True, "pretraining_tp": 1}
    scaling = LLAMA3_SCALING if args.use_scaled_rope else None
    if style == "4.x":
        return c | {"rope_theta": args.rope_theta, "rope_scaling": scaling, "torch_dtype": "float32",
                    "transformers_version": "4.45.0"}
    return c | {"rope_parameters": {**(scaling or {"rope_type": "default"}), "rope_theta": args.rope_theta},
                "dtype": "float32", "head_dim": args.dim // args.n_heads, "transformers_version": "5.0.0"}


def hand_folder(d, m, style="4.x", shards=1, tokenizer=None):
    """An HF folder written without hf.py: save_file of hand_tensors, a hand config, an index for shards."""
    d.mkdir(parents=True)
    tensors = hand_tensors(m)
    tied = "lm_head.weight" not in tensors
    (d / "config.json").write_text(json.dumps(hand_config(m.args, style, tied)))
    if shards == 1:
        save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    else:
        names = list(tensors)
        files = [f"model-{k + 1:05d}-of-{shards:05d}.safetensors" for k in range(shards)]
        weight_map = {name: files[j * shards // len(names)] for j, name in enumerate(names)}
        for f in files:
            save_file({n: tensors[n] for n in names if weight_map[n] == f}, d / f, metadata={"format": "pt"})
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if tokenizer is not None:
        write_hf_tokenizer(tokenizer, d)
    return d


# ---- HF's forward, from config.json and the safetensors alone ----

def hf_inv_freq(config, hd):
    """RoPE frequencies as transformers computes them, in fp32, with its llama3 branch (torch.where form)."""
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd)
    if rope.get("rope_type", rope.get("type")) != "llama3":
        return inv
    factor, lo, hi, old = (rope[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                              "original_max_position_embeddings"))
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old / lo, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    medium = (wavelen >= old / hi) & (wavelen <= old / lo)
    return torch.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)


def hf_reference_logits(folder, tokens, positions):
    """LlamaForCausalLM's forward in float64: q and k rotated by halves (rotate_half), K/V heads repeated
    for GQA (repeat_kv), RMSNorm in float, SwiGLU MLP, lm_head or the tied embedding."""
    config = json.loads((folder / "config.json").read_text())
    t = {k: v.double() for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}
    H, n_kv, eps = config["num_attention_heads"], config["num_key_value_heads"], config["rms_norm_eps"]
    hd = config.get("head_dim") or config["hidden_size"] // H
    # fp32 angles, as HF's rotary embedding (and Meta's) computes them: at position 8000 their rounding
    # alone moves the logits by 1e-4, whatever the weights' dtype
    angles = (positions.float()[:, None] * hf_inv_freq(config, hd)).double()  # (T, hd/2)
    cos, sin = torch.cat([angles.cos()] * 2, -1)[:, None], torch.cat([angles.sin()] * 2, -1)[:, None]
    rotate_half = lambda x: torch.cat([-x[..., hd // 2:], x[..., :hd // 2]], -1)  # noqa: E731
    rms = lambda x, w: w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))  # noqa: E731
    T = len(tokens)
    h = t["model.embed_tokens.weight"][tokens]
    for i in range(config["num_hidden_layers"]):
        p = lambda n: t[f"model.layers.{i}.{n}.weight"]  # noqa: E731
        x = rms(h, p("input_layernorm"))
        q, k, v = ((x @ p(f"self_attn.{n}_proj").T).view(T, -1, hd) for n in "qkv")
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k, v = k.repeat_interleave(H // n_kv, 1), v.repeat_interleave(H // n_kv, 1)
        s = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd)
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        h = h + torch.einsum("hqk,khd->qhd", s.softmax(-1), v).reshape(T, -1) @ p("self_attn.o_proj").T
        x = rms(h, p("post_attention_layernorm"))
        h = h + (F.silu(x @ p("mlp.gate_proj").T) * (x @ p("mlp.up_proj").T)) @ p("mlp.down_proj").T
    return rms(h, t["model.norm.weight"]) @ t.get("lm_head.weight", t["model.embed_tokens.weight"]).T


def logits(m, tokens, positions):
    with torch.no_grad():
        return m(tokens[None], positions=positions[None])[0]


TOKENS = torch.randint(0, ARGS.vocab_size, (24,), generator=torch.Generator().manual_seed(1))
POSITIONS = [torch.arange(24), torch.arange(8180, 8204)]  # the start, and past LLaMA-3.1's 8192


# ---- reading ----

@pytest.mark.parametrize("style, shards, tied, n_kv", [("4.x", 1, False, 2), ("5.x", 3, True, 2),
                                                        ("4.x", 2, True, 4), ("5.x", 1, False, 1)])
def test_load_hf_equals_load_meta_on_the_same_weights(tmp_path, style, shards, tied, n_kv):
    m = random_model(replace(ARGS, n_kv_heads=n_kv), tied=tied)
    meta = save_meta(m, tmp_path / "meta", dtype=torch.float32)
    folder = hand_folder(tmp_path / "hf", m, style, shards)
    a, b = hf.load_hf(folder), load_meta(meta)
    assert a.args.use_scaled_rope and a.args.rope_scaling_factor == 32.0 and a.args.rope_theta == 500000.0
    assert (a.output.weight is a.tok_embeddings.weight) == tied
    for k, v in b.state_dict().items():  # un-permuted bit for bit
        assert torch.equal(a.state_dict()[k], v), k
    for pos in POSITIONS:
        assert torch.equal(logits(a, TOKENS, pos), logits(b, TOKENS, pos))


@pytest.mark.parametrize("style", ["4.x", "5.x"])
def test_our_forward_equals_hfs_rotate_half_forward_at_every_position(tmp_path, style):
    m = random_model()
    folder = hand_folder(tmp_path / "hf", m, style)
    ours = hf.load_hf(folder)
    for pos in POSITIONS:
        want = hf_reference_logits(folder, TOKENS, pos)
        got = logits(ours, TOKENS, pos).double()
        assert want.std() > 0.5  # logits of order one: the tolerance below is a tight one
        assert (got - want).abs().max(-1).values.max() < 1e-4  # at each of the 24 positions
    # the check can tell: HF's rows taken as Meta's (no un-permuting) change every position after the first
    hf_rows = load_file(folder / "model.safetensors")
    unpermuted = Transformer(ARGS).eval()
    unpermuted.load_state_dict({**m.state_dict(), **{f"layers.{i}.attention.w{n}.weight":
                                                     hf_rows[f"model.layers.{i}.self_attn.{n}_proj.weight"]
                                                     for i in range(2) for n in "qk"}})
    want = hf_reference_logits(folder, TOKENS, POSITIONS[1])
    wrong = (logits(unpermuted, TOKENS, POSITIONS[1]).double() - want).abs()
    assert wrong[0].max() < 1e-4 and (wrong[1:].max(-1).values > 1e-2).all()


class CountingSlices:
    """safetensors.safe_open that counts the rows each get_slice read returns."""
    rows = {}

    def __init__(self, path, framework):
        self.f = REAL_SAFE_OPEN(path, framework=framework)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def keys(self):
        return self.f.keys()

    def get_slice(self, name):
        real, rows = self.f.get_slice(name), CountingSlices.rows

        class Slice:
            get_shape, get_dtype = real.get_shape, real.get_dtype

            def __getitem__(self, s):
                out = real[s]
                rows[name] = rows.get(name, 0) + out.shape[0]
                return out
        return Slice()


REAL_SAFE_OPEN = safetensors.safe_open


def test_each_read_takes_only_its_rows_in_metas_order(tmp_path, monkeypatch):
    m = random_model()  # 4 query heads, 2 KV heads of 16 rows
    folder = hand_folder(tmp_path / "hf", m, shards=2)
    monkeypatch.setattr(hf, "safe_open", CountingSlices)
    CountingSlices.rows.clear()
    _, weights, _ = checkpoint.hf_weights(folder)
    assert CountingSlices.rows == {}  # nothing read but the headers
    for key, name in (("layers.1.attention.wq.weight", "model.layers.1.self_attn.q_proj.weight"),
                      ("layers.0.attention.wk.weight", "model.layers.0.self_attn.k_proj.weight"),
                      ("layers.0.feed_forward.w2.weight", "model.layers.0.mlp.down_proj.weight")):
        full = m.state_dict()[key]
        n = full.shape[0]
        for start, end in ((0, n), (3, 21), (5, 6), (8, 8), (n - 7, n), (16, 32)):
            CountingSlices.rows.clear()
            assert torch.equal(weights[key].read(start, end), full[start:end]), (key, start, end)
            assert CountingSlices.rows.get(name, 0) == end - start


# ---- config.json ----

LLAMA32_1B = {"architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
              "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu",
              "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 8192,
              "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
              "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8, "pretraining_tp": 1,
              "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "rope_scaling": LLAMA3_SCALING,
              "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.45.0.dev0",
              "use_cache": True, "vocab_size": 128256}
# Meta's own params.json of Llama-3.2-1B, and the factor HF's config states (Meta's code assumes 8)
LLAMA32_1B_PARAMS = {"dim": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
                     "multiple_of": 256, "ffn_dim_multiplier": 1.5, "norm_eps": 1e-05, "rope_theta": 500000.0,
                     "use_scaled_rope": True, "rope_scaling_factor": 32.0}


def test_llama32_config_in_both_styles_gives_metas_params():
    v5 = {k: v for k, v in LLAMA32_1B.items() if k not in ("rope_theta", "rope_scaling", "torch_dtype")}
    v5 |= {"rope_parameters": {**LLAMA3_SCALING, "rope_theta": 500000.0}, "dtype": "bfloat16"}
    for config in (LLAMA32_1B, v5):
        args, tied = hf.config_args(config)
        assert tied and model.meta_params(args) == LLAMA32_1B_PARAMS
        assert args.max_seq_len == 131072 and args.rope_original_context == 8192


@pytest.mark.parametrize("dim, hidden, meta", [
    (4096, 11008, dict(multiple_of=256, ffn_dim_multiplier=None)),  # LLaMA-1/2-7B
    (8192, 28672, dict(multiple_of=4096, ffn_dim_multiplier=1.3)),  # LLaMA-2-70B, 3.x-70B
    (4096, 14336, dict(multiple_of=1024, ffn_dim_multiplier=1.3)),  # LLaMA-3-8B, Mistral-7B
    (16384, 53248, dict(multiple_of=4096, ffn_dim_multiplier=1.2)),  # LLaMA-3.1-405B
    (64, 192, dict(multiple_of=64, ffn_dim_multiplier=None)),
    (64, 200, dict(hidden_dim=200)),  # no rounding gives it
])
def test_ffn_width_as_metas_multiple_of_and_multiplier(dim, hidden, meta):
    assert hf.ffn_args(dim, hidden) == meta
    assert model.ffn_hidden_dim(ModelArgs(dim=dim, **meta)) == hidden


def test_head_dim_gqa_and_mistral_configs():
    base = {**LLAMA32_1B, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 4,
            "intermediate_size": 256, "head_dim": 16}
    args, _ = hf.config_args(base)
    assert args.n_kv_heads is None and args.head_dim is None and args.multiple_of == 256
    assert hf.config_args({**base, "head_dim": 32})[0].head_dim == 32
    assert hf.config_args({**base, "num_key_value_heads": 1})[0].n_kv_heads == 1
    mistral = {**base, "model_type": "mistral", "rope_scaling": None, "max_position_embeddings": 32768}
    assert hf.config_args({**mistral, "sliding_window": None})[0].rope_theta == 500000.0
    assert hf.config_args({**mistral, "sliding_window": 32768})[0].max_seq_len == 32768
    for bad in ({**mistral, "sliding_window": 4096}, mistral):  # Mistral-7B-v0.1; MistralConfig's default 4096
        with pytest.raises(CheckpointError, match="sliding_window"):
            hf.config_args(bad)


# ---- writing ----

@pytest.mark.parametrize("tied", [False, True])
def test_written_folder_is_the_hand_layout(tmp_path, tied):
    m = random_model(tied=tied)
    out = hf.save_hf(m, tmp_path / "hf", dtype=torch.float32)
    got, want = load_file(out / "model.safetensors"), hand_tensors(m)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    config, hand = json.loads((out / "config.json").read_text()), hand_config(m.args, "4.x", tied)
    for k in ("architectures", "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "hidden_act", "rms_norm_eps", "vocab_size",
              "max_position_embeddings", "tie_word_embeddings", "attention_bias", "mlp_bias", "rope_theta",
              "rope_scaling"):
        assert config[k] == hand[k], k
    assert config["torch_dtype"] == "float32" and config["head_dim"] == 16
    for pos in POSITIONS:
        assert (logits(m, TOKENS, pos).double() - hf_reference_logits(out, TOKENS, pos)).abs().max() < 1e-4


def test_shards_and_index(tmp_path):
    m = random_model()
    out = hf.write_hf(m.state_dict(), m.args, tmp_path / "hf", max_shard_bytes=70_000)  # w1, w3: 65,536 bytes
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[-1] == f"model-{len(files):05d}-of-{len(files):05d}.safetensors"
    assert not (out / "model.safetensors").exists()
    per_file = [load_file(out / f) for f in files]
    assert all(sum(v.numel() * 4 for v in shard.values()) <= 70_000 for shard in per_file)
    tensors = {k: v for shard in per_file for k, v in shard.items()}
    assert {k: index["weight_map"][k] for k in tensors} == index["weight_map"]
    assert index["metadata"]["total_size"] == sum(v.numel() * 4 for v in tensors.values())
    assert all(torch.equal(tensors[k], v) for k, v in hand_tensors(m).items())
    assert torch.equal(logits(hf.load_hf(out), TOKENS, POSITIONS[1]), logits(m, TOKENS, POSITIONS[1]))


def test_a_write_that_fails_leaves_the_old_folder_whole(tmp_path, monkeypatch):
    out = hf.save_hf(random_model(), tmp_path / "hf", dtype=torch.float32)
    before = {f.name: f.read_bytes() for f in out.iterdir()}

    def crash(path, tensors):
        path.write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(hf, "write_safetensors", crash)
    with pytest.raises(KeyboardInterrupt):
        hf.save_hf(random_model(seed=1), out, dtype=torch.float32)
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    assert [f.name for f in tmp_path.iterdir()] == ["hf"]  # no temporary folder left behind


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory):
    return builtin_data.builtin_tokenizer(tmp_path_factory.mktemp("sp") / "tokenizer.model", vocab_size=400)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_meta_to_hf_to_meta_is_bit_exact(tmp_path, sp_tok, dtype):
    m = random_model(replace(ARGS, vocab_size=sp_tok.n_words))
    meta = save_meta(m, tmp_path / "meta", tokenizer_path=sp_tok.path, dtype=dtype)
    params = json.loads((meta / "params.json").read_text())
    assert params["rope_scaling_factor"] == 32.0  # a number Meta's own code does not know, kept
    r = call(hf.main, "to-hf", meta, tmp_path / "hf")
    assert r.returncode == 0, r.stderr
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["rope_scaling"] == LLAMA3_SCALING and config["torch_dtype"] == str(dtype)[6:]
    assert load_file(tmp_path / "hf" / "model.safetensors")["model.norm.weight"].dtype == dtype
    r = call(hf.main, "to-meta", tmp_path / "hf", tmp_path / "back")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "back" / "params.json").read_text()) == params
    a, b = (torch.load(d / "consolidated.00.pth", weights_only=True) for d in (meta, tmp_path / "back"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    back_tok = Tokenizer(model.find_tokenizer(tmp_path / "back"))  # tokenizer.json, as the HF folder has it
    assert back_tok.kind == "hf" and back_tok.stop_ids == sp_tok.stop_ids
    for text in ("Hello  world", " Give three tips.\n"):
        assert back_tok.encode(text) == sp_tok.encode(text)


def chatml_tokenizer_json(folder):
    """A byte-level BPE with ChatML's tokens (SmolLM2's layout): its EOS, <|im_end|>, is only in its config."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf_tok = HFTokenizer(models.BPE())
    hf_tok.pre_tokenizer, hf_tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf_tok.train_from_iterator(TEXTS * 5, trainer)
    hf_tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                                                              "add_bos_token": False}))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    return Tokenizer(folder / "tokenizer.json")


def test_to_meta_keeps_a_tokenizer_json_with_its_config_files(tmp_path):
    # Read alone, this tokenizer.json would end answers at <|endoftext|> (0), not <|im_end|> (2)
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    tok = chatml_tokenizer_json(tok_dir)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.stop_ids) == (None, 2, 0, [2, 0])
    m = random_model(replace(ARGS, vocab_size=tok.n_words), tied=True)
    folder = hand_folder(tmp_path / "hf", m, "5.x")
    for f in tok_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    r = call(hf.main, "to-meta", folder, tmp_path / "meta")
    assert r.returncode == 0, r.stderr
    back = Tokenizer(model.find_tokenizer(tmp_path / "meta"))
    assert back.path.name == "tokenizer.json"
    assert (back.bos_id, back.eos_id, back.pad_id, back.stop_ids) == (None, 2, 0, [2, 0])
    meta = load_meta(tmp_path / "meta")  # tied: one tensor under both of Meta's names
    assert meta.output.weight is meta.tok_embeddings.weight
    assert torch.equal(logits(meta, TOKENS, POSITIONS[1]), logits(m, TOKENS, POSITIONS[1]))


def test_sample_reads_hf_folders_as_meta_ones(tmp_path, sp_tok):
    m = random_model(replace(ARGS, vocab_size=sp_tok.n_words))
    meta = save_meta(m, tmp_path / "meta", tokenizer_path=sp_tok.path, dtype=torch.float32)
    folder = hf.save_hf(m, tmp_path / "hf", tokenizer_path=sp_tok.path, dtype=torch.float32)
    r = call(sample.main, "--ckpt", folder, "--prompt", "Hello", "--max-new-tokens", 4, "--device", "cpu",
             "--dtype", "fp32", "--template", "alpaca")
    assert r.returncode == 0 and r.stdout.strip(), r.stderr
    # the same greedy ids from both folders (their texts may differ: a tokenizer.json decodes a broken
    # UTF-8 byte run with one U+FFFD per byte, SentencePiece with one per run)
    answers = []
    for d in (meta, folder):
        model, tok = sample.load(d, torch.float32, "cpu")
        prompt = data.prompt_ids([{"role": "user", "content": "Hello"}], tok, "alpaca")
        answers.append(sample.generate(model, [prompt], [8], repetition_penalty=1.0, eos_id=tok.stop_ids))
    assert answers[0] == answers[1] and len(answers[0][0]) > 0


# ---- transformers itself ----

def write_bpe(path, text, vocab_size=384):
    """A tiny LLaMA-3-format tokenizer.model: tiktoken's own (pure Python) trainer, Meta's regex."""
    from tiktoken._educational import bpe_train

    ranks = bpe_train(text, vocab_size, PAT_STR, visualise=None)
    by_rank = sorted(ranks.items(), key=lambda x: x[1])
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in by_rank))
    return path


TEXTS = ["Hello world", "Give three tips for staying healthy.", "a  b   c\n\n  indented", "What is 2+2? It is 4."]


def assert_transformers_agrees(folder, m, tok):
    """AutoModelForCausalLM's logits (fp32) and AutoTokenizer's ids, against ours."""
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    x = torch.randint(0, m.args.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    for start in (0, 8185):
        pos = torch.arange(start, start + 20).expand(2, 20)
        with torch.no_grad():
            assert (theirs(x, position_ids=pos).logits - m(x, positions=pos)).abs().max() < 1e-4
    auto = transformers.AutoTokenizer.from_pretrained(folder)
    for text in TEXTS:
        assert auto(text).input_ids == tok.encode(text), text
    gen = transformers.GenerationConfig.from_pretrained(folder)
    assert gen.eos_token_id == tok.stop_ids


@pytest.mark.parametrize("kind", ["sentencepiece", "tiktoken"])
def test_transformers_reads_written_folders(tmp_path, sp_tok, kind):
    pytest.importorskip("transformers")
    if kind == "tiktoken":
        text = " ".join(TEXTS) + " " + " ".join(r[0]["content"] for r in builtin_data.builtin_records(seed=0, n=40))
        tok = Tokenizer(write_bpe(tmp_path / "tokenizer.model", text))
    else:
        tok = sp_tok
    m = random_model(replace(ARGS, vocab_size=tok.n_words), tied=kind == "tiktoken")
    folder = hf.save_hf(m, tmp_path / "hf", tokenizer_path=tok.path, dtype=torch.float32)
    assert_transformers_agrees(folder, m, tok)


# ---- one-line errors that name the file ----

def one_line(fn, *args):
    with pytest.raises(CheckpointError) as e:
        fn(*args)
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("change, key", [
    ({"attention_bias": True}, "attention_bias"), ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"), ({"model_type": "qwen2"}, "model_type"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling.rope_type"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling.rope_type"),
    ({"rope_scaling": None, "rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, "rope_parameters.rope_type"),
    ({"rope_scaling": {**LLAMA3_SCALING, "attention_factor": 0.5}}, "rope_scaling.attention_factor"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"), ({"num_local_experts": 8}, "num_local_experts"),
    ({"quantization_config": {"quant_method": "gptq", "bits": 4}}, "quantization_config"),
    ({"vision_config": {"hidden_size": 32}}, "vision_config"), ({"auto_map": {"AutoModel": "x.Y"}}, "auto_map"),
    ({"hidden_size": "64"}, "hidden_size"),
])
def test_config_that_changes_the_math_is_refused(tmp_path, change, key):
    folder = hand_folder(tmp_path / "hf", random_model())
    (folder / "config.json").write_text(json.dumps({**hand_config(ARGS), **change}))
    msg = one_line(hf.load_hf, folder)
    assert str(folder / "config.json") in msg and f'"{key}"' in msg


def test_broken_folders_are_one_line_naming_the_file(tmp_path, sp_tok):
    m = random_model(replace(ARGS, vocab_size=sp_tok.n_words))
    folder = hand_folder(tmp_path / "hf", m, shards=2, tokenizer=sp_tok)
    index = folder / "model.safetensors.index.json"
    (folder / "model-00002-of-00002.safetensors").rename(tmp_path / "away")  # a shard missing
    assert str(folder / "model-00002-of-00002.safetensors") in one_line(hf.load_hf, folder)
    (tmp_path / "away").rename(folder / "model-00002-of-00002.safetensors")
    good = index.read_text()
    wm = json.loads(good)
    wm["weight_map"]["model.norm.weight"] = "model-00003-of-00002.safetensors"  # the index names a missing file
    index.write_text(json.dumps(wm))
    assert str(folder / "model-00003-of-00002.safetensors") in one_line(hf.load_hf, folder)
    index.write_text("{not json")
    assert str(index) in one_line(hf.load_hf, folder)
    index.write_text(good)
    config = folder / "config.json"
    config.write_text(json.dumps({**hand_config(m.args), "vocab_size": sp_tok.n_words + 1}))
    msg = one_line(hf.load_hf, folder)
    assert str(config) in msg and "vocab_size" in msg and f"{sp_tok.n_words} rows" in msg
    config.write_text("{")
    assert str(config) in one_line(hf.load_hf, folder)
    config.write_text(json.dumps(hand_config(m.args)))
    shard = folder / "model-00001-of-00002.safetensors"
    good_shard = shard.read_bytes()
    shard.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    assert str(shard) in one_line(hf.load_hf, folder)
    shard.write_bytes(good_shard)
    config.write_text(json.dumps(hand_config(m.args)))
    hf.load_hf(folder)  # repaired: loads
    (folder / "tokenizer.json").write_text("not JSON")
    assert str(folder / "tokenizer.json") in one_line(hf.load_hf, folder)
    r = call(hf.main, "to-meta", folder, tmp_path / "out")
    assert r.returncode == 2 and str(folder / "tokenizer.json") in one_error_line(r.stderr, "hf.py")
    assert not (tmp_path / "out").exists()


def test_cli_checks_paths_first(tmp_path, sp_tok):
    m = random_model(replace(ARGS, vocab_size=sp_tok.n_words))
    meta = save_meta(m, tmp_path / "meta", tokenizer_path=sp_tok.path)
    keep = tmp_path / "notes"
    keep.mkdir()
    (keep / "todo.txt").write_text("mine")
    for args, what in ((("to-hf", meta, keep), "not a checkpoint folder"),
                       (("to-meta", meta, tmp_path / "o"), "not a Hugging Face folder"),
                       (("to-hf", tmp_path / "missing", tmp_path / "o"), "folder not found"),
                       (("to-hf", meta, meta), "OUT is the folder"), (("to-meta",), "required")):
        r = call(hf.main, *args)
        assert r.returncode == 2 and what in one_error_line(r.stderr, "hf.py"), (args, r.stderr)
    assert (keep / "todo.txt").read_text() == "mine" and not (tmp_path / "o").exists()


def test_non_finite_weights_are_not_written(tmp_path):
    m = random_model()
    state = dict(m.state_dict())
    state["layers.1.feed_forward.w3.weight"] = state["layers.1.feed_forward.w3.weight"].clone()
    state["layers.1.feed_forward.w3.weight"][3, 4] = float("nan")
    msg = one_line(hf.write_hf, state, m.args, tmp_path / "hf")
    assert "layers.1.feed_forward.w3.weight" in msg and not (tmp_path / "hf").exists()


# ---- train.py --init HF_DIR under torchrun, --export-hf, sample.py ----

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same LoRA run on 2 ranks from a Meta folder (uninterrupted) and from a hand-written HF folder
    of the same weights (killed after its first checkpoint, then resumed), both with --export-hf."""
    root = tmp_path_factory.mktemp("hf_runs")
    meta, tok, m = meta_folder(root)  # GQA: 4 heads over 2 KV heads
    folder = hand_folder(root / "hf_init", m, shards=2, tokenizer=tok)  # tokenizer.json + tokenizer.model
    flags = [*TINY, "--data", alpaca_file(root / "train.json", 48), "--max-steps", "8", "--batch-size", "8",
             "--micro-batch-size", "2", "--save-every", "2", "--lora-rank", "2", "--lora-dropout", "0.1",
             "--export-hf", "--export-dtype", "fp32"]
    run_train(["--init", meta, "--out", root / "ref", *flags], nproc=2)
    out = root / "resumed"
    kill_at_checkpoint(["train.py", "--init", folder, "--out", out, *flags], out, nproc=2)
    run_train(["--init", folder, "--out", out, "--resume", *flags], nproc=2)
    return root, m, tok


@pytest.mark.slow
def test_hf_init_killed_and_resumed_reproduces_the_meta_init_run(runs):
    root, _, _ = runs
    ref, out = root / "ref", root / "resumed"
    assert losses(out) == losses(ref) and [r["step"] for r in read_log(out)] == list(range(1, 9))
    a, b = (torch.load(d / "final" / "consolidated.00.pth", weights_only=True) for d in (ref, out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a, b = (load_file(d / "final_hf" / "model.safetensors") for d in (ref, out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # OUT/final keeps the HF folder's tokenizer.json with its config files, not a copy named tokenizer.model
    assert model.find_tokenizer(out / "final") == out / "final" / "tokenizer.json"
    assert (out / "final" / "tokenizer_config.json").is_file()


@pytest.mark.slow
def test_exported_hf_folder_is_the_trained_model(runs):
    root, _, tok = runs
    trained = load_meta(root / "ref" / "final")
    x = torch.randint(0, tok.n_words, (24,), generator=torch.Generator().manual_seed(2))
    for pos in POSITIONS:
        want = hf_reference_logits(root / "ref" / "final_hf", x, pos)
        assert (logits(trained, x, pos).double() - want).abs().max() < 1e-5 * max(1.0, want.abs().max().item())


@pytest.mark.slow
def test_transformers_reads_the_exported_folder(runs):
    root, _, tok = runs
    assert_transformers_agrees(root / "ref" / "final_hf", load_meta(root / "ref" / "final"), tok)


@pytest.mark.slow
def test_sample_gives_the_same_answer_from_final_and_final_hf(runs):
    root, _, _ = runs
    out = root / "resumed"  # both hold the HF folder's tokenizer.json
    answers = [call(sample.main, "--ckpt", out / d, "--prompt", "Add 3 and 4.", "--max-new-tokens", 8,
                    "--device", "cpu") for d in ("final", "final_hf")]
    assert all(r.returncode == 0 for r in answers), answers[0].stderr + answers[1].stderr
    assert answers[0].stdout == answers[1].stdout and answers[0].stdout.strip()
    # ref's final holds the SentencePiece file and final_hf the tokenizer.json written from it: the same
    # ids in and out. Their texts can differ where the ids are bytes that are not UTF-8 (as this barely
    # trained model's are): tokenizers' ByteFallback writes U+FFFD for each byte of such a run,
    # SentencePiece only for the bytes that break it.
    loaded = [sample.load(root / "ref" / d, torch.float32, "cpu") for d in ("final", "final_hf")]
    prompts = [tok.encode("Add 3 and 4.") for _, tok in loaded]
    assert prompts[0] == prompts[1] and [tok.stop_ids for _, tok in loaded] == [[2], [2]]
    ids = [sample.generate(m, prompts[:1], 12, repetition_penalty=1.2, eos_id=tok.stop_ids) for m, tok in loaded]
    assert ids[0] == ids[1] and ids[0][0]
