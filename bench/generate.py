"""Generation at AlpacaEval scale, a part of the benchmarks: answer tokens per second of wall time on
AlpacaEval instructions with a real model (an HF folder, e.g. SmolLM2-135M-Instruct from
../shared/tools/smollm2_hf.py), greedy, penalty 1.2, 1024 tokens counting the prompt, three ways:
sample.py's defaults (slots, dtype by measurement), static batches of the same size (each runs to its
longest answer), and transformers' generate in static batches of the same size and dtype (skipped
without transformers). --vs-batch1 also counts the answers that differ from each prompt generated alone.

    python -m bench.generate --model ../SmolLM2-135M-Instruct --n 48 --out results/generate.json
"""
import argparse
import json
import time
from pathlib import Path

import torch

import data
import sample
from bench.decode import sync
from precision import choose_dtype

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def alpaca_prompts(tok, path, n, template, max_new_tokens=None):
    records = sample.read_prompts(path)[:n]
    ids = [data.prompt_ids([sample.user_message(r)], tok, template) for r in records]
    return ids, [min(max(0, sample.MAX_LENGTH - len(x)), max_new_tokens or sample.MAX_LENGTH) for x in ids]


def timed(fn):
    """fn() -> (its result, (wall seconds, this process's CPU seconds)): on a machine that other work
    shares, the CPU seconds say what the wall time would have been with the cores to itself."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, (time.perf_counter() - t0, time.process_time() - c0)


def figures(answers, seconds):
    n, (wall, cpu) = sum(map(len, answers)), seconds
    return {"answer_tokens": n, "seconds": round(wall, 1), "tokens_per_s": round(n / wall, 2),
            "cpu_seconds": round(cpu, 1), "tokens_per_cpu_s": round(n / cpu, 2)}


def ours(model, tok, ids, budgets, batch_size, static=False, compile=False):
    """sample.generate as sample.py runs it (slots), or in static batches (longest prompts first, as
    sample.py batched them before: every batch runs until its longest answer is done)."""
    settings = dict(repetition_penalty=sample.REPETITION_PENALTY, eos_id=tok.stop_ids, compile=compile)
    if not static:
        return sample.generate(model, ids, budgets, batch_size=batch_size, **settings)
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    answers = [None] * len(ids)
    for b in range(0, len(order), batch_size):
        rows = order[b:b + batch_size]
        for i, new in zip(rows, sample.generate(model, [ids[i] for i in rows], [budgets[i] for i in rows], **settings)):
            answers[i] = new
    return answers


def transformers_static(folder, dtype, ids, tok, batch_size, max_new_tokens=None):
    """transformers' generate as the paper's eval_generate.py calls it (greedy, penalty 1.2, max_length
    1024), in left-padded batches of batch_size, longest prompts first -> answers cut at a stop token."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    pad = tok.stop_ids[0]
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    answers = [None] * len(ids)
    with torch.inference_mode():
        for b in range(0, len(order), batch_size):
            rows = order[b:b + batch_size]
            P = max(len(ids[i]) for i in rows)
            x = torch.tensor([[pad] * (P - len(ids[i])) + ids[i] for i in rows])
            mask = torch.tensor([[0] * (P - len(ids[i])) + [1] * len(ids[i]) for i in rows])
            out = model.generate(input_ids=x, attention_mask=mask, do_sample=False, repetition_penalty=1.2,
                                 max_length=sample.MAX_LENGTH, max_new_tokens=max_new_tokens, pad_token_id=pad,
                                 eos_token_id=tok.stop_ids)
            for i, row in zip(rows, out[:, P:].tolist()):
                answers[i] = next((row[:k] for k, t in enumerate(row) if t in tok.stop_ids), row)
    return answers


