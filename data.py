"""From a JSON/JSONL instruction file to (input_ids, labels, mask) batches: read, template, tokenize, pack.

    python data.py ../shared/data/sharegpt_demo.json --tokenizer ../shared/tokenizers/mistral_v1_32k.model --pack
"""
import random
import sys
from pathlib import Path

import torch

from chat_template import ChatTemplate, folder_template
from checks import ArgumentParser, DataError, UserError, number, read_json, run_main
from model import Tokenizer

IGNORE = -100  # the label F.cross_entropy skips (its default ignore_index)
FORMATS = ("alpaca", "sharegpt", "messages")
TEMPLATES = ("alpaca", "llama2-chat", "vicuna", "llama3-chat", "chatml")
# ShareGPT "from" values: FastChat's demo file has human/gpt, raw dumps name the site (chatgpt, bing, bard)
ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
         "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}


# ---------------------------------------------------------------- reading records

def detect_format(records, path):
    if not isinstance(records[0], dict):
        raise DataError(f"{path}: record 0: expected a JSON object, got {type(records[0]).__name__}")
    for fmt, key in (("sharegpt", "conversations"), ("messages", "messages"), ("alpaca", "instruction")):
        if key in records[0]:
            return fmt
    raise DataError(f"{path}: cannot tell the format from record 0's keys {sorted(records[0])}: expected "
                    "'instruction' (alpaca), 'conversations' (sharegpt) or 'messages'")


def field(record, key, i, path, kind=str):
    if key not in record:
        raise DataError(f"{path}: record {i}: missing field '{key}'")
    if not isinstance(record[key], kind):
        got = type(record[key]).__name__
        raise DataError(f"{path}: record {i}: field '{key}' should be a {kind.__name__}, got {got}")
    return record[key]


def normalise_chat(messages, i, path):
    """Clean a chat so it reads [system], user, assistant, user, assistant ... ending on an answer."""
    out = []
    for j, m in enumerate(messages):
        if m["role"] == "system" and j > 0:
            raise DataError(f"{path}: record {i}: a system message is allowed only first (found at message {j})")
        if out and out[-1]["role"] == m["role"]:  # a repeated turn (e.g. a reply sent twice): one message
            out[-1] = {"role": m["role"], "content": out[-1]["content"] + "\n\n" + m["content"]}
        elif m["role"] == "assistant" and (not out or out[-1]["role"] == "system"):
            continue  # an opening assistant turn answers nothing; FastChat's train.py skips it too
        else:
            out.append(dict(m))
    while out and out[-1]["role"] != "assistant":  # nothing to learn after the last answer
        out.pop()
    return out  # [] or [system] when the record has no answer at all: load_dataset skips it


def normalise(record, fmt, i, path):
    if not isinstance(record, dict):
        raise DataError(f"{path}: record {i}: expected a JSON object, got {type(record).__name__}")
    if fmt == "alpaca":
        # Alpaca ships "input": "" when there is none; Evol-Instruct and others leave the key out
        return [{"role": "user", "content": field(record, "instruction", i, path),
                 "input": field(record, "input", i, path) if record.get("input") is not None else ""},
                {"role": "assistant", "content": field(record, "output", i, path)}]
    key, role_key, text_key = ("conversations", "from", "value") if fmt == "sharegpt" else ("messages", "role",
                                                                                            "content")
    messages = []
    for j, m in enumerate(field(record, key, i, path, kind=list)):
        if not isinstance(m, dict) or not isinstance(m.get(role_key), str) or not isinstance(m.get(text_key), str):
            raise DataError(f"{path}: record {i}: message {j} needs '{role_key}' and a string '{text_key}'")
        role = ROLES.get(m[role_key]) if fmt == "sharegpt" else m[role_key]
        if role not in ("system", "user", "assistant"):
            raise DataError(f"{path}: record {i}: unknown role {m[role_key]!r} in message {j}")
        messages.append({"role": role, "content": m[text_key]})
    return normalise_chat(messages, i, path)


