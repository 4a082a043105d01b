"""A local AlpacaEval-style judge: an instruct model reads each instruction with a reference answer and a
model's answer, in both orders, and its two labels' probabilities give a soft preference; then raw and
length-controlled win rates with error bars. Resumable, and sharded under torchrun as train.py shards.

    python judge.py --judge SmolLM2-135M-Instruct --reference text_davinci_003.json neft.json base.json --out judged/
    python judge.py --annotations annotations.json --out rescored/     # win rates of any AlpacaEval annotations
    python judge.py --judge SmolLM2-135M-Instruct --agreement annotations.json   # agreement with a published judge
"""
import hashlib
import json
import math
import os
import sys
from argparse import Namespace
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
from checks import ArgumentParser, DataError, RunLock, UserError, atomic, number, run_main, writable_folder
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
BOOTSTRAP = 500  # resamples of the instructions for the LC error bar and the paired intervals


def judge_messages(instruction, output_1, output_2):
    """The chat a judge answers with one label: AlpacaEval 2's layout (a system turn, then the
    instruction, the two labelled answers, the task and a header for the answer), in our words."""
    user = USER.format(instruction=instruction, output_1=output_1, output_2=output_2, l1=LABELS[0], l2=LABELS[1])
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


# ---------------------------------------------------------------- the judge's template and labels

def pick_template(folder, flag):
    """STAND-IN for data.pick_template (a folder's own chat template), used until that lands: --template,
    else one line. The template must carry a system turn: alpaca's has none."""
    if hasattr(data, "pick_template"):
        return data.pick_template(folder, flag)
    if flag is None:
        raise UserError(f"{folder}: no chat template found for this judge; pass --template (chatml, llama3-chat, ...)")
    return flag


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
    records = data.read_json(path)
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


# ---------------------------------------------------------------- statistics

def preferences(rows):
    """Rows with a preference -> float64 tensor in [1, 2]; AlpacaEval's legacy 0 is a tie."""
    return torch.tensor([1.5 if r["preference"] == 0 else float(r["preference"]) for r in rows], dtype=torch.float64)


def lc_fit(p, d, steps=50):
    """AlpacaEval's length_controlled_minimal, unpenalised: logit P(model wins) = theta + phi * tanh(d / sd(d)),
    d = reference length - model length, fit by Newton's method on soft labels p (maximum likelihood of
    each row as a win weighted p and a loss weighted 1 - p). Batched over leading dims -> theta, phi."""
    f = torch.tanh(d / d.std(-1, keepdim=True))
    theta, phi = torch.zeros(d.shape[:-1], dtype=d.dtype), torch.zeros(d.shape[:-1], dtype=d.dtype)
    for _ in range(steps):
        s = torch.sigmoid(theta[..., None] + phi[..., None] * f)
        g0, g1 = (s - p).sum(-1), ((s - p) * f).sum(-1)
        w = s * (1 - s) + 1e-12
        h00, h01, h11 = w.sum(-1), (w * f).sum(-1), (w * f * f).sum(-1)
        det = h00 * h11 - h01 * h01
        step0, step1 = (h11 * g0 - h01 * g1) / det, (h00 * g1 - h01 * g0) / det  # the 2 x 2 Newton step
        theta, phi = (theta - step0).clamp(-40, 40), (phi - step1).clamp(-40, 40)  # clamp: all wins or losses
        if not (step0.abs().nan_to_num().max() > 1e-12 or step1.abs().nan_to_num().max() > 1e-12):
            break
    return theta, phi


def lc_win_rate(p, d):
    return 100 * torch.sigmoid(lc_fit(p, d)[0])


def resamples(n, seed=0, count=BOOTSTRAP):
    return torch.randint(n, (count, n), generator=torch.Generator().manual_seed(seed))


def length_difference(rows):
    return torch.tensor([len(r["output_1"]) - len(r["output_2"]) for r in rows], dtype=torch.float64)


def position_bias(rows):
    """Mean share of the first position's label over both orders of our judge's rows (0.5: none)."""
    first = [(1 - r["p_model_order_1"] + r["p_model_order_2"]) / 2 for r in rows
             if r.get("p_model_order_1") is not None]
    return sum(first) / len(first) if first else None


