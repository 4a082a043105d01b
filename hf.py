"""Hugging Face LLaMA folders (config.json + safetensors) in and out; Meta's layout stays the native one.

    python hf.py to-meta Llama-3.2-1B/ llama-3.2-1b/    # an HF folder -> params.json + consolidated.00.pth
    python hf.py to-hf out/final out/final_hf          # Meta's layout -> what transformers and vLLM read

hf_tensors indexes a folder without reading it (checkpoint.hf_weights then reads each rank's rows),
load_hf builds the model (sample.py --ckpt), write_hf and save_hf write one (train.py --export-hf).
The trap is RoPE: Meta rotates interleaved feature pairs (2i, 2i+1) of each head, HF rotates halves
(i, i + head_dim/2), so HF's files hold the rows of wq and wk permuted within each head.
"""
import ctypes
import json
import math
import re
import struct
import sys
from functools import partial
from pathlib import Path

import torch
from safetensors import safe_open

import model as llama
from chat_template import folder_template, record, token_strings
from checks import (
    ArgumentParser,
    CheckpointError,
    UserError,
    atomic,
    check_replace,
    config_value,
    read_json,
    run_main,
    writable_folder,
)
from tokenizer import Tokenizer, read_config

LAYER_NAMES = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
               "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
               "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj", "feed_forward.w3": "mlp.up_proj",
               "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
TOP_NAMES = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}
LAYER_META = {v: k for k, v in LAYER_NAMES.items()}
TOP_META = {f"{v}.weight": f"{k}.weight" for k, v in TOP_NAMES.items()}
# Meta's released (multiple_of, ffn_dim_multiplier), ordered so that each model's own pair is the first to
# give its FFN width: LLaMA-1/2 7B-65B, 3.2-1B, 2-70B and 3.x-70B, 3-8B (and Mistral-7B), 3.1-405B
FFN_CHOICES = [(256, None), (256, 1.5), (4096, 1.3), (1024, 1.3), (4096, 1.2)]
FFN_CHOICES += [(2**k, None) for k in range(12, 2, -1)]  # then the largest power of two that rounds to it
LLAMA3_SCALING = {"factor": "rope_scaling_factor", "low_freq_factor": "rope_low_freq_factor",
                  "high_freq_factor": "rope_high_freq_factor"}  # and original_max_position_embeddings
# LlamaForCausalLM reads no other config key, so transformers computes any such file as LLaMA; these keys
# say the weights are something else (quantized, MoE, multimodal, custom code): refused when set
FOREIGN = ("quantization_config", "auto_map", "num_local_experts", "num_experts", "num_experts_per_tok",
           "n_routed_experts", "moe_intermediate_size", "vision_config", "text_config", "layer_types")
# What transformers assumes where a config leaves these out (LlamaConfig's and MistralConfig's defaults)
DEFAULTS = {"llama": dict(max_position_embeddings=2048, num_key_value_heads=None, sliding_window=None),
            "mistral": dict(max_position_embeddings=4096 * 32, num_key_value_heads=8, sliding_window=4096)}
LLAMA31_CONTEXT = 131072  # LLaMA-3.1/3.2 (scaled RoPE) were trained to 128K tokens, as HF's configs say
SHARD_BYTES = 5 * 10**9  # HF's default max_shard_size, "5GB"
DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def hf_name(key):
    stem, _, leaf = key.rpartition(".")
    if stem in TOP_NAMES:
        return f"{TOP_NAMES[stem]}.{leaf}"
    _, i, rest = stem.split(".", 2)  # layers.N.attention.wq
    return f"model.layers.{i}.{LAYER_NAMES[rest]}.{leaf}"


def meta_name(name):
    """HF's tensor name -> Meta's key; an unknown name is kept, for check_weights to report."""
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", name)
    if m and m[2] in LAYER_META:
        return f"layers.{m[1]}.{LAYER_META[m[2]]}.weight"
    return TOP_META.get(name, name)


def to_meta_order(w, heads):
    """Rows of HF's wq/wk, (heads, 2, head_dim/2) in each head, as Meta's interleaved (heads, head_dim/2, 2)."""
    return w.unflatten(0, (heads, 2, -1)).transpose(1, 2).flatten(0, 2)


