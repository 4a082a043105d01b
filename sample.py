"""Answer instructions with a finetuned LLaMA, batched with a static KV cache; writes the JSON that AlpacaEval reads.

    python sample.py --ckpt out/final --prompts ../shared/data/alpaca_eval_instructions.json --out outputs.json
    python sample.py --ckpt out/final --prompt "Give three tips for staying healthy."   # streams one answer
"""
import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

import data
import model as llama
from checks import UserError, number, writable_file
from fast_decode import CACHE_BUCKET, attach_static_cache, compiled_step

# The paper's generation settings (the authors' eval_generate.py calls HF generate with do_sample=False,
# repetition_penalty=1.2, max_length=1024): greedy, penalty 1.2, 1024 tokens counting the prompt.
MAX_LENGTH = 1024
REPETITION_PENALTY = 1.2


def apply_repetition_penalty(logits, seen, penalty):
    """CTRL's penalty (Keskar et al. 2019) as HF's RepetitionPenaltyLogitsProcessor applies it: the logit
    of every token already in the row (prompt or output) is divided by `penalty` when positive and
    multiplied by it when negative, so a seen token always becomes less likely. seen: (B, vocab) bool."""
    if penalty == 1.0:
        return logits
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def sample_top_p(probs, top_p, generator=None):
    """Nucleus sampling (Holtzman et al. 2020): keep the most likely tokens until they hold top_p of the
    mass; the top token always stays, so a tiny top_p is greedy. probs: (B, vocab) -> (B,) token ids."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    sorted_probs[sorted_probs.cumsum(-1) - sorted_probs > top_p] = 0.0  # mass ranked above already > top_p
    choice = torch.multinomial(sorted_probs, 1, generator=generator)  # multinomial renormalises itself
    return order.gather(-1, choice)[:, 0]


def next_token(logits, seen, temperature, top_p, repetition_penalty, generator=None):
    # HF's order: the penalty acts on the raw logits, then temperature and top-p shape the distribution.
    logits = apply_repetition_penalty(logits.float(), seen, repetition_penalty)
    if temperature == 0:
        return logits.argmax(-1)
    return sample_top_p(torch.softmax(logits / temperature, dim=-1), top_p, generator)


@torch.inference_mode()
def generate(model, prompts, max_new_tokens, temperature=0.0, top_p=1.0, repetition_penalty=1.0,
             eos_id=None, seed=None, on_token=None, compile=False):
    """Continue each prompt (a list of token ids; lengths may differ) in one batch -> each prompt's new
    tokens, cut before the first stop token: eos_id is one id or a collection of ids (LLaMA-3 ends an
    answer at <|eot_id|>, <|eom_id|> or <|end_of_text|>: Tokenizer.stop_ids). max_new_tokens: an int,
    or one budget per prompt. Greedy when temperature is 0, else temperature + top-p sampling from a
    generator seeded by `seed` (the draws depend on the batch's composition; greedy results never do).
    on_token(row, token_id) is called for every new token as it is chosen (streaming).

    Prompts are left-padded so every row's next token sits in the same column: the padded prompt block
    is prefilled once, then each step feeds one token per row at cache position t. `mask` hides the
    padding and `positions` start each row's RoPE at its first real token, so a row gives exactly the
    tokens it gives alone. compile=True runs each step through torch.compile'd fast_decode.decode_step (the
    same tokens; the first call of each batch shape pays the compile)."""
    if not prompts:
        return []
    B = len(prompts)
    per_prompt = isinstance(max_new_tokens, (list, tuple))
    budgets = [int(n) for n in max_new_tokens] if per_prompt else [int(max_new_tokens)] * B
    if len(budgets) != B:
        raise ValueError(f"{len(budgets)} max_new_tokens for {B} prompts")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt: pass at least the BOS token")
    lens = [len(p) for p in prompts]
    P, N = max(lens), max(budgets)
    if N <= 0:
        return [[] for _ in prompts]
    was_training = model.training
    model.eval()
    device = model.output.weight.device
    tokens = torch.zeros(B, P, dtype=torch.long)  # pad id is irrelevant: masked out, never counted as seen
    for i, p in enumerate(prompts):
        tokens[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
    tokens = tokens.to(device)
    pad = torch.tensor([P - n for n in lens], device=device)
    cols = torch.arange(P, device=device)
    L = P + N - 1  # the last chosen token is never fed back
    if compile:
        L = CACHE_BUCKET * -(-L // CACHE_BUCKET)
    mask = torch.ones(B, L, dtype=torch.bool, device=device)  # generated columns are real tokens
    mask[:, :P] = cols >= pad[:, None]
    positions = (cols - pad[:, None]).clamp(min=0)  # padding's positions are masked anyway
    # Which tokens each row has seen, for the penalty: counted with scatter_add so padding adds 0
    # (a plain boolean scatter with repeated ids would be order-dependent).
    vocab = model.args.vocab_size
    seen = torch.zeros(B, vocab, dtype=torch.long, device=device).scatter_add_(1, tokens, mask[:, :P].long()) > 0
    budget = torch.tensor(budgets, device=device)
    n_out = torch.zeros(B, dtype=torch.long, device=device)
    done = budget <= 0
    out = torch.zeros(B, N, dtype=torch.long, device=device)
    rows = torch.arange(B, device=device)
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    stop = None if eos_id is None else torch.tensor([int(i) for i in eos_id] if hasattr(eos_id, "__iter__") else [int(eos_id)], device=device)
    key_mask = mask if bool((pad > 0).any()) else None  # no padding: SDPA's mask-free kernels
    if compile:
        attach_static_cache(model, B, L)
        step_fn = compiled_step(device)
    else:
        model.setup_cache(B, L)
    try:
        logits = model(tokens, mask=None if key_mask is None else key_mask[:, :P], positions=positions, cache_pos=0)[:, -1]
        for step in range(N):
            tok = next_token(logits, seen, temperature, top_p, repetition_penalty, generator)
            out[:, step] = tok
            is_eos = torch.isin(tok, stop) if stop is not None else torch.zeros_like(done)
            kept = ~done & ~is_eos  # a row's tokens are a prefix of out[i]: n_out counts it
            n_out += kept
            done |= is_eos | (n_out >= budget)
            seen[rows, tok] = True
            if on_token is not None:
                for i in kept.nonzero()[:, 0].tolist():
                    on_token(i, int(tok[i]))
            if step == N - 1 or bool(done.all()):  # one sync per step: cheap next to a forward pass
                break
            t = P + step
            if compile:
                logits = step_fn(model, tok, torch.tensor(t, device=device), pad, mask)
                continue
            step_mask = None if key_mask is None else key_mask[:, :t + 1]
            logits = model(tok[:, None], cache_pos=t, mask=step_mask, positions=(t - pad)[:, None])[:, -1]
    finally:
        model.clear_cache()
        model.train(was_training)
    return [row[:n].tolist() for row, n in zip(out.cpu(), n_out.tolist())]


def decode_speed(model, batch_size, new_tokens, prompt_len):
    """Tokens/s of greedy generation (prefill included) for random prompts, after one warm-up call."""
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, model.args.vocab_size, (batch_size, prompt_len), generator=g).tolist()
    generate(model, prompts, 2)
    sync = torch.cuda.synchronize if model.output.weight.is_cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = generate(model, prompts, new_tokens)
    sync()
    return sum(map(len, out)) / (time.perf_counter() - t0)


def is_exact(answer, reference):
    """Equal up to spaces at either end. An answer of None (cut off by the token budget, so never
    finished) is wrong."""
    return answer is not None and answer.strip() == reference.strip()


def exact_match(answers, references):
    return sum(map(is_exact, answers, references)) / len(references)


def exact_match_answers(model, tok, examples, batch_size=64):
    """Greedy answers (no repetition penalty: a sorted list repeats digits) to tokenized examples'
    prompts, scored against their training answers: how train.py reports what the demo model gets
    right on its held-out built-in tasks. A prompt is an example's ids before its first labelled
    token; the reference is the labelled rest, EOS dropped."""
    prompts, refs = [], []
    for x in examples:
        start = next(i for i, label in enumerate(x["labels"]) if label != data.IGNORE)
        prompts.append(x["input_ids"][:start])
        refs.append([t for t in x["input_ids"][start:] if t != tok.eos_id])
    budgets = [len(r) + 8 for r in refs]  # room for another tokenization of the same text
    answers = []
    for b in range(0, len(prompts), batch_size):
        new = generate(model, prompts[b:b + batch_size], budgets[b:b + batch_size], eos_id=tok.eos_id)
        answers += [tok.decode(n) if len(n) < budget else None for n, budget in zip(new, budgets[b:b + batch_size])]
    references = [tok.decode(r) for r in refs]
    rows = [{"prompt": tok.decode(p), "answer": a, "reference": r, "correct": is_exact(a, r)}
            for p, a, r in zip(prompts, answers, references)]
    return {"exact_match": exact_match(answers, references), "n": len(rows), "answers": rows}


class TextStream:
    """Prints generated tokens as text while they come. Decoding one piece at a time is wrong twice over:
    SentencePiece drops a piece's leading space when it starts the text, and a byte-fallback character
    spans several pieces. So decode from the last clean boundary and print only what the new token adds
    once it no longer ends in a half character (U+FFFD)."""

    def __init__(self, tok, file=None):
        self.tok, self.file = tok, file or sys.stdout
        self.ids, self.start, self.printed = [], 0, 0  # decode ids[start:]; ids[start:printed] are shown

    def put(self, token_id):
        self.ids.append(token_id)
        self._emit(final=False)

    def end(self):
        self._emit(final=True)
        self.file.write("\n")
        self.file.flush()

    def _emit(self, final):
        shown = self.tok.decode(self.ids[self.start:self.printed])
        text = self.tok.decode(self.ids[self.start:])
        if len(text) > len(shown) and (final or not text.endswith("\ufffd")):
            self.file.write(text[len(shown):])
            self.file.flush()
            # keep one piece of context so the next piece's leading space survives decoding
            self.start, self.printed = self.printed, len(self.ids)


def read_prompts(path):
    """A JSON list (or JSONL) of {"instruction", ["input"], ["dataset"], ...}: AlpacaEval's file, Alpaca data."""
    records = data.read_json(path)  # DataError naming the file when missing or not JSON
    if not isinstance(records, list) or not records:
        raise data.DataError(f"{path}: expected a non-empty JSON list of {{\"instruction\": ...}} records")
    for i, r in enumerate(records):
        if not isinstance(r, dict) or not isinstance(r.get("instruction"), str):
            raise data.DataError(f"{path}: record {i} has no \"instruction\" string")
        if not isinstance(r.get("input") or "", str):
            raise data.DataError(f"{path}: record {i}: \"input\" is not a string")
    return records


