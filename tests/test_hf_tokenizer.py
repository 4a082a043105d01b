"""Hugging Face tokenizer.json: read through Tokenizer (the tokenizers library's own ids; BOS, EOS, pad and
stop ids as the config files say), written from SentencePiece and LLaMA-3's tiktoken (the original's ids,
on real text with runs of spaces), found by find_tokenizer, read back by transformers; the chatml template."""
import base64
import functools
import io
import json
import re
from pathlib import Path

import pytest
from conftest import CORPUS, MADE_UP, call, hf_folder
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import processors

import builtin_data
import data
import tokenizer
from hf_tokenizer import write_hf_tokenizer
from tokenizer import CheckpointError, Tokenizer, find_tokenizer

ROOT = Path(__file__).resolve().parents[1]
IGNORE = data.IGNORE
RUNS = [" " * n + "x" + " " * m + "y" + "\t" * (m % 3) for n in range(20) for m in range(0, 20, 3)]


@functools.cache
def real_texts(shared):
    """1,389 real texts: AlpacaEval's 805 instructions, alpaca_en_demo's first 150 records (instruction, input,
    output), the turns of ShareGPT's first 30 conversations, and every other text in ../shared/data with
    a run of spaces or a tab (where SentencePiece's whitespace pieces are a trap)."""
    load = lambda name: json.loads((shared / "data" / name).read_text(encoding="utf-8"))
    texts = [r["instruction"] for r in load("alpaca_eval_instructions.json")]
    texts += [t for r in load("alpaca_en_demo.json")[:150] for t in (r["instruction"], r["input"], r["output"])]
    texts += [m["value"] for r in load("sharegpt_demo.json")[:30] for m in r["conversations"]]
    rest = [t for r in load("alpaca_en_demo.json") for t in (r["instruction"], r["input"], r["output"])]
    rest += [m["value"] for r in load("sharegpt_demo.json") for m in r["conversations"]]
    rest += [r["output"] for name in ("alpaca-7b", "llama-2-7b-chat-hf", "text_davinci_003")
             for r in load(f"alpaca_eval_outputs/{name}.json")]
    texts = [t for t in texts if t]
    seen = set(texts)
    return tuple(texts + [t for t in dict.fromkeys(rest) if re.search(r"  |\t", t) and t not in seen])


def spaced(texts):
    return sum("  " in t for t in texts)


def plain(hf):
    """The same tokenizer without its added tokens: what its text gives when nothing in it is a control token."""
    spec = json.loads(hf.to_str())
    spec["added_tokens"] = []
    return HFTokenizer.from_str(json.dumps(spec))


@pytest.fixture(scope="module")
def builtin_sp(tmp_path_factory):  # LLaMA's SentencePiece layout, no ../shared needed
    return builtin_data.builtin_tokenizer(tmp_path_factory.mktemp("sp") / "tokenizer.model")


# ---------------------------------------------------------------- reading tokenizer.json

def test_tokenizer_json_gives_the_librarys_ids(chatml_bpe, tmp_path):
    tok = Tokenizer(hf_folder(tmp_path, chatml_bpe, {"bos_token": None, "eos_token": "<|im_end|>",
                                                     "pad_token": "<|endoftext|>"}, {"eos_token_id": [2, 0]}))
    assert tok.kind == "hf" and tok.n_words == chatml_bpe.get_vocab_size(with_added_tokens=True) == 500
    assert tok.special_ids == {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    # no BOS (a ChatML tokenizer): encode adds nothing; <|endoftext|> from the eos list ends an answer too
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.stop_ids) == (None, 2, 0, [2, 0])
    for text in MADE_UP[:-1]:
        ids = chatml_bpe.encode(text).ids
        assert tok.encode(text) == tok.encode(text, bos=False) == ids and tok.encode(text, eos=True) == ids + [2]
        assert tok.decode(ids + [2]) == text
    # control-token text stays text: the ids of the same tokenizer with no added tokens at all
    for text in ("<|im_end|>", "say <|im_start|>user\nhi<|im_end|>\n", "<|endoftext|><|endoftext|>", MADE_UP[-1]):
        ids = tok.encode(text)
        assert ids == plain(chatml_bpe).encode(text).ids and not set(ids) & {0, 1, 2} and tok.decode(ids) == text
        assert set(chatml_bpe.encode(text).ids) & {0, 1, 2}  # the library's default would have matched them
    # the file is told apart by its contents too
    odd = tmp_path / "vocab.bin"
    odd.write_bytes((tmp_path / "tokenizer.json").read_bytes())
    assert Tokenizer(odd).kind == "hf" and Tokenizer(odd).encode("Hello  world") == tok.encode("Hello  world")


