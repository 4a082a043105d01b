"""judge.py on a tiny judge: both orders against a hand-computed forward, the swap symmetry, ties, matching,
truncation, resume after kill -9, 2 ranks = 1 rank, the statistics against hand-computed and published
figures, and the prompt's ids against transformers' apply_chat_template."""
import json
import math
import os
import signal
import subprocess
import time

import pytest
import torch
from conftest import ENV, ROOT, call, command, hf_folder, run_script

import builtin_data
import data
import judge
import winrate
from model import ModelArgs, Transformer, load_meta, save_meta

DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
TEMPLATE = "llama2-chat"  # the built-in SentencePiece tokenizer has no ChatML or LLaMA-3 tokens


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    """A tiny random judge in Meta's layout with unit-variance weights, so that every token of the
    prompt moves the labels' probabilities (training's 0.02 init would leave them all near 1/2)."""
    root = tmp_path_factory.mktemp("judge")
    builtin_data.builtin_tokenizer(root / "tokenizer.model", seed=3)
    torch.manual_seed(0)
    m = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=1000, multiple_of=32))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 1.0 if name == "tok_embeddings.weight" else p.shape[1] ** -0.5)
    save_meta(m, root / "tiny", dtype=torch.float32)
    return root / "tiny"


def outputs(path, n, generator, answer=lambda i, text: text, seed=0):
    recs = builtin_data.builtin_records(seed=seed, n=n)
    rows = [{"instruction": f"{i}. {r[0]['content']}", "output": answer(i, r[1]["content"]), "generator": generator}
            for i, r in enumerate(recs)]
    path.write_text(json.dumps(rows))
    return path


@pytest.fixture
def files(tmp_path):
    """A reference and a model whose answers differ (reversed, longer), one identical answer (row 3)."""
    ref = outputs(tmp_path / "ref.json", 8, "ref")
    model = outputs(tmp_path / "model.json", 8, "model",
                    lambda i, t: t if i == 3 else t[::-1] + " and so on" * (i % 4))
    return ref, model


def run_judge(*args):
    """judge.main in this process; the process group it makes (a world of one) leaves no variables behind."""
    before = {k: os.environ.get(k) for k in DIST_ENV}
    try:
        return call(judge.main, *args)
    finally:
        for k, v in before.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def judged(judge_dir, out, *files, extra=()):
    r = run_judge("--judge", judge_dir, "--template", TEMPLATE, "--dtype", "fp32", "--reference", files[0], *files[1:],
                  "--out", out, *extra)
    assert r.returncode == 0, r.stderr
    return r


def rows_of(out, generator="model"):
    return json.loads((out / f"annotations_{generator}.json").read_text())


def label_ids(tok, label):  # the label's pieces, found by name rather than by decoding every id
    return [i for i in range(tok.n_words) if tok.sp.id_to_piece(i) in (label, "▁" + label, f"<0x{ord(label):02X}>")]


@torch.no_grad()
def hand_preference(model, tok, instruction, ref, answer):
    """1 + mean over the two orders of P(model's label), each prompt alone, the full logits' last row."""
    a, b = label_ids(tok, judge.LABELS[0]), label_ids(tok, judge.LABELS[1])
    p_model = []
    for first, second, model_label in ((ref, answer, b), (answer, ref, a)):
        ids = data.prompt_ids(judge.judge_messages(instruction, first, second), tok, TEMPLATE)
        probs = model(torch.tensor([ids]))[0, -1].double().softmax(-1)
        p_model.append((probs[model_label].sum() / (probs[a].sum() + probs[b].sum())).item())
    return 1 + sum(p_model) / 2


# ---------------------------------------------------------------- judging

def test_judge_messages_layout():
    system, user = judge.judge_messages("Name a colour.", "Red.", "Blue, or green.")
    assert (system["role"], user["role"]) == ("system", "user")
    c = user["content"]
    assert c.index("Name a colour.") < c.index("Red.") < c.index("Blue, or green.")
    assert c.index(f"[Answer {judge.LABELS[0]}]\nRed.") < c.index(f"[Answer {judge.LABELS[1]}]\nBlue, or green.")
    assert c.rstrip().endswith("## The better answer")


