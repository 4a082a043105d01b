"""A local AlpacaEval-style judge: an instruct model reads each instruction with a reference answer and a
model's answer, in both orders, and its two labels' probabilities give a soft preference; then raw and
length-controlled win rates with error bars. Resumable, and sharded under torchrun as train.py shards.

    python judge.py --judge SmolLM2-135M-Instruct --reference text_davinci_003.json neft.json base.json --out judged/
    python judge.py --annotations annotations.json --out rescored/     # win rates of any AlpacaEval annotations
    python judge.py --judge SmolLM2-135M-Instruct --agreement annotations.json   # agreement with a published judge
"""
import hashlib
import json
import os
import sys
from argparse import Namespace
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import checkpoint as ckpt
import data
import plots
import winrate
from checks import (
    ArgumentParser,
    DataError,
    UserError,
    atomic,
    make_folder,
    number,
    read_json,
    run_main,
    writable_folder,
)
from launch import acquire_lock, setup_distributed
from precision import choose_dtype
from tokenizer import Tokenizer, find_tokenizer

LABELS = ("A", "B")  # (label of output_1, label of output_2): one token each in LLaMA, LLaMA-3 and ChatML vocabularies
SYSTEM = ("You judge the answers of AI assistants. Given an instruction and two answers to it, you name the "
          "answer that a careful, knowledgeable person would prefer.")
USER = """Two assistants were given the same instruction. Read both answers and decide which one is better.

## Instruction

{instruction}

## The two answers

Each answer is marked by its label.

[Answer {l1}]
{output_1}
[End of answer {l1}]

[Answer {l2}]
{output_2}
[End of answer {l2}]

## What to do

Prefer the answer that follows the instruction more faithfully and is more correct, helpful and clear; \
do not prefer an answer for its length or its position. Reply with the label of the better answer only, \
{l1} or {l2}, with nothing before or after it.

## The better answer"""
PAD_LIMIT = 0.1  # a batch closes before its padding exceeds this share of its tokens


def judge_messages(instruction, output_1, output_2):
    """The chat a judge answers with one label: AlpacaEval 2's layout (a system turn, then the
    instruction, the two labelled answers, the task and a header for the answer), in our words."""
    user = USER.format(instruction=instruction, output_1=output_1, output_2=output_2, l1=LABELS[0], l2=LABELS[1])
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


# ---------------------------------------------------------------- the judge's template and labels

def label_forms(tok, labels=None):
    """Each label's token ids: every token that reads as the label, with or without a leading space
    (SentencePiece's "▁A" and "A", byte-level BPE's " A" and "A"); their probabilities are summed.
    A label that is not one token of this tokenizer cannot be read at one position: refused."""
    labels = labels or LABELS
    for label in labels:
        if len(tok.encode(label, bos=False)) != 1:
            raise UserError(f"{tok.path}: the label {label!r} is {len(tok.encode(label, bos=False))} tokens in the "
                            "judge's tokenizer; a label must be one token")
    texts = [tok.decode([i]) for i in range(tok.n_words)]
    return [[i for i, t in enumerate(texts) if t in (label, " " + label)] for label in labels]


# ---------------------------------------------------------------- reading and matching outputs

def read_outputs(path):
    """An AlpacaEval outputs file -> (generator, [(instruction, output)]). The generator is the records'
    own name, else the file's stem."""
    records = read_json(path, DataError, expect=list, jsonl=True)
    if not records:
        raise DataError(f"{path}: no records")
    rows = []
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise DataError(f"{path}: record {i}: expected a JSON object, got {type(r).__name__}")
        rows.append((data.field(r, "instruction", i, path), data.field(r, "output", i, path)))
    gen = records[0].get("generator")
    return (gen if isinstance(gen, str) and gen else Path(path).stem), rows


