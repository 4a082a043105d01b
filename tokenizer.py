"""The two tokenizers of Meta's LLaMA folders behind one small interface, told apart by the file's contents:
SentencePiece (LLaMA-1/2) and the tiktoken BPE of LLaMA-3.x ("base64-token rank" per line).

    python tokenizer.py llama-3.2-1b/tokenizer.model "Hello <|eot_id|> world"
"""
import base64
import binascii
import re
import sys
from pathlib import Path

from checks import ArgumentParser, CheckpointError, run_main

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


class Tokenizer:
    """encode(text, bos, eos) -> ids, decode(ids) -> text, n_words, bos_id, eos_id, pad_id, stop_ids.

    SentencePiece, LLaMA-1/2 layout (<unk>=0, <s>=1, </s>=2). LLaMA's tokenizer has no pad piece
    (pad_id() is -1), so we pad with <unk> (0): padded positions are masked out of attention and
    carry label -100, so the id never reaches the model's output or the loss.

    LLaMA-3 (tiktoken BPE): bos = <|begin_of_text|>, eos = <|end_of_text|>, pad =
    <|finetune_right_pad_id|> (the token Meta reserved for it); an answer ends at <|end_of_text|>,
    <|eom_id|> or <|eot_id|>. Control tokens are never produced from text: `special_ids` maps their
    names to ids for the chat template, which inserts them by id."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{path}: tokenizer file not found")
        blob = self.path.read_bytes()
        first = blob.lstrip().split(b"\n", 1)[0].strip()
        if RANK_LINE.fullmatch(first):  # a SentencePiece model is a binary protobuf: never this
            self._init_tiktoken(read_bpe_ranks(path, blob))
        else:
            self._init_sentencepiece()

    def _init_sentencepiece(self):
        import sentencepiece as spm

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
        import tiktoken

        n_base = len(ranks)  # special ids follow the base vocabulary: 128000.. in Meta's 128k files
        self.special_ids = {name: n_base + i for i, name in enumerate(SPECIAL_TOKENS)}
        self.kind, self.n_base = "tiktoken", n_base
        self.tiktoken = tiktoken.Encoding(name=self.path.name, pat_str=PAT_STR, mergeable_ranks=ranks,
                                          special_tokens=self.special_ids)
        self.n_words = n_base + len(SPECIAL_TOKENS)
        self.bos_id, self.eos_id = self.special_ids["<|begin_of_text|>"], self.special_ids["<|end_of_text|>"]
        self.pad_id = self.special_ids["<|finetune_right_pad_id|>"]
        self.stop_ids = [self.eos_id, self.special_ids["<|eom_id|>"], self.special_ids["<|eot_id|>"]]

    def encode(self, text, bos=True, eos=False):
        if self.tiktoken is None:
            ids = self.sp.encode(text)
        else:
            # allowed_special=set(): "<|eot_id|>" written in the data is text, never the control token;
            # disallowed_special=(): ...and no error for it either (tiktoken's default raises).
            pieces = [p for i in range(0, len(text), MAX_ENCODE_CHARS) for p in cut_long_runs(text[i:i + MAX_ENCODE_CHARS])]
            ids = [t for p in pieces for t in self.tiktoken.encode(p, allowed_special=set(), disallowed_special=())]
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids):
        ids = [int(i) for i in ids]
        if self.tiktoken is None:
            return self.sp.decode(ids)  # control pieces (<s>, </s>) decode to nothing
        # as SentencePiece does with its control pieces: no control-token text in the output
        return self.tiktoken.decode([i for i in ids if i < self.n_base])


def find_tokenizer(ckpt_dir):
    """Meta's download puts tokenizer.model one level above the size folders; ours beside the weights."""
    for p in (Path(ckpt_dir) / "tokenizer.model", Path(ckpt_dir).parent / "tokenizer.model"):
        if p.is_file():
            return p
    return None


def run(argv):
    p = ArgumentParser(prog="tokenizer.py", description="Which tokenizer a file is, and the ids of a text.")
    p.add_argument("path", help="tokenizer.model (SentencePiece or LLaMA-3's tiktoken BPE)")
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
