"""Our tokenizers as Hugging Face tokenizer.json files that give exactly their ids, for the folders that
transformers, vLLM and lm-evaluation-harness read: SentencePiece in the layout of LLaMA-2's own
tokenizer.json, LLaMA-3's tiktoken BPE as byte-level BPE. Read back by tokenizer.Tokenizer, like any.

    write_hf_tokenizer(Tokenizer("llama-2-7b/tokenizer.model"), "out/final_hf")
    python hf.py to-hf llama-2-7b/ llama-2-7b-hf/      # the command that writes one beside the weights
"""
import itertools
import json
import shutil
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from checks import CheckpointError
from tokenizer import PAT_STR, SPECIAL_TOKENS, copy_tokenizer, read_bpe_ranks


def sentencepiece_merges(sp, normal):
    """Every split of a piece into two pieces, as BPE merges. SentencePiece merges the adjacent pair
    whose joined piece scores highest, so the ranks follow the joined piece's score, not its id: the
    whitespace-only pieces ("▁▁", ...) sit early by id but score -1e9, and ranked by id they would merge
    runs of spaces before the words around them. Equal scores (those same pieces) go to the leftmost
    pair in SentencePiece, which ranks cannot say; ranking the longer joined piece first does the
    same thing for a run of one character: it grows from its left end."""
    merges = []
    for piece, i in normal.items():
        for k in range(1, len(piece)):
            if piece[:k] in normal and piece[k:] in normal:
                merges.append(((-sp.get_score(i), -len(piece), -k), (piece[:k], piece[k:])))
    return [pair for _, pair in sorted(merges)]


def sentencepiece_as_hf(tok):
    """A LLaMA-1/2-layout SentencePiece model (identity normalisation, dummy prefix, byte fallback) as a
    tokenizers.Tokenizer that gives the same ids, in the layout of LLaMA-2's own tokenizer.json."""
    sp = tok.sp
    pieces = [sp.id_to_piece(i) for i in range(sp.vocab_size())]
    control = [i for i in range(len(pieces)) if sp.is_control(i) or sp.is_unknown(i)]
    # only normal pieces take part in merging: control pieces and <0x..> bytes never come from text
    normal = {p: i for i, p in enumerate(pieces) if not (i in control or sp.is_byte(i) or sp.is_unused(i))}
    has_bytes = any(sp.is_byte(i) for i in range(len(pieces)))
    hf = HFTokenizer(models.BPE({p: i for i, p in enumerate(pieces)}, sentencepiece_merges(sp, normal),
                                unk_token=pieces[sp.unk_id()], fuse_unk=True, byte_fallback=has_bytes))
    # SentencePiece's dummy prefix and its "▁" for spaces; no pre-tokenizer: the text is one word
    hf.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    hf.add_special_tokens([AddedToken(pieces[i], special=True, normalized=False) for i in control])
    add_bos_post_processor(hf, pieces[tok.bos_id], tok.bos_id)
    # a model trained with other normaliser settings (nmt_nfkc, squeezed spaces, no dummy prefix) would
    # tokenize differently: refuse it rather than write a tokenizer.json that disagrees
    probe = "  Héllo,  ﬁne\tworld ①!\n"
    if hf.encode(probe, add_special_tokens=False).ids != sp.encode(probe):
        raise CheckpointError(f"{tok.path}: this SentencePiece model normalises text in a way tokenizer.json "
                              "cannot reproduce here (only LLaMA's layout is converted)")
    return hf