def read_format(path, fmt=None):  # -> (records as normalised chats, the format)
    raw = read_json(path, DataError, expect=list, jsonl=True)  # a JSON list, or JSONL: one record per line
    if not raw:
        raise DataError(f"{path}: empty dataset (no records)")
    if fmt is not None and fmt not in FORMATS:
        raise DataError(f"{path}: unknown format {fmt!r} (choose from {', '.join(FORMATS)})")
    fmt = fmt or detect_format(raw, path)
    return [normalise(r, fmt, i, path) for i, r in enumerate(raw)], fmt


# ---------------------------------------------------------------- templates

# Stanford Alpaca's PROMPT_DICT (tatsu-lab/stanford_alpaca train.py), the template NEFTune used.
ALPACA_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                "Write a response that appropriately completes the request.\n\n"
                "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:")
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.\n\n"
                   "### Instruction:\n{instruction}\n\n### Response:")
# Meta's llama/generation.py chat_completion
B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
# FastChat's vicuna_v1.1 conversation template
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")


class Special(str):
    """<s>, </s> or a control token (LLaMA-3's, ChatML's) inside a template: stands for the token id, never
    encoded as text."""


BOS, EOS = Special("<s>"), Special("</s>")
# Meta's LLaMA-3 chat format (llama-models ChatFormat); <|begin_of_text|> is the tokenizer's BOS
START_HEADER, END_HEADER, EOT = Special("<|start_header_id|>"), Special("<|end_header_id|>"), Special("<|eot_id|>")
# ChatML (SmolLM2, Qwen, transformers' default chat template): tokens a tokenizer.json adds
IM_START, IM_END = Special("<|im_start|>"), Special("<|im_end|>")
# what a template's control tokens ask of the tokenizer, for the error when it lacks them
NEEDS = {"llama3-chat": "a LLaMA-3 tokenizer",
         "chatml": "a tokenizer.json with ChatML's <|im_start|> and <|im_end|> tokens (SmolLM2's, Qwen's, ...)"}


def default_template(fmt):
    return "alpaca" if fmt == "alpaca" else "vicuna"


def recorded_template(folder):
    """chat_template.folder_template(folder), a name that template.json records checked against TEMPLATES."""
    template = folder_template(folder)
    if template is None or isinstance(template, ChatTemplate) or template in TEMPLATES:
        return template
    raise UserError(f"{Path(folder) / 'template.json'}: unknown template {template!r} (one of {', '.join(TEMPLATES)})")


def pick_template(folder, flag):
    """The template to prompt the model in `folder` with: --template's name when given (one warning line
    when the folder records another), else the one the folder records (chat_template.py: a name of
    TEMPLATES, or a ChatTemplate for its own Jinja template). Neither: a UserError naming --template."""
    recorded = recorded_template(folder) if folder is not None else None
    if flag is not None:
        if flag not in TEMPLATES:
            raise UserError(f"--template: unknown {flag!r} (choose from {', '.join(TEMPLATES)})")
        if recorded is not None and recorded != flag:
            print(f"warning: --template {flag} differs from the template {folder} was trained with ({recorded})",
                  file=sys.stderr)
        return flag
    if recorded is None:
        raise UserError(f"{folder}: records no chat template (no template.json, chat_template.jinja or "
                        f"tokenizer_config.json chat_template); pass --template ({', '.join(TEMPLATES)})")
    return recorded


def user_text(m):  # an alpaca record's input joins its instruction in the chat templates
    return m["content"] + "\n\n" + m["input"] if m.get("input") else m["content"]


def split_turns(messages):
    """[system], user, assistant, ..., user[, assistant] -> (system or None, [(user message, answer or None)])."""
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
    rest = messages[system is not None:]
    roles = [m["role"] for m in rest]
    if not rest or roles != [("user", "assistant")[k % 2] for k in range(len(rest))]:
        roles = [m["role"] for m in messages]
        raise ValueError(f"expected alternating user/assistant turns starting with user, got {roles}")
    return system, [(rest[k], rest[k + 1]["content"] if k + 1 < len(rest) else None) for k in range(0, len(rest), 2)]


