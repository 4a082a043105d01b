"""LLaMA-3.x: tiktoken tokenizer, scaled RoPE, tied output, the llama3-chat template, stop tokens,
chunked loss, and train.py --init / sample.py on a small random LLaMA-3.1-style Meta folder."""
import base64
import json
import math
import os
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import builtin_data
import data
import sample
import train
from model import CheckpointError, ModelArgs, Transformer, load_meta, save_meta
from tokenizer import PAT_STR, SPECIAL_TOKENS, Tokenizer, find_tokenizer

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
IGNORE = data.IGNORE


def write_bpe(path, text, vocab_size=384):
    """A tiny LLaMA-3-format tokenizer.model: tiktoken's own (pure Python) BPE trainer, Meta's regex."""
    from tiktoken._educational import bpe_train

    ranks = bpe_train(text, vocab_size, PAT_STR, visualise=None)
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in sorted(ranks.items(),
                                                                                       key=lambda x: x[1])))
    return path


@pytest.fixture(scope="session")
def llama3(tmp_path_factory):
    """Meta's LLaMA-3.1 layout in miniature: tokenizer.model (tiktoken), params.json with
    use_scaled_rope and rope_theta 500000, GQA (n_kv_heads < n_heads), vocab = base + 256 specials."""
    root = tmp_path_factory.mktemp("llama3")
    records = builtin_data.builtin_records(seed=0, n=120)
    text = "\n".join(m["content"] + " " + m.get("input", "") for r in records for m in r)
    text += "\nsystem user assistant Be brief. Hello! Hi there. What is 2+2? It is 4. Say hi. Paris, France."
    tok = Tokenizer(write_bpe(root / "tokenizer.model", text))
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.n_words, multiple_of=32,
                     norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True)
    torch.manual_seed(0)
    model = Transformer(args).eval()
    ckpt = save_meta(model, root / "Llama3.1-tiny", tokenizer_path=root / "tokenizer.model", dtype=torch.float32)
    return ckpt, tok, model


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory):  # a LLaMA-1/2 SentencePiece tokenizer, named to mislead
    return builtin_data.builtin_tokenizer(tmp_path_factory.mktemp("sp") / "tiktoken.model", vocab_size=500)


# ---------------------------------------------------------------- tokenizer

def test_tokenizer_ids_follow_meta_layout(llama3):
    ckpt, tok, _ = llama3
    n_base = sum(1 for line in (ckpt / "tokenizer.model").read_text().splitlines() if line)
    assert tok.kind == "tiktoken" and tok.n_words == n_base + 256
    ids = {name: n_base + i for i, name in enumerate(SPECIAL_TOKENS)}
    assert SPECIAL_TOKENS[:12] == ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                                   "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
                                   "<|python_tag|>", "<|image|>"]
    assert SPECIAL_TOKENS[12] == "<|reserved_special_token_2|>"
    assert SPECIAL_TOKENS[-1] == "<|reserved_special_token_245|>"
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (n_base, n_base + 1, n_base + 4)
    assert tok.stop_ids == [n_base + 1, n_base + 8, n_base + 9] and tok.special_ids == ids
    text = "Héllo wörld 12345, don't PANIC!!\n\n  ok 🙂"
    body = tok.encode(text, bos=False)
    assert tok.encode(text, bos=True, eos=True) == [tok.bos_id] + body + [tok.eos_id]
    assert tok.decode(tok.encode(text, bos=True, eos=True)) == text  # control tokens decode to nothing
    assert all(i < n_base for i in body)


def test_pretokenizer_is_metas_regex(llama3):
    import regex

    _, tok, _ = llama3
    text = "I'LL pay 12345 dollars!!\n\n  ok"
    words = regex.findall(PAT_STR, text)
    # by hand from the pattern: case-insensitive contractions, digits in threes, trailing newlines
    # kept with punctuation, a run of spaces leaves its last space to the next word
    assert words == ["I", "'LL", " pay", " ", "123", "45", " dollars", "!!\n\n", " ", " ok"]
    # BPE never merges across those boundaries: the text's ids are its words' ids, concatenated
    assert tok.encode(text, bos=False) == [i for w in words for i in tok.encode(w, bos=False)]