def to_hf_order(w, heads):
    """The inverse, convert_llama_weights_to_hf.py's permute, as a (heads, 2, head_dim/2, ...) view."""
    return w.unflatten(0, (heads, -1, 2)).transpose(1, 2)


def heads_of(key, args):
    """How many heads' rows the weight's RoPE permutation runs over: None for all but wq and wk."""
    return {"wq": args.n_heads, "wk": args.n_kv_heads or args.n_heads}.get(key.split(".")[-2])


# ----------------------------------------------------------------------------- config.json -> ModelArgs

def refuse(path, key, value):
    raise CheckpointError(f'{path}: "{key}": {value!r} changes the model and is not implemented here')


def rope_args(config, path, max_pos):
    """rope_theta and LLaMA-3.1's frequency scaling, from transformers 4.x's keys (rope_theta, rope_scaling)
    or 5.x's (rope_parameters); a file with both is read as transformers 5 reads it, rope_scaling first."""
    key = "rope_scaling" if config.get("rope_scaling") else "rope_parameters"
    rope = config.get(key) or {}
    if not isinstance(rope, dict):
        refuse(path, key, rope)
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "llama3"):  # linear, dynamic, yarn, longrope, ...: other frequencies
        refuse(path, f"{key}.rope_type", kind)
    llama3_keys = {*LLAMA3_SCALING, "original_max_position_embeddings"} if kind == "llama3" else set()
    for k in sorted(set(rope) - {"rope_type", "type", "rope_theta", "partial_rotary_factor"} - llama3_keys):
        refuse(path, f"{key}.{k}", rope[k])  # attention_factor, beta_fast, mrope_section, ...
    partial = rope.get("partial_rotary_factor", config.get("partial_rotary_factor"))
    if partial not in (None, 1):  # RoPE on only part of each head
        refuse(path, "partial_rotary_factor", partial)
    theta = float(config_value(rope, "rope_theta", path, float, config.get("rope_theta", 10000.0)))
    if kind == "default":
        return dict(rope_theta=theta)
    rope = {"original_max_position_embeddings": max_pos, **rope}  # transformers 5's default, where missing
    scaling = {f: float(config_value(rope, k, path, float)) for k, f in LLAMA3_SCALING.items()}
    scaling["rope_original_context"] = config_value(rope, "original_max_position_embeddings", path, int)
    return dict(rope_theta=theta, use_scaled_rope=True, **scaling)


def ffn_args(dim, hidden):
    """Meta's multiple_of / ffn_dim_multiplier if a natural pair gives `hidden` exactly, else hidden_dim."""
    for multiple_of, mult in FFN_CHOICES:
        if llama.ffn_hidden_dim(llama.ModelArgs(dim=dim, multiple_of=multiple_of, ffn_dim_multiplier=mult)) == hidden:
            return dict(multiple_of=multiple_of, ffn_dim_multiplier=mult)
    return dict(hidden_dim=hidden)