def pieces(messages, template):
    """The conversation as [(text, trained)]: each text is encoded on its own, trained = in the loss.
    A conversation ending with a user message ends with the prompt the model answers from."""
    system, turns = split_turns(messages)
    out = []
    if template == "alpaca":
        if len(turns) > 1:
            raise ValueError(f"the alpaca template is single-turn, this conversation has {len(turns)} turns: "
                             "use --template vicuna or llama2-chat")
        user, answer = turns[0]
        prompt = (ALPACA_INPUT if user.get("input") else ALPACA_NO_INPUT).format(instruction=user["content"],
                                                                                 input=user.get("input"))
        out += [(BOS, False), (prompt, False)]
        if answer is not None:
            out += [(answer, True), (EOS, True)]
    elif template == "llama2-chat":
        for k, (user, answer) in enumerate(turns):
            text = B_SYS + system + E_SYS + user_text(user) if k == 0 and system is not None else user_text(user)
            out += [(BOS, False), (f"{B_INST} {text.strip()} {E_INST}", False)]  # every turn opens with <s>
            if answer is not None:
                out += [(answer.strip(), True), (EOS, True)]  # Meta strips the answer too
    elif template == "llama3-chat":
        # <|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|> per message; a prompt ends
        # with an open assistant header. Role, "\n\n" and content are encoded apart, as Meta does.
        def header(role):
            return [(START_HEADER, False), (role, False), (END_HEADER, False), ("\n\n", False)]
        out.append((BOS, False))
        if system is not None:
            out += header("system") + [(system.strip(), False), (EOT, False)]
        for user, answer in turns:
            out += header("user") + [(user_text(user).strip(), False), (EOT, False)] + header("assistant")
            if answer is not None:
                out += [(answer.strip(), True), (EOT, True)]  # the answer and the <|eot_id|> ending it
    elif template == "chatml":
        # <|im_start|>{role}\n{content}<|im_end|>\n per message, content as it is (the HF templates strip
        # nothing); a prompt ends with an open assistant turn. Role line and content are encoded apart.
        def message(role, content):
            return [(IM_START, False), (role + "\n", False), (content, False), (IM_END, False), ("\n", False)]

        out.append((BOS, False))
        if system is not None:
            out += message("system", system)
        for user, answer in turns:
            out += message("user", user_text(user)) + [(IM_START, False), ("assistant\n", False)]
            if answer is not None:
                out += [(answer, True), (IM_END, True), ("\n", False)]  # trained: up to <|im_end|>, not the "\n"
    elif template == "vicuna":
        out.append((BOS, False))
        for k, (user, answer) in enumerate(turns):
            head = (VICUNA_SYSTEM if system is None else system) + " " if k == 0 else ""
            out.append((f"{head}USER: {user_text(user)} ASSISTANT:", False))
            if answer is not None:
                out += [(answer, True), (EOS, True)]
    else:
        raise ValueError(f"unknown template {template!r} (choose from {', '.join(TEMPLATES)})")
    return out


def render(messages, template):
    """The conversation as one string in each format's usual notation. The space before each answer
    is sentencepiece's dummy prefix: the answer is encoded on its own, so it starts with one
    (the byte-level BPEs of llama3-chat and chatml add none)."""
    prefix = template not in ("llama3-chat", "chatml")
    return "".join(" " + text if trained and not isinstance(text, Special) and prefix else text
                   for text, trained in pieces(messages, template))


# ---------------------------------------------------------------- tokenizing

def tokenize(messages, tok, template, max_len=512):
    """-> (input_ids, labels, truncated). labels[t] = input_ids[t] on answer tokens (and each answer's
    </s>), IGNORE elsewhere; train.py shifts them. Prompt and answer are separate sentencepiece calls
    so that the prompt's ids at generation time (prompt_ids) are exactly the ones trained on."""
    if isinstance(template, ChatTemplate):  # the folder's own: rendered as transformers renders it
        ids, trained = template.encode([{"role": m["role"], "content": user_text(m)} for m in messages], tok)
        labels = [i if t else IGNORE for i, t in zip(ids, trained)]
        return ids[:max_len], labels[:max_len], len(ids) > max_len
    ids, labels = [], []
    for text, trained in pieces(messages, template):
        if isinstance(text, Special) and text not in (BOS, EOS):
            if text not in tok.special_ids:
                raise ValueError(f"the {template} template needs {NEEDS[template]} (it has no {text} token)")
            part = [tok.special_ids[text]]
        elif isinstance(text, Special) and text == EOS:
            part = [tok.eos_id]
        elif isinstance(text, Special):
            # a tokenizer without a BOS (SmolLM2, Qwen): the conversation opens with its first message
            part = [] if tok.bos_id is None else [tok.bos_id]
        else:
            part = tok.encode(text, bos=False)
        ids += part
        labels += part if trained else [IGNORE] * len(part)
    return ids[:max_len], labels[:max_len], len(ids) > max_len


