"""Answer instructions with a finetuned LLaMA in slots of a static KV cache (continuous batching); writes the JSON
that AlpacaEval reads, resumably: the same command after Ctrl-C or kill -9 continues.

    python sample.py --ckpt out/final --prompts ../shared/data/alpaca_eval_instructions.json --out outputs.json
    python sample.py --ckpt out/final --prompt "Give three tips for staying healthy."   # streams one answer
"""
import argparse
import json
import sys
from collections import deque
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm import tqdm

import data
import fast_decode
import hf
import model as llama
from checks import ArgumentParser, DataError, UserError, atomic, number, read_json, run_main, writable_file
from partial import Partial, answers_key
from precision import choose_dtype
from stream import TextStream  # noqa: F401 (sample.TextStream)

# The paper's generation settings (the authors' eval_generate.py calls HF generate with do_sample=False,
# repetition_penalty=1.2, max_length=1024): greedy, penalty 1.2, 1024 tokens counting the prompt.
MAX_LENGTH = 1024
REPETITION_PENALTY = 1.2
ROWS_PER_BLOCK = 16  # decoding's attention runs per block of this many slots (block_lengths)


def apply_repetition_penalty(logits, seen, penalty):
    """CTRL's penalty (Keskar et al. 2019) as HF's RepetitionPenaltyLogitsProcessor applies it: the logit
    of every token already in the row (prompt or output) is divided by `penalty` when positive and
    multiplied by it when negative, so a seen token always becomes less likely. seen: (B, vocab) bool."""
    if penalty == 1.0:
        return logits
    out = logits.clone()  # one pass over the (B, vocab) logits; the rest touches the seen tokens only
    hit = out[seen]  # a row's prompt and answer so far: ~1k of SmolLM2's 49k tokens
    out[seen] = torch.where(hit > 0, hit / penalty, hit * penalty)
    return out


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


def fill_slots(owner, pending):
    """Continuous batching's bookkeeping: each free slot (owner[s] is None) takes the next pending
    prompt, in input order. owner: slot -> prompt index or None; pending: a deque of prompt indices.
    -> [(slot, prompt index)], the prompts to prefill now."""
    filled = []
    for s in range(len(owner)):
        if owner[s] is None and pending:
            owner[s] = pending.popleft()
            filled.append((s, owner[s]))
    return filled