def test_tokenizer_json_real_text(chatml_bpe, shared, tmp_path):
    texts = list(real_texts(shared))
    tok = Tokenizer(hf_folder(tmp_path, chatml_bpe))
    want = [e.ids for e in plain(chatml_bpe).encode_batch(texts)]
    assert [i for i, t in enumerate(texts) if tok.encode(t) != want[i]] == []
    assert [i for i, t in enumerate(texts) if tok.decode(want[i]) != t] == []


def with_bos(hf, bos):
    hf = HFTokenizer.from_str(hf.to_str())
    hf.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, hf.token_to_id(bos))])
    return hf


@pytest.mark.parametrize("bos_post_processor, tokenizer_config, generation_config, want", [
    # nothing beside it: an EOS by its usual name, pad = EOS (masked out anyway)
    (None, None, None, (None, 0, 0, [0, 2])),
    # the post-processor's leading token is the BOS
    ("<|endoftext|>", None, None, (0, 0, 0, [0, 2])),
    # transformers rebuilds the post-processor from add_bos_token when the config has it
    (None, {"add_bos_token": True, "bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}, None, (1, 2, 2, [2])),
    ("<|endoftext|>", {"add_bos_token": False, "bos_token": "<|endoftext|>"}, None, (None, 0, 0, [0, 2])),
    # a bos_token that nothing adds is no BOS
    (None, {"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>", "special": True}}, None,
     (None, 2, 2, [2])),
    # generation_config alone: one eos id, a pad id
    (None, None, {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 1}, (None, 2, 1, [2])),
    (None, {"eos_token": "<|endoftext|>", "pad_token": None}, {"eos_token_id": [2, 0]}, (None, 0, 0, [0, 2])),
])
def test_special_ids_as_the_config_files_say(chatml_bpe, tmp_path, bos_post_processor, tokenizer_config,
                                             generation_config, want):
    hf = with_bos(chatml_bpe, bos_post_processor) if bos_post_processor else chatml_bpe
    tok = Tokenizer(hf_folder(tmp_path, hf, tokenizer_config, generation_config))
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.stop_ids) == want
    body = chatml_bpe.encode("Hi  there").ids
    assert tok.encode("Hi  there") == ([] if want[0] is None else [want[0]]) + body


def one_line_error(path, why):
    with pytest.raises(CheckpointError, match=why) as e:
        Tokenizer(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("content, why", [(b"{not json", "tokenizer.json: not a JSON file"),
                                          (b"\xff\xfe{}", "not a JSON file"),
                                          (b'{"version": "1.0"}', "not a tokenizer.json of the tokenizers library"),
                                          (b"[1, 2]", "not a tokenizer.json of the tokenizers library"),
                                          (b'{"model": {"type": "Nope"}}', "not a valid tokenizer.json")])
def test_bad_tokenizer_json_is_one_line(tmp_path, content, why):
    (tmp_path / "tokenizer.json").write_bytes(content)
    one_line_error(tmp_path / "tokenizer.json", why)


def test_bad_config_beside_it_is_named(chatml_bpe, tmp_path):
    path = hf_folder(tmp_path, chatml_bpe, {"add_bos_token": True, "bos_token": "<s>"})
    with pytest.raises(CheckpointError, match="bos_token '<s>' is not in") as e:
        Tokenizer(path)
    assert str(tmp_path / "tokenizer_config.json") in str(e.value)
    (tmp_path / "tokenizer_config.json").write_text("{")
    with pytest.raises(CheckpointError, match="tokenizer_config.json: not a JSON file"):
        Tokenizer(path)
    (tmp_path / "tokenizer_config.json").unlink()
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [2, 70000]}')
    with pytest.raises(CheckpointError, match=r"generation_config.json: eos_token_id \[2, 70000\] is not a token id"):
        Tokenizer(path)
    # the command line: one line on stderr, exit status 2, no traceback
    (tmp_path / "generation_config.json").unlink()
    path.write_text("{oops")
    p = call(tokenizer.main, path)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "not a JSON file" in p.stderr