def test_long_runs_are_cut_as_meta_does(llama3):
    _, tok, _ = llama3
    # Meta cuts a run of one kind (here a 60k-letter word) every 25k characters before tiktoken; a
    # 3-letter token repeated is then cut mid-token (25k = 3 x 8333 + 1), which changes the ids
    words = [w for w in (tok.decode([i]) for i in range(256, tok.n_base)) if w.isalpha() and len(w) == 3]
    changed = 0
    for w in words[:5]:
        text = "x " + w * 20_000 + " b"
        pieces = [text[:25_002], text[25_002:50_002], text[50_002:]]  # the word starts at 2
        ids = tok.encode(text, bos=False)
        assert ids == [i for p in pieces for i in tok.tiktoken.encode(p)] and tok.decode(ids) == text
        changed += ids != tok.tiktoken.encode(text)
    assert changed > 0


def test_special_token_text_is_plain_text(llama3):
    _, tok, _ = llama3
    for text in ("<|eot_id|>", "<|begin_of_text|>hi", "a <|start_header_id|>user<|end_header_id|> b"):
        ids = tok.encode(text, bos=False)
        assert not set(ids) & set(tok.special_ids.values()) and tok.decode(ids) == text
    # ...also inside a record: only the template's own control tokens are control tokens
    messages = [{"role": "user", "content": "Print <|eot_id|> please"},
                {"role": "assistant", "content": "<|eot_id|><|start_header_id|>"}]
    ids, labels, _ = data.tokenize(messages, tok, "llama3-chat")
    eot, sh = tok.special_ids["<|eot_id|>"], tok.special_ids["<|start_header_id|>"]
    assert ids.count(eot) == 2 and ids.count(sh) == 2  # one each per message
    answer = [i for i, label in zip(ids, labels) if label != IGNORE]
    assert tok.decode(answer) == "<|eot_id|><|start_header_id|>" and answer[-1] == eot


def test_format_detected_from_contents_and_bad_files(llama3, sp_tokenizer, tmp_path):
    ckpt, tok, _ = llama3
    odd = tmp_path / "vocab.bin"  # the name says nothing
    odd.write_bytes((ckpt / "tokenizer.model").read_bytes())
    assert Tokenizer(odd).kind == "tiktoken" and Tokenizer(odd).n_words == tok.n_words
    spm = sp_tokenizer
    assert spm.kind == "sentencepiece" and spm.stop_ids == [spm.eos_id] and spm.pad_id == 0
    for content, why in (("YQ== 0\nYg== 2\n", "ranks are not"), ("YQ== 0\nnot base64!! 1\n", "line 2")):
        bad = tmp_path / "bad.model"
        bad.write_text(content)
        with pytest.raises(CheckpointError, match=why) as e:
            Tokenizer(bad)
        assert str(bad) in str(e.value)


# ---------------------------------------------------------------- model

def scaled_inv_freq(head_dim, theta):
    """Meta's apply_scaling, written out per frequency from the formula (factor 8, low 1, high 4, 8192)."""
    out = []
    for i in range(0, head_dim, 2):
        f = theta ** (-i / head_dim)
        wavelen = 2 * math.pi / f
        if wavelen < 8192 / 4:
            out.append(f)
        elif wavelen > 8192 / 1:
            out.append(f / 8)
        else:
            s = (8192 / wavelen - 1) / (4 - 1)
            out.append((1 - s) * f / 8 + s * f)
    return torch.tensor(out, dtype=torch.float64)