def bench_generate(folder, prompts, n=48, template="chatml", batch_size=32, dtype=None, ways=("slots", "static",
                   "transformers"), vs_batch1=False, compile=False, max_new_tokens=None):
    model_dtype, why = choose_dtype(argparse.Namespace(resume=False, dtype=dtype), torch.device("cpu"), None)
    model, tok = sample.load(folder, DTYPES[model_dtype], "cpu")
    ids, budgets = alpaca_prompts(tok, prompts, n, template, max_new_tokens)
    out = {"model": str(folder), "prompts": len(ids), "batch_size": batch_size, "dtype": model_dtype,
           "dtype_why": why, "threads": torch.get_num_threads(), "compile": compile}
    got = {}
    for way in ways:
        if way == "transformers":
            try:
                import transformers  # noqa: F401 (a test-only dependency: skipped without it)
            except ImportError:
                out[way] = "skipped: transformers is not installed"
                continue
            got[way], s = timed(lambda: transformers_static(folder, DTYPES[model_dtype], ids, tok, batch_size,
                                                                   max_new_tokens))
        else:
            got[way], s = timed(lambda: ours(model, tok, ids, budgets, batch_size, way == "static", compile))
        out[way] = figures(got[way], s)
        print(f"{way}: {out[way]}", flush=True)
    if "slots" in got:
        for way in set(got) - {"slots"}:
            out[way]["answers_equal_to_slots"] = sum(a == b for a, b in zip(got[way], got["slots"]))
            out[f"slots_over_{way}_tokens_per_s"] = round(out["slots"]["tokens_per_s"] / out[way]["tokens_per_s"], 2)
        lens = sorted(map(len, got["slots"]))
        out["answer_tokens_min_median_max"] = [lens[0], lens[len(lens) // 2], lens[-1]]
    if vs_batch1 and "slots" in got:
        alone = [ours(model, tok, [x], [b], 1)[0] for x, b in zip(ids, budgets)]
        differ = [i for i, (a, b) in enumerate(zip(alone, got["slots"])) if a != b]
        out["vs_batch1"] = {"differ": len(differ), "of": len(ids), "first_difference_at_token": [
            next((k for k, (x, y) in enumerate(zip(alone[i], got["slots"][i])) if x != y),
                 min(len(alone[i]), len(got["slots"][i]))) for i in differ]}
        out["vs_batch1"]["near_ties"] = near_ties(model, tok, ids, alone, got["slots"], differ)
    return out


@torch.inference_mode()
def near_ties(model, tok, ids, alone, batched, differ):
    """For each answer that differs from batch 1: at the first token where they part, the gap between the
    two candidates' (penalised) logits, computed alone (batch 1, no cache) over the common prefix. A
    gap within the dtype's rounding (bf16: ~0.06 at logits of ~10) is a near-tie that a different
    batch shape, hence a different summation order in the matmuls, may flip."""
    gaps = []
    for i in differ:
        k = next((k for k, (x, y) in enumerate(zip(alone[i], batched[i])) if x != y), None)
        if k is None:  # one is a prefix of the other: a stop token won in one of them
            gaps.append(None)
            continue
        seq = ids[i] + alone[i][:k]
        logits = model(torch.tensor([seq]))[0, -1].float()
        seen = torch.zeros_like(logits, dtype=torch.bool)
        seen[torch.tensor(seq)] = True
        logits = sample.apply_repetition_penalty(logits[None], seen[None], sample.REPETITION_PENALTY)[0]
        gaps.append(round(float(logits[alone[i][k]] - logits[batched[i][k]]), 4))
    return gaps


def bench_slots(cfg, device, dtype_name, n_prompts, batch_size, new_tokens, compile):
    """The same comparison on a random model of any shape (the GPU's decode measurement): n_prompts of
    8-64 tokens with budgets spread over 1..new_tokens, as uneven as real answers, decoded in slots and
    in static batches of batch_size (compiled where compile), sequentially; tokens/s of wall time."""

    from model import ModelArgs, Transformer
    g = torch.Generator().manual_seed(0)
    args = ModelArgs(**cfg)
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(args).to(DTYPES[dtype_name]).eval()
    lens = torch.randint(8, 65, (n_prompts,), generator=g).tolist()
    ids = [torch.randint(3, args.vocab_size, (n,), generator=g).tolist() for n in lens]
    budgets = torch.randint(1, new_tokens + 1, (n_prompts,), generator=g).tolist()
    out = {"config": cfg, "dtype": dtype_name, "prompts": n_prompts, "batch_size": batch_size,
           "new_tokens_max": new_tokens, "answer_tokens": sum(budgets), "compile": compile}

    class NoStop:
        stop_ids = []
    for way in ("slots", "static"):
        ours(model, NoStop, ids[:batch_size], [2] * batch_size, batch_size, way == "static", compile)  # compile
        sync(device)
        t0 = time.perf_counter()
        ours(model, NoStop, ids, budgets, batch_size, way == "static", compile)
        sync(device)
        out[f"{way}_tokens_per_s"] = round(sum(budgets) / (time.perf_counter() - t0), 1)
    out["slots_over_static"] = round(out["slots_tokens_per_s"] / out["static_tokens_per_s"], 2)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a Hugging Face folder (SmolLM2-135M-Instruct)")
    p.add_argument("--prompts", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" /
                                             "alpaca_eval_instructions.json"))
    p.add_argument("--n", type=int, default=48, help="the first N instructions (default: 48)")
    p.add_argument("--template", default="chatml")
    p.add_argument("--batch-size", type=int, default=32, help="slots, and the size of the static batches")
    p.add_argument("--dtype", choices=list(DTYPES), help="default: as sample.py picks it")
    p.add_argument("--ways", nargs="+", default=["slots", "static", "transformers"],
                   choices=["slots", "static", "transformers"])
    p.add_argument("--vs-batch1", action="store_true", help="also count the answers that differ from batch 1")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--max-new-tokens", type=int, help="cap the answers (quick runs; default: 1024 with the prompt)")
    p.add_argument("--out", help="write the figures here as JSON")
    a = p.parse_args(argv)
    r = bench_generate(a.model, a.prompts, a.n, a.template, a.batch_size, a.dtype, a.ways, a.vs_batch1, a.compile,
                       a.max_new_tokens)
    print(json.dumps(r, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(r, indent=1) + "\n")


if __name__ == "__main__":
    main()
