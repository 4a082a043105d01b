"""Speed and memory against the machine's own limits, measured in the same run: the command line over
every part (training.py, decode.py and memory.py beside this file hold them), run from the repo root:

    python -m bench                  # everything (~12 min on 2 CPU cores); --only PART ... picks (--help lists them)
    python -m bench --only train --compile --dtypes fp32 bf16
    python -m bench --only train --preset tinyllama --seq-len 2048 --batch-size 4 --dtypes bf16 --compile  # GPU: MFU
    python -m bench --only decode1 --preset llama2-7b --decode1-dtypes bf16 --new-tokens 128  # GPU: 7B decode
"""
import argparse
import json
from pathlib import Path

import torch

from bench import generate, judge, memory, qlora
from bench.decode import DTYPES, bench_decode, bench_decode1
from bench.training import bench_lora, bench_noise, bench_train
from model import ModelArgs

TRAIN_CFG = dict(dim=512, n_layers=8, n_heads=8, vocab_size=32000, multiple_of=256)  # ~51M parameters, 32K vocab
DECODE_CFG = dict(dim=768, n_layers=12, n_heads=12, vocab_size=32000, multiple_of=256)  # ~134M parameters


# Real shapes for the GPU runs: TinyLlama-1.1B (training MFU at seq 2048) and LLaMA-2-7B (batch-1 decode)
PRESETS = {"tinyllama": dict(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, vocab_size=32000, multiple_of=256),
           "llama2-7b": dict(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, multiple_of=256)}


def size_cfg(cfg, a, preset=True):
    cfg = PRESETS[a.preset] if a.preset and preset else cfg
    return {**cfg, **{k: v for k, v in (("dim", a.dim), ("n_layers", a.n_layers), ("n_heads", a.n_heads),
                                        ("vocab_size", a.vocab)) if v}}


PARTS = {
    "train": lambda a, d: bench_train(size_cfg(TRAIN_CFG, a), a.dtypes, [False, True] if a.compile else [False], d,
                                      a.seq_len, a.batch_size, a.min_time, a.peak_n),
    "noise": lambda a, d: bench_noise(size_cfg(TRAIN_CFG, a), d, a.seq_len, a.batch_size, a.noise_rounds),
    "decode": lambda a, d: bench_decode(size_cfg(DECODE_CFG, a), d, a.decode_dtype, a.new_tokens,
                                        a.prompt_len, a.decode_batches, a.nocache_tokens, a.copy_mb),
    "load": lambda a, d: memory.bench_load(a.load_dir, ModelArgs(**size_cfg(memory.LOAD_CFG, a, preset=False))),
    "loss": lambda a, d: memory.bench_loss(size_cfg(memory.LOSS_CFG, a, preset=False), a.loss_batch_size, a.seq_len),
    "lora": lambda a, d: bench_lora(size_cfg(TRAIN_CFG, a), d, a.seq_len, a.batch_size, a.noise_rounds, a.lora_rank),
    "lora_memory": lambda a, d: memory.lora_memory(size_cfg(memory.LLAMA2_7B, a, preset=False), a.lora_rank,
                                                   a.lora_micro_batch, a.lora_seq_len),
    "init_memory": lambda a, d: memory.init_memory(size_cfg(memory.INIT_CFG, a, preset=False)),
    "grad_sync": lambda a, d: memory.grad_sync(size_cfg(memory.GRAD_SYNC_CFG, a, preset=False)),
    "qlora_memory": lambda a, d: qlora.qlora_memory(size_cfg(memory.INIT_CFG, a, preset=False)),
    "qlora_speed": lambda a, d: qlora.qlora_speed(size_cfg(TRAIN_CFG, a), a.seq_len, a.batch_size, a.noise_rounds,
                                                  a.lora_rank),
    "nf4_error": lambda a, d: qlora.nf4_error(a.nf4_folder) if a.nf4_folder else {"skipped": "no --nf4-folder"},
    "slots": lambda a, d: generate.bench_slots(size_cfg(DECODE_CFG, a), d, a.decode_dtype, a.slots_prompts,
                                               a.slots_batch, a.new_tokens, a.compile),
    "judge": lambda a, d: judge.bench_judge(judge.SMOLLM2_SHAPE | {"n_layers": a.judge_layers}, d, a.judge_prompts,
                                            dtype=a.judge_dtype),
    "decode1": lambda a, d: bench_decode1(size_cfg(DECODE_CFG, a), d, a.decode1_dtypes, a.new_tokens,
                                          a.prompt_len, a.decode1_rounds, a.copy_mb, a.profile),
}