def config_args(config, path="config.json"):
    """config.json's dict -> (ModelArgs, tied), or a one-line CheckpointError naming the key and file."""
    model_type = config.get("model_type")
    if model_type not in DEFAULTS:
        refuse(path, "model_type", model_type)
    for key in FOREIGN:
        if config.get(key) not in (None, False):
            refuse(path, key, config[key])
    for key, want in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False), ("attention_dropout", 0)):
        if config.get(key, want) != want:
            refuse(path, key, config[key])
    default = DEFAULTS[model_type]
    dim = config_value(config, "hidden_size", path, int)
    n_heads = config_value(config, "num_attention_heads", path, int)
    n_kv = config_value(config, "num_key_value_heads", path, int, default["num_key_value_heads"] or n_heads)
    head_dim = config_value(config, "head_dim", path, int, dim // n_heads)
    max_pos = config_value(config, "max_position_embeddings", path, int, default["max_position_embeddings"])
    # Mistral's sliding window masks keys further back than it: the same model only where no position the
    # config allows reaches that far. A run's own --max-len is not known here, so max_position_embeddings
    # is what the window is checked against. (LlamaForCausalLM reads no sliding_window.)
    window = config.get("sliding_window", default["sliding_window"]) if model_type == "mistral" else None
    if window is not None and (not isinstance(window, int) or window < max_pos):
        refuse(path, "sliding_window", window)
    if n_heads % n_kv or head_dim % 2:
        raise CheckpointError(f"{path}: {n_heads} heads over {n_kv} KV heads of size {head_dim}: not LLaMA's attention")
    args = llama.ModelArgs(
        dim=dim, n_layers=config_value(config, "num_hidden_layers", path, int), n_heads=n_heads,
        n_kv_heads=None if n_kv == n_heads else n_kv, vocab_size=config_value(config, "vocab_size", path, int),
        norm_eps=float(config_value(config, "rms_norm_eps", path, float, 1e-6)), max_seq_len=max_pos,
        head_dim=None if head_dim == dim // n_heads else head_dim,
        **ffn_args(dim, config_value(config, "intermediate_size", path, int)), **rope_args(config, path, max_pos))
    return args, config_value(config, "tie_word_embeddings", path, bool, False)


# ----------------------------------------------------------------------------- reading

def open_safetensors(path):
    """The file memory-mapped by safetensors (nothing read but its header), or a one-line error."""
    try:
        return safe_open(path, framework="pt")
    except Exception as e:  # noqa: BLE001 (SafetensorError, OSError: the message says which)
        raise CheckpointError(f"{path}: not a safetensors file ({str(e).splitlines()[0]})") from None


def weight_files(folder):
    """{tensor name: file}: model.safetensors's own names, or the weight_map of model.safetensors.index.json."""
    index_path, single = folder / "model.safetensors.index.json", folder / "model.safetensors"
    if index_path.is_file():
        weight_map = read_json(index_path, CheckpointError, expect=dict).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise CheckpointError(f'{index_path}: no "weight_map" of tensor names to file names')
        for name in sorted(set(weight_map.values())):
            if not (folder / name).is_file():
                raise CheckpointError(f"{folder / name}: missing (named by {index_path.name})")
        return {k: folder / f for k, f in weight_map.items()}
    if single.is_file():
        return {k: single for k in open_safetensors(single).keys()}
    bins = "; pytorch_model*.bin files are not read" if any(folder.glob("pytorch_model*.bin")) else ""
    raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json{bins}")


def hf_tensors(folder):
    """An HF folder -> (ModelArgs, {Meta's key: (safetensors slice, heads)}, tied, source), checked
    against config.json with nothing read but the files' headers. heads: the head count of a wq or wk
    whose rows HF permuted (to_meta_order undoes it), else None."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{config_path}: not found")
    args, tied = config_args(read_json(config_path, CheckpointError, expect=dict), config_path)
    files = weight_files(folder)
    handles = {p: open_safetensors(p) for p in sorted(set(files.values()))}
    tensors = {}
    for name, path in files.items():
        key = meta_name(name)
        if name.endswith("rotary_emb.inv_freq") or key == "output.weight" and tied:
            continue  # a RoPE table older transformers saved; an lm_head that transformers replaces when tied
        if name not in handles[path].keys():
            raise CheckpointError(f"{path}: has no tensor {name} (the index says it does)")
        sl = handles[path].get_slice(name)
        if sl.get_dtype() not in DTYPES.values():
            raise CheckpointError(f"{path}: {name} is {sl.get_dtype()}, not a bf16, fp16 or fp32 weight")
        tensors[key] = (sl, heads_of(key, args))
    emb = tensors.get("tok_embeddings.weight")
    if emb is not None and emb[0].get_shape()[0] != args.vocab_size:
        raise CheckpointError(f"{config_path}: vocab_size is {args.vocab_size} but the embedding in "
                              f"{files['model.embed_tokens.weight']} has {emb[0].get_shape()[0]} rows")
    return args, tensors, tied, f"{folder} ({len(handles)} file(s))"


def load_hf(folder, dtype=None, device="cpu"):
    """An HF folder -> Transformer in eval mode, its tokenizer's size checked against the embedding."""
    args, tensors, tied, source = hf_tensors(folder)
    state = {k: sl[:] if heads is None else to_meta_order(sl[:], heads) for k, (sl, heads) in tensors.items()}
    return llama.build(args, state, tied, dtype, device, tok_dir=folder, source=source, config="config.json")


def is_hf_folder(folder):
    """A Hugging Face folder (config.json, safetensors) rather than Meta's (params.json)."""
    return (Path(folder) / "config.json").is_file() and not (Path(folder) / "params.json").is_file()


def load_any(folder, dtype=None, device="cpu"):
    """A Meta folder (params.json) or an HF one (config.json) -> Transformer: what sample.py --ckpt takes."""
    return (load_hf if is_hf_folder(folder) else llama.load_meta)(folder, dtype=dtype, device=device)


# ----------------------------------------------------------------------------- writing

def config_bos_id(tok):
    """config.json's bos_token_id: the BOS the tokenizer adds, else the one its tokenizer_config.json names
    without adding it (SmolLM2's <|im_start|>, 1), as the source folder's config.json says."""
    if tok is None or tok.bos_id is not None or tok.kind != "hf":
        return None if tok is None else tok.bos_id
    return tok.hf.token_to_id(token_strings(tok.path.parent).get("bos_token", ""))


def hf_config(args, tied, dtype, tok):
    config = dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=args.dim,
        intermediate_size=llama.ffn_hidden_dim(args), num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads or args.n_heads,
        head_dim=args.head_dim or args.dim // args.n_heads, hidden_act="silu", rms_norm_eps=args.norm_eps,
        rope_theta=args.rope_theta, rope_scaling=None, vocab_size=args.vocab_size,
        # Meta's params.json holds no context length: the run's, or LLaMA-3.1's for scaled RoPE
        max_position_embeddings=max(args.max_seq_len, LLAMA31_CONTEXT if args.use_scaled_rope else 0),
        tie_word_embeddings=tied, bos_token_id=config_bos_id(tok), eos_token_id=tok.eos_id if tok else None,
        pad_token_id=tok.pad_id if tok else None, torch_dtype=str(dtype).removeprefix("torch."),
        attention_bias=False, mlp_bias=False)
    if args.use_scaled_rope:  # transformers 4.x's keys, which 5.x reads too
        config["rope_scaling"] = {"rope_type": "llama3", **{k: getattr(args, f) for k, f in LLAMA3_SCALING.items()},
                                  "original_max_position_embeddings": args.rope_original_context}
    return config