def win_rates(rows, name):
    """One generator's annotation rows -> the leaderboard entry (see docs/evaluation.md for each key)."""
    rows = [r for r in rows if r.get("preference") is not None]
    if len(rows) < 2:
        raise UserError(f"{name}: {len(rows)} row(s) with a preference; a win rate needs at least 2")
    pref, d = preferences(rows), length_difference(rows)
    if d.std() == 0:
        raise UserError(f"{name}: every answer is as long as its reference's minus {d[0]:g} characters (sd of the "
                        "length difference 0): the length-controlled fit is undefined")
    p = pref - 1
    wins, draws = int((pref > 1.5).sum()), int((pref == 1.5).sum())
    lc_boot = lc_win_rate(p[idx := resamples(len(rows))], d[idx])
    decided = d != 0
    longer_won = torch.where(d < 0, p, 1 - p)[decided]  # d < 0: the model's answer is the longer
    ours = [r for r in rows if r.get("p_model_order_1") is not None]
    agree = [(r["p_model_order_1"] > 0.5) == (r["p_model_order_2"] > 0.5) for r in ours]
    return {"win_rate": 100 * p.mean().item(), "standard_error": 100 * p.std().item() / math.sqrt(len(p)),
            "discrete_win_rate": 100 * (wins + draws / 2) / len(p), "n_wins": wins, "n_draws": draws,
            "n_total": len(p), "lc_win_rate": lc_win_rate(p, d).item(),
            "lc_standard_error": lc_boot[lc_boot.isfinite()].std().item(),
            "avg_length": sum(len(r["output_2"]) for r in rows) / len(rows),
            "p_longer": longer_won.mean().item() if decided.any() else None,
            "p_first": position_bias(ours),
            "consistency": sum(agree) / len(agree) if ours else None,
            "truncated": sum(bool(r.get("truncated")) for r in rows)}


def paired(rows_a, rows_b):
    """Generator a minus b on the instructions both have preferences for: raw and LC win rates, each
    with a bootstrap 95% interval from the same resampled instructions."""
    b = {r["instruction"]: r for r in rows_b if r.get("preference") is not None}
    both = [(r, b[r["instruction"]]) for r in rows_a if r.get("preference") is not None and r["instruction"] in b]
    if len(both) < 2:
        return None
    (pa, da), (pb, db) = [(preferences(x) - 1, length_difference(x)) for x in zip(*both)]
    idx = resamples(len(both), seed=1)
    out = {"n": len(both)}
    for key, f in (("win_rate", lambda p, d: 100 * p.mean(-1)), ("lc_win_rate", lc_win_rate)):
        diff, boot = f(pa, da) - f(pb, db), f(pa[idx], da[idx]) - f(pb[idx], db[idx])
        boot = boot[boot.isfinite()]
        out[key] = diff.item()
        out[key + "_ci95"] = [boot.quantile(0.025).item(), boot.quantile(0.975).item()]
    return out


def leaderboard(by_generator):
    """{generator: rows} -> {generator: entry}; with two or more, each entry's "minus" holds its paired
    differences from the generators listed after it."""
    board = {g: win_rates(rows, g) for g, rows in by_generator.items()}
    names = list(by_generator)
    for i, a in enumerate(names):
        diffs = {b: paired(by_generator[a], by_generator[b]) for b in names[i + 1:]}
        if any(diffs.values()):
            board[a]["minus"] = {b: v for b, v in diffs.items() if v}
    return board


def fmt(x, spec=".1f"):
    return "-" if x is None else format(x, spec)


def leaderboard_md(board, note=""):
    lines = ["| generator | win rate | LC win rate | discrete | wins / draws / n | avg length | p_longer | p_first "
             "| consistency | truncated |", "|---|---|---|---|---|---|---|---|---|---|"]
    for g, e in board.items():
        lines.append(f"| {g} | {e['win_rate']:.2f} ± {e['standard_error']:.2f} | {e['lc_win_rate']:.2f} ± "
                     f"{e['lc_standard_error']:.2f} | {e['discrete_win_rate']:.2f} | {e['n_wins']} / {e['n_draws']} / "
                     f"{e['n_total']} | {e['avg_length']:.0f} | {fmt(e['p_longer'], '.3f')} | "
                     f"{fmt(e['p_first'], '.3f')} | {fmt(e['consistency'], '.3f')} | {e['truncated']} |")
    for a, e in board.items():
        for b, d in e.get("minus", {}).items():
            lines.append(f"\n{a} minus {b} ({d['n']} instructions): win rate {d['win_rate']:+.2f} "
                         f"[{d['win_rate_ci95'][0]:+.2f}, {d['win_rate_ci95'][1]:+.2f}], LC win rate "
                         f"{d['lc_win_rate']:+.2f} [{d['lc_win_rate_ci95'][0]:+.2f}, {d['lc_win_rate_ci95'][1]:+.2f}] "
                         "(bootstrap 95%)")
    return "\n".join(lines) + "\n" + note


