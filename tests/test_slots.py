"""sample.py at scale: continuous batching (a slot whose answer ends takes the next prompt) against each
prompt generated alone, the dtype chosen by measurement, and resumable --prompts runs (Ctrl-C, kill -9)."""
import json
import os
import signal
import subprocess
import time

import pytest
import torch
from conftest import ENV, ROOT, command, one_error_line, tiny_model, uneven_prompts

import builtin_data
import data
import precision
import sample
from bench import generate as bench_generate
from model import KVCache, save_meta
from sample import block_lengths, close_up, fill_slots, generate


def test_fill_slots_takes_pending_prompts_in_order():
    from collections import deque
    owner, pending = [None, 7, None], deque([3, 4, 5])
    assert fill_slots(owner, pending) == [(0, 3), (2, 4)] and owner == [3, 7, 4] and list(pending) == [5]
    assert fill_slots(owner, pending) == [] and list(pending) == [5]  # no free slot
    owner[1] = None
    assert fill_slots(owner, pending) == [(1, 5)] and fill_slots([None], deque()) == []


def test_close_up_fills_freed_slots_with_the_oldest_later_rows(monkeypatch):
    """Blocks of 2 rows; prompts 0, 2 and 4 ended. Slot 1 (block 0) takes the oldest later row, prompt 3
    from slot 3; slot 3 (block 1) then takes prompt 5 from slot 4: blocks stay in starting order and the
    free slots gather at the end. Each move carries the columns the row filled (and nothing past them),
    its seen tokens and its next token; a free slot is at column 0."""
    monkeypatch.setattr(sample, "ROWS_PER_BLOCK", 2)

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = torch.nn.Module()
            k = torch.arange(6 * 2 * 6 * 3, dtype=torch.float).view(6, 2, 6, 3)  # (slots, heads, columns, dim)
            self.attention.cache = KVCache(k, -k)
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([Layer(), Layer()])
    before = model.layers[1].attention.cache.k.clone()
    owner, col = [1, None, 6, 3, 5, None], [4, 0, 1, 3, 2, 0]
    seen, tok = torch.eye(6, dtype=torch.bool), torch.tensor([10, 11, 12, 13, 14, 15])
    close_up(model, owner, col, seen, tok)
    assert owner == [1, 3, 6, 5, None, None] and col == [4, 3, 1, 2, 0, 0] and tok[:4].tolist() == [10, 13, 12, 14]
    assert seen[:4].tolist() == torch.eye(6, dtype=torch.bool)[[0, 3, 2, 4]].tolist()
    k, v = model.layers[1].attention.cache.k, model.layers[1].attention.cache.v
    assert torch.equal(k[0], before[0]) and torch.equal(k[2], before[2])  # rows that stay are untouched
    assert torch.equal(k[1, :, :3], before[3, :, :3]) and torch.equal(k[1, :, 3:], before[1, :, 3:])  # 3 columns
    assert torch.equal(v[1, :, :3], -before[3, :, :3])
    assert torch.equal(k[3, :, :2], before[4, :, :2]) and torch.equal(k[3, :, 2:], before[3, :, 2:])
    owner, col = [None, 2, None, None], [0, 5, 0, 0]  # nothing later to move: nothing moves
    close_up(model, owner, col, seen, tok)
    assert owner == [None, 2, None, None] and col == [0, 5, 0, 0]


def test_block_lengths_per_block_of_rows(monkeypatch):
    monkeypatch.setattr(sample, "ROWS_PER_BLOCK", 2)
    assert block_lengths([9, 4, 3, 7, 0]) == [(2, 10), (2, 8), (1, 1)]
    monkeypatch.setattr(sample, "ROWS_PER_BLOCK", 16)
    assert block_lengths([9, 4, 3, 7, 0]) == [(5, 10)]


