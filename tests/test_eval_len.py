"""eval_len.py against values worked out by hand, the published AlpacaEval lengths, and bad input."""
import json
import math
import random

import pytest
from conftest import call

import eval_len
from eval_len import corpus_bleu, lcs_len, length_stats, rouge_l, train_overlap


def run_cli(*args):
    return call(eval_len.main, *args)


def write(path, obj):
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


# ---- Table 4 statistics ----

def test_repetition_worked_example():
    s = length_stats(["a b a b a"], cutoff=5)
    # bigrams ab ba ab ba: 2 unique of 4 -> 50%; trigrams aba bab aba: 2 of 3 -> 33.3%;
    # 4-grams abab baba: 2 of 2 -> 0%. diversity = 0.5 * 2/3 * 1 = 1/3, log-div = -ln(2/3).
    assert s["n"] == 1 and s["n_cut"] == 1
    assert s["chars"] == 9 and s["words"] == 5
    assert s["rep_2"] == pytest.approx(50.0)
    assert s["rep_3"] == pytest.approx(100 / 3)
    assert s["rep_4"] == pytest.approx(0.0)
    assert s["diversity"] == pytest.approx(1 / 3)
    assert s["log_diversity"] == pytest.approx(math.log(1.5))


def test_no_repeats_caps_log_diversity_at_20():
    s = length_stats(["one two three four five six"], cutoff=6)
    assert (s["rep_2"], s["rep_3"], s["rep_4"], s["diversity"]) == (0.0, 0.0, 0.0, 1.0)
    assert s["log_diversity"] == 20.0  # -ln(max(0, e^-20))


def test_cutoff_truncates_and_leaves_out_short_responses():
    texts = ["a b a b a", "x y z", "p q r s t p q"]
    s = length_stats(texts, cutoff=5)
    # Lengths over all three: chars (9 + 5 + 13) / 3, words (5 + 3 + 7) / 3.
    assert s["n"] == 3 and s["chars"] == 9.0 and s["words"] == 5.0
    # "x y z" is shorter than 5 tokens and left out; "p q r s t p q" is cut to "p q r s t",
    # which repeats nothing (uncut, "p q" would repeat). Means over the two kept responses.
    assert s["n_cut"] == 2
    assert s["rep_2"] == pytest.approx(25.0)
    assert s["rep_3"] == pytest.approx(50 / 3)
    assert s["rep_4"] == pytest.approx(0.0)
    assert s["diversity"] == pytest.approx((1 / 3 + 1) / 2)
    assert s["log_diversity"] == pytest.approx((math.log(1.5) + 20) / 2)


def test_whitespace_tokens_and_python_len():
    s = length_stats(["  a\tb\n\nc  ", "é ü"], cutoff=50)
    assert s["words"] == (3 + 2) / 2
    assert s["chars"] == (10 + 3) / 2  # characters, not UTF-8 bytes
    assert s["n_cut"] == 0
    assert all(s[k] is None for k in ("rep_2", "rep_3", "rep_4", "diversity", "log_diversity"))


def test_cutoff_below_four_is_refused():
    with pytest.raises(ValueError):
        length_stats(["a b c"], cutoff=3)


# ---- Figure 5 overlap ----

def lcs_table(a, b):
    # The textbook O(len(a) * len(b)) dynamic programme, to check the bit-parallel version.
    t = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            t[i + 1][j + 1] = t[i][j] + 1 if x == y else max(t[i][j + 1], t[i + 1][j])
    return t[-1][-1]


def test_lcs_matches_dynamic_programme():
    rng = random.Random(0)
    for _ in range(300):
        a = [rng.choice("abcd") for _ in range(rng.randint(0, 70))]
        b = [rng.choice("abcde") for _ in range(rng.randint(0, 70))]
        assert lcs_len(a, b) == lcs_table(a, b)


