"""sample.py: cached batched generation against a full-forward loop, the penalty by hand, EOS, sampling, the CLI."""
import io
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import PROMPTS, call, tiny_model

import builtin_data
import data
import sample
from chat_template import record
from model import ModelArgs, Tokenizer, Transformer, load_meta, save_meta
from sample import apply_repetition_penalty, generate, sample_top_p

ROOT = Path(__file__).resolve().parents[1]






@torch.no_grad()
def nocache_generate(model, prompt, n, penalty=1.0):
    """The reference: a full forward over the whole sequence for every new token, penalty from a set."""
    ids, out = list(prompt), []
    for _ in range(n):
        logits = model(torch.tensor([ids]))[0, -1].float()
        for t in set(ids):
            logits[t] = logits[t] / penalty if logits[t] > 0 else logits[t] * penalty
        out.append(int(logits.argmax()))
        ids.append(out[-1])
    return out


# ---- the KV cache and left padding ----

def test_cached_greedy_equals_full_forward_loop():
    model = tiny_model()
    for p in PROMPTS:
        ref = nocache_generate(model, p, 16)
        assert len(set(ref)) > 3  # a real sequence, not one token repeated: positions matter
        assert generate(model, [p], 16) == [ref]


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_prompt_alone_equals_prompt_in_padded_batch(penalty):
    model = tiny_model(seed=1)
    alone = [generate(model, [p], 12, repetition_penalty=penalty)[0] for p in PROMPTS]
    assert generate(model, PROMPTS, 12, repetition_penalty=penalty) == alone
    assert generate(model, PROMPTS[::-1], 12, repetition_penalty=penalty) == alone[::-1]
    assert alone == [nocache_generate(model, p, 12, penalty) for p in PROMPTS]


def test_padding_is_not_counted_as_seen():
    class FavoursPad(Transformer):  # token 0, the pad id, wins by a wide margin
        def forward(self, *args, **kwargs):
            logits = super().forward(*args, **kwargs)
            logits[..., 0] += 5.0
            return logits

    torch.manual_seed(0)
    model = FavoursPad(ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=97, multiple_of=16)).eval()
    short, long = [1, 20], [1, 3, 4, 5, 6, 7, 8]
    # Alone, nothing has been seen yet, so 0 wins first; a huge penalty then forbids it. Had the
    # short row's five pad positions been counted as seen, 0 would lose from the start.
    first = generate(model, [short], 3, repetition_penalty=100.0)[0]
    assert first[0] == 0 and 0 not in first[1:]
    assert generate(model, [short, long], 3, repetition_penalty=100.0)[0] == first


def test_per_prompt_budgets():
    model = tiny_model()
    ref = generate(model, PROMPTS[:3], 6)
    assert generate(model, PROMPTS[:3], [3, 0, 6]) == [ref[0][:3], [], ref[2]]
    assert generate(model, PROMPTS[:2], 0) == [[], []]
    assert generate(model, [], 5) == []
    with pytest.raises(ValueError):
        generate(model, [[]], 5)


# ---- repetition penalty ----