def test_blocks_of_rows_attend_to_their_own_columns():
    """A cache_len per block of rows gives the logits of one length for all rows (the columns a block
    skips are masked anyway), and SDPA sees each block's keys only."""
    model = tiny_model(seed=5)
    B, L = 6, 12
    model.setup_cache(B, L)
    with torch.no_grad():
        for layer in model.layers:  # a filled cache, and each row's next column
            layer.attention.cache.k.normal_(), layer.attention.cache.v.normal_()
    pos = torch.tensor([9, 8, 5, 4, 2, 0])
    tok = torch.arange(3, 3 + B)
    with torch.no_grad():
        one = model(tok[:, None], cache_pos=pos[:, None], cache_len=10)
        keys = []
        sdpa = torch.nn.functional.scaled_dot_product_attention
        with pytest.MonkeyPatch.context() as m:
            m.setattr(torch.nn.functional, "scaled_dot_product_attention",
                      lambda q, k, v, **kw: keys.append((q.shape[0], k.shape[2])) or sdpa(q, k, v, **kw))
            blocks = model(tok[:, None], cache_pos=pos[:, None], cache_len=[(2, 10), (3, 9), (1, 1)])
    assert keys == [(2, 10), (3, 9), (1, 1)] * 2  # per layer: rows 0-1 see 10 columns, 2-4 nine, row 5 one
    assert torch.allclose(blocks, one, atol=1e-5, rtol=0)
    model.clear_cache()


@pytest.mark.parametrize("penalty", [1.0, 1.2])
def test_slot_refill_equals_each_prompt_alone(penalty):
    model = tiny_model(seed=2)
    prompts, budgets = uneven_prompts()
    alone = [generate(model, [p], n, repetition_penalty=penalty)[0] for p, n in zip(prompts, budgets)]
    assert [len(a) for a in alone] == budgets and len({tuple(a) for a in alone}) > len(alone) // 2
    finished = []
    calls = []
    hook = model.register_forward_hook(lambda m, args, out: calls.append(args[0].shape))
    try:
        got = generate(model, prompts, budgets, repetition_penalty=penalty, batch_size=3,
                       on_answer=lambda i, new: finished.append((i, list(new))))
    finally:
        hook.remove()
    assert got == alone  # the input order, each answer as alone
    assert sorted(finished) == list(enumerate(alone)) and [i for i, _ in finished] != sorted(i for i, _ in finished)
    # slots were refilled: a batch-1 prefill per prompt after the first three (one forward for those),
    # and one step per token of the busiest slot's answers, far fewer than 23 prompts' worth of static batches
    prefills = [s for s in calls if s[1] > 1 or s[0] == 1]
    assert len(prefills) >= 20 and all(s[0] in (1, 3) for s in calls)
    steps = len(calls) - len(prefills)
    static = sum(max(budgets[b:b + 3]) for b in range(0, len(budgets), 3))
    assert steps < static


def test_stop_tokens_free_slots_for_the_next_prompt():
    model = tiny_model(seed=3)
    prompts, _ = uneven_prompts(n=15, seed=1)
    ref = [generate(model, [p], 24)[0] for p in prompts]
    counts = torch.bincount(torch.tensor(sum(ref, [])))
    stop = counts.argsort(descending=True)[:3].tolist()  # the most common tokens: many answers stop early
    alone = [generate(model, [p], 24, eos_id=stop)[0] for p in prompts]
    assert sum(len(a) < 24 for a in alone) >= 5
    assert generate(model, prompts, 24, eos_id=stop, batch_size=4) == alone
    assert generate(model, prompts[::-1], 24, eos_id=stop, batch_size=2) == alone[::-1]


def test_many_slots_in_blocks_equal_each_prompt_alone(monkeypatch):
    """60 prompts of 1-60 tokens through 13 slots in blocks of 3 rows: answers end mid-batch (stop
    tokens, budgets), the rows behind them move down (close_up), each block attends to its own columns."""
    model = tiny_model(seed=4)
    prompts, budgets = uneven_prompts(n=60, seed=6)
    stop = [5, 17, 40]
    alone = [generate(model, [p], n, eos_id=stop)[0] for p, n in zip(prompts, budgets)]
    assert sum(len(a) < n for a, n in zip(alone, budgets)) >= 5  # some answers end at a stop token
    monkeypatch.setattr(sample, "ROWS_PER_BLOCK", 3)
    moves, close = [], sample.close_up
    monkeypatch.setattr(sample, "close_up", lambda *a: moves.append(list(a[1])) or close(*a))
    assert generate(model, prompts, budgets, eos_id=stop, batch_size=13) == alone
    assert any(any(o is not None for o in owner[owner.index(None):]) for owner in moves)  # rows behind a freed slot