def test_rouge_l_worked_examples():
    assert rouge_l("the cat sat", "the cat sat") == 1.0
    # LCS of "the cat sat on the mat" / "the cat is on the mat" is "the cat on the mat": 5 of 6 each.
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    # "a b c d" vs "a c e": LCS "a c" = 2, P = 2/4, R = 2/3, F1 = 2PR / (P + R) = 4/7.
    assert rouge_l("a b c d", "a c e") == pytest.approx(4 / 7)
    # Order matters for a subsequence: "b a" vs "a b" share only one token in order: P = R = 1/2.
    assert rouge_l("b a", "a b") == pytest.approx(0.5)
    assert rouge_l("x y", "a b") == 0.0
    assert rouge_l("", "a b") == 0.0


def test_bleu_identical_is_one():
    texts = ["the quick brown fox jumps", "a b c d e f g"]
    assert corpus_bleu(texts, texts) == pytest.approx(1.0)


def test_bleu_worked_corpus_example():
    cands = ["a b c d e f", "a b c d", "z z z z"]
    refs = ["a b c d x f", "a b c d e f g h", "z y z x"]
    # Clipped matches / candidate n-grams, per pair:
    #   1-grams: 5/6 (e missing), 4/4, 2/4 (z appears 4 times but only twice in the reference)
    #   2-grams: 3/5 (ab bc cd), 3/3, 0/3
    #   3-grams: 2/4 (abc bcd), 2/2, 0/2
    #   4-grams: 1/3 (abcd),    1/1, 0/1
    # Summed over the corpus: p1 = 11/14, p2 = 6/11, p3 = 4/8, p4 = 2/5.
    # Candidate length 14 < reference length 18, so BP = exp(1 - 18/14).
    p = [11 / 14, 6 / 11, 4 / 8, 2 / 5]
    expected = math.exp(1 - 18 / 14) * math.prod(p) ** 0.25
    assert corpus_bleu(cands, refs) == pytest.approx(expected)
    assert expected == pytest.approx(math.exp(-2 / 7) * (3 / 35) ** 0.25)  # the same, simplified