def byte_chars():
    """GPT-2's byte-level alphabet, as tokenizers' ByteLevel uses it: printable bytes stand for
    themselves, the others for the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(others)) for b in range(256)]


def last_merge(token, ranks):
    """The two tokens that byte-pair encoding joins into `token`: its bytes merged with the lower ranks
    only, lowest first, leftmost on ties (tiktoken's rule); None if that stops short of two."""
    parts, rank = [bytes([b]) for b in token], ranks[token]
    while len(parts) > 2:
        best, i = min((ranks.get(a + b, rank), i) for i, (a, b) in enumerate(itertools.pairwise(parts)))
        if best >= rank:
            return None
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts if len(parts) == 2 else None


def tiktoken_as_hf(tok):
    """LLaMA-3's tiktoken BPE as a byte-level tokenizers.Tokenizer that gives the same ids: Meta's regex
    as the pre-tokenizer, the ranks as vocabulary and merges, the 256 control tokens after them.
    Meta's encode also cuts runs of over 25k characters (cut_long_runs); this does not."""
    ranks = read_bpe_ranks(tok.path, tok.path.read_bytes())
    chars = byte_chars()
    def word(token):
        return "".join(chars[b] for b in token)
    by_rank = sorted(ranks, key=ranks.get)
    merges = [tuple(map(word, pair)) for pair in (last_merge(t, ranks) for t in by_rank if len(t) > 1) if pair]
    # ignore_merges: a word that is a token comes out whole, as in tiktoken, even where no chain of
    # merges leads to it
    hf = HFTokenizer(models.BPE({word(t): r for t, r in ranks.items()}, merges, ignore_merges=True))
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PAT_STR), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])  # bytes -> chars, no second regex
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in SPECIAL_TOKENS])
    assert all(hf.token_to_id(name) == i for name, i in tok.special_ids.items())  # numbered after the ranks
    add_bos_post_processor(hf, "<|begin_of_text|>", tok.bos_id)
    return hf


def add_bos_post_processor(hf, bos, bos_id):
    """BOS before the text (and before each of a pair), as LLaMA's tokenizer.json files do."""
    hf.post_processor = processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                                      special_tokens=[(bos, bos_id)])


def write_json(path, obj):
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_hf_tokenizer(tok, out_dir, model_max_length=None):
    """Write `tok` (a Tokenizer) into the existing folder out_dir as a Hugging Face tokenizer:
    tokenizer.json, tokenizer_config.json and special_tokens_map.json, plus a copy of tokenizer.model
    for SentencePiece. AutoTokenizer.from_pretrained(out_dir)(text).input_ids == tok.encode(text).
    A tokenizer read from a tokenizer.json is copied with the config files beside it."""
    out = Path(out_dir)
    if not out.is_dir():
        raise CheckpointError(f"{out}: not a folder (write_hf_tokenizer writes into an existing one)")
    if tok.kind == "hf":
        copy_tokenizer(tok.path, out)
        if (out / "tokenizer_config.json").is_file():
            return
        hf = tok.hf
    elif tok.kind == "sentencepiece":
        hf = sentencepiece_as_hf(tok)
        hf.save(str(out / "tokenizer.json"))
        if tok.path.resolve() != (out / "tokenizer.model").resolve():
            shutil.copyfile(tok.path, out / "tokenizer.model")  # for tools that read the SentencePiece file
    else:
        hf = tiktoken_as_hf(tok)
        hf.save(str(out / "tokenizer.json"))
    def name(i):
        return None if i is None else hf.id_to_token(i)
    tokens = {"bos_token": name(tok.bos_id), "eos_token": name(tok.eos_id), "pad_token": name(tok.pad_id)}
    if tok.kind == "sentencepiece":
        tokens["unk_token"] = name(tok.sp.unk_id())
    # PreTrainedTokenizerFast runs tokenizer.json as written (LlamaTokenizerFast would rebuild parts of it);
    # add_bos_token says the same as the post-processor, for the transformers versions that rebuild it
    # from these keys. No token_type_ids (LLaMA takes none); no clean-up of spaces before punctuation.
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **tokens,
              "add_bos_token": tok.bos_id is not None, "add_eos_token": False,
              "clean_up_tokenization_spaces": False, "model_input_names": ["input_ids", "attention_mask"]}
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    write_json(out / "tokenizer_config.json", config)
    write_json(out / "special_tokens_map.json", {k: v for k, v in tokens.items() if v is not None})