def test_both_orders_match_a_hand_computed_forward(judge_dir, files, tmp_path):
    ref, model_file = files
    judged(judge_dir, tmp_path / "out", ref, model_file)
    rows = rows_of(tmp_path / "out")
    m, tok = load_meta(judge_dir), judge.Tokenizer(judge_dir.parent / "tokenizer.model")
    for r in rows:
        if r["output_1"] == r["output_2"]:
            assert r["preference"] == 1.5 and r["p_model_order_1"] is None
            continue
        want = hand_preference(m, tok, r["instruction"], r["output_1"], r["output_2"])
        assert abs(r["preference"] - want) < 1e-6
        assert r["preference"] == 1 + (r["p_model_order_1"] + r["p_model_order_2"]) / 2 or \
            abs(r["preference"] - 1 - (r["p_model_order_1"] + r["p_model_order_2"]) / 2) < 1e-15
        assert 0 < r["label_mass"][0] < 1 and r["generator_1"] == "ref" and r["generator_2"] == "model"
    assert len({round(r["preference"], 6) for r in rows}) > 5  # the prompts really move the judge
    # identical pairs (row 3, and answers that read the same reversed) were never asked: 2 prompts per other pair
    asked = sum(r["output_1"] != r["output_2"] for r in rows)
    assert 4 <= asked <= 7 and len((tmp_path / "out" / "cache.jsonl").read_text().splitlines()) == 2 * asked
    board = json.loads((tmp_path / "out" / "leaderboard.json").read_text())["model"]
    assert board["n_total"] == 8 and abs(board["win_rate"] - 100 * sum(r["preference"] - 1 for r in rows) / 8) < 1e-9


@pytest.mark.slow  # judges end to end: seconds, not milliseconds
def test_swapping_the_files_gives_exactly_3_minus_p(judge_dir, files, tmp_path):
    ref, model_file = files
    swapped_ref = tmp_path / "swapped_ref.json"
    swapped_ref.write_text(json.dumps([dict(r, generator="model") for r in json.loads(model_file.read_text())]))
    swapped = tmp_path / "swapped.json"
    swapped.write_text(json.dumps([dict(r, generator="ref") for r in json.loads(ref.read_text())]))
    judged(judge_dir, tmp_path / "a", ref, model_file)
    judged(judge_dir, tmp_path / "b", swapped_ref, swapped)
    for x, y in zip(rows_of(tmp_path / "a"), rows_of(tmp_path / "b", "ref"), strict=True):
        assert y["preference"] == 3 - x["preference"]


def test_label_forms_and_one_token_labels(judge_dir, monkeypatch):
    tok = judge.Tokenizer(judge_dir.parent / "tokenizer.model")
    assert judge.label_forms(tok) == [label_ids(tok, "A"), label_ids(tok, "B")]
    monkeypatch.setattr(judge, "LABELS", ("Zyxwvut", "B"))
    with pytest.raises(judge.UserError, match="label 'Zyxwvut' is .* tokens in the judge's tokenizer"):
        judge.label_forms(tok)


def test_batches_pad_little_and_keep_every_prompt():
    lengths = [5, 7, 8, 40, 41, 43, 44, 100, 101, 260, 9, 10, 11, 12, 300]
    prompts = {f"k{i:02d}": [1] * n for i, n in enumerate(lengths)}
    batches = judge.plan_batches(prompts, max_tokens=256)
    assert sorted(k for b in batches for k in b) == sorted(prompts)
    for b in batches:
        ns = [len(prompts[k]) for k in b]
        assert len(b) == 1 or len(b) * max(ns) <= 256
        assert len(b) * max(ns) - sum(ns) <= 0.1 * len(b) * max(ns)
    assert batches == judge.plan_batches(dict(reversed(prompts.items())), max_tokens=256)  # the set decides


