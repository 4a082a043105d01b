"""The decode step of sample.generate compiled (gpt-fast's recipe): the same tokens as eager decoding,
one compile per batch shape, any number of shapes without meeting dynamo's recompile limit, only the
current shape's KV cache kept, and on a CPU the faster of compiled and eager kept by a measurement."""
import gc
import weakref

import pytest
import torch
from conftest import PROMPTS, call, tiny_model, uneven_prompts
from torch._dynamo.utils import counters

import builtin_data
import fast_decode
import sample
from model import save_meta
from sample import generate


def graphs():
    return counters["stats"]["unique_graphs"]


@pytest.fixture(scope="module")
def compiled():
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
    x = torch.tensor([PROMPTS[2]])
    assert torch.equal(model(x), tiny_model()(x))  # a plain forward ignores the cache the compiled step keeps


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
    long = generate(model, PROMPTS[2:3], fast_decode.CACHE_BUCKET, compile=True)
    assert graphs() == before + 2
    assert long == generate(model, PROMPTS[2:3], fast_decode.CACHE_BUCKET)


def test_only_the_current_shapes_cache_is_kept(compiled):
    model = compiled[0]
    generate(model, PROMPTS, 4, compile=True)
    old = [weakref.ref(b) for b in model.buffers()]
    generate(model, PROMPTS[:2], 4, compile=True)  # another batch shape: its own cache replaces the first
    shape = model.layers[0].attention.cache.k.shape
    assert shape[0] == 2 and shape[2] == fast_decode.CACHE_BUCKET
    gc.collect()
    assert all(r() is None for r in old)  # the first shape's cache is freed, not kept beside the new one
    held = [b for b in model.buffers() if b.dim() == 4]  # the caches are the model's only 4-d buffers
    assert len(held) == 2 * len(model.layers) and all(b.shape == shape for b in held)
    generate(model, PROMPTS[:2], 4)  # eager decoding frees its cache when done
    assert all(layer.attention.cache is None for layer in model.layers)


@pytest.mark.slow
def test_more_batch_shapes_than_the_recompile_limit():
    # 10 batch sizes -> 10 power-of-two shapes, past dynamo's limit of 8 compiled graphs per function: with
    # fullgraph=True the 9th would be an error; the compiled graphs are dropped and compiling starts afresh
    assert torch._dynamo.config.recompile_limit < 10
    model = tiny_model()
    for b in (1, 2, 3, 5, 9, 17, 33, 65, 129, 257):
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(b)]
        assert generate(model, prompts, 2, compile=True) == generate(model, prompts, 2), b
    assert fast_decode.batch_bucket(257) == 512 and fast_decode.batch_bucket(8) == 8


def test_the_faster_step_is_kept(compiled, monkeypatch):
    # a compiled step made slow on purpose: after the timed steps the eager one serves the shape, same tokens
    model = compiled[0]
    real = fast_decode.compiled_step(torch.device("cpu"))

    def slow(*args):
        import time
        time.sleep(0.02)
        return real(*args)
    monkeypatch.setattr(fast_decode, "compiled_step", lambda device: slow)
    monkeypatch.setattr(fast_decode, "_choice", {})
    prompts = [PROMPTS[0]] * 3  # 3 rows -> a batch of 4, the fixture's shape: compiled already
    got = generate(model, prompts, 12, compile=True)
    assert got == generate(model, prompts, 12)
    assert list(fast_decode._choice.values()) == [fast_decode.decode_step]


def test_cli_compile_gives_the_same_answer(tmp_path):
    tok = builtin_data.builtin_tokenizer(tmp_path / "tok" / "tokenizer.model")
    ckpt = save_meta(tiny_model(vocab_size=tok.n_words), tmp_path / "run" / "final", tokenizer_path=tok.path)
    texts = []
    for extra in (["--template", "alpaca"], ["--template", "alpaca", "--compile"]):
        p = call(sample.main, "--ckpt", ckpt, "--prompt", "Name three rivers.", "--max-new-tokens", "10", *extra)
        assert p.returncode == 0, p.stderr
        texts.append(p.stdout)
    assert texts[0] == texts[1] and texts[0].strip()


def test_compiled_slots_refill_equal_each_prompt_alone(compiled):
    # continuous batching in the fixture's shape (4 slots, one cache bucket): no new compile, and each
    # prompt gives its tokens alone, whatever slot it lands in and whenever
    model = compiled[0]
    prompts, budgets = uneven_prompts(n=10, seed=5)
    alone = [generate(model, [p], n, repetition_penalty=1.2)[0] for p, n in zip(prompts, budgets)]
    before = graphs()
    assert generate(model, prompts, budgets, repetition_penalty=1.2, batch_size=4, compile=True) == alone
    assert generate(model, prompts, budgets, repetition_penalty=1.2, batch_size=3, compile=True) == alone  # 3 -> 4
    assert graphs() == before