def test_repetition_penalty_by_hand():
    logits = torch.tensor([[2.0, 1.9, -1.0, -0.5, 0.0],
                           [2.0, 1.9, -1.0, -0.5, 0.0]])
    seen = torch.tensor([[True, False, True, False, True],
                         [False, True, False, False, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    # Seen positive logits are halved, seen negative ones doubled (CTRL as HF applies it), per row.
    torch.testing.assert_close(out, torch.tensor([[1.0, 1.9, -2.0, -0.5, 0.0],
                                                  [2.0, 0.95, -1.0, -0.5, 0.0]]))
    assert out.argmax(-1).tolist() == [1, 0]  # without the penalty both rows pick 0
    assert apply_repetition_penalty(logits, seen, 1.0) is logits


class FixedLogits(torch.nn.Module):
    """Stands in for the Transformer: the same next-token logits at every position."""

    def __init__(self, logits):
        super().__init__()
        self.args = ModelArgs(vocab_size=len(logits))
        self.output = torch.nn.Linear(1, 1)  # generate reads the device from here
        self.logits = torch.tensor(logits)

    def forward(self, tokens, **kwargs):
        return self.logits.expand(*tokens.shape, -1)

    def setup_cache(self, batch_size, max_len):
        pass

    def clear_cache(self):
        pass

    layers = ()  # sample.cache_row swaps each layer's cache: none here


def test_repetition_penalty_during_generation():
    model = FixedLogits([3.0, 2.9, 1.0, -1.0, -1.1, -3.0])
    # Row 0 (prompt [5]): 0 wins (3.0); then 0 is seen: 3.0/1.2 = 2.5 < 2.9, so 1; then both seen:
    # 2.5 > 2.9/1.2 = 2.417, so 0 again, and 0 from then on. Row 1 has seen 0 and 1 from its prompt.
    assert generate(model, [[5], [0, 1]], 4, repetition_penalty=1.2) == [[0, 1, 0, 0], [0, 0, 0, 0]]
    assert generate(model, [[5], [0, 1]], 4) == [[0, 0, 0, 0], [0, 0, 0, 0]]
    # All logits negative: a seen negative logit is multiplied (-1.0 -> -2.0), so 4 (-1.1) overtakes
    # 3; dividing instead (-0.5) would have kept 3. Then 4 is seen too: -2.2 < -2.0, back to 3.
    model = FixedLogits([-3.0, -3.0, -3.0, -1.0, -1.1, -5.0])
    assert generate(model, [[3]], 3, repetition_penalty=2.0) == [[4, 3, 3]]


# ---- stopping ----

def test_eos_stops_each_row_and_the_loop():
    model = tiny_model()
    ref = generate(model, PROMPTS, 16)
    p, full = PROMPTS[0], ref[0]
    k = next(i for i in range(3, 16) if full[i] not in full[:i])  # a token first produced at step k
    eos = full[k]
    assert generate(model, [p], 16, eos_id=eos) == [full[:k]]  # EOS itself is not returned
    # In a batch, each row stops at its own first EOS (or runs out of budget).
    cut = [r[:r.index(eos)] if eos in r else r for r in ref]
    assert generate(model, PROMPTS, 16, eos_id=eos) == cut
    # When every row is done the loop ends: prefill + one forward per fed-back token, k + 1 in all.
    calls = []
    hook = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        generate(model, [p], 16, eos_id=eos)
    finally:
        hook.remove()
    assert len(calls) == k + 1


# ---- sampling ----

def test_sampling_is_seeded_and_tiny_top_p_is_greedy():
    model = tiny_model()
    a = generate(model, PROMPTS, 12, temperature=1.0, top_p=0.95, seed=123)
    assert a == generate(model, PROMPTS, 12, temperature=1.0, top_p=0.95, seed=123)
    assert a != generate(model, PROMPTS, 12, temperature=1.0, top_p=0.95, seed=124)
    assert a != generate(model, PROMPTS, 12)
    tiny = generate(model, PROMPTS, 12, temperature=1.0, top_p=1e-6, seed=5, repetition_penalty=1.2)
    assert tiny == generate(model, PROMPTS, 12, repetition_penalty=1.2)


def test_top_p_draws_only_from_the_nucleus():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]]).repeat(4000, 1)
    draws = sample_top_p(probs, 0.7, torch.Generator().manual_seed(0))
    # Sorted: 0.5, 0.3 | 0.15, 0.05. The mass above 0.15 is 0.8 > 0.7, so only tokens 1 and 3 stay,
    # renormalised to 0.625 and 0.375.
    assert set(draws.tolist()) == {1, 3}
    assert (draws == 1).float().mean().item() == pytest.approx(0.625, abs=0.03)


# ---- streaming ----

@pytest.fixture(scope="module")
def builtin_tok(tmp_path_factory):
    return builtin_data.builtin_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.model")


def check_stream(tok, text):
    ids = tok.encode(text, bos=False)
    out = io.StringIO()
    stream = sample.TextStream(tok, out)
    shown = []
    for t in ids:
        stream.put(t)
        shown.append(out.getvalue())
    stream.end()
    assert out.getvalue() == tok.decode(ids) + "\n"
    return shown


def test_stream_prints_what_decode_gives(shared):
    text = "Hello world!  Two  spaces,\na newline, wörds, 你好 and 🙂 emoji."
    shown = check_stream(Tokenizer(shared / "tokenizers" / "mistral_v1_32k.model"), text)
    assert "\ufffd" not in "".join(shown)  # half a character is never printed
    assert shown[len(shown) // 2]  # text appears while generating, not only at the end


def test_stream_builtin_tokenizer(builtin_tok):
    shown = check_stream(builtin_tok, "Write a poem about the river. ünïcode ✓ bytes.")
    assert "\ufffd" not in "".join(shown)


# ---- command line ----

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, builtin_tok):
    model = tiny_model(vocab_size=builtin_tok.n_words)
    folder = save_meta(model, tmp_path_factory.mktemp("run") / "my-run" / "final", tokenizer_path=builtin_tok.path)
    record(folder, "alpaca")  # as train.py records the template it trained with
    return folder


def write(path, obj):
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


RECORDS = [{"instruction": "Name three rivers.", "dataset": "helpful_base"},
           {"instruction": "Summarise the text below in one line, please, for a busy reader.", "dataset": "koala"},
           {"instruction": "Translate.", "input": "green house"},
           {"instruction": "Never answered (past --limit).", "dataset": "x"}]