def match(reference, rows, path, ref_path, limit=None):
    """Pair each answer with the reference's answer to the same instruction text -> [(instruction,
    reference answer, answer)] in the file's order; the first `limit` rows with --limit (then the
    reference may hold more). Anything else missing, repeated or extra is one line with the counts."""
    ref = dict(reference)
    ref_dups = sum(c > 1 for c in Counter(i for i, _ in reference).values())
    if ref_dups:
        raise DataError(f"{ref_path}: {ref_dups} instruction(s) appear more than once; a reference needs each once")
    rows = rows[:limit]
    counts = Counter(i for i, _ in rows)
    dups, extra = sum(c > 1 for c in counts.values()), sum(i not in ref for i in counts)
    missing = 0 if limit else sum(i not in counts for i in ref)
    if dups or extra or missing:
        raise DataError(f"{path}: does not match {ref_path} by instruction: {missing} of its {len(ref)} instructions "
                        f"missing, {extra} not in it, {dups} repeated ({len(rows)} records)")
    return [(i, ref[i], out) for i, out in rows]


# ---------------------------------------------------------------- prompts

def fit_pair(tok, template, instruction, a, b, max_len):
    """Both orders' prompt ids of one pair, and whether its answers were cut. One rule for every pair:
    when a prompt would not fit max_len tokens, each answer longer than K tokens keeps its first K,
    K = half the room the prompt leaves (less what re-encoding the cut text adds): the same cut for
    both answers and both orders, so neither side nor position loses more."""
    def prompts(x, y):
        return [data.prompt_ids(judge_messages(instruction, x, y), tok, template),
                data.prompt_ids(judge_messages(instruction, y, x), tok, template)]
    ids = prompts(a, b)
    if max(map(len, ids)) <= max_len:
        return ids, False
    room = max_len - max(map(len, prompts("", "")))
    k = room // 2
    if k < 16:
        raise UserError(f"--max-len {max_len}: the judge's prompt alone takes {max_len - room} tokens, "
                        "leaving no room for the answers")
    ea, eb = tok.encode(a, bos=False), tok.encode(b, bos=False)
    while True:
        ids = prompts(tok.decode(ea[:k]) if len(ea) > k else a, tok.decode(eb[:k]) if len(eb) > k else b)
        over = max(map(len, ids)) - max_len
        if over <= 0:
            return ids, True
        k -= max(over, 1)


def prompt_key(judge_id, ids):
    """What a judgement is kept under: the judge (folder, dtype) and the prompt's ids, which hold the
    instruction, both answers in their order, the template and the labels."""
    return hashlib.sha256(json.dumps([judge_id, ids]).encode()).hexdigest()


def plan_batches(prompts, max_tokens):
    """Batches of prompts (key -> ids) of similar length: sorted by (length, key), a batch closes when
    the next prompt would exceed max_tokens (rows x longest) or PAD_LIMIT padding. The plan depends
    only on the set of prompts, so a resumed run recomputes its batches exactly as they were."""
    order = sorted(prompts, key=lambda k: (len(prompts[k]), k))
    batches, cur, cur_tokens = [], [], 0
    for k in order:
        n = len(prompts[k])  # the longest so far: sorted
        if cur and ((len(cur) + 1) * n > max_tokens or (len(cur) + 1) * n - (cur_tokens + n) > PAD_LIMIT * (
                len(cur) + 1) * n):
            batches.append(cur)
            cur, cur_tokens = [], 0
        cur.append(k)
        cur_tokens += n
    return batches + [cur] * bool(cur)