def reference_logits(sd, a, tokens, positions, inv_freq):
    """LLaMA's forward from the formulas in float64, not calling model.py: RMSNorm, RoPE as complex
    rotation of feature pairs (2j, 2j+1), GQA, causal softmax attention, SwiGLU."""
    sd = {k: v.double() for k, v in sd.items()}
    hd, rep = a.dim // a.n_heads, a.n_heads // a.n_kv_heads
    rms = lambda x, w: x / torch.sqrt((x * x).mean(-1, keepdim=True) + a.norm_eps) * w
    rot = torch.polar(torch.ones(len(positions), hd // 2, dtype=torch.float64), positions.double()[:, None] * inv_freq)

    def rotary(x):  # (T, heads, hd)
        z = torch.view_as_complex(x.reshape(*x.shape[:-1], hd // 2, 2).contiguous()) * rot[:, None]
        return torch.view_as_real(z).flatten(-2)

    T = len(tokens)
    h = sd["tok_embeddings.weight"][tokens]
    for i in range(a.n_layers):
        p = lambda n: sd[f"layers.{i}.{n}.weight"]
        x = rms(h, p("attention_norm"))
        q = rotary((x @ p("attention.wq").T).view(T, a.n_heads, hd))
        k = rotary((x @ p("attention.wk").T).view(T, a.n_kv_heads, hd)).repeat_interleave(rep, 1)
        v = (x @ p("attention.wv").T).view(T, a.n_kv_heads, hd).repeat_interleave(rep, 1)
        s = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd)
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        h = h + torch.einsum("hqk,khd->qhd", s.softmax(-1), v).reshape(T, -1) @ p("attention.wo").T
        x = rms(h, p("ffn_norm"))
        h = h + (F.silu(x @ p("feed_forward.w1").T) * (x @ p("feed_forward.w3").T)) @ p("feed_forward.w2").T
    return rms(h, sd["norm.weight"]) @ sd["output.weight"].T


def test_logits_match_formula_with_scaled_rope_past_2000(llama3):
    ckpt, tok, _ = llama3
    assert json.loads((ckpt / "params.json").read_text())["use_scaled_rope"] is True
    model = load_meta(ckpt)
    a = model.args
    assert a.use_scaled_rope and a.rope_theta == 500000.0 and a.n_kv_heads < a.n_heads
    tokens = torch.randint(0, a.vocab_size, (24,), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(3000, 3024)  # past 2048: the scaled (low) frequencies have turned far enough to matter
    hd = a.dim // a.n_heads
    inv = scaled_inv_freq(hd, a.rope_theta)
    plain = torch.tensor([a.rope_theta ** (-i / hd) for i in range(0, hd, 2)], dtype=torch.float64)
    assert (inv == plain).any() and (inv == plain / 8).any() and ((inv != plain) & (inv != plain / 8)).any()  # 3 bands
    with torch.no_grad():
        got = model(tokens[None], positions=positions[None])[0].double()
    want = reference_logits(model.state_dict(), a, tokens, positions, inv)
    unscaled = reference_logits(model.state_dict(), a, tokens, positions, plain)
    assert torch.allclose(got, want, atol=2e-5), (got - want).abs().max()
    assert (unscaled - want).abs().max() > 100 * (got - want).abs().max()  # the test would see a missing scaling


@pytest.mark.parametrize("key, value", [("vision_chunk_size", 560), ("quantization_args",
                                                                     {"scheme": "int4_weight_int8_dynamic_activation"}),
                                        ("moe_args", {"num_experts": 16}), ("rope_scaling", {"factor": 32.0}),
                                        ("lora_args", {"rank": 16})])
def test_params_that_change_the_math_are_refused(llama3, tmp_path, key, value):
    ckpt, _, _ = llama3
    d = tmp_path / "ck"
    d.mkdir()
    (d / "consolidated.00.pth").symlink_to(ckpt / "consolidated.00.pth")
    params = json.loads((ckpt / "params.json").read_text())
    (d / "params.json").write_text(json.dumps(params | {key: value}))
    with pytest.raises(CheckpointError, match=key) as e:
        load_meta(d)
    assert str(d / "params.json") in str(e.value)
    # generation-only settings and null values change nothing: loaded
    (d / "params.json").write_text(json.dumps(params | {"max_batch_size": 32, "max_seq_len": 131072, key: None}))
    assert load_meta(d).args.use_scaled_rope


def test_checkpoint_without_output_weight_loads_tied(llama3, tmp_path):
    ckpt, tok, model = llama3
    sd = {k: v for k, v in model.state_dict().items() if k != "output.weight"}
    d = tmp_path / "tied"
    d.mkdir()
    torch.save(sd, d / "consolidated.00.pth")
    (d / "params.json").write_text((ckpt / "params.json").read_text())
    tied = load_meta(d)
    assert tied.output.weight is tied.tok_embeddings.weight
    x = torch.randint(0, tok.n_words, (1, 9))
    with torch.no_grad():
        want = model(x, head=lambda h, output: h) @ model.tok_embeddings.weight.T  # h: the final normed states
        assert torch.allclose(tied(x), want, atol=1e-5)
    # save_meta writes both of Meta's keys (Meta's code and converters expect output.weight), as one
    # tensor: the folder reloads tied
    save_meta(tied, tmp_path / "again", dtype=torch.float32)
    back = torch.load(tmp_path / "again" / "consolidated.00.pth", weights_only=True)
    assert torch.equal(back["output.weight"], back["tok_embeddings.weight"])
    again = load_meta(tmp_path / "again")
    assert again.output.weight is again.tok_embeddings.weight
    assert sum(p.numel() for p in again.parameters()) == sum(v.numel() for v in sd.values())
    # Meta's 3.2 files (as far as we can tell) store output.weight as a separate, equal copy: tied too;
    # the 3.1-style folder's own output layer is not
    torch.save(sd | {"output.weight": sd["tok_embeddings.weight"].clone()}, d / "consolidated.00.pth")
    assert _tied(load_meta(d)) and not _tied(load_meta(ckpt))


def _tied(m):
    return m.output.weight is m.tok_embeddings.weight


# ---------------------------------------------------------------- llama3-chat template

def test_llama3_chat_exact_ids_and_labels(llama3):
    _, tok, _ = llama3
    S = tok.special_ids
    enc = lambda t: tok.encode(t, bos=False)

    def header(role):
        return [S["<|start_header_id|>"]] + enc(role) + [S["<|end_header_id|>"]] + enc("\n\n")

    chat = [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!\n"}, {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "It is 4."}]
    eot = [S["<|eot_id|>"]]
    prompt1 = [tok.bos_id] + header("system") + enc("Be brief.") + eot
    prompt1 += header("user") + enc("Hi") + eot + header("assistant")
    answer1 = enc("Hello!") + [S["<|eot_id|>"]]
    prompt2 = header("user") + enc("What is 2+2?") + [S["<|eot_id|>"]] + header("assistant")
    answer2 = enc("It is 4.") + [S["<|eot_id|>"]]
    ids, labels, truncated = data.tokenize(chat, tok, "llama3-chat", max_len=4096)
    assert ids == prompt1 + answer1 + prompt2 + answer2 and not truncated
    assert labels == [IGNORE] * len(prompt1) + answer1 + [IGNORE] * len(prompt2) + answer2
    # at generation time: the same prompt, ending with an open assistant header
    assert data.prompt_ids(chat[:4], tok, "llama3-chat") == prompt1 + answer1 + prompt2
    # an Alpaca record: instruction and input form the user message, no system message
    alpaca = [{"role": "user", "content": "Add the numbers.", "input": "3 and 4"}, {"role": "assistant",
                                                                                    "content": "7"}]
    ids, labels, _ = data.tokenize(alpaca, tok, "llama3-chat")
    prompt = [tok.bos_id] + header("user") + enc("Add the numbers.\n\n3 and 4") + eot + header("assistant")
    assert ids == prompt + enc("7") + eot and labels == [IGNORE] * len(prompt) + enc("7") + eot


def test_llama3_chat_reads_sharegpt_and_messages_files(llama3, sp_tokenizer, tmp_path):
    _, tok, _ = llama3
    conv = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"}, {"from": "gpt",
                                                                                         "value": "Hello!"}]
    (tmp_path / "sg.json").write_text(json.dumps([{"conversations": conv}]))
    msgs = [{"role": m, "content": c} for m, c in (("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!"))]
    (tmp_path / "m.jsonl").write_text(json.dumps({"messages": msgs}) + "\n")
    direct = data.tokenize(msgs, tok, "llama3-chat")[:2]
    for f in ("sg.json", "m.jsonl"):
        [x] = data.load_dataset(tmp_path / f, tok, "llama3-chat", 512, verbose=False)
        assert (x["input_ids"], x["labels"]) == direct
    with pytest.raises(data.DataError, match="needs a LLaMA-3 tokenizer"):
        data.load_dataset(tmp_path / "m.jsonl", sp_tokenizer, "llama3-chat", 512, verbose=False)


# ---------------------------------------------------------------- chunked loss

def test_chunked_loss_equals_full_logits_loss_and_gradients(llama3):
    _, tok, _ = llama3
    torch.manual_seed(1)
    model = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=tok.n_words, multiple_of=16,
                                  use_scaled_rope=True))
    x = torch.randint(0, tok.n_words, (2, 300))  # 300 positions: chunks of 128, 128 and 43 after the shift
    labels = x.clone()
    labels[0, :40] = IGNORE
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[1, 250:] = False
    labels[1, 250:] = IGNORE
    batch = {"input_ids": x, "labels": labels, "mask": mask}
    chunked = train.forward_loss(model, batch, "cpu", nullcontext())
    chunked.backward()
    g_chunked = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    full = train.response_loss_sum(model(x, mask=mask), labels)
    full.backward()
    assert torch.allclose(chunked, full, rtol=1e-5)
    for n, p in model.named_parameters():
        assert (g_chunked[n] - p.grad).abs().max() <= 1e-5 * p.grad.abs().max(), n


# ---------------------------------------------------------------- generation

def rigged_checkpoint(llama3, path, scores):
    """A model whose greedy choice is fixed by `scores` (token id -> logit, the same at every step):
    blocks that add nothing, embeddings that all point along feature 0, an output layer reading it."""
    ckpt, tok, model = llama3
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    for k in sd:
        if k.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
            sd[k].zero_()
    sd["tok_embeddings.weight"][:, 0] = 1.0
    sd["output.weight"].zero_()
    for i, s in scores.items():
        sd["output.weight"][i, 0] = s / 7.9  # the normed state's feature 0 is about sqrt(64) / (1 + small)
    m = Transformer(model.args)
    m.load_state_dict(sd)
    return save_meta(m, path, tokenizer_path=ckpt.parent / "tokenizer.model", dtype=torch.float32)


def test_sample_llama3_chat_stops_at_eot(llama3, tmp_path, monkeypatch, capsys):
    _, tok, _ = llama3
    X, Y = tok.encode("X", bos=False), tok.encode("Y", bos=False)
    assert len(X) == len(Y) == 1
    eot = tok.special_ids["<|eot_id|>"]
    # with repetition penalty 1.2: X (3.0) first, then Y (2.8 > 3.0 / 1.2), then <|eot_id|> (3.2, seen in
    # the prompt: 2.67 > X's 2.5 and Y's 2.33); it would stay the choice forever after
    ckpt = rigged_checkpoint(llama3, tmp_path / "rigged", {X[0]: 3.0, Y[0]: 2.8, eot: 3.2})
    model = load_meta(ckpt)
    prompt = data.prompt_ids([{"role": "user", "content": "Say hi."}], tok, "llama3-chat")
    assert X[0] not in prompt and Y[0] not in prompt
    run = lambda eos: sample.generate(model, [prompt], 6, repetition_penalty=1.2, eos_id=eos)[0]
    assert run(tok.stop_ids) == X + Y == run(eot)
    assert run(tok.eos_id) == X + Y + [eot] * 4  # <|end_of_text|> alone does not end a chat answer
    # the command line passes every stop id; streamed and --prompts outputs hold the text only
    stops, real = [], sample.generate
    monkeypatch.setattr(sample, "generate", lambda *a, **k: stops.append(k["eos_id"]) or real(*a, **k))
    assert sample.main(["--ckpt", str(ckpt), "--prompt", "Say hi.", "--template", "llama3-chat", "--max-new-tokens",
                        "6"]) == 0
    assert capsys.readouterr().out == "XY\n"
    (tmp_path / "p.json").write_text(json.dumps([{"instruction": "Say hi."}]))
    out = tmp_path / "o.json"
    assert sample.main(["--ckpt", str(ckpt), "--prompts", str(tmp_path / "p.json"), "--out", str(out),
                        "--template", "llama3-chat", "--max-new-tokens", "6"]) == 0
    assert json.loads(out.read_text())[0]["output"] == "XY"
    assert stops == [tok.stop_ids] * 2


# ---------------------------------------------------------------- train.py --init under torchrun

@pytest.mark.slow
def test_train_init_two_ranks_and_final_round_trip(llama3, tmp_path):
    ckpt, tok, model = llama3
    msgs = lambda i: {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user",
                                                                                "content": f"What is {i} + 1?"},
                                   {"role": "assistant", "content": f"It is {i + 1}. <|eot_id|> is not special."}]}
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(msgs(i)) + "\n" for i in range(16)))
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(msgs(i)) + "\n" for i in range(50, 55)))
    out = tmp_path / "o"
    # lr 0: the weights stay the folder's, so the logged clean eval loss (chunked, on 2 FSDP ranks)
    # must equal the loss of the folder's model from full logits, computed here
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           "--init", str(ckpt), "--data", str(tmp_path / "train.jsonl"), "--eval-data", str(tmp_path / "eval.jsonl"),
           "--template", "llama3-chat", "--out", str(out), "--max-steps", "2", "--batch-size", "4",
           "--micro-batch-size", "2", "--lr", "0", "--max-len", "128", "--dtype", "fp32", "--export-dtype", "fp32"]
    p = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    examples = data.load_dataset(tmp_path / "eval.jsonl", tok, "llama3-chat", 128, verbose=False)
    b = data.collate(examples, tok.pad_id)
    with torch.no_grad():
        direct = train.response_loss_sum(model(b["input_ids"], mask=b["mask"]), b["labels"]).item()
    n = int((b["labels"][:, 1:] != IGNORE).sum())
    last = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    assert math.isclose(last["eval_loss"], direct / n, rel_tol=1e-5)
    # OUT/final: still a LLaMA-3.1 folder (use_scaled_rope, rope_theta, the same tokenizer file)
    final = out / "final"
    params = json.loads((final / "params.json").read_text())
    assert params["use_scaled_rope"] is True and params["rope_theta"] == 500000.0 and params["n_kv_heads"] == 2
    assert (final / "tokenizer.model").read_bytes() == (ckpt.parent / "tokenizer.model").read_bytes()
    assert find_tokenizer(final) == final / "tokenizer.model"
    assert Tokenizer(final / "tokenizer.model").kind == "tiktoken"
    back = load_meta(final)
    x, pos = torch.randint(0, tok.n_words, (1, 8)), torch.arange(5000, 5008)[None]
    with torch.no_grad():
        assert torch.equal(back(x, positions=pos), model(x, positions=pos))