def test_cli_writes_alpaca_eval_outputs(tmp_path, ckpt):
    prompts = write(tmp_path / "prompts.json", RECORDS)
    out = tmp_path / "outputs.json"
    r = call(sample.main, "--ckpt", ckpt, "--prompts", prompts, "--out", out, "--limit", 3, "--max-new-tokens", 5,
             "--batch-size", 2)
    assert r.returncode == 0, r.stderr
    outputs = json.loads(out.read_text())
    assert [list(o) for o in outputs] == [["instruction", "output", "generator", "dataset"],
                                          ["instruction", "output", "generator", "dataset"],
                                          ["instruction", "output", "generator", "input"]]
    assert [o["instruction"] for o in outputs] == [r["instruction"] for r in RECORDS[:3]]  # original order
    assert [o.get("dataset") for o in outputs] == ["helpful_base", "koala", None]
    assert {o["generator"] for o in outputs} == {"my-run"}  # OUT/final is named after OUT
    # Each answer is what the prompt gives alone, with the paper's penalty, through data.py's template.
    model, tok = load_meta(ckpt), Tokenizer(ckpt / "tokenizer.model")
    for rec, o in zip(RECORDS, outputs):
        ids = data.prompt_ids([sample.user_message(rec)], tok, "alpaca")
        new = generate(model, [ids], 5, repetition_penalty=1.2, eos_id=tok.eos_id)[0]
        assert o["output"] == tok.decode(new)
    assert not list(tmp_path.glob(".outputs.json.*"))  # no temporary file left behind


def test_cli_budget_counts_the_prompt_and_meta_prompt(tmp_path, ckpt, monkeypatch, builtin_tok):
    calls = []
    real = sample.generate

    def spy(model, prompts, max_new_tokens, **kw):
        calls.append((prompts, max_new_tokens))
        return real(model, prompts, 2, **kw)

    monkeypatch.setattr(sample, "generate", spy)
    prompts = write(tmp_path / "p.json", RECORDS[:2])
    out = tmp_path / "o.json"
    assert sample.main(["--ckpt", str(ckpt), "--prompts", str(prompts), "--out", str(out), "--max-length", "100",
                        "--meta-prompt", "Generate a long response", "--generator", "named"]) == 0
    (batch, budgets), = calls  # both prompts in one batch, longest first
    assert [100 - len(ids) for ids in batch] == budgets
    expected = data.prompt_ids([{"role": "user", "content": RECORDS[1]["instruction"] + "\nGenerate a long response"}],
                               builtin_tok, "alpaca")
    assert batch[0] == expected
    outputs = json.loads(out.read_text())
    assert outputs[1]["instruction"] == RECORDS[1]["instruction"]  # AlpacaEval matches the original text
    assert {o["generator"] for o in outputs} == {"named"}


def test_cli_prompt_streams_the_answer(ckpt, capsys):
    assert sample.main(["--ckpt", str(ckpt), "--prompt", "Name three rivers.", "--max-new-tokens", "8"]) == 0
    model, tok = load_meta(ckpt), Tokenizer(ckpt / "tokenizer.model")
    ids = data.prompt_ids([{"role": "user", "content": "Name three rivers."}], tok, "alpaca")
    new = generate(model, [ids], 8, repetition_penalty=1.2, eos_id=tok.eos_id)[0]
    assert capsys.readouterr().out == tok.decode(new) + "\n"


@pytest.mark.parametrize("case", ["missing", "not_json", "no_instruction", "bad_ckpt", "no_out_dir"])
def test_cli_errors_are_one_line(tmp_path, ckpt, capsys, case):
    prompts = tmp_path / "prompts.json"
    ckpt_arg = ckpt
    if case == "not_json":
        write(prompts, "[{\"instruction\": ")
    elif case == "no_instruction":
        write(prompts, [{"instruction": "ok"}, {"prompt": "wrong key"}])
    elif case != "missing":
        write(prompts, RECORDS)
    if case == "bad_ckpt":
        ckpt_arg = tmp_path / "nothing-here"
    out = tmp_path / ("nope/outputs.json" if case == "no_out_dir" else "outputs.json")
    code = sample.main(["--ckpt", str(ckpt_arg), "--prompts", str(prompts), "--out", str(out)])
    err = capsys.readouterr().err  # an uncaught exception would have failed the test above
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("sample.py: error: ")
    assert str({"bad_ckpt": ckpt_arg, "no_out_dir": out}.get(case, prompts)) in err
    if case == "missing":
        assert err == f"sample.py: error: {prompts}: file not found\n"
    assert not out.exists()