def machine(device):
    if device.type == "cuda":
        return {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown") if Path("/proc/cpuinfo").exists() else "unknown"
    capability = torch.backends.cpu.get_cpu_capability()
    return {"device": f"CPU {cpu}, {torch.get_num_threads()} threads, capability {capability}",
            "torch": torch.__version__}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench", description="Benchmarks of the NEFTune reference code.")
    p.add_argument("--only", nargs="+", choices=list(PARTS), default=list(PARTS), help="parts to run (default: all)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["fp32", "bf16"],
                   help="training dtypes (bf16 = autocast)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd blocks")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--min-time", type=float, default=10.0, help="seconds of timed training steps per variant")
    p.add_argument("--noise-rounds", type=int, default=6,
                   help="alternating steps timed: alpha 0 / 5 (noise), full / LoRA (lora)")
    p.add_argument("--preset", choices=list(PRESETS),
                   help="model shape of the train, noise, decode and decode1 parts (--dim etc. still override)")
    p.add_argument("--dim", type=int, help="override the model width (tiny runs: tests)")
    p.add_argument("--n-layers", type=int)
    p.add_argument("--n-heads", type=int)
    p.add_argument("--vocab", type=int)
    p.add_argument("--decode-dtype", choices=list(DTYPES), default="bf16" if torch.cuda.is_available() else "fp32")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--decode-batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--decode1-dtypes", nargs="+", choices=list(DTYPES), default=["fp32", "bf16"],
                   help="weight dtypes of the batch-1 eager-vs-compiled decode part")
    p.add_argument("--decode1-rounds", type=int, default=5, help="alternating rounds of the decode1 part (best of)")
    p.add_argument("--profile", action="store_true",
                   help="decode1: print a torch.profiler table of eager and compiled decoding")
    p.add_argument("--nocache-tokens", type=int, default=256, help="tokens of the no-cache reference loop")
    p.add_argument("--peak-n", type=int, default=4096, help="largest square size for the matmul peak")
    p.add_argument("--copy-mb", type=int, default=1024, help="size of the bandwidth-measuring copy")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--load-dir", default="/tmp/neftune_bench_ckpt",
                   help="cache folder for the generated checkpoint of the load bench (reused if present)")
    p.add_argument("--lora-rank", type=int, default=16, help="LoRA rank of the lora and lora_memory parts")
    p.add_argument("--lora-micro-batch", type=int, default=4, help="lora_memory: micro-batch (LLaMA-2-7B by default)")
    p.add_argument("--lora-seq-len", type=int, default=512, help="lora_memory: sequence length")
    p.add_argument("--slots-prompts", type=int, default=64, help="slots: prompts of uneven budgets up to --new-tokens")
    p.add_argument("--slots-batch", type=int, default=16, help="slots: the number of slots = the static batch size")
    p.add_argument("--nf4-folder", help="nf4_error: an HF folder whose linear weights are quantized (e.g. SmolLM2)")
    p.add_argument("--judge-prompts", type=int, default=48, help="judge: prompts judged (200-800 tokens each)")
    p.add_argument("--judge-layers", type=int, default=4, help="judge: layers of the SmolLM2-135M-shaped judge")
    p.add_argument("--judge-dtype", choices=list(DTYPES), default="fp32", help="judge: weight dtype")
    p.add_argument("--out", default="bench.json", help="results, merged into the file's existing parts")
    p.add_argument("--loss-batch-size", type=int, default=4, help="micro-batch of the loss-memory bench (x --seq-len)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    results = {"machine": machine(device)}
    for name in a.only:
        results[name] = PARTS[name](a, device)
        print(f"== {name}")
        for k, v in results[name].items():
            print(f"  {k:<36} {v}")
    out = Path(a.out)
    old = json.loads(out.read_text()) if out.is_file() else {}
    out.write_text(json.dumps({**old, **results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