@pytest.mark.slow  # judges end to end: seconds, not milliseconds
def test_truncation_is_one_rule_for_both_answers_and_orders(judge_dir, tmp_path):
    tok = judge.Tokenizer(judge_dir.parent / "tokenizer.model")
    long_a, long_b, short = "one two three four " * 100, "five six seven " * 120, "Fine."
    (ids1, ids2), cut = judge.fit_pair(tok, TEMPLATE, "Count.", long_a, long_b, 600)
    assert cut and max(len(ids1), len(ids2)) <= 600
    text = tok.decode(ids1)
    kept_a = text[text.index("[Answer A]") + 11:text.index("[End of answer A]")].strip()
    kept_b = text[text.index("[Answer B]") + 11:text.index("[End of answer B]")].strip()
    assert long_a.startswith(kept_a) and long_b.startswith(kept_b)
    assert abs(len(tok.encode(kept_a, bos=False)) - len(tok.encode(kept_b, bos=False))) <= 1  # the same K tokens
    assert kept_a in tok.decode(ids2) and kept_b in tok.decode(ids2)  # the same cut in the other order
    assert judge.fit_pair(tok, TEMPLATE, "Count.", short, short + " Yes.", 600)[1] is False
    with pytest.raises(judge.UserError, match="--max-len 300: the judge's prompt alone takes"):
        judge.fit_pair(tok, TEMPLATE, "Count.", long_a, long_b, 300)
    # counted per model in the leaderboard
    ref = outputs(tmp_path / "ref.json", 4, "ref", lambda i, t: t + " really" * (200 * (i % 2)))
    model = outputs(tmp_path / "model.json", 4, "model", lambda i, t: t[::-1])
    judged(judge_dir, tmp_path / "out", ref, model, extra=("--max-len", 500))
    assert [r["truncated"] for r in rows_of(tmp_path / "out")] == [False, True, False, True]
    assert json.loads((tmp_path / "out" / "leaderboard.json").read_text())["model"]["truncated"] == 2


@pytest.mark.slow  # judges end to end: seconds, not milliseconds
def test_matching_by_instruction_text_and_limit(judge_dir, files, tmp_path):
    ref, model_file = files
    shuffled = tmp_path / "shuffled.json"
    rows = json.loads(model_file.read_text())
    shuffled.write_text(json.dumps(rows[::-1]))
    judged(judge_dir, tmp_path / "a", ref, model_file)
    judged(judge_dir, tmp_path / "b", ref, shuffled)
    assert sorted(rows_of(tmp_path / "a"), key=lambda r: r["instruction"]) == \
        sorted(rows_of(tmp_path / "b"), key=lambda r: r["instruction"])
    judged(judge_dir, tmp_path / "c", ref, shuffled, extra=("--limit", 3))
    assert [r["instruction"] for r in rows_of(tmp_path / "c")] == [r["instruction"] for r in rows[::-1][:3]]


def one_line(r, *parts):
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("judge.py: error: "), r.stderr
    assert "Traceback" not in r.stderr and all(p in lines[0] for p in parts), lines[0]


def test_bad_inputs_are_one_line_before_judging(judge_dir, files, tmp_path):
    ref, model_file = files
    rows = json.loads(model_file.read_text())
    cases = {"missing.json": rows[:6], "dup.json": rows + rows[:1],
             "extra.json": rows + [dict(rows[0], instruction="Something else")],
             "malformed.json": rows[:2] + [{"instruction": "x"}]}
    for name, recs in cases.items():
        (tmp_path / name).write_text(json.dumps(recs))
    base = ["--judge", judge_dir, "--template", TEMPLATE, "--dtype", "fp32", "--out", tmp_path / "out",
            "--reference", ref]
    one_line(run_judge(*base, tmp_path / "missing.json"), "missing.json", "2 of its 8 instructions missing")
    one_line(run_judge(*base, tmp_path / "dup.json"), "dup.json", "1 repeated")
    one_line(run_judge(*base, tmp_path / "extra.json"), "extra.json", "1 not in it")
    one_line(run_judge(*base, tmp_path / "malformed.json"), "malformed.json", "record 2", "'output'")
    one_line(run_judge(*base, tmp_path / "nowhere.json"), "nowhere.json", "not found")
    for bad in ("0", "-3", "nan"):
        one_line(run_judge(*base, model_file, "--limit", bad), "--limit")
    no_template = ["--judge", judge_dir, "--out", tmp_path / "out", "--reference", ref, model_file]
    one_line(run_judge(*no_template), "--template")
    one_line(run_judge(*no_template, "--template", "alpaca"), "no system turn")
    one_line(run_judge("--judge", tmp_path / "nojudge", "--reference", ref, model_file), "--judge folder not found")
    assert not (tmp_path / "out").exists()  # nothing written by any of them