def test_bleu_zero_precision_and_no_penalty_when_longer():
    assert corpus_bleu(["a b c d"], ["a b x d"]) == 0.0  # no shared 3-gram
    # Candidate longer than the reference: BP = 1. Precisions 4/5, 3/4, 2/3, 1/2.
    assert corpus_bleu(["a b c d e"], ["a b c d"]) == pytest.approx((4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25)


def test_train_overlap_pairs_by_instruction():
    train = [{"instruction": "q1", "input": "", "output": "a b c d"},
             {"instruction": "q2", "input": "", "output": "x y z w"},
             {"instruction": "q1", "input": "", "output": "something else"}]
    outputs = [{"instruction": "q1", "output": "a b c d"},        # exact copy of the first q1
               {"instruction": "q2", "output": "x y q q"},        # LCS 2 of 4 -> F1 0.5
               {"instruction": "unseen", "output": "a b c d"}]    # no training match: skipped
    s = train_overlap(outputs, train)
    assert s["n_refs"] == 2
    assert s["rouge_l"] == pytest.approx((1.0 + 0.5) / 2)
    # Corpus: p1 = (4+2)/8, p2 = (3+1)/6, p3 = 2/4, p4 = 1/2; lengths equal, so BP = 1.
    assert s["bleu_4"] == pytest.approx((6 / 8 * 4 / 6 * 2 / 4 * 1 / 2) ** 0.25)
    none = train_overlap([{"instruction": "unseen", "output": "a"}], train)
    assert none == {"rouge_l": None, "bleu_4": None, "n_refs": 0}


# ---- the command line ----

def test_cli_json_and_table(tmp_path):
    texts = ["a b a b a", "x y z"]
    f = write(tmp_path / "m.json", [{"instruction": str(i), "output": t, "generator": "m",
                                     "dataset": "d"} for i, t in enumerate(texts)])
    r = run_cli(f, "--cutoff", 5, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {str(f): length_stats(texts, cutoff=5)}
    short = write(tmp_path / "short.json", [{"output": "too short"}])
    r = run_cli(f, short, "--cutoff", 5)
    assert r.returncode == 0, r.stderr
    header, row_f, row_short = r.stdout.splitlines()
    assert header.split()[-1] == "n>=5"
    assert row_f.split()[1:] == ["2", "7.0", "4.0", "50.00", "33.33", "0.00", "0.41", "1"]
    assert row_short.split()[-5:] == ["-", "-", "-", "-", "0"]


def test_cli_refs(tmp_path):
    train = write(tmp_path / "train.json", [{"instruction": "q", "input": "", "output": "a b c d"}])
    gen = write(tmp_path / "gen.json", [{"instruction": "q", "output": "a b c d"},
                                        {"instruction": "other", "output": "a b c d"}])
    r = run_cli(gen, "--refs", train, "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)[str(gen)]
    assert (s["rouge_l"], s["bleu_4"], s["n_refs"], s["n"]) == (1.0, 1.0, 1, 2)


BAD_INPUTS = {
    "dict.json": {"output": "a"},
    "strings.json": ["a", "b"],
    "no_output.json": [{"instruction": "q"}],
    "number_output.json": [{"output": "fine"}, {"output": 3}],
    "empty_list.json": [],
    "empty_file.json": "",
    "invalid.json": '[{"output": "a"',
}


@pytest.mark.parametrize("name", [*BAD_INPUTS, "missing.json", "bad_refs"])
def test_cli_bad_input_is_one_line_and_status_2(tmp_path, name):
    good = write(tmp_path / "good.json", [{"instruction": "q", "output": "a b c d"}])
    if name == "bad_refs":
        bad = write(tmp_path / "train.json", [{"instruction": "q", "input": ""}])  # no "output"
        r = run_cli(good, "--refs", bad)
    else:
        bad = tmp_path / name
        if name in BAD_INPUTS:
            write(bad, BAD_INPUTS[name])
        r = run_cli(good, bad)
    assert r.returncode == 2
    assert r.stdout == ""  # nothing printed for the good file either
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"eval_len.py: error: {bad}: ")


def test_cli_not_a_list_message(tmp_path):
    bad = write(tmp_path / "foo.json", {"output": "a"})
    r = run_cli(bad)
    assert r.stderr.startswith(f'eval_len.py: error: {bad}: not a JSON list of objects with "output"')


# ---- real data ----

def test_published_alpaca_eval_lengths(shared):  # the fixture: skipped without ../shared, failed under CI=true
    published = {"alpaca-7b": 396.3, "llama-2-7b-chat-hf": 1479.6, "text_davinci_003": 308.0}
    for model, chars in published.items():
        outputs = json.loads((shared / "data" / "alpaca_eval_outputs" / f"{model}.json").read_text())
        s = length_stats([o["output"] for o in outputs])
        assert s["n"] == 805
        assert round(s["chars"], 1) == chars, model


def test_cli_rows_are_file_names_and_an_empty_refs_match_says_why(tmp_path):
    train = write(tmp_path / "train.json", [{"instruction": "q", "input": "", "output": "a b c d"}])
    (tmp_path / "runs").mkdir()
    gen = write(tmp_path / "runs" / "neft.json", [{"instruction": "q", "output": "a b c d"}])
    eval_outputs = write(tmp_path / "alpaca_eval.json", [{"instruction": "not in train", "output": "x y"}])
    r = run_cli(gen, eval_outputs, "--refs", train)
    assert r.returncode == 0, r.stderr
    rows = r.stdout.splitlines()[1:]
    assert [row.split()[0] for row in rows] == ["neft", "alpaca_eval"]
    assert rows[0].split()[-1] == "1" and rows[1].split()[-3:] == ["-", "-", "0"]
    assert r.stderr.count("\n") == 1  # one line for the file with no match, naming it and the fix
    assert str(eval_outputs) in r.stderr and "n_refs 0" in r.stderr and "--refs must be the training file" in r.stderr
    # two files of one name: their paths tell them apart
    other = write(tmp_path / "neft.json", [{"instruction": "q", "output": "a"}])
    rows = run_cli(gen, other).stdout.splitlines()[1:]
    assert [row.split()[0] for row in rows] == [str(gen), str(other)]