def test_tokenizer_json_without_eos_is_refused(chatml_bpe, tmp_path):
    path = hf_folder(tmp_path, plain(chatml_bpe))  # no added tokens, no config files: nothing ends an answer
    with pytest.raises(CheckpointError, match="no end-of-sequence token") as e:
        Tokenizer(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_find_tokenizer_order(tmp_path):
    meta, size = tmp_path / "llama-2", tmp_path / "llama-2" / "7B"
    size.mkdir(parents=True)
    assert find_tokenizer(size) is None
    (size / "tokenizer.json").write_text("{}")
    assert find_tokenizer(size) == size / "tokenizer.json"  # nothing else: the json
    (meta / "tokenizer.model").write_bytes(b"x")
    assert find_tokenizer(size) == meta / "tokenizer.model"  # Meta's folders: tokenizer.model, one level up too
    (size / "tokenizer.model").write_bytes(b"x")
    assert find_tokenizer(size) == size / "tokenizer.model"
    (size / "config.json").write_text("{}")  # a Hugging Face folder: its tokenizer.json first
    assert find_tokenizer(size) == size / "tokenizer.json"
    (size / "tokenizer.json").unlink()
    assert find_tokenizer(size) == size / "tokenizer.model"
    (size / "tokenizer.model").unlink()
    assert find_tokenizer(size) is None  # not the parent's: another model's, as far as HF folders go


# ---------------------------------------------------------------- writing tokenizer.json

def assert_written_gives_the_same_ids(tok, folder, texts):
    """folder/tokenizer.json through our Tokenizer and through the tokenizers library: tok's ids, text for text."""
    ours = Tokenizer(folder / "tokenizer.json")
    lib = HFTokenizer.from_file(str(folder / "tokenizer.json"))
    lib.encode_special_tokens = True
    want = [tok.encode(t) for t in texts]  # with BOS: the library's post-processor adds it
    assert [t for t, w in zip(texts, want, strict=True) if ours.encode(t) != w] == []
    assert [t for t, w, e in zip(texts, want, lib.encode_batch(list(texts)), strict=True) if e.ids != w] == []
    assert [t for t, w in zip(texts, want, strict=True) if ours.decode(w) != tok.decode(w)] == []
    assert (ours.n_words, ours.bos_id, ours.eos_id, ours.pad_id, ours.stop_ids) == \
        (tok.n_words, tok.bos_id, tok.eos_id, tok.pad_id, tok.stop_ids)
    return ours


def test_sentencepiece_written_as_tokenizer_json(builtin_sp, tmp_path):
    tok = builtin_sp
    write_hf_tokenizer(tok, tmp_path, model_max_length=2048)
    assert (tmp_path / "tokenizer.model").read_bytes() == tok.path.read_bytes()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and config["model_max_length"] == 2048
    assert (config["bos_token"], config["eos_token"], config["pad_token"], config["unk_token"]) == \
        ("<s>", "</s>", "<unk>", "<unk>")
    assert config["add_bos_token"] is True and config["add_eos_token"] is False
    assert json.loads((tmp_path / "special_tokens_map.json").read_text())["eos_token"] == "</s>"
    texts = MADE_UP + RUNS + [m["content"] for r in builtin_data.builtin_records(seed=1, n=200) for m in r]
    ours = assert_written_gives_the_same_ids(tok, tmp_path, texts)
    assert ours.special_ids == {"<unk>": 0, "<s>": 1, "</s>": 2}
    # a "▁" in the text decodes to a space: SentencePiece's own decode does the same
    assert [t for t in MADE_UP if ours.decode(ours.encode(t)) != t] == ["▁ already a meta space"]
    assert ours.decode(ours.encode("▁ already a meta space")) == tok.decode(tok.encode("▁ already a meta space"))
    assert ours.encode("<s>", bos=False) == tok.encode("<s>", bos=False) and 1 not in ours.encode("<s>", bos=False)


def test_sentencepiece_with_other_normalisation_is_refused(tmp_path):
    import sentencepiece as spm

    # sentencepiece's defaults: NFKC and squeezed spaces, which LLaMA's files turn off
    model = io.BytesIO()
    lines = [m["content"] for r in builtin_data.builtin_records(seed=0, n=300) for m in r]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=400,
                                   byte_fallback=True, num_threads=1, minloglevel=2)
    (tmp_path / "tokenizer.model").write_bytes(model.getvalue())
    (tmp_path / "out").mkdir()
    with pytest.raises(CheckpointError, match="normalises text in a way tokenizer.json cannot reproduce") as e:
        write_hf_tokenizer(Tokenizer(tmp_path / "tokenizer.model"), tmp_path / "out")
    assert str(tmp_path / "tokenizer.model") in str(e.value) and not (tmp_path / "out" / "tokenizer.json").exists()


def merges_of(folder):
    merges = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]["merges"]
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in merges]