def test_batch_size_larger_than_the_prompts_and_zero_budgets():
    model = tiny_model()
    prompts, budgets = uneven_prompts(n=5, seed=4)
    budgets[1] = 0
    alone = [generate(model, [p], n)[0] for p, n in zip(prompts, budgets)]
    assert alone[1] == [] and generate(model, prompts, budgets, batch_size=64) == alone
    with pytest.raises(ValueError):
        generate(model, prompts, budgets, batch_size=0)


# ---- the command line: dtype and resume ----

@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """A tiny checkpoint with the built-in tokenizer and 12 instructions of very different lengths."""
    root = tmp_path_factory.mktemp("slots")
    tok = builtin_data.builtin_tokenizer(root / "tok" / "tokenizer.model")
    ckpt = save_meta(tiny_model(vocab_size=tok.n_words), root / "run" / "final", tokenizer_path=tok.path,
                     dtype=torch.float32)
    words = "rivers mountains the of a cat sat on mat under bright green trees near old stone bridges".split()
    records = [{"instruction": " ".join(words[:1 + (7 * i) % len(words)] * (1 + i % 4))} for i in range(12)]
    (root / "prompts.json").write_text(json.dumps(records))
    return root, ckpt


def sample_args(root, ckpt, out, *extra):
    return ["--ckpt", str(ckpt), "--prompts", str(root / "prompts.json"), "--out", str(out), "--max-new-tokens",
            "12", "--batch-size", "3", "--dtype", "fp32", "--template", "alpaca", *extra]


def test_dtype_by_measurement_and_override(cli, tmp_path, monkeypatch, capsys):
    root, ckpt = cli
    loaded = []
    real = sample.load
    monkeypatch.setattr(sample, "load", lambda c, dtype, device: loaded.append(dtype) or real(c, dtype, device))
    for flops, name, want in (((100e9, 900e9), "bf16", torch.bfloat16), ((100e9, 110e9), "fp32", torch.float32)):
        monkeypatch.setattr(precision, "matmul_flops", lambda flops=flops: flops)
        argv = sample_args(root, ckpt, tmp_path / f"{name}.json")
        argv.remove("--dtype"), argv.remove("fp32")
        assert sample.main(argv) == 0
        assert loaded[-1] == want and f"dtype: {name} (measured on this CPU" in capsys.readouterr().err
    monkeypatch.setattr(precision, "matmul_flops", lambda: (100e9, 900e9))  # bf16 would win: --dtype decides
    assert sample.main(sample_args(root, ckpt, tmp_path / "o.json")) == 0
    assert loaded[-1] == torch.float32 and "dtype: fp32 (--dtype)" in capsys.readouterr().err


def test_the_answers_the_budget_stopped_are_counted(cli, tmp_path, capsys):
    root, ckpt = cli
    assert sample.main(sample_args(root, ckpt, tmp_path / "o.json")) == 0
    # the same answers one prompt at a time: those of exactly --max-new-tokens (12) tokens were cut by it
    model, tok = sample.load(ckpt, torch.float32, "cpu")
    records = json.loads((root / "prompts.json").read_text())
    alone = [generate(model, [data.prompt_ids([sample.user_message(r)], tok, "alpaca")], 12,
                      repetition_penalty=1.2, eos_id=tok.stop_ids)[0] for r in records]
    cut = sum(len(a) == 12 for a in alone)
    assert cut > 0  # a random tiny model seldom ends an answer itself
    assert f"wrote 12 answers to {tmp_path / 'o.json'} ({cut} of them stopped by the token budget" in \
        capsys.readouterr().err