def prompt_ids(messages, tok, template):
    """The ids the model reads before answering a conversation that ends with a user message (a system
    message may open it): the prompt with the template's generation prompt. template: a name of
    TEMPLATES or pick_template's ChatTemplate."""
    if not messages or messages[-1]["role"] != "user":
        raise ValueError("prompt_ids needs a conversation whose last message is from the user")
    return tokenize(messages, tok, template, max_len=sys.maxsize)[0]


def tokenize_all(records, tok, template, max_len, source):
    """-> (examples, counts). Records with no answer are skipped; so are examples whose answer lies
    entirely beyond max_len (the prompt alone filled it: nothing to learn)."""
    examples, counts = [], {"records": len(records), "truncated": 0, "dropped": 0, "unanswered": 0}
    for i, messages in enumerate(records):
        if not any(m["role"] == "assistant" for m in messages):
            counts["unanswered"] += 1
            continue
        try:
            ids, labels, truncated = tokenize(messages, tok, template, max_len)
        except ValueError as e:
            raise DataError(f"{source}: record {i}: {e}") from None
        counts["truncated"] += truncated
        if all(label == IGNORE for label in labels):
            counts["dropped"] += 1
        else:
            examples.append({"input_ids": ids, "labels": labels})
    if not examples:
        raise DataError(f"{source}: no examples left ({len(records)} records, "
                        f"{counts['unanswered']} without an answer, "
                        f"{counts['dropped']} with no response token within max_len {max_len})")
    return examples, counts


def tokenize_records(records, tok, template, max_len=512, source="data", verbose=True):
    """Records -> examples {"input_ids", "labels"}, reporting truncation once, in one stderr line."""
    examples, c = tokenize_all(records, tok, template, max_len, source)
    if verbose and (c["truncated"] or c["unanswered"]):
        msg = (f"data.py: {c['truncated']} of {c['records']} examples in {source} longer than max_len {max_len} "
               f"were truncated ({c['dropped']} dropped: no response token left)")
        if c["unanswered"]:
            msg += f"; {c['unanswered']} records without an assistant turn skipped"
        print(msg, file=sys.stderr)
    return examples


def load_dataset(path, tok, template=None, max_len=512, fmt=None, verbose=True):
    records, fmt = read_format(path, fmt)
    return tokenize_records(records, tok, template or default_template(fmt), max_len, path, verbose)


def split_eval(examples, eval_frac, seed):
    """A deterministic held-out split: a seeded shuffle picks the eval examples; both keep file order."""
    n_eval = min(max(1, round(len(examples) * eval_frac)), len(examples) - 1) if eval_frac > 0 else 0
    held = set(random.Random(seed).sample(range(len(examples)), n_eval))
    return ([x for i, x in enumerate(examples) if i not in held], [x for i, x in enumerate(examples) if i in held])


# ---------------------------------------------------------------- batching

def collate(examples, pad_id):
    """Right-pad to the longest example: input_ids (B, T), labels (B, T) with IGNORE on padding,
    mask (B, T) True at real tokens; packed rows also get segment_ids and positions (0 on padding)."""
    T = max(len(x["input_ids"]) for x in examples)
    keys = ("segment_ids", "positions") if "segment_ids" in examples[0] else ()
    batch = {"input_ids": torch.full((len(examples), T), pad_id, dtype=torch.long),
             "labels": torch.full((len(examples), T), IGNORE, dtype=torch.long),
             "mask": torch.zeros(len(examples), T, dtype=torch.bool),
             **{k: torch.zeros(len(examples), T, dtype=torch.long) for k in keys}}
    for b, x in enumerate(examples):
        n = len(x["input_ids"])
        batch["mask"][b, :n] = True
        for k in ("input_ids", "labels") + keys:
            batch[k][b, :n] = torch.tensor(x[k], dtype=torch.long)
    return batch