def plot(board, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(board)
    fig, ax = plt.subplots(figsize=(2.8 + 1.2 * len(names), 3.6))
    xs = torch.arange(len(names)).tolist()
    for shift, key, label in ((-0.18, "win_rate", "raw"), (0.18, "lc_win_rate", "length-controlled")):
        err = "standard_error" if key == "win_rate" else "lc_standard_error"
        ax.bar([x + shift for x in xs], [board[g][key] for g in names], 0.36, yerr=[board[g][err] for g in names],
               capsize=4, label=label)
    ax.axhline(50, color="grey", lw=0.8, ls="--")
    ax.set_xticks(xs, names, rotation=15)
    ax.set_ylim(0, 100)
    ax.set_ylabel("win rate vs reference (%)")
    ax.legend(frameon=False, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_json(path, obj):
    with atomic(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


def write_board(out, by_generator, note=""):
    board = leaderboard(by_generator)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "leaderboard.json", board)
    with atomic(out / "leaderboard.md") as tmp:
        tmp.write_text(leaderboard_md(board, note))
    with atomic(out / "judge.png") as tmp:
        plot(board, tmp.with_suffix(".png"))
        tmp.with_suffix(".png").rename(tmp)
    return board


def agreement(rows, ours):
    """How our preferences (one per row, None where not judged) agree with a published file's, beside
    what "always the longer answer" reaches on the same rows. Rounded agreement leaves ties out."""
    def side(p):  # 1: output_2 preferred, -1: output_1, 0: a tie
        return (p > 1.5) - (p < 1.5)
    both = [(r, 1.5 if r["preference"] == 0 else float(r["preference"]), q) for r, q in zip(rows, ours)
            if r.get("preference") is not None and q is not None]
    longer = [side(1.5 + len(r["output_2"]) - len(r["output_1"])) for r, _, _ in both]

    def share(pairs):
        pairs = [a == b for a, b in pairs if a and b]
        return (sum(pairs) / len(pairs) if pairs else None), len(pairs)
    (agree, n), (lagree, ln) = (share([(side(q), side(p)) for _, p, q in both]),
                                share([(side(p), s) for (_, p, _), s in zip(both, longer)]))
    # "always the longer answer" agrees with the published judge exactly as often as it picks the longer one
    return {"n": len(both), "agreement": agree, "n_decisive": n,
            "soft_agreement": sum(1 - abs(q - p) for _, p, q in both) / len(both) if both else None,
            "longer_answer_agreement": lagree, "n_longer_decisive": ln,
            "ours_picks_longer": share([(side(q), s) for (_, _, q), s in zip(both, longer)])[0]}


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
    import checkpoint as ckpt

    tok = Tokenizer(find_tokenizer(a.judge, required=True))
    template = pick_template(Path(a.judge), a.template)
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
    import checkpoint as ckpt
    from precision import choose_dtype
    from train import all_sum, setup_distributed

    lock = None
    try:
        rank, world, device, mesh = setup_distributed(a.device)
        error = None
        if rank == 0:
            try:
                lock = RunLock(out).acquire()
            except UserError as e:
                error = e
        if all_sum(error is not None, device=device)[0]:
            raise error or UserError("")
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
    rows = data.read_json(path)[:limit]
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
        print(leaderboard_md(board), end="")
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
        result = agreement(rows, [r["preference"] for r in ours])
        result["p_first"] = position_bias(ours)
        write_json(out / "agreement.json", result)
        for k, v in result.items():
            print(f"{k:<26} {fmt(v, '.3f') if isinstance(v, float) else v}")
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
    print(leaderboard_md(board, note=f"\nrows with answers cut to fit the judge's context: {cuts}\n"), end="")
    print(f"wrote {out}/annotations_*.json, leaderboard.json, leaderboard.md, judge.png")


def main(argv=None):
    return run_main("judge.py", run, argv)


if __name__ == "__main__":
    sys.exit(main())