# ---------------------------------------------------------------- resume and ranks

@pytest.mark.slow  # judges end to end: seconds, not milliseconds
def test_a_run_continues_from_its_cache_to_the_same_files(judge_dir, files, tmp_path):
    ref, model_file = files
    judged(judge_dir, tmp_path / "full", ref, model_file, extra=("--batch-tokens", 700))
    lines = (tmp_path / "full" / "cache.jsonl").read_text().splitlines()
    (tmp_path / "part").mkdir()
    # what a kill leaves: some rounds written, the last line cut short
    (tmp_path / "part" / "cache.jsonl").write_text("\n".join(lines[:5]) + "\n" + lines[5][:25])
    judged(judge_dir, tmp_path / "part", ref, model_file, extra=("--batch-tokens", 700))
    for name in ("annotations_model.json", "leaderboard.json", "leaderboard.md"):
        assert (tmp_path / "part" / name).read_bytes() == (tmp_path / "full" / name).read_bytes()


@pytest.mark.slow
def test_kill_9_then_the_same_command_gives_the_same_files(judge_dir, tmp_path):
    ref = outputs(tmp_path / "ref.json", 30, "ref", seed=1)
    model = outputs(tmp_path / "model.json", 30, "model", lambda i, t: t[::-1] + " so" * (i % 5), seed=1)
    args = ["--judge", judge_dir, "--template", TEMPLATE, "--dtype", "fp32", "--batch-tokens", 400,
            "--reference", ref, model]
    run_script("judge.py", [*args, "--out", tmp_path / "full"])
    out, cache = tmp_path / "killed", tmp_path / "killed" / "cache.jsonl"
    p = subprocess.Popen(command("judge.py", [*args, "--out", out]), cwd=ROOT, env=ENV, start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 200
    while not (cache.exists() and len(cache.read_text().splitlines()) >= 4) and p.poll() is None \
            and time.time() < deadline:
        time.sleep(0.005)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert len(cache.read_text().splitlines()) < 60 and not (out / "leaderboard.json").exists()
    run_script("judge.py", [*args, "--out", out])
    for name in ("annotations_model.json", "leaderboard.json", "leaderboard.md"):
        assert (out / name).read_bytes() == (tmp_path / "full" / name).read_bytes()


@pytest.mark.slow
def test_two_ranks_equal_one(judge_dir, files, tmp_path):
    ref, model_file = files
    args = ["--judge", judge_dir, "--template", TEMPLATE, "--dtype", "fp32", "--batch-tokens", 700,
            "--reference", ref, model_file]
    run_script("judge.py", [*args, "--out", tmp_path / "one"])
    run_script("judge.py", [*args, "--out", tmp_path / "two"], nproc=2)
    for x, y in zip(rows_of(tmp_path / "one"), rows_of(tmp_path / "two"), strict=True):
        assert abs(x["preference"] - y["preference"]) < 1e-6
        assert x["p_model_order_1"] is None or abs(x["p_model_order_1"] - y["p_model_order_1"]) < 1e-6


# ---------------------------------------------------------------- statistics

def rows_from(prefs, ref_lens, model_lens, **extra):
    return [{"instruction": f"i{k}", "output_1": "r" * a, "output_2": "m" * b, "preference": p, **extra}
            for k, (p, a, b) in enumerate(zip(prefs, ref_lens, model_lens))]


def test_win_rates_by_hand():
    rows = rows_from([2, 1, 1.5, 1.75, None, 0], [10, 20, 30, 40, 50, 60], [15, 5, 30, 70, 10, 60])
    e = winrate.win_rates(rows, "m")
    p = [1, 0, 0.5, 0.75, 0.5]  # None left out, the legacy 0 is a tie
    mean = sum(p) / 5
    sd = math.sqrt(sum((x - mean) ** 2 for x in p) / 4)
    assert math.isclose(e["win_rate"], 100 * mean) and math.isclose(e["standard_error"], 100 * sd / math.sqrt(5))
    assert (e["n_wins"], e["n_draws"], e["n_total"]) == (2, 2, 5)
    assert math.isclose(e["discrete_win_rate"], 100 * 3 / 5)
    assert math.isclose(e["avg_length"], (15 + 5 + 30 + 70 + 60) / 5)
    # the longer answer won: row 0 (model longer, p 1), row 1 (reference longer, 1 - 0 = 1), row 3 (0.75)
    assert math.isclose(e["p_longer"], (1 + 1 + 0.75) / 3)
    # the unpenalised fit by hand: Newton's method in plain Python on the same likelihood
    d = [10 - 15, 20 - 5, 30 - 30, 40 - 70, 60 - 60]
    m = sum(d) / 5
    s = math.sqrt(sum((x - m) ** 2 for x in d) / 4)
    f = [math.tanh(x / s) for x in d]
    th = ph = 0.0
    for _ in range(100):
        q = [1 / (1 + math.exp(-(th + ph * x))) for x in f]
        g0, g1 = sum(qi - pi for qi, pi in zip(q, p)), sum((qi - pi) * x for qi, pi, x in zip(q, p, f))
        w = [qi * (1 - qi) for qi in q]
        h00, h01, h11 = sum(w), sum(wi * x for wi, x in zip(w, f)), sum(wi * x * x for wi, x in zip(w, f))
        det = h00 * h11 - h01 * h01
        th, ph = th - (h11 * g0 - h01 * g1) / det, ph - (h00 * g1 - h01 * g0) / det
    assert math.isclose(e["lc_win_rate"], 100 / (1 + math.exp(-th)), rel_tol=1e-9)


def test_length_alone_gives_lc_50():
    g = torch.Generator().manual_seed(0)
    ref = (torch.rand(600, generator=g) * 400 + 100).long().tolist()
    model = (torch.rand(600, generator=g) * 900 + 200).long().tolist()  # mostly longer
    d = torch.tensor([a - b for a, b in zip(ref, model)], dtype=torch.float64)
    p = torch.sigmoid(-1.5 * torch.tanh(d / d.std()))  # the longer answer wins, nothing else matters
    e = winrate.win_rates(rows_from((1 + p).tolist(), ref, model), "m")
    assert e["win_rate"] > 60 and abs(e["lc_win_rate"] - 50) < 1e-6
    hard = (torch.rand(600, generator=g) < p).double()  # the same as hard labels: 50 within the noise
    e = winrate.win_rates(rows_from((1 + hard).tolist(), ref, model), "m")
    assert e["win_rate"] > 60 and abs(e["lc_win_rate"] - 50) < 2.5 * e["lc_standard_error"]


def test_equal_length_differences_are_one_line():
    with pytest.raises(judge.UserError, match="sd of the length difference 0"):
        winrate.win_rates(rows_from([1.2, 1.8, 1.4], [10, 20, 30], [15, 25, 35]), "m")


def test_paired_difference_uses_the_same_resamples():
    g = torch.Generator().manual_seed(1)
    ref = (torch.rand(300, generator=g) * 300 + 50).long().tolist()
    a_len = (torch.rand(300, generator=g) * 300 + 50).long().tolist()
    pa = (1 + torch.rand(300, generator=g)).tolist()
    rows_a = rows_from(pa, ref, a_len)
    same = winrate.paired(rows_a, rows_a)
    assert same["win_rate"] == 0 and same["win_rate_ci95"] == [0, 0] and same["lc_win_rate_ci95"] == [0, 0]
    board = winrate.leaderboard({"a": rows_a, "b": rows_from([min(2, x + 0.1) for x in pa], ref, a_len)})
    diff = board["a"]["minus"]["b"]
    assert math.isclose(diff["win_rate"], board["a"]["win_rate"] - board["b"]["win_rate"])
    assert diff["win_rate_ci95"][0] <= diff["win_rate"] <= diff["win_rate_ci95"][1] < 0


def test_published_figures(shared, tmp_path):
    """JUDGE.md's figures, from alpaca_eval 0.6.6 on the shared annotation files."""
    folder = shared / "data" / "alpaca_eval_annotations"
    for name, win, se, lc, lc_se in (("alpaca-7b__alpaca_eval_gpt4", 26.460, 1.536, 25.678, 1.7),
                                     ("alpaca-7b__weighted_alpaca_eval_gpt4_turbo", 2.591, 0.487, 19.835, 4.1)):
        e = winrate.win_rates(judge.read_annotations(folder / f"{name}.json"), name)
        assert e["n_total"] == 805 and abs(e["win_rate"] - win) < 5e-4 and abs(e["standard_error"] - se) < 5e-4
        assert abs(e["lc_win_rate"] - lc) < 5e-4 and abs(e["lc_standard_error"] - lc_se) < 0.15 * lc_se
        assert abs(e["avg_length"] - 396.3) < 0.05
    e = winrate.win_rates(judge.read_annotations(folder / "alpaca-7b__alpaca_eval_gpt4.json"), "gpt4")
    assert (e["n_wins"], e["n_draws"]) == (205, 16)
    r = run_judge("--annotations", folder / "alpaca-7b__alpaca_eval_gpt4.json", "--out", tmp_path / "re")
    assert r.returncode == 0, r.stderr
    board = json.loads((tmp_path / "re" / "leaderboard.json").read_text())
    assert abs(board["alpaca-7b"]["lc_win_rate"] - 25.678) < 5e-4 and (tmp_path / "re" / "judge.png").stat().st_size


def test_agreement_by_hand():
    rows = rows_from([2, 1, 1.5, 2, 1], [10, 50, 10, 90, 30], [40, 20, 10, 30, 60])
    ours = [1.9, 1.3, 1.6, 1.2, None]
    r = winrate.agreement(rows, ours)
    # decisive in both: rows 0 (agree), 1 (agree), 3 (disagree); row 2 is a published tie, row 4 not judged
    assert r["n"] == 4 and r["n_decisive"] == 3 and math.isclose(r["agreement"], 2 / 3)
    assert math.isclose(r["soft_agreement"], (0.9 + 0.7 + 0.9 + 0.2) / 4)
    # longer: row 0 output_2, row 1 output_1, row 2 equal, row 3 output_1 -> published agrees on 0, 1, not 3
    assert math.isclose(r["longer_answer_agreement"], 2 / 3) and r["n_longer_decisive"] == 3
    assert math.isclose(r["ours_picks_longer"], 1.0)


# ---------------------------------------------------------------- the judge's own chat template

SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3_TEMPLATE = (
    "{{- bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>"
    "\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


@pytest.mark.slow  # judges end to end: seconds, not milliseconds
def test_prompt_ids_equal_transformers_apply_chat_template(chatml_bpe, llama3_tok, tmp_path):  # noqa: F811
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    from hf_tokenizer import write_hf_tokenizer

    chatml = tmp_path / "chatml"
    hf_folder(chatml, chatml_bpe, {"bos_token": None, "eos_token": "<|im_end|>",
                                                 "chat_template": SMOLLM2_TEMPLATE})
    llama3 = tmp_path / "llama3"
    llama3.mkdir()
    write_hf_tokenizer(llama3_tok, llama3)
    config = json.loads((llama3 / "tokenizer_config.json").read_text())
    (llama3 / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": LLAMA3_TEMPLATE}))
    answers = [("Add 2 and 3.", "5", "The sum of 2 and 3 is 5.\n\nThat is all."),
               ("Say hi  twice.", "  hi hi ", "Hello! Hello!\n"), ("Name a café.", "Café 🙂", "")]
    for folder, template in ((chatml, "chatml"), (llama3, "llama3-chat")):
        tok, auto = judge.Tokenizer(folder / "tokenizer.json"), AutoTokenizer.from_pretrained(folder)
        for instruction, a, b in answers:
            messages = judge.judge_messages(instruction, a, b)
            theirs = auto.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            theirs = theirs["input_ids"] if hasattr(theirs, "keys") else theirs
            assert data.prompt_ids(messages, tok, template) == list(theirs), (template, instruction)



def test_an_out_the_system_refuses_is_one_line(tmp_path, capsys):
    # root passes every permission check, so /proc is found out only at the first write: still one line
    rows = [{"instruction": f"q{i}", "output_1": "a" * (i + 1), "output_2": "b" * (3 * i + 1), "generator_2": "m",
             "preference": 1.0 + i / 4} for i in range(4)]
    (tmp_path / "ann.json").write_text(json.dumps(rows))
    assert judge.main(["--annotations", str(tmp_path / "ann.json"), "--out", "/proc/neftune-judged"]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("judge.py: error: /proc/neftune-judged: --out ") and "\n" not in line, line