def converted(w, heads, dtype):
    """One weight in HF's layout and dtype: at most one new tensor, permuted and cast in one copy."""
    w = w.detach().cpu()
    if heads is None and w.dtype == dtype and w.is_contiguous():
        return w
    src = w if heads is None else to_hf_order(w, heads)
    out = torch.empty(w.shape, dtype=dtype)
    out.view(src.shape).copy_(src)
    return out


def write_safetensors(path, tensors):
    """[(name, shape, dtype, make)] -> a safetensors file, each tensor made just before its bytes are
    written (safetensors.torch.save_file holds every byte of the file at once). The format: the header's
    length in 8 bytes, the JSON header, then the tensors packed in the header's order."""
    tensors = sorted(tensors, key=lambda t: -t[2].itemsize)  # wider dtypes first: every tensor stays aligned
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, dtype, _ in tensors:
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # padded with spaces to 8 bytes, as safetensors pads its own
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for *_, make in tensors:
            t = make()
            if t.numel():
                f.write((ctypes.c_char * t.nbytes).from_address(t.data_ptr()))  # the tensor's bytes, not a copy


def write_json(path, obj):
    path.write_text(json.dumps(obj, indent=2) + "\n")


def write_hf(state, args, out_dir, tokenizer_path=None, dtype=None, max_shard_bytes=SHARD_BYTES, template=None):
    """Meta's keys (tied: no output.weight, or the embedding tensor itself) -> an HF folder: config.json,
    model.safetensors (or shards of at most max_shard_bytes with model.safetensors.index.json),
    generation_config.json, the tokenizer and the record of the chat template trained with
    (chat_template.record), written into a temporary folder renamed into place."""
    out_dir = Path(out_dir)
    check_replace(out_dir, "config.json")
    tied = state.get("output.weight") is None or state["output.weight"] is state["tok_embeddings.weight"]
    shapes = {k: v.shape for k, v in state.items() if not (k == "output.weight" and tied)}
    llama.check_shapes(args, shapes, tied, "the weights to write", config="their ModelArgs")
    for key, v in state.items():
        if not torch.isfinite(v).all():
            raise CheckpointError(f"{key}: non-finite values; {out_dir} not written")
    tok = Tokenizer(tokenizer_path) if tokenizer_path is not None else None
    dtype = dtype or state["tok_embeddings.weight"].dtype
    shards, size = [[]], 0
    for key in shapes:
        shape, n = state[key].shape, state[key].numel() * dtype.itemsize
        if shards[-1] and size + n > max_shard_bytes:
            shards, size = shards + [[]], 0
        size += n
        shards[-1].append((hf_name(key), shape, dtype, partial(converted, state[key], heads_of(key, args), dtype)))
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    with atomic(out_dir, folder=True, marker="config.json") as tmp:
        for name, shard in zip(names, shards):
            write_safetensors(tmp / name, shard)
        if n > 1:
            weight_map = {t[0]: name for name, shard in zip(names, shards) for t in shard}
            total = sum(math.prod(t[1]) * dtype.itemsize for shard in shards for t in shard)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            write_json(tmp / "model.safetensors.index.json", index)
        write_json(tmp / "config.json", hf_config(args, tied, dtype, tok))
        if tok is not None:
            from hf_tokenizer import write_hf_tokenizer  # imports `tokenizers`: only an export needs it here
            write_hf_tokenizer(tok, tmp)  # with the source's generation_config.json, if it has one: kept, and
            # every stop id as an EOS: transformers' generate then ends an answer where sample.py does
            gen = read_config(tmp / "generation_config.json")
            write_json(tmp / "generation_config.json", gen | {"bos_token_id": config_bos_id(tok),
                                                              "eos_token_id": tok.stop_ids, "pad_token_id": tok.pad_id})
        if template is not None:
            record(tmp, template)
    return out_dir