def close_up(model, owner, col, seen, tok):
    """Keep the blocks of rows in the order their prompts started, so that block_lengths pays off: a
    slot freed in one block takes the oldest row of the later blocks (the lowest prompt index: prompts
    start in input order), whose own slot the next blocks fill the same way. Each block is then older
    than the next, every row grows by one column a step, so the blocks are about longest first, and the
    free slots, where new prompts go, end up in the last blocks. One move per later block and freed slot,
    each copying only the columns that row has filled (~20 MB for 1k columns of SmolLM2-135M, ~0.5 GB at
    7B, all layers): next to a decode step's reading of the whole cache, a small price."""
    B, size = len(owner), ROWS_PER_BLOCK
    for hole in (h for h in range(B) if owner[h] is None):
        later = [s for s in range((hole // size + 1) * size, B) if owner[s] is not None]
        if not later:
            continue
        s = min(later, key=lambda t: owner[t])
        for layer in model.layers:
            cache = layer.attention.cache
            cache.k[hole, :, :col[s]], cache.v[hole, :, :col[s]] = cache.k[s, :, :col[s]], cache.v[s, :, :col[s]]
        seen[hole], tok[hole], owner[hole], col[hole] = seen[s], tok[s], owner[s], col[s]
        owner[s], col[s] = None, 0  # an empty slot writes column 0 of its row: never read


def block_lengths(col):
    """Model.forward's cache_len for rows kept in about length order (close_up): per block of rows, its
    number of rows and the columns its longest row uses. Blocks of 16: at 64 slots on AlpacaEval answers
    of SmolLM2, 4 SDPA calls read ~40% less of the cache than one; more blocks read barely less, and
    each call has its own overhead."""
    return [(len(col[i:i + ROWS_PER_BLOCK]), max(col[i:i + ROWS_PER_BLOCK]) + 1)
            for i in range(0, len(col), ROWS_PER_BLOCK)]


@contextmanager
def cache_row(model, i):
    """Inside this block `model` is a batch-1 model whose cache is row i of the static cache: how
    continuous batching prefills a new prompt into a freed slot, the other rows untouched."""
    whole = [layer.attention.cache for layer in model.layers]
    for layer, cache in zip(model.layers, whole):
        layer.attention.cache = llama.KVCache(cache.k[i:i + 1], cache.v[i:i + 1])
    try:
        yield model
    finally:
        for layer, cache in zip(model.layers, whole):
            layer.attention.cache = cache


def prefill(model, prompts, slots, n_slots):
    """Run prompts (lists of ids) into their slots of the static cache at columns 0.., positions 0..
    -> each one's next-token logits (len(prompts), vocab). When every slot is filled at once (the
    start), one right-padded forward serves them all: the padding lands in columns that each row's
    first decode step overwrites or masks. A slot filled later is prefilled alone into a batch-1 view
    of its row, the other rows untouched. Only the last real token of each prompt goes through the
    vocab matmul."""
    device = model.output.weight.device
    if len(slots) == n_slots:
        lens = torch.tensor([len(p) for p in prompts], device=device)
        tokens = torch.zeros(len(prompts), int(lens.max()), dtype=torch.long, device=device)
        for i, p in enumerate(prompts):
            tokens[i, :len(p)] = torch.tensor(p, dtype=torch.long, device=device)
        last = (torch.arange(len(prompts), device=device), lens - 1)
        return model(tokens, cache_pos=torch.arange(tokens.shape[1], device=device), cache_len=tokens.shape[1],
                     head=lambda h, output: output(h[last][:, None]))[:, -1]
    out = []
    for s, p in zip(slots, prompts):
        with cache_row(model, s) as alone:
            out.append(prefill(alone, [p], [0], 1))
    return torch.cat(out)


@torch.inference_mode()
def generate(model, prompts, max_new_tokens, temperature=0.0, top_p=1.0, repetition_penalty=1.0,
             eos_id=None, seed=None, on_token=None, compile=False, batch_size=None, on_answer=None):
    """Continue each prompt (a list of token ids; lengths may differ) -> each prompt's new tokens, in
    the prompts' order, cut before the first stop token: eos_id is one id or a collection of ids
    (LLaMA-3 ends an answer at <|eot_id|>, <|eom_id|> or <|end_of_text|>: Tokenizer.stop_ids).
    max_new_tokens: an int, or one budget per prompt. Greedy when temperature is 0, else temperature
    + top-p sampling from a generator seeded by `seed` (the draws depend on the batch's composition;
    greedy results never do). on_token(i, token_id) is called for every new token of prompt i as it is
    chosen (streaming); on_answer(i, tokens) once prompt i's answer is complete (resumable output).

    Continuous batching on a static KV cache of batch_size rows, the slots (default: every prompt at
    once). A prompt is prefilled alone into a free slot, at columns 0.. of that row and its own RoPE
    positions; then every step feeds one token per slot at that slot's next column
    (fast_decode.decode_step). When answers end (a stop token or the budget), older rows move into the
    freed slots (close_up) and the next prompts take the free slots that are left, so no row computes
    for an answer that is done, blocks of rows stay in the order they started (about longest first, so
    each block attends only to the columns its own longest row uses), and a prompt gives exactly the
    tokens it gives alone. compile=True runs the step through torch.compile (the same
    tokens): slots and cache lengths come in buckets, so the first call of each shape pays the compile."""
    if not prompts:
        return []
    per_prompt = isinstance(max_new_tokens, (list, tuple))
    budgets = [int(n) for n in max_new_tokens] if per_prompt else [int(max_new_tokens)] * len(prompts)
    if len(budgets) != len(prompts):
        raise ValueError(f"{len(budgets)} max_new_tokens for {len(prompts)} prompts")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt: pass at least the BOS token")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    answers = [[] for _ in prompts]
    pending = deque(i for i, n in enumerate(budgets) if n > 0)
    for i in (i for i, n in enumerate(budgets) if n <= 0):
        if on_answer is not None:
            on_answer(i, [])
    if not pending:
        return answers
    B = min(batch_size or len(pending), len(pending))
    B = fast_decode.batch_bucket(B) if compile else B  # few shapes, few compiles: spare slots stay empty
    # a slot's last chosen token is never fed back: an answer of n tokens fills prompt + n - 1 columns
    L = fast_decode.cache_length(max(len(prompts[i]) + budgets[i] - 1 for i in pending), compile)
    was_training = model.training
    model.eval()
    device = model.output.weight.device
    owner, col = [None] * B, [0] * B  # per slot: its prompt's index, the cache column of its next token
    seen = torch.zeros(B, model.args.vocab_size, dtype=torch.bool, device=device)  # for the penalty
    logits = torch.zeros(B, model.args.vocab_size, device=device)
    rows = torch.arange(B, device=device)
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    stop = set() if eos_id is None else {int(i) for i in eos_id} if hasattr(eos_id, "__iter__") else {int(eos_id)}
    step_fn = fast_decode.step_function(model, B, L, compile)
    try:
        while True:
            filled = fill_slots(owner, pending)
            if filled:
                slots = [s for s, _ in filled]
                logits[slots] = prefill(model, [prompts[i] for _, i in filled], slots, B).float()
                for s, i in filled:
                    seen[s] = False
                    seen[s, torch.tensor(prompts[i], device=device)] = True
                    col[s] = len(prompts[i])
            tok = next_token(logits, seen, temperature, top_p, repetition_penalty, generator)
            seen[rows, tok] = True
            ended = False
            for s, t in enumerate(tok.tolist()):  # one sync per step: cheap next to a forward pass
                i = owner[s]
                if i is None:
                    continue
                if t not in stop:
                    answers[i].append(t)
                    if on_token is not None:
                        on_token(i, t)
                if t in stop or len(answers[i]) == budgets[i]:
                    owner[s], col[s], ended = None, 0, True  # an empty slot writes column 0: never read
                    if on_answer is not None:
                        on_answer(i, answers[i])
            if not pending and all(o is None for o in owner):
                break
            if ended:
                close_up(model, owner, col, seen, tok)
            in_use = None if compile else block_lengths(col)  # eager: attend to the columns in use only
            logits.copy_(step_fn(model, tok, rows.new_tensor(col), in_use))
            col = [c + (o is not None) for c, o in zip(col, owner)]
    finally:
        if not compile:  # a compiled step keeps its cache, built for those buffers; eager frees it
            model.clear_cache()
        model.train(was_training)
    return answers


def read_prompts(path):
    """A JSON list (or JSONL) of {"instruction", ["input"], ["dataset"], ...}: AlpacaEval's file, Alpaca data."""
    records = read_json(path, DataError, expect=list, jsonl=True)  # one line naming the file if it is not
    if not isinstance(records, list) or not records:
        raise DataError(f"{path}: expected a non-empty JSON list of {{\"instruction\": ...}} records")
    for i, r in enumerate(records):
        if not isinstance(r, dict) or not isinstance(r.get("instruction"), str):
            raise DataError(f"{path}: record {i} has no \"instruction\" string")
        if not isinstance(r.get("input") or "", str):
            raise DataError(f"{path}: record {i}: \"input\" is not a string")
    return records


def user_message(record, meta_prompt=None):
    # The paper's length control: models are also asked for longer answers with meta-prompts such as
    # "Generate a long response", to see whether length alone buys the win rate (longer answers score
    # better but do not close the gap). Where the authors put the text in the prompt is not stated;
    # it is appended on a new line here.
    content = record["instruction"] + (f"\n{meta_prompt}" if meta_prompt else "")
    msg = {"role": "user", "content": content}
    if record.get("input"):
        msg["input"] = record["input"]
    return msg


def generator_name(ckpt):
    """AlpacaEval's model name: the checkpoint folder's name, or its parent's for train.py's OUT/final."""
    p = Path(ckpt).resolve()
    return p.parent.name if p.name in ("final", "final_hf") else p.name


def write_json_atomic(path, obj):
    """indent=1, raw UTF-8: how AlpacaEval's own model_outputs.json files are written; never half a file."""
    with atomic(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def load_tokenizer(ckpt):
    return llama.Tokenizer(llama.find_tokenizer(ckpt, required=True))


def load(ckpt, dtype, device):
    """A Meta folder (params.json) or a Hugging Face one (config.json) -> (model, tokenizer)."""
    return hf.load_any(ckpt, dtype=dtype, device=device), load_tokenizer(ckpt)


def pick_dtype(a, partial):
    """precision.choose_dtype, as train.py uses it (--dtype; bf16 on CUDA; on a CPU bf16 only where a
    matmul timing finds it clearly faster); an unfinished run continues in the dtype it started with."""
    if partial is not None and partial.header is not None:
        kept = partial.header["dtype"]
        if a.dtype and a.dtype != kept:
            raise UserError(f"--dtype {a.dtype}: {partial.path} was started in {kept}; drop --dtype, pass "
                            f"--dtype {kept}, or delete that file to start afresh")
        return kept, f"kept from the unfinished run in {partial.path}"
    return choose_dtype(argparse.Namespace(resume=False, dtype=a.dtype), torch.device(a.device), None)


def check_args(a):
    """Every number, path and the device, before the model is loaded: a mistake costs one line, and
    never hours of generation (a bad --out would otherwise surface only when the answers are written)."""
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
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"--device {a.device}: not usable here ({why})") from None


def run(argv):
    p = ArgumentParser(prog="sample.py", description=__doc__.splitlines()[0])
    add = p.add_argument
    add("--ckpt", required=True, help="a Meta folder (params.json, consolidated.NN.pth) or a Hugging Face one")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", help='JSON list of {"instruction", ["input"], ["dataset"]}: AlpacaEval\'s file')
    src.add_argument("--prompt", help="one instruction; its answer is streamed to stdout")
    add("--template", choices=data.TEMPLATES, help="prompt format (default: the one the checkpoint records, "
        "from train.py or the Hugging Face folder's own chat template)")
    add("--out", default="outputs.json", help="AlpacaEval outputs file, with --prompts (default: outputs.json)")
    add("--overwrite", action="store_true", help="replace an existing --out file")
    add("--generator", help="model name written into the outputs (default: the checkpoint's folder name)")
    add("--max-length", type=int, default=MAX_LENGTH, help="token budget counting the prompt, as HF's max_length "
        "(default: 1024, the paper's)")
    add("--max-new-tokens", type=int, help="new tokens per answer (overrides --max-length)")
    add("--temperature", type=float, default=0.0, help="0 = greedy, the paper's setting (default: 0)")
    add("--top-p", type=float, default=1.0, help="nucleus sampling mass, with --temperature > 0 (default: 1)")
    add("--repetition-penalty", type=float, default=REPETITION_PENALTY, help="CTRL's penalty (default: 1.2, the "
        "paper's)")
    add("--meta-prompt", help='append "\\n" + this to every instruction, e.g. "Generate a long response"')
    add("--batch-size", type=int, default=32, help="slots: answers generated together; a slot whose answer ends "
        "takes the next prompt at once (default: 32)")
    add("--limit", type=int, help="answer only the first N prompts")
    add("--seed", type=int, default=0, help="the sampling generator's seed (default: 0)")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="default: cuda if present, else cpu")
    add("--dtype", choices=("bf16", "fp32"), help="default: bf16 on CUDA; on a CPU bf16 where a matmul timing "
        "finds it clearly faster, else fp32")
    add("--compile", action="store_true", help="torch.compile the one-token decode step (same tokens; pays off for "
        "long answers, CUDA graphs on GPU; on a CPU kept only where it times faster)")
    a = p.parse_args(argv)
    check_args(a)
    template = data.pick_template(a.ckpt, a.template)  # before the model loads: one line if there is none
    records = read_prompts(a.prompts)[:a.limit] if a.prompts is not None else None
    partial = Partial(a.out) if records is not None else None
    dtype_name, why = pick_dtype(a, partial)
    tok = load_tokenizer(a.ckpt)
    ids = []
    for i, r in enumerate(records or [{"instruction": a.prompt}]):
        try:
            ids.append(data.prompt_ids([user_message(r, a.meta_prompt)], tok, template))
        except ValueError as e:
            raise UserError(f"{a.prompts or '--prompt'}: record {i}: {e}") from None
    # HF's max_length counts the prompt; per prompt here, so a batch's longest prompt shortens no other.
    budgets = [a.max_new_tokens if a.max_new_tokens is not None else max(0, a.max_length - len(x)) for x in ids]
    if 0 in budgets:
        print(f"sample.py: warning: {budgets.count(0)} prompt(s) use the whole budget; their answers are empty",
              file=sys.stderr)
    settings = dict(temperature=a.temperature, top_p=a.top_p, repetition_penalty=a.repetition_penalty,
                    eos_id=tok.stop_ids, seed=a.seed, compile=a.compile)
    if partial is not None:  # before the model is loaded: another command's answers cost one line
        partial.start(dtype_name, answers_key(a.ckpt, ids, budgets, settings, dtype_name))
    model = load(a.ckpt, {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name], a.device)[0]
    print(f"dtype: {dtype_name} ({why})", file=sys.stderr)  # once the checkpoint has loaded: a mistake is one line

    if records is None:
        stream = TextStream(tok)
        generate(model, ids, budgets, **settings, on_token=lambda row, t: stream.put(t))
        stream.end()
        return 0

    answers = [partial.done.get(i) for i in range(len(ids))]
    # Longest prompts first: memory trouble shows at once. The answers go back in the prompts' order.
    todo = sorted((i for i, x in enumerate(answers) if x is None), key=lambda i: -len(ids[i]))
    if len(todo) < len(ids):
        print(f"continuing {partial.path}: {len(ids) - len(todo)} of {len(ids)} answers were done", file=sys.stderr)
    bar = tqdm(total=len(ids), initial=len(ids) - len(todo), desc="generating", unit="answer")
    at_budget = []  # answers cut by the token budget, not ended by the model: often the longest, and repetitive

    def finished(j, new):  # written as it comes: a killed run loses only the answers under way
        answers[todo[j]] = tok.decode(new)
        partial.add({"index": todo[j], "output": answers[todo[j]]})
        if len(new) == budgets[todo[j]]:
            at_budget.append(todo[j])
            bar.set_postfix(at_budget=len(at_budget))
        bar.update()
    generate(model, [ids[i] for i in todo], [budgets[i] for i in todo], **settings, batch_size=a.batch_size,
             on_answer=finished)
    bar.close()
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
        raise UserError(f"{a.out}: {e.strerror or e}") from None
    partial.path.unlink()
    print(f"wrote {len(outputs)} answers to {a.out} ({len(at_budget)} of them stopped by the token budget "
          "in this run)", file=sys.stderr)


def main(argv=None):
    return run_main("sample.py", run, argv)


if __name__ == "__main__":
    sys.exit(main())
