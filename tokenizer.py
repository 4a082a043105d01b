"""Three kinds of tokenizer file behind one small interface, told apart by the file's contents: the
SentencePiece model of LLaMA-1/2, the tiktoken BPE of LLaMA-3.x ("base64-token rank" per line), and a
Hugging Face tokenizer.json (the `tokenizers` library's format). hf_tokenizer.py writes either of
Meta's kinds as a tokenizer.json that gives the same ids.

    python tokenizer.py llama-3.2-1b/tokenizer.model "Hello <|eot_id|> world"
"""
import base64
import binascii
import json
import re
import shutil
import sys
from pathlib import Path

import sentencepiece as spm
import tiktoken

from checks import ArgumentParser, CheckpointError, read_json, run_main

# LLaMA-3's pre-tokenizer (Meta's llama3 tokenizer.py; OpenAI's cl100k pattern): contractions, letters
# with one leading non-letter, digits in groups of at most three, punctuation runs, newlines, spaces.
PAT_STR = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# The 256 control tokens numbered right after the base vocabulary, in Meta's order.
NUM_SPECIAL_TOKENS = 256
NAMED_SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                        "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                        "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
                        "<|python_tag|>", "<|image|>"]
SPECIAL_TOKENS = NAMED_SPECIAL_TOKENS + [f"<|reserved_special_token_{2 + i}|>"
                                         for i in range(NUM_SPECIAL_TOKENS - len(NAMED_SPECIAL_TOKENS))]
RANK_LINE = re.compile(rb"[A-Za-z0-9+/]+=* \d+")  # one line of a tiktoken BPE file
# tiktoken's Rust side fails on very long inputs and very long runs of (non-)whitespace: Meta cuts
# the text into calls of at most 400k characters, and such runs every 25k characters (a long
# base64 blob in a ShareGPT dump is one)
MAX_ENCODE_CHARS, MAX_RUN_CHARS = 400_000, 25_000
# Tokens that end an answer wherever a tokenizer.json has them (LLaMA-3's, then ChatML's), beside the EOS
# its config files name. LLaMA-3's three come first in tiktoken's order, so both kinds give one stop_ids.
HF_STOP_TOKENS = ("<|eom_id|>", "<|eot_id|>", "<|im_end|>", "<|end_of_text|>")
# A tokenizer.json with no config files beside it: the first of these it has is its EOS.
HF_EOS_GUESSES = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<|im_end|>", "<|eot_id|>")


def cut_long_runs(text, n=MAX_RUN_CHARS):
    """text -> pieces, cut only inside runs of whitespace or non-whitespace longer than n characters."""
    long_runs = re.finditer(rf"\s{{{n + 1},}}|\S{{{n + 1},}}", text)  # a maximal run: it starts where its kind does
    cuts = [m.start() + k for m in long_runs for k in range(n, len(m.group()), n)]
    return [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]


def read_bpe_ranks(path, blob):
    """Meta's LLaMA-3 tokenizer.model: "base64-token rank" per line -> {token bytes: rank}."""
    ranks = {}
    for n, line in enumerate(blob.splitlines(), 1):
        if not line.strip():
            continue
        if not RANK_LINE.fullmatch(line.strip()):
            raise CheckpointError(f"{path}: line {n} is not 'base64-token rank' (a tiktoken BPE file)")
        token, rank = line.split()
        try:
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except binascii.Error:
            raise CheckpointError(f"{path}: line {n}: invalid base64") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise CheckpointError(f"{path}: ranks are not 0..{len(ranks) - 1}, each once")
    return ranks