@pytest.mark.slow
def test_train_tied_checkpoint_stays_tied(llama3, tmp_path):
    ckpt, tok, model = llama3
    d = tmp_path / "tied"  # LLaMA-3.2 style: no output.weight, the output reads the embedding
    d.mkdir()
    torch.save({k: v for k, v in model.state_dict().items() if k != "output.weight"}, d / "consolidated.00.pth")
    (d / "params.json").write_text((ckpt / "params.json").read_text())
    (d / "tokenizer.model").write_bytes((ckpt.parent / "tokenizer.model").read_bytes())
    recs = [{"instruction": f"What is {i} + 1?", "output": f"It is {i + 1}."} for i in range(20)]
    (tmp_path / "train.json").write_text(json.dumps(recs))
    out = tmp_path / "o"
    p = subprocess.run([sys.executable, "train.py", "--init", str(d), "--data", str(tmp_path / "train.json"), "--out",
                        str(out),
                        "--template", "llama3-chat", "--max-steps", "2", "--batch-size", "8", "--micro-batch-size", "4",
                        "--lr", "1e-2", "--max-len", "128", "--dtype", "fp32", "--export-dtype", "fp32", "--eval-frac",
                        "0.2"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    final = torch.load(out / "final" / "consolidated.00.pth", weights_only=True)
    emb = final["tok_embeddings.weight"]
    assert final["output.weight"].untyped_storage().data_ptr() == emb.untyped_storage().data_ptr()  # one tensor
    assert not torch.equal(emb, model.tok_embeddings.weight)  # trained, as one parameter
    trained = load_meta(out / "final")
    assert trained.output.weight is trained.tok_embeddings.weight


@pytest.mark.slow
def test_bench_loss_memory_part(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "bench", "--only", "loss", "--dim", "32", "--n-layers", "1", "--n-heads", "2",
           "--vocab", "32000", "--seq-len", "512", "--loss-batch-size", "2", "--out", str(out)]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=300)
    r = json.loads(out.read_text())["loss"]
    assert r["fp32_logits_gb"] == round(2 * 512 * 32000 * 4 / 1e9, 3)
    assert math.isclose(r["chunked_loss"], r["full_logits_loss"], rel_tol=1e-5)  # the same loss, two ways
    assert 0 < r["chunked_peak_above_model_gb"] < r["full_logits_peak_above_model_gb"]