@torch.no_grad()
def label_probs(model, rows, forms, pad_id, device, autocast):
    """rows: prompt ids -> (B, 2) float64 probabilities of the two labels at the first answer position,
    over the whole vocabulary. One prefill; the output layer sees only each row's last position, so
    (B, T, vocab) logits never exist. Right padding: causal attention never looks at what follows."""
    lens = torch.tensor([len(r) for r in rows])
    x = torch.full((len(rows), int(lens.max())), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        x[i, :len(r)] = torch.tensor(r)
    last = (lens - 1).to(device)
    with autocast:
        logits = model(x.to(device), head=lambda h, out: out(h[torch.arange(len(rows), device=device), last]))
    probs = logits.double().softmax(-1)
    return torch.stack([probs[:, f].sum(-1) for f in forms], -1).cpu()


def read_cache(path):
    """key -> [P(label 1), P(label 2)] from a run's cache; a line cut short by kill -9 is ignored."""
    found = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
                found[r["key"]] = r["probs"]
            except (json.JSONDecodeError, KeyError, TypeError):
                pass
    return found


def judge_prompts(model, prompts, forms, pad_id, device, autocast, cache_path, max_tokens, rank=0, world=1):
    """key -> [P(label 1), P(label 2)] for every prompt, the ones in cache_path kept. Whole planned
    batches go to the ranks in turn; after each round rank 0 appends every rank's results to the
    cache (one write), so a kill loses at most a round. FSDP's forward is collective: a rank with no
    batch in the last round still runs one."""
    done = read_cache(cache_path)
    if world > 1:
        dist.barrier()  # every rank has read the cache before rank 0 appends to it: the same batches to do
    todo = [b for b in plan_batches(prompts, max_tokens) if not all(k in done for k in b)]
    rounds = range(0, len(todo), world)
    for r in tqdm(rounds, desc="judging", unit="round", disable=rank != 0 or not todo, dynamic_ncols=True):
        mine = todo[r + rank] if r + rank < len(todo) else todo[0][:1]
        probs = label_probs(model, [prompts[k] for k in mine], forms, pad_id, device, autocast).tolist()
        results = [dict(zip(mine, probs))] if r + rank < len(todo) else [{}]
        if world > 1:
            results = [None] * world
            dist.all_gather_object(results, dict(zip(mine, probs)) if r + rank < len(todo) else {})
        new = {k: v for res in results for k, v in res.items()}
        if rank == 0:
            with open(cache_path, "a") as f:
                f.write("".join(json.dumps({"key": k, "probs": v}) + "\n" for k, v in new.items()))
                f.flush()
                os.fsync(f.fileno())
        done |= new
    return done


def preference(p1, p2):
    """p1, p2: [P(label 1), P(label 2)] with the reference first (order 1) and the model first (order 2)
    -> (preference, P(model's label) in each order, label mass in each order). preference = 1 + the
    mean of P(model's label), written as 1.5 + (a2 - a1) / 2 (a = normalised P(first label)) so that
    swapping the files gives exactly 3 - p."""
    mass = [p1[0] + p1[1], p2[0] + p2[1]]
    if min(mass) <= 0:
        return None, [None, None], mass
    a1, a2 = p1[0] / mass[0], p2[0] / mass[1]
    return 1.5 + (a2 - a1) / 2, [1 - a1, a2], mass


def write_json(path, obj):
    with atomic(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


def write_board(out, by_generator, note=""):
    board = winrate.leaderboard(by_generator)
    make_folder("--out", out)
    write_json(out / "leaderboard.json", board)
    with atomic(out / "leaderboard.md") as tmp:
        tmp.write_text(winrate.leaderboard_md(board, note))
    with atomic(out / "judge.png") as tmp:
        plots.plot_leaderboard(board, tmp.with_suffix(".png"))
        tmp.with_suffix(".png").rename(tmp)
    return board


# ---------------------------------------------------------------- the command line

def check_args(a):
    for flag, x, lo in (("--limit", a.limit, 1), ("--max-len", a.max_len, 32), ("--batch-tokens", a.batch_tokens, 1)):
        if x is not None:
            number(flag, x, lo=lo)
    modes = [bool(a.outputs or a.reference), bool(a.annotations), bool(a.agreement)]
    if sum(modes) != 1:
        raise UserError("give model outputs with --reference, or --annotations, or --agreement (one of them)")
    if a.outputs and not a.reference or a.reference and not a.outputs:
        raise UserError("--reference REF.json needs one or more model outputs files after it, and they need it")
    if (modes[0] or modes[2]) and not a.judge:
        raise UserError("--judge JUDGE_DIR is needed to judge (--annotations alone needs no judge)")
    if a.judge and not Path(a.judge).is_dir():
        raise UserError(f"{a.judge}: --judge folder not found")
    writable_folder("--out", a.out)


def prepare(a, pairs_by_gen):
    """Everything that can be refused, before a process group or a weight: the tokenizer, the template,
    the labels, the weights' shapes, and every pair's prompts (identical answers need none). ->
    (tok, forms, init, max_len, {generator: [(ids order 1, ids order 2, cut) or None]})."""

    tok = Tokenizer(find_tokenizer(a.judge, required=True))
    template = data.pick_template(Path(a.judge), a.template)  # the folder's own, or --template
    if template == "alpaca":
        raise UserError("--template alpaca has no system turn; a judge needs a chat template (chatml, llama3-chat, "
                        "llama2-chat, vicuna)")
    forms = label_forms(tok)
    init = ckpt.read_init(a.judge, tok)  # the files' headers: shapes checked, no weight read yet
    max_len = a.max_len or init[0].max_seq_len
    prompts = {g: [None if x == y else fit_pair(tok, template, i, x, y, max_len) for i, x, y in pairs]
               for g, pairs in pairs_by_gen.items()}
    return tok, forms, init, prompts


def run_judge(a, tok, forms, init, prompts, out):
    """The judge's probabilities for every prompt -> {prompt ids as a tuple: probs}, under torchrun or
    in one process (a world of one, as train.py): FSDP2 shards the judge exactly as training does."""

    lock = None
    try:
        rank, world, device, mesh = setup_distributed(a.device)
        lock = acquire_lock(out, rank, device)
        settings = out / "judge_settings.json"  # a continued run keeps its dtype: the cache's keys hold it
        if a.dtype is None and settings.is_file():
            dtype_name, why = json.loads(settings.read_text())["dtype"], f"kept from {settings}"
        else:
            dtype_name, why = choose_dtype(Namespace(resume=False, dtype=a.dtype), device, out)
        if rank == 0:
            write_json(settings, {"dtype": dtype_name})
        dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
        autocast = torch.autocast("cpu", dtype=dtype) if device.type == "cpu" and dtype == torch.bfloat16 \
            else nullcontext()
        judge_id = [str(Path(a.judge).resolve()), dtype_name]
        keyed = {prompt_key(judge_id, ids): ids for rows in prompts.values() for r in rows if r for ids in r[0]}
        n_tokens = sum(map(len, keyed.values()))
        if rank == 0:
            print(f"judge.py: {len(keyed)} prompts ({n_tokens} tokens) on {world} rank(s), {dtype_name} ({why})",
                  file=sys.stderr)
        build_args = Namespace(lora_rank=0, act_ckpt=False, compile=False, seed=0)
        model = ckpt.build_model(build_args, init, tok.n_words, device, mesh, dtype).eval()
        found = judge_prompts(model, keyed, forms, tok.pad_id, device, autocast, out / "cache.jsonl",
                              a.batch_tokens, rank, world)
        return rank, {tuple(ids): found[k] for k, ids in keyed.items()}
    finally:
        if lock is not None:
            lock.release()
        if dist.is_initialized():
            dist.destroy_process_group()


def annotation_rows(pairs, prompts, probs, generator_1, generator_2, annotator):
    rows = []
    for (instruction, ref, answer), fitted in zip(pairs, prompts):
        pref, p_model, mass = (1.5, [None, None], [None, None]) if fitted is None else \
            preference(probs[tuple(fitted[0][0])], probs[tuple(fitted[0][1])])
        rows.append({"instruction": instruction, "output_1": ref, "generator_1": generator_1, "output_2": answer,
                     "generator_2": generator_2, "annotator": annotator, "preference": pref,
                     "p_model_order_1": p_model[0], "p_model_order_2": p_model[1], "label_mass": mass,
                     "truncated": bool(fitted and fitted[1])})
    return rows


def read_annotations(path, limit=None):
    rows = read_json(path, DataError, expect=list, jsonl=True)[:limit]
    if not rows:
        raise DataError(f"{path}: no records")
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise DataError(f"{path}: record {i}: expected a JSON object, got {type(r).__name__}")
        for key in ("instruction", "output_1", "output_2"):
            data.field(r, key, i, path)
        p = r.get("preference")
        if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not (p == 0 or 1 <= p <= 2)):
            raise DataError(f"{path}: record {i}: preference must be in [1, 2], 0 (a tie) or null, got {p!r}")
    return rows


def run(argv):
    p = ArgumentParser(prog="judge.py", description=__doc__.splitlines()[0])
    p.add_argument("outputs", nargs="*", help="AlpacaEval model_outputs files, each judged against --reference")
    p.add_argument("--judge", help="the judge: an instruct model's folder (Meta's layout or Hugging Face's)")
    p.add_argument("--reference", help="the reference outputs (AlpacaEval 1: text_davinci_003's)")
    p.add_argument("--annotations", nargs="+", help="re-score AlpacaEval annotation files (output_1 = the reference)")
    p.add_argument("--agreement", help="judge a published annotations file's pairs and compare the preferences")
    p.add_argument("--out", default="judged", help="folder of the annotations, leaderboard, cache (default: judged)")
    p.add_argument("--template", choices=data.TEMPLATES, help="the judge's chat template (default: the folder's own)")
    p.add_argument("--limit", type=int, help="judge only the first N records of each file")
    p.add_argument("--max-len", type=int, help="the judge's context in tokens (default: the model's max_seq_len)")
    p.add_argument("--batch-tokens", type=int, default=8192, help="rows x longest prompt per batch (default: 8192)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), help="default: bf16 on CUDA, else measured as train.py does")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if present")
    a = p.parse_args(argv)
    check_args(a)
    out = Path(a.out)
    if a.annotations:
        files = {path: {} for path in a.annotations}
        for path in a.annotations:
            for r in read_annotations(path, a.limit):
                files[path].setdefault(r.get("generator_2") or Path(path).stem, []).append(r)
        seen = Counter(g for groups in files.values() for g in groups)  # one model judged twice: name the file
        by_gen = {g if seen[g] == 1 else f"{g}:{Path(path).stem}": rows
                  for path, groups in files.items() for g, rows in groups.items()}
        board = write_board(out, by_gen)
        print(winrate.leaderboard_md(board), end="")
        return print(f"wrote {out / 'leaderboard.json'}, {out / 'leaderboard.md'}, {out / 'judge.png'}")
    if a.agreement:
        rows = read_annotations(a.agreement, a.limit)
        pairs_by_gen = {"agreement": [(r["instruction"], r["output_1"], r["output_2"]) for r in rows]}
    else:
        ref_gen, reference = read_outputs(a.reference)
        pairs_by_gen = {}
        for path in a.outputs:
            gen, rows = read_outputs(path)
            if gen in pairs_by_gen or gen == ref_gen:
                raise DataError(f"{path}: generator {gen!r} is named twice; give each file its own 'generator'")
            pairs_by_gen[gen] = match(reference, rows, path, a.reference, a.limit)
    tok, forms, init, prompts = prepare(a, pairs_by_gen)
    try:
        rank, probs = run_judge(a, tok, forms, init, prompts, out)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"(the judged prompts are kept in {out / 'cache.jsonl'}: "
                                "the same command continues)") from None
    if rank != 0:
        return
    annotator = f"judge.py:{Path(a.judge).resolve().name}"
    if a.agreement:
        ours = annotation_rows(pairs_by_gen["agreement"], prompts["agreement"], probs, None, None, annotator)
        result = winrate.agreement(rows, [r["preference"] for r in ours])
        result["p_first"] = winrate.position_bias(ours)
        write_json(out / "agreement.json", result)
        for k, v in result.items():
            print(f"{k:<26} {winrate.fmt(v, '.3f') if isinstance(v, float) else v}")
        if result["agreement"] is not None and result["longer_answer_agreement"] is not None:
            better = result["agreement"] > result["longer_answer_agreement"]
            print(f"this judge agrees {result['agreement']:.1%} with {a.agreement}; always picking the longer answer "
                  f"agrees {result['longer_answer_agreement']:.1%}: the judge does "
                  f"{'better' if better else 'NO better'} than length alone")
        return print(f"wrote {out / 'agreement.json'}")
    by_gen = {g: annotation_rows(pairs, prompts[g], probs, ref_gen, g, annotator) for g, pairs in pairs_by_gen.items()}
    for g, rows in by_gen.items():
        write_json(out / f"annotations_{g}.json", rows)
    cuts = ", ".join(f"{g}: {sum(r['truncated'] for r in rows)}" for g, rows in by_gen.items())
    board = write_board(out, by_gen, note=f"\nrows with answers cut to fit the judge's context: {cuts}\n")
    print(winrate.leaderboard_md(board, note=f"\nrows with answers cut to fit the judge's context: {cuts}\n"), end="")
    print(f"wrote {out}/annotations_*.json, leaderboard.json, leaderboard.md, judge.png")


def main(argv=None):
    return run_main("judge.py", run, argv)


if __name__ == "__main__":
    sys.exit(main())