def read_tokenizer_json(path, blob):
    """A Hugging Face tokenizer.json -> tokenizers.Tokenizer, or a one-line CheckpointError."""
    try:
        spec = json.loads(blob.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a JSON file ({str(e).splitlines()[0]})") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("model"), dict):
        raise CheckpointError(f"{path}: JSON, but not a tokenizer.json of the tokenizers library (no \"model\")")
    from tokenizers import Tokenizer as HFTokenizer  # here: only tokenizer.json folders need it (~1 MB a process)
    try:
        return HFTokenizer.from_str(blob.decode("utf-8"))
    except Exception as e:  # noqa: BLE001 (the library raises a bare Exception with serde's message)
        raise CheckpointError(f"{path}: not a valid tokenizer.json ({str(e).splitlines()[0]})") from None


def read_config(path):
    """A JSON object from a config file beside a tokenizer.json; {} when there is none."""
    return read_json(path, CheckpointError, expect=dict) if path.is_file() else {}


def post_processor_bos(hf):
    """The id that the tokenizer's post-processor puts before a text (<s>, <|begin_of_text|>), or None."""
    plain, full = hf.encode("Hello", add_special_tokens=False).ids, hf.encode("Hello").ids
    return full[0] if plain and full[1:1 + len(plain)] == plain else None


def hf_special_ids(path, hf, special_ids):
    """(bos_id, eos_id, pad_id, stop_ids) of a tokenizer.json, from the config files beside it."""
    tok_config_path, gen_config_path = path.parent / "tokenizer_config.json", path.parent / "generation_config.json"
    tok_config, gen_config = read_config(tok_config_path), read_config(gen_config_path)

    def named(key):  # a token as tokenizer_config.json names it: "<s>", {"content": "<s>", ...} or null
        name = tok_config.get(key)
        name = name.get("content") if isinstance(name, dict) else name
        if name is not None and hf.token_to_id(name) is None:
            raise CheckpointError(f"{tok_config_path}: {key} {name!r} is not in {path}")
        return None if name is None else hf.token_to_id(name)

    def given(key):  # generation_config.json's ids: an int or a list of them
        ids = gen_config.get(key)
        ids = [] if ids is None else ids if isinstance(ids, list) else [ids]
        if not all(isinstance(i, int) and 0 <= i < hf.get_vocab_size(with_added_tokens=True) for i in ids):
            raise CheckpointError(f"{gen_config_path}: {key} {gen_config[key]!r} is not a token id of {path}")
        return ids

    # transformers builds its post-processor from add_bos_token when the config has the key; else the
    # tokenizer.json's own post-processor decides. A bos_token alone is not enough: a config may name
    # one (ChatML tokenizers often name <|im_start|> or <|endoftext|>) that nothing ever adds.
    if "add_bos_token" in tok_config:
        bos_id = named("bos_token") if tok_config["add_bos_token"] else None
    else:
        bos_id = post_processor_bos(hf)
    eos_ids = given("eos_token_id")
    eos_id = named("eos_token")
    eos_id = eos_id if eos_id is not None else eos_ids[0] if eos_ids else next(
        (special_ids[name] for name in HF_EOS_GUESSES if name in special_ids), None)
    if eos_id is None:
        raise CheckpointError(f"{path}: no end-of-sequence token: no eos_token in {tok_config_path.name} or "
                              f"{gen_config_path.name} beside it, and none of {', '.join(HF_EOS_GUESSES)}")
    # padding is masked out of attention and the loss: any id will do when the files name none
    pad_id = next(i for i in (named("pad_token"), *given("pad_token_id"),
                              special_ids.get("<|finetune_right_pad_id|>"), eos_id) if i is not None)
    stop_ids = [eos_id] + eos_ids + [special_ids[name] for name in HF_STOP_TOKENS if name in special_ids]
    return bos_id, eos_id, pad_id, list(dict.fromkeys(stop_ids))


class Tokenizer:
    """encode(text, bos, eos) -> ids, decode(ids) -> text, n_words, bos_id, eos_id, pad_id, stop_ids.

    SentencePiece, LLaMA-1/2 layout (<unk>=0, <s>=1, </s>=2). LLaMA's tokenizer has no pad piece
    (pad_id() is -1), so we pad with <unk> (0): padded positions are masked out of attention and
    carry label -100, so the id never reaches the model's output or the loss.

    LLaMA-3 (tiktoken BPE): bos = <|begin_of_text|>, eos = <|end_of_text|>, pad =
    <|finetune_right_pad_id|> (the token Meta reserved for it); an answer ends at <|end_of_text|>,
    <|eom_id|> or <|eot_id|>. Control tokens are never produced from text: `special_ids` maps their
    names to ids for the chat template, which inserts them by id.

    Hugging Face tokenizer.json: EOS and pad as tokenizer_config.json / generation_config.json beside it
    say; every EOS id of generation_config.json, LLaMA-3's stop tokens and ChatML's <|im_end|> also end
    an answer. BOS is the token its post-processor puts first (tokenizer_config.json's bos_token where
    that file sets add_bos_token). Some have no BOS at all (SmolLM2, Qwen): bos_id is None, encode adds
    nothing and the templates open without one. Its added special tokens are `special_ids` and, as
    above, never come out of text."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{path}: tokenizer file not found")
        blob = self.path.read_bytes()
        first = blob.lstrip().split(b"\n", 1)[0].strip()
        if RANK_LINE.fullmatch(first):  # a SentencePiece model is a binary protobuf: never this
            self._init_tiktoken(read_bpe_ranks(path, blob))
        elif self.path.suffix == ".json" or first.startswith(b"{"):  # SentencePiece's opens with its <unk> piece
            self._init_hf(blob)
        else:
            self._init_sentencepiece()

    def _init_sentencepiece(self):
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (OSError, RuntimeError) as e:
            raise CheckpointError(f"{self.path}: neither a SentencePiece model nor a tiktoken BPE file "
                                  f"({str(e).splitlines()[0]})") from None
        self.kind, self.tiktoken = "sentencepiece", None
        self.n_words = self.sp.vocab_size()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.sp.unk_id()
        self.stop_ids = [self.eos_id]
        self.special_ids = {}

    def _init_tiktoken(self, ranks):
        n_base = len(ranks)  # special ids follow the base vocabulary: 128000.. in Meta's 128k files
        self.special_ids = {name: n_base + i for i, name in enumerate(SPECIAL_TOKENS)}
        self.kind, self.n_base = "tiktoken", n_base
        self.tiktoken = tiktoken.Encoding(name=self.path.name, pat_str=PAT_STR, mergeable_ranks=ranks,
                                          special_tokens=self.special_ids)
        self.n_words = n_base + len(SPECIAL_TOKENS)
        self.bos_id, self.eos_id = self.special_ids["<|begin_of_text|>"], self.special_ids["<|end_of_text|>"]
        self.pad_id = self.special_ids["<|finetune_right_pad_id|>"]
        self.stop_ids = [self.eos_id, self.special_ids["<|eom_id|>"], self.special_ids["<|eot_id|>"]]

    def _init_hf(self, blob):
        self.hf = read_tokenizer_json(self.path, blob)
        # as with tiktoken above: "<|im_end|>" written in the data is text, never the control token
        self.hf.encode_special_tokens = True
        self.kind, self.tiktoken = "hf", None
        self.n_words = self.hf.get_vocab_size(with_added_tokens=True)
        self.special_ids = {t.content: i for i, t in sorted(self.hf.get_added_tokens_decoder().items()) if t.special}
        self.bos_id, self.eos_id, self.pad_id, self.stop_ids = hf_special_ids(self.path, self.hf, self.special_ids)

    def check_vocab(self, vocab_size, source):
        """The one check that these ids are a model's embedding rows: a larger vocabulary would index past
        the table, a smaller one leave rows that no text reaches. source: whose embedding, for the message."""
        if self.n_words != vocab_size:
            raise CheckpointError(f"{self.path}: tokenizer has {self.n_words} pieces but {source}'s embedding "
                                  f"has {vocab_size} rows")

    def encode(self, text, bos=True, eos=False):
        if self.kind == "hf":
            ids = self.hf.encode(text, add_special_tokens=False).ids
            return [self.bos_id] * (bos and self.bos_id is not None) + ids + [self.eos_id] * eos
        if self.tiktoken is None:
            ids = self.sp.encode(text)
        else:
            # allowed_special=set(): "<|eot_id|>" written in the data is text, never the control token;
            # disallowed_special=(): ...and no error for it either (tiktoken's default raises).
            pieces = [p for i in range(0, len(text), MAX_ENCODE_CHARS)
                      for p in cut_long_runs(text[i:i + MAX_ENCODE_CHARS])]
            ids = [t for p in pieces for t in self.tiktoken.encode(p, allowed_special=set(), disallowed_special=())]
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids):
        ids = [int(i) for i in ids]
        if self.kind == "hf":
            return self.hf.decode(ids, skip_special_tokens=True)
        if self.tiktoken is None:
            return self.sp.decode(ids)  # control pieces (<s>, </s>) decode to nothing
        # as SentencePiece does with its control pieces: no control-token text in the output
        return self.tiktoken.decode([i for i in ids if i < self.n_base])


# A tokenizer.json's BOS, EOS, pad and stop ids come from the files beside it (hf_special_ids)
HF_CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
# The chat template a folder records (chat_template.py) goes wherever its tokenizer goes
TEMPLATE_FILES = ("chat_template.jinja", "template.json")


def copy_tokenizer(path, folder):
    """Copy a tokenizer file into `folder` under the name find_tokenizer looks for: tokenizer.model, or
    tokenizer.json with the config files beside it (copied alone it would lose its EOS and stop ids),
    and the chat template recorded beside it."""
    path, folder = Path(path), Path(folder)
    is_json = Tokenizer(path).kind == "hf"
    for src in [path, *(path.with_name(name) for name in HF_CONFIG_FILES if is_json),
                *(path.with_name(name) for name in TEMPLATE_FILES)]:
        dst = folder / ("tokenizer.json" if src == path and is_json else "tokenizer.model" if src == path else src.name)
        if src.is_file() and src.resolve() != dst.resolve():
            shutil.copyfile(src, dst)


def find_tokenizer(ckpt_dir, required=False):
    """Meta's download puts tokenizer.model one level above the size folders; ours beside the weights.
    A Hugging Face folder (it has config.json) reads its tokenizer.json first: that is the file
    transformers uses, and the only one that holds tokens added after training the SentencePiece model."""
    d = Path(ckpt_dir)
    if (d / "config.json").is_file():
        candidates = (d / "tokenizer.json", d / "tokenizer.model")
    else:
        candidates = (d / "tokenizer.model", d.parent / "tokenizer.model", d / "tokenizer.json")
    found = next((p for p in candidates if p.is_file()), None)
    if found is None and required:
        raise CheckpointError(f"{ckpt_dir}: no tokenizer.model or tokenizer.json beside the weights or one level up")
    return found


def run(argv):
    p = ArgumentParser(prog="tokenizer.py", description="Which tokenizer a file is, and the ids of a text.")
    p.add_argument("path", help="tokenizer.model (SentencePiece or LLaMA-3's tiktoken BPE) or tokenizer.json")
    p.add_argument("text", nargs="*", default=["Hello world"], help="text to encode")
    a = p.parse_args(argv)
    tok = Tokenizer(a.path)
    ids = tok.encode(" ".join(a.text))
    print(f"{tok.kind}, {tok.n_words} ids, bos {tok.bos_id}, eos {tok.eos_id}, pad {tok.pad_id}, stop {tok.stop_ids}")
    print(ids)
    print(repr(tok.decode(ids)))


def main(argv=None):
    return run_main("tokenizer.py", run, argv)


if __name__ == "__main__":
    sys.exit(main())