def test_outputs_written_atomically(tmp_path):
    out = write(tmp_path / "outputs.json", [{"old": 1}])
    with pytest.raises(TypeError):  # fails halfway through writing
        sample.write_json_atomic(out, [{"output": "partial"}, {"output": object()}])
    assert json.loads(out.read_text()) == [{"old": 1}]
    assert list(tmp_path.iterdir()) == [out]
    sample.write_json_atomic(out, [{"output": "é"}])
    assert json.loads(out.read_text(encoding="utf-8")) == [{"output": "é"}]


def test_generator_name(tmp_path):
    assert sample.generator_name(tmp_path / "neftune-7b" / "final") == "neftune-7b"
    assert sample.generator_name(tmp_path / "llama-2-7b") == "llama-2-7b"


def test_sampling_at_temperature_half_matches_the_tempered_softmax():
    # logits (2, 1, 0) at T = 0.5: p proportional to exp(4), exp(2), exp(0), by hand
    expected = torch.tensor([math.exp(4), math.exp(2), 1.0])
    expected /= expected.sum()  # 0.8668, 0.1173, 0.0159
    n = 40000
    logits = torch.tensor([[2.0, 1.0, 0.0]]).expand(n, 3)
    seen = torch.zeros(n, 3, dtype=torch.bool)
    draws = sample.next_token(logits, seen, 0.5, 1.0, 1.0, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=3).double() / n
    # 4 standard errors of a binomial proportion: fails for a wrong temperature (T=1 gives 0.665)
    se = (expected * (1 - expected) / n).sqrt().double()
    assert torch.all((freq - expected.double()).abs() < 4 * se + 1e-9), freq
    # the same seeded draw, done independently: multinomial over the sorted tempered distribution
    g = torch.Generator().manual_seed(0)
    ref = torch.multinomial(expected.expand(n, 3).contiguous(), 1, generator=g)[:, 0]  # already sorted descending
    assert torch.equal(draws, ref)


def test_exact_match_by_hand():
    answers = ["3 + 4 = 7", " 1, 2, 3\n", None, "yes", "5 - 2 = 4"]
    refs = ["3 + 4 = 7", "1, 2, 3", "12", "no", "5 - 2 = 3"]
    assert builtin_data.exact_match(answers, refs) == 2 / 5  # right: the first two (ends' spaces ignored)


def test_exact_match_answers_on_examples(tmp_path):
    # a scripted model: it says the first example's reference, then EOS, whatever it is asked
    tok = builtin_data.builtin_tokenizer(tmp_path / "tokenizer.model", seed=1)
    recs = [[{"role": "user", "content": "How many times does the letter 'e' appear in the word 'tree'?", "input": ""},
             {"role": "assistant", "content": "2"}],
            [{"role": "user", "content": "What is 2 + 2?", "input": ""}, {"role": "assistant", "content": "2 + 2 = 4"}]]
    examples = data.tokenize_records(recs, tok, "alpaca", 128, verbose=False)
    start = examples[0]["labels"].index(next(x for x in examples[0]["labels"] if x != data.IGNORE))
    script = examples[0]["input_ids"][start:]  # "2" then EOS
    assert script[-1] == tok.eos_id and tok.decode(script[:-1]) == "2"
    torch.manual_seed(0)
    m = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=tok.n_words, multiple_of=16))
    calls = []
    m.output.register_forward_hook(lambda mod, inp, out: calls.append(1) or torch.nn.functional.one_hot(
        torch.full(out.shape[:-1], script[min(len(calls), len(script)) - 1]), out.shape[-1]).float())
    r = builtin_data.exact_match_answers(m, tok, examples)
    assert [a["answer"] for a in r["answers"]] == ["2", "2"] and [a["reference"] for a in r["answers"]] == ["2",
                                                                                                            "2 + 2 = 4"]
    assert r["exact_match"] == 0.5 and [a["correct"] for a in r["answers"]] == [True, False]
    assert r["answers"][1]["prompt"].endswith("What is 2 + 2?\n\n### Response:")


def test_a_checkpoint_without_a_template_needs_template(tmp_path, builtin_tok, capsys):
    # never an empty answer with exit 0 from a guessed template: one line, before the model loads
    folder = save_meta(tiny_model(vocab_size=builtin_tok.n_words), tmp_path / "final", tokenizer_path=builtin_tok.path)
    assert sample.main(["--ckpt", str(folder), "--prompt", "Hi.", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "records no chat template" in err and "pass --template" in err
    assert sample.main(["--ckpt", str(folder), "--prompt", "Hi.", "--max-new-tokens", "2", "--template", "alpaca"]) == 0
    assert [line.split(":")[0] for line in capsys.readouterr().err.splitlines()] == ["dtype"]  # the choice, no warning
