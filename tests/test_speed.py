"""Issue 13's speed paths: the compiled decode step (same tokens, one compile per batch shape), the
CPU training dtype chosen by a measurement and kept across a resume, and CUDA variants (skipped
without CUDA) of the generation and training smoke tests."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

import data
import sample
import train
from model import ModelArgs, Transformer, save_meta
from sample import generate
from test_sample import PROMPTS, one_thread, tiny_model  # noqa: F401 (one_thread: an autouse fixture)

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def graphs():
    return counters["stats"]["unique_graphs"]


# ---- Part 1: the compiled decode step ----

@pytest.fixture(scope="module")
def compiled(one_thread):
    """One tiny model and its first compiled call (a left-padded batch of 4): compiling is the slow part."""
    model = tiny_model()
    before = graphs()
    out = generate(model, PROMPTS, 12, repetition_penalty=1.2, compile=True)
    return model, out, graphs() - before


def test_compiled_greedy_equals_eager_left_padded(compiled):
    model, out, n_graphs = compiled
    assert n_graphs == 1  # fullgraph=True: one graph, no breaks
    assert out == generate(model, PROMPTS, 12, repetition_penalty=1.2)
    assert all(len(o) == 12 for o in out) and len({tuple(o) for o in out}) == len(out)  # rows differ: a real check
    assert all(layer.attention.cache is None for layer in model.layers)  # a training forward never sees the cache


def test_compiled_eos_and_budgets_equal_eager(compiled):
    model = compiled[0]
    eos = compiled[1][0][4]  # a token row 0 chooses: it then stops there
    budgets = [12, 3, 7, 12]
    got = generate(model, PROMPTS, budgets, eos_id=eos, compile=True)
    assert got == generate(model, PROMPTS, budgets, eos_id=eos)
    assert len(got[0]) == 4 and len(got[1]) <= 3


def test_one_compile_per_batch_shape(compiled):
    model = compiled[0]
    before = graphs()
    # same batch size, other prompt lengths and budgets within the cache bucket: the same graph
    generate(model, [p[:3] for p in PROMPTS], 9, compile=True)
    generate(model, PROMPTS[::-1], 20, compile=True)
    assert graphs() == before
    # a new batch size compiles once, then is reused
    ref = generate(model, PROMPTS[2:3], 10)
    assert generate(model, PROMPTS[2:3], 10, compile=True) == ref
    assert generate(model, PROMPTS[2:3], 10, compile=True) == ref
    assert graphs() == before + 1
    # a cache longer than one bucket is another shape: one more compile
    long = generate(model, PROMPTS[2:3], sample.CACHE_BUCKET, compile=True)
    assert graphs() == before + 2
    assert long == generate(model, PROMPTS[2:3], sample.CACHE_BUCKET)


def test_cli_compile_gives_the_same_answer(tmp_path, capsys):
    tok = data.builtin_tokenizer(tmp_path / "tok" / "tokenizer.model")
    ckpt = save_meta(tiny_model(vocab_size=tok.n_words), tmp_path / "run" / "final", tokenizer_path=tok.path)
    texts = []
    for extra in ([], ["--compile"]):
        assert sample.main(["--ckpt", str(ckpt), "--prompt", "Name three rivers.", "--max-new-tokens", "10", *extra]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and texts[0].strip()