def test_ctrl_c_then_the_same_command_continues(cli, tmp_path, monkeypatch, capsys):
    root, ckpt = cli
    ref = tmp_path / "ref.json"
    assert sample.main(sample_args(root, ckpt, ref)) == 0
    out = tmp_path / "out.json"
    partial = tmp_path / "out.json.partial.jsonl"
    real = sample.generate

    def interrupted(*args, on_answer, **kw):
        def answer(i, new):
            on_answer(i, new)
            if partial.read_text().count("\n") == 6:  # the header and 5 answers
                raise KeyboardInterrupt
        return real(*args, on_answer=answer, **kw)
    monkeypatch.setattr(sample, "generate", interrupted)
    assert sample.main(sample_args(root, ckpt, out)) == 130 and not out.exists()
    with open(partial, "a") as f:
        f.write('{"index": 11, "outp')  # as kill -9 can leave the last line
    asked = []
    monkeypatch.setattr(sample, "generate", lambda model, prompts, *a, **k: asked.append(len(prompts)) or
                        real(model, prompts, *a, **k))
    capsys.readouterr()
    assert sample.main(sample_args(root, ckpt, out)) == 0
    assert "5 of 12 answers were done" in capsys.readouterr().err and asked == [7]
    assert out.read_text() == ref.read_text() and not partial.exists()


def test_partial_answers_of_another_command_are_refused(cli, tmp_path, capsys):
    root, ckpt = cli
    out = tmp_path / "out.json"
    partial = tmp_path / "out.json.partial.jsonl"
    partial.write_text(json.dumps({"dtype": "fp32", "key": "another"}) + "\n")
    assert sample.main(sample_args(root, ckpt, out)) == 2
    assert "holds answers of another command" in one_error_line(capsys.readouterr().err, "sample.py")
    assert sample.main(sample_args(root, ckpt, out, "--dtype", "bf16")) == 2  # the last --dtype wins
    assert "was started in fp32" in one_error_line(capsys.readouterr().err, "sample.py")
    partial.write_text("not json\n")
    assert sample.main(sample_args(root, ckpt, out)) == 2
    assert "not the answers of an unfinished sample.py run" in one_error_line(capsys.readouterr().err, "sample.py")
    assert not out.exists()


@pytest.mark.slow
def test_kill_9_then_the_same_command_gives_the_uninterrupted_file(cli, tmp_path):
    root, ckpt = cli
    args = lambda out: sample_args(root, ckpt, out, "--batch-size", "1", "--max-new-tokens", "200")
    ref = tmp_path / "ref.json"
    subprocess.run(command("sample.py", args(ref)), cwd=ROOT, env=ENV, check=True, capture_output=True, timeout=300)
    out = tmp_path / "out.json"
    partial = tmp_path / "out.json.partial.jsonl"
    p = subprocess.Popen(command("sample.py", args(out)), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    while p.poll() is None and (not partial.exists() or partial.read_text().count("\n") < 4):
        time.sleep(0.01)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    done = partial.read_text().count("\n") - 1
    assert p.returncode == -signal.SIGKILL and 3 <= done < 12 and not out.exists()
    q = subprocess.run(command("sample.py", args(out)), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert q.returncode == 0, q.stderr
    assert f"{done} of 12 answers were done" in q.stderr
    assert out.read_text() == ref.read_text() and not partial.exists()


def test_bench_slots_part_counts_the_same_answers_both_ways():
    cfg = dict(dim=32, n_layers=1, n_heads=2, vocab_size=64, multiple_of=16)
    r = bench_generate.bench_slots(cfg, torch.device("cpu"), "fp32", 9, 4, 6, False)
    assert r["answer_tokens"] > 9 and r["slots_tokens_per_s"] > 0 and r["static_tokens_per_s"] > 0
    model = tiny_model()
    prompts, budgets = uneven_prompts(n=9, seed=6)

    class Tok:
        stop_ids = [5]
    static = bench_generate.ours(model, Tok, prompts, budgets, 4, static=True)
    slots = bench_generate.ours(model, Tok, prompts, budgets, 4)
    assert static == slots == generate(model, prompts, budgets, eos_id=5, repetition_penalty=1.2)  # as sample.py