def user_message(record, meta_prompt=None):
    # The NEFTune paper's length control (its Table 5, as we recall it; we could not re-read the paper
    # here): models without NEFTune are asked for longer answers with the meta-prompts "Generate a long
    # response" and "Generate a comprehensive response", to see whether length alone buys the win
    # rate. Where the authors put the text in the prompt we do not know; we append it on a new line.
    content = record["instruction"] + (f"\n{meta_prompt}" if meta_prompt else "")
    msg = {"role": "user", "content": content}
    if record.get("input"):
        msg["input"] = record["input"]
    return msg


def generator_name(ckpt):
    """AlpacaEval's model name: the checkpoint folder's name, or its parent's for train.py's OUT/final."""
    p = Path(ckpt).resolve()
    return p.parent.name if p.name == "final" else p.name


def write_json_atomic(path, obj):
    """Write to a temporary sibling and rename it into place: an interrupted run leaves no half file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            # indent=1, raw UTF-8: how AlpacaEval's own model_outputs.json files are written
            json.dump(obj, f, indent=1, ensure_ascii=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def check_args(a):
    """Every number, path and the device, before the model is loaded: a mistake costs one line, and
    never hours of generation (a bad --out used to surface only when the answers were written)."""
    for flag, x in (("--batch-size", a.batch_size), ("--max-length", a.max_length), ("--limit", a.limit),
                    ("--max-new-tokens", a.max_new_tokens)):
        if x is not None:  # --limit and --max-new-tokens are optional
            number(flag, x, lo=1)
    number("--temperature", a.temperature, lo=0)
    number("--top-p", a.top_p, above=0, hi=1)
    number("--repetition-penalty", a.repetition_penalty, above=0)
    number("--seed", a.seed, lo=0, below=2**63)
    if not Path(a.ckpt).is_dir():
        raise UserError(f"{a.ckpt}: --ckpt folder not found")
    if a.prompts is not None:  # read_prompts names a missing or unreadable --prompts file
        writable_file("--out", a.out, a.overwrite)
    try:
        torch.empty(0, device=a.device)
    except (RuntimeError, AssertionError) as e:  # e.g. "Torch not compiled with CUDA enabled"
        raise UserError(f"--device {a.device}: not usable here ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def main(argv=None):
    p = argparse.ArgumentParser(prog="sample.py", description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="Meta-format folder (params.json, consolidated.NN.pth, tokenizer.model)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", help='JSON list of {"instruction", ["input"], ["dataset"]}')
    src.add_argument("--prompt", help="one instruction; its answer is streamed to stdout")
    p.add_argument("--template", default="alpaca", choices=data.TEMPLATES, help="prompt format used in training")
    p.add_argument("--out", default="outputs.json", help="AlpacaEval outputs file (with --prompts)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--generator", help="model name written into the outputs (default: the checkpoint's folder name)")
    p.add_argument("--max-length", type=int, default=MAX_LENGTH, help="token budget counting the prompt, as HF's max_length")
    p.add_argument("--max-new-tokens", type=int, help="new tokens per answer (overrides --max-length)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy, the paper's setting")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=REPETITION_PENALTY)
    p.add_argument("--meta-prompt", help='append "\\n" + this to every instruction, e.g. "Generate a long response"')
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--limit", type=int, help="answer only the first N prompts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("bf16", "fp32"), help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the one-token decode step (same tokens; "
                   "pays off for long answers, CUDA graphs on GPU)")

    def fail(msg):  # one line naming the file, exit 2, no traceback
        p.exit(2, f"sample.py: error: {msg}\n")

    p.error = fail  # argparse's own errors too: one line, not a usage block
    a = p.parse_args(argv)

    try:
        check_args(a)
        records = None
        if a.prompts is not None:
            records = read_prompts(a.prompts)[:a.limit]
        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype or ("bf16" if a.device.startswith("cuda") else "fp32")]
        model = llama.load_meta(a.ckpt, dtype=dtype, device=a.device)
        tok_path = llama.find_tokenizer(a.ckpt)
        if tok_path is None:
            raise llama.CheckpointError(f"{a.ckpt}: no tokenizer.model beside the weights or one level up")
        tok = llama.Tokenizer(tok_path)
    except (llama.CheckpointError, data.DataError, UserError) as e:
        fail(e)
    ids = []
    for i, r in enumerate(records or [{"instruction": a.prompt}]):
        try:
            ids.append(data.prompt_ids([user_message(r, a.meta_prompt)], tok, a.template))
        except (data.DataError, ValueError) as e:
            fail(f"{a.prompts or '--prompt'}: record {i}: {e}")
    # HF's max_length counts the prompt; per prompt here, so a batch's longest prompt shortens no other.
    budgets = [a.max_new_tokens if a.max_new_tokens is not None else max(0, a.max_length - len(x)) for x in ids]
    if 0 in budgets:
        print(f"sample.py: warning: {budgets.count(0)} prompt(s) use the whole budget; their answers are empty",
              file=sys.stderr)
    settings = dict(temperature=a.temperature, top_p=a.top_p, repetition_penalty=a.repetition_penalty,
                    eos_id=tok.stop_ids, seed=a.seed, compile=a.compile)

    if records is None:
        stream = TextStream(tok)
        generate(model, ids, budgets, **settings, on_token=lambda row, t: stream.put(t))
        stream.end()
        return 0

    # Longest prompts first: similar lengths share a batch (little padding), and memory trouble shows at once.
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    answers = [None] * len(ids)
    for b in tqdm(range(0, len(order), a.batch_size), desc="generating", unit="batch"):
        rows = order[b:b + a.batch_size]
        for i, new in zip(rows, generate(model, [ids[i] for i in rows], [budgets[i] for i in rows], **settings)):
            answers[i] = tok.decode(new)
    name = a.generator or generator_name(a.ckpt)
    outputs = []
    for r, answer in zip(records, answers):
        o = {"instruction": r["instruction"], "output": answer, "generator": name}
        if r.get("input"):  # Alpaca-format prompts: keep what tells two equal instructions apart
            o["input"] = r["input"]
        if "dataset" in r:
            o["dataset"] = r["dataset"]
        outputs.append(o)
    try:
        write_json_atomic(a.out, outputs)
    except OSError as e:
        fail(f"{a.out}: {e.strerror or e}")
    print(f"wrote {len(outputs)} answers to {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
