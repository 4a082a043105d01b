"""The built-in demo data, made on the spot so that train.py runs with no download: short tasks with
checkable answers ("tasks", the default demo), invented people's facts that no prompt gives away
("facts", Figure 4 on a CPU), a small SentencePiece tokenizer in LLaMA's layout trained on them, and
the exact-match score of a model's greedy answers to held-out tasks (OUT/accuracy.json).

    torchrun --standalone --nproc_per_node=2 train.py --alpha 5     # the demo: trains on the "tasks"
    python train.py --recipe fig4 --alpha 0 5 --out out/fig4          # Figure 4 on the "facts"
"""
import io
import random
from pathlib import Path

import sentencepiece as spm
import torch

import sample
from checks import atomic
from data import IGNORE, render
from model import Tokenizer, load_meta

WORDS = ("apple river green house music paper stone cloud happy quick light table water blue horse "
         "window garden silver orange yellow summer winter bread chair tiger ocean small bright "
         "road moon star fish bird tree book lamp door").split()


def builtin_record(rng):
    """One short task with a checkable answer, as (instruction, input, output)."""
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    words = rng.sample(WORDS, rng.randint(3, 5))
    task = rng.randrange(8)
    if task == 0:
        return rng.choice([(f"What is {a} + {b}?", "", f"{a} + {b} = {a + b}"),
                           ("Add the two numbers.", f"{a} and {b}", f"{a} + {b} = {a + b}")])
    if task == 1:
        a, b = max(a, b), min(a, b)
        return rng.choice([(f"What is {a} - {b}?", "", f"{a} - {b} = {a - b}"),
                           ("Subtract the second number from the first.", f"{a} and {b}", f"{a} - {b} = {a - b}")])
    if task == 2:
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        return f"What is {a} * {b}?", "", f"{a} * {b} = {a * b}"
    if task == 3:
        return "Reverse the order of these words.", " ".join(words), " ".join(reversed(words))
    if task == 4:
        nums = [rng.randint(0, 99) for _ in range(rng.randint(3, 6))]
        return "Sort these numbers from smallest to largest.", ", ".join(map(str, nums)), ", ".join(map(str,
                                                                                                        sorted(nums)))
    if task == 5:
        word = rng.choice(WORDS)
        letter = rng.choice(sorted(set(word)) + ["e"])
        return f"How many times does the letter '{letter}' appear in the word '{word}'?", "", str(word.count(letter))
    if task == 6:
        return "Write this phrase in uppercase.", " ".join(words), " ".join(words).upper()
    return f"Answer with yes or no: is {a} even?", "", "yes" if a % 2 == 0 else "no"


def builtin_records(seed=0, n=4000, kind="tasks"):
    """n alpaca-style records (as read_records returns them), the same for the same seed.
    kind: "tasks" (checkable answers) or "facts" (answers that cannot be inferred: Figure 4)."""
    rng = random.Random(seed)
    make = {"tasks": builtin_record, "facts": builtin_fact}[kind]
    return [[{"role": "user", "content": instruction, "input": inp}, {"role": "assistant", "content": output}]
            for instruction, inp, output in (make(rng) for _ in range(n))]


# The second built-in set, for Figure 4 (train.py --recipe fig4): every answer holds facts that
# cannot be inferred from the prompt, as real instruction data's free-form answers do, so a model
# that memorises the training answers pays for it on held-out ones.
SYLLABLES = "ba ko ri ten mu sa lo vek di na zu fe gor pi tal mo".split()
JOBS = ("baker farmer painter sailor doctor teacher miner singer weaver potter hunter tailor "
        "builder fisher scribe dancer").split()
CITIES = ("Oslo Lima Cairo Quito Perth Dakar Hanoi Kyiv Riga Accra Bern Doha Lagos Sofia Tunis Vaduz").split()
LIKES = "tea chess rain jazz maps honey kites dogs snow figs poems boats clocks bees salt ink".split()


def builtin_fact(rng):
    """An invented person and three random facts about them, as (instruction, input, output)."""
    name = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()
    job, city, likes = rng.choice(JOBS), rng.choice(CITIES), rng.choice(LIKES)
    question = rng.choice([(f"Who is {name}?", ""), (f"Tell me about {name}.", ""), ("Describe this person.", name)])
    return *question, f"{name} is a {job} from {city} who likes {likes}."


def builtin_tokenizer(path, seed=0, vocab_size=1000, kind="tasks"):
    """Train a small SentencePiece BPE with LLaMA's layout on the built-in text (all three templates)
    and write it to path. One thread and a fixed sentence order make it byte-identical per seed."""
    lines = []
    for messages in builtin_records(seed, kind=kind):
        for template in ("alpaca", "llama2-chat", "vicuna"):  # the SentencePiece templates
            # sentencepiece trains on lines; "\n" itself is left to byte fallback, as in LLaMA (<0x0A>)
            lines += render(messages, template).replace("<s>", "\n").replace("</s>", "\n").split("\n")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([line for line in lines if line.strip()]), model_writer=model,
        model_type="bpe", vocab_size=vocab_size, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        byte_fallback=True, split_digits=True, character_coverage=1.0, num_threads=1,
        normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        input_sentence_size=0, shuffle_input_sentence=False, minloglevel=2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic(path) as tmp:  # a crash never leaves a half-written tokenizer behind
        tmp.write_bytes(model.getvalue())
    return Tokenizer(path)


# ---------------------------------------------------------------- what the demo gets right

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
        start = next(i for i, label in enumerate(x["labels"]) if label != IGNORE)
        prompts.append(x["input_ids"][:start])
        refs.append([t for t in x["input_ids"][start:] if t != tok.eos_id])
    budgets = [len(r) + 8 for r in refs]  # room for another tokenization of the same text
    answers = []
    for b in range(0, len(prompts), batch_size):
        new = sample.generate(model, prompts[b:b + batch_size], budgets[b:b + batch_size], eos_id=tok.eos_id)
        answers += [tok.decode(n) if len(n) < budget else None for n, budget in zip(new, budgets[b:b + batch_size])]
    references = [tok.decode(r) for r in refs]
    rows = [{"prompt": tok.decode(p), "answer": a, "reference": r, "correct": is_exact(a, r)}
            for p, a, r in zip(prompts, answers, references)]
    return {"exact_match": exact_match(answers, references), "n": len(rows), "answers": rows}


def write_accuracy(ckpt_dir, tok, examples, path, device):
    """exact_match_answers of the checkpoint in ckpt_dir on `device` (bf16 on a GPU, as trained there),
    written to `path` as JSON; returns the exact-match fraction."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    answers = exact_match_answers(load_meta(ckpt_dir, dtype=dtype, device=device), tok, examples)
    sample.write_json_atomic(path, answers)
    return answers["exact_match"]