def save_hf(model, out_dir, tokenizer_path=None, dtype=torch.bfloat16, template=None):
    """A Transformer as an HF folder, each weight cast to dtype as it is written."""
    return write_hf(llama.model_state(model), model.args, out_dir, tokenizer_path, dtype, template=template)


# ----------------------------------------------------------------------------- the command line

def to_meta(src, out):
    if not is_hf_folder(src):
        raise UserError(f"{src}: not a Hugging Face folder (no config.json, or a params.json beside it)")
    check_replace(out, "params.json")
    # the tokenizer our scripts read there: tokenizer.json (with the files that set its special ids)
    # where there is one, so the Meta folder tokenizes as the HF one did
    tok_path = llama.find_tokenizer(src, required=True)
    template = folder_template(src)
    llama.save_meta(load_hf(src), out, tokenizer_path=tok_path, dtype=None,  # each weight in its own dtype
                    extra=lambda folder: record(folder, template))


def to_hf(src, out):
    if not (src / "params.json").is_file():
        raise UserError(f"{src}: not a Meta folder (no params.json)")
    check_replace(out, "config.json")
    tok_path = llama.find_tokenizer(src, required=True)
    save_hf(llama.load_meta(src), out, tokenizer_path=tok_path, dtype=None,  # every weight in the embedding's dtype
            template=folder_template(src))


def run(argv):
    p = ArgumentParser(prog="hf.py", description="Convert a LLaMA folder between Meta's layout and Hugging Face's.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, src, what in (("to-meta", "HF_DIR", "an HF folder (config.json, safetensors) to Meta's layout"),
                            ("to-hf", "META_DIR", "a Meta folder (params.json, consolidated.NN.pth) to HF's")):
        s = sub.add_parser(name, help=what, description=what)
        s.add_argument("src", metavar=src)
        s.add_argument("out", metavar="OUT", help="the folder to write (an existing checkpoint there is replaced)")
    a = p.parse_args(argv)
    src, out = Path(a.src), Path(a.out)
    if not src.is_dir():
        raise UserError(f"{src}: folder not found")
    writable_folder("OUT", out)
    if out.resolve() == src.resolve():
        raise UserError(f"{out}: OUT is the folder being converted")
    (to_meta if a.command == "to-meta" else to_hf)(src, out)
    print(f"wrote {out}")


def main(argv=None):
    return run_main("hf.py", run, argv)


if __name__ == "__main__":
    sys.exit(main())