def pack(examples, seq_len):
    """Greedy in order: append each example to the current row while it fits in seq_len, else start
    a new row. segment_ids number the documents 1, 2, ... (padding will be 0) so attention stays
    inside each one, and positions restart at 0 so every document sees the RoPE angles it would alone.
    Each example opens with <s> labelled IGNORE, so the shifted loss never asks the end of one
    document to predict the start of the next."""
    rows, row = [], None
    for x in examples:
        n = len(x["input_ids"])
        if n > seq_len:
            raise ValueError(f"an example of {n} tokens does not fit seq_len {seq_len}: truncate to max_len <= seq_len")
        if row is None or len(row["input_ids"]) + n > seq_len:
            row = {"input_ids": [], "labels": [], "segment_ids": [], "positions": []}
            rows.append(row)
        row["segment_ids"] += [(row["segment_ids"][-1] if row["segment_ids"] else 0) + 1] * n
        row["positions"] += range(n)
        row["input_ids"] += x["input_ids"]
        row["labels"] += x["labels"]
    return rows


def padding_fraction(examples, batch_size):
    """Pad tokens / all tokens when consecutive examples are collated batch_size at a time."""
    lengths = [len(x["input_ids"]) for x in examples]
    total = sum(len(b) * max(b) for b in (lengths[i:i + batch_size] for i in range(0, len(lengths), batch_size)))
    return 1 - sum(lengths) / total if total else 0.0


def run(argv):  # the command line: the statistics of a dataset
    p = ArgumentParser(prog="data.py", description="Statistics of an instruction dataset as train.py would see it.")
    p.add_argument("file", help="Alpaca, ShareGPT or messages records, JSON or JSONL")
    p.add_argument("--tokenizer", required=True, help="tokenizer.model (SentencePiece or LLaMA-3's) or tokenizer.json")
    p.add_argument("--template", choices=TEMPLATES, help="default: the chat template of the tokenizer's folder, "
                   "else alpaca for alpaca data, else vicuna")
    p.add_argument("--format", choices=FORMATS, help="default: detected from the records' keys")
    p.add_argument("--max-len", type=int, default=512, help="tokens per example; longer ones are truncated")
    p.add_argument("--batch-size", type=int, default=8, help="micro-batch size for the padding fraction")
    p.add_argument("--pack", action="store_true", help="also describe the packed rows")
    a = p.parse_args(argv)
    for flag, x in (("--max-len", a.max_len), ("--batch-size", a.batch_size)):
        number(flag, x, lo=1)
    tok = Tokenizer(a.tokenizer)
    records, fmt = read_format(a.file, a.format)
    template = a.template or folder_template(Path(a.tokenizer).parent) or default_template(fmt)
    examples, counts = tokenize_all(records, tok, template, a.max_len, a.file)
    n_tokens = sum(len(x["input_ids"]) for x in examples)
    n_response = sum(label != IGNORE for x in examples for label in x["labels"])
    rows = pack(examples, a.max_len)
    print(f"{a.file}: {fmt} format, {template} template, max_len {a.max_len}")
    print(f"examples        {len(examples)} of {len(records)} records ({counts['truncated']} truncated, "
          f"{counts['dropped']} dropped with no response token left, {counts['unanswered']} without an answer)")
    longest = max(len(x["input_ids"]) for x in examples)
    print(f"tokens          {n_tokens} (mean {n_tokens / len(examples):.1f}, max {longest})")
    print(f"response tokens {n_response} ({n_response / n_tokens:.1%} of tokens)")
    print(f"padding         {padding_fraction(examples, a.batch_size):.1%} at batch size {a.batch_size}, "
          f"{padding_fraction(rows, a.batch_size):.1%} packed (seq_len {a.max_len})")
    if a.pack:
        print(f"packed rows     {len(rows)} ({len(examples) / len(rows):.1f} examples and "
              f"{n_tokens / len(rows):.0f} tokens per row)")


def main(argv=None):
    return run_main("data.py", run, argv)


if __name__ == "__main__":
    sys.exit(main())