def test_sentencepiece_written_exactly_on_real_text(shared, tmp_path):
    tok = Tokenizer(shared / "tokenizers" / "mistral_v1_32k.model")
    texts = list(real_texts(shared))
    assert len(texts) == 1389 and spaced(texts) == 148  # the trap is in the data
    write_hf_tokenizer(tok, tmp_path)
    assert_written_gives_the_same_ids(tok, tmp_path, texts + MADE_UP + RUNS)
    # the whitespace-only pieces ("▁▁" is id 259) score -1e9: their merges rank last...
    merges = merges_of(tmp_path)
    spaces = [i for i, (a, b) in enumerate(merges) if set(a + b) == {"▁"}]
    assert len(spaces) > 15 and spaces == list(range(len(merges) - len(spaces), len(merges)))
    # ...and ranked by the merged piece's id instead, runs of spaces tokenize differently
    by_id = sorted(merges, key=lambda m: tok.sp.piece_to_id(m[0] + m[1]))
    spec = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    spec["model"]["merges"] = [list(m) for m in by_id]
    wrong = HFTokenizer.from_str(json.dumps(spec))
    differ = [t for t in texts if wrong.encode(t).ids != tok.encode(t)]
    assert differ and all("  " in t for t in differ)


def test_tiktoken_written_as_tokenizer_json(llama3_tok, tmp_path):
    tok = llama3_tok
    write_hf_tokenizer(tok, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["special_tokens_map.json", "tokenizer.json",
                                                          "tokenizer_config.json"]
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == \
        ("<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>") and "model_max_length" not in config
    ours = assert_written_gives_the_same_ids(tok, tmp_path, MADE_UP + RUNS + [CORPUS, CORPUS * 3])
    assert ours.special_ids == tok.special_ids and tok.n_words == 600 + 256
    assert [t for t in MADE_UP if ours.decode(ours.encode(t)) != t] == []
    # LLaMA-3's control-token text stays text here too
    assert ours.encode(MADE_UP[-1]) == tok.encode(MADE_UP[-1]) and max(ours.encode(MADE_UP[-1], bos=False)) < 600


def test_tiktoken_tokens_no_merge_leads_to(tmp_path):
    # tiktoken looks a whole pre-tokenized word up before merging: "abc" is a token though neither "ab"
    # nor "bc" is, so no chain of merges makes it; "xyz" is made by merges ("xy" + "z")
    ranks = [bytes([b]) for b in range(256)] + [b"abc", b"xy", b"xyz", b" xyz"]
    (tmp_path / "tokenizer.model").write_text("".join(f"{base64.b64encode(t).decode()} {r}\n"
                                                      for r, t in enumerate(ranks)))
    tok = Tokenizer(tmp_path / "tokenizer.model")
    write_hf_tokenizer(tok, tmp_path)
    texts = ["abc", "abc xyz", "abcabc", " abc", "xyz xyzabc", "abc\n\nabc  xyz"]
    assert tok.encode("abc xyz", bos=False) == [256, 259]
    assert_written_gives_the_same_ids(tok, tmp_path, texts)


def test_tiktoken_written_exactly_on_real_text(llama3_tok, shared, tmp_path):
    write_hf_tokenizer(llama3_tok, tmp_path)
    assert_written_gives_the_same_ids(llama3_tok, tmp_path, list(real_texts(shared)))


def test_tokenizer_json_written_as_it_came(chatml_bpe, tmp_path):
    src = hf_folder(tmp_path / "in", chatml_bpe, {"eos_token": "<|im_end|>", "chat_template": "{{ messages }}"})
    (tmp_path / "out").mkdir()
    write_hf_tokenizer(Tokenizer(src), tmp_path / "out")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "in" / name).read_bytes()
    bare = hf_folder(tmp_path / "bare", chatml_bpe)  # no config beside it: one is written
    write_hf_tokenizer(Tokenizer(bare), tmp_path / "bare")
    config = json.loads((tmp_path / "bare" / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["add_bos_token"]) == (None, "<|endoftext|>", False)
    with pytest.raises(CheckpointError, match="not a folder"):
        write_hf_tokenizer(Tokenizer(bare), tmp_path / "missing")


# ---------------------------------------------------------------- transformers reads the written folders

def assert_transformers_agrees(tok, folder, texts):
    from transformers import AutoTokenizer

    write_hf_tokenizer(tok, folder)
    auto = AutoTokenizer.from_pretrained(folder)
    want = [tok.encode(t) for t in texts]
    # split_special_tokens: control-token text as text, as ours; transformers' default matches it
    assert [t for t, w, g in zip(texts, want, auto(texts, split_special_tokens=True).input_ids, strict=True)
            if g != w] == []
    ordinary = [t for t in texts if not re.search(r"<s>|</s>|<unk>|<\|", t)]
    assert auto(ordinary).input_ids == [tok.encode(t) for t in ordinary]
    assert auto.batch_decode(want, skip_special_tokens=True) == [tok.decode(w) for w in want]
    assert (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)


def test_transformers_reads_written_folders(builtin_sp, llama3_tok, tmp_path):
    pytest.importorskip("transformers")
    for name, tok in (("sp", builtin_sp), ("llama3", llama3_tok)):
        (tmp_path / name).mkdir()
        assert_transformers_agrees(tok, tmp_path / name, MADE_UP + RUNS)


def test_transformers_reads_written_folders_real_text(llama3_tok, shared, tmp_path):
    pytest.importorskip("transformers")
    texts = list(real_texts(shared))
    for name, tok in (("mistral", Tokenizer(shared / "tokenizers" / "mistral_v1_32k.model")), ("llama3", llama3_tok)):
        (tmp_path / name).mkdir()
        assert_transformers_agrees(tok, tmp_path / name, texts)
        if name == "mistral":
            assert [t for t in texts if tok.decode(tok.encode(t)) != t] == []  # it decodes back the same text


# ---------------------------------------------------------------- chatml template

def test_chatml_exact_ids_and_labels(chatml_bpe, tmp_path):
    tok = Tokenizer(hf_folder(tmp_path, chatml_bpe, {"bos_token": None, "eos_token": "<|im_end|>"}))
    start, end = tok.special_ids["<|im_start|>"], tok.special_ids["<|im_end|>"]
    assert end in tok.stop_ids and tok.bos_id is None  # sample.py stops at <|im_end|>
    enc = lambda t: tok.encode(t, bos=False)
    nl = enc("\n")

    def message(role, content):
        return [start] + enc(role + "\n") + enc(content) + [end] + nl

    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "It is 4."}]
    prompt1 = message("system", "Be brief.") + message("user", "Hi") + [start] + enc("assistant\n")
    answer1 = enc("Hello!") + [end]
    prompt2 = message("user", "What is 2+2?") + [start] + enc("assistant\n")
    answer2 = enc("It is 4.") + [end]
    ids, labels, truncated = data.tokenize(chat, tok, "chatml", max_len=4096)
    assert ids == prompt1 + answer1 + nl + prompt2 + answer2 + nl and not truncated
    assert labels == ([IGNORE] * len(prompt1) + answer1 + [IGNORE] * len(nl + prompt2) + answer2
                      + [IGNORE] * len(nl))
    assert data.prompt_ids(chat[:4], tok, "chatml") == prompt1 + answer1 + nl + prompt2
    # the string HF's ChatML chat templates write, encoded whole by the library with its control tokens:
    # the same ids (here the pieces' edges are the pre-tokenizer's own)
    text = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
            "Hello!<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\nIt is 4.<|im_end|>\n")
    assert chatml_bpe.encode(text).ids == ids and data.render(chat, "chatml") == "<s>" + text  # <s>: BOS, if any
    # an Alpaca record: instruction and input form the user message
    alpaca = [{"role": "user", "content": "Add the numbers.", "input": "3 and 4"},
              {"role": "assistant", "content": "7"}]
    ids, labels, _ = data.tokenize(alpaca, tok, "chatml")
    prompt = message("user", "Add the numbers.\n\n3 and 4") + [start] + enc("assistant\n")
    assert ids == prompt + enc("7") + [end] + nl
    assert labels == [IGNORE] * len(prompt) + enc("7") + [end] + [IGNORE] * len(nl)
    # with a BOS, the conversation opens with it; the alpaca template without one opens with its prompt
    with_bos_tok = Tokenizer(hf_folder(tmp_path / "bos", with_bos(chatml_bpe, "<|endoftext|>")))
    assert data.tokenize(chat, with_bos_tok, "chatml")[0] == [0] + prompt1 + answer1 + nl + prompt2 + answer2 + nl
    assert data.tokenize(alpaca, tok, "alpaca")[0][:3] == enc(data.ALPACA_INPUT)[:3]


def test_chatml_needs_chatml_tokens(builtin_sp, llama3_tok, tmp_path):
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    for tok in (builtin_sp, llama3_tok):
        with pytest.raises(ValueError, match=r"chatml template needs a tokenizer.json with ChatML's .*<\|im_start\|>"):
            data.tokenize(chat, tok, "chatml")
    (tmp_path / "m.jsonl").write_text(json.dumps({"messages": chat}) + "\n")
    with pytest.raises(data.DataError, match="needs a tokenizer.json with ChatML's"):
        data.load_dataset(tmp_path / "m.jsonl", builtin_sp, "chatml", 512, verbose=False)
