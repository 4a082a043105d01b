"""train.py's command line: every flag once, with its help; the recipes that give the defaults of the
flags a run does not set (paper, demo, fig4, shown by `python train.py --help`); and the checks that
every number and path meets before any work or write.
"""
import argparse
from pathlib import Path

import data
import lora
import qlora
from checks import ArgumentParser, UserError, number, writable_folder
from noise import KINDS

# The paper's recipe (Stanford Alpaca's, which NEFTune kept) when finetuning real weights; a small
# model that learns visibly in a minute or two on a CPU for the built-in demo; and fig4, the paper's
# Figure 4 on a laptop: few examples whose answers hold facts that cannot be inferred, many epochs,
# so that alpha 0 memorises and overfits (docs/fig4.md).
RECIPES = {
    "paper": dict(lr=5e-5, batch_size=128, micro_batch_size=4, epochs=3, max_len=512, eval_every=50, save_every=200),
    "demo": dict(lr=2e-3, batch_size=32, micro_batch_size=16, epochs=1, max_len=128, eval_every=25, save_every=20),
    "fig4": dict(lr=3e-3, batch_size=16, micro_batch_size=16, epochs=40, max_len=128, eval_every=28, save_every=1000,
                 dim=64, n_layers=4, n_heads=4, builtin="facts", builtin_size=340, eval_frac=0.3,
                 template="llama2-chat"),
}
# What a recipe does not set: the from-scratch model's shape, the built-in data, the held-out fraction
COMMON = dict(dim=256, n_layers=4, n_heads=4, builtin="tasks", builtin_size=4000, eval_frac=0.02)
RECIPES = {name: COMMON | r for name, r in RECIPES.items()}
SCRATCH_ONLY = ("dim", "n_layers", "n_heads")  # the from-scratch model's shape: not with --init
BUILTIN_ONLY = ("builtin", "builtin_size")  # the built-in data: not with --data
RECIPE_FLAGS = ("lr", "batch_size", "micro_batch_size", "epochs", "max_len", "eval_every", "save_every",
                "eval_frac", *SCRATCH_ONLY, *BUILTIN_ONLY, "template")


def recipes_table():
    rows = ["recipes (each flag above overrides its recipe's value; 'paper' is the default with --init,",
            "'demo' without; '-' = none):", "",
            f"  {'flag':<20}" + "".join(f"{r:>12}" for r in RECIPES)]
    for k in RECIPE_FLAGS:
        values = "".join(f"{str(r.get(k, '-')):>12}" for r in RECIPES.values())
        rows.append(f"  --{k.replace('_', '-'):<18}" + values)
    return "\n".join(rows)


def parse_args(argv=None):
    p = ArgumentParser(prog="train.py", description="Instruction finetuning with NEFTune, under torchrun or "
                       "plain python.", epilog=recipes_table(), formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--out", default="out", help="run folder: log.jsonl, ckpt/, final/, curves.png (default: out)")
    add("--alpha", type=float, nargs="+", default=[5.0], help="NEFTune alpha; 0 = no noise; several = a sweep "
        "(default: 5)")
    add("--noise", nargs="+", default=["uniform"], choices=KINDS, help="noise distribution; several = crossed with "
        "--alpha (default: uniform)")
    add("--init", help="Meta or Hugging Face folder to finetune (default: a small model from scratch)")
    add("--data", help="training file: Alpaca, ShareGPT or messages records, JSON or JSONL (default: built-in data)")
    add("--eval-data", help="held-out file for the clean eval loss (default: --eval-frac of --data)")
    add("--eval-frac", type=float, help="held-out fraction of the data when there is no --eval-data (recipe)")
    add("--format", choices=data.FORMATS, help="data format (default: told from the records' keys)")
    add("--template", choices=data.TEMPLATES, help="prompt template (recipe, else alpaca for Alpaca data, else vicuna)")
    add("--dim", type=int, help="width of the from-scratch model, without --init (recipe)")
    add("--n-layers", type=int, help="blocks of the from-scratch model (recipe)")
    add("--n-heads", type=int, help="attention heads of the from-scratch model (recipe)")
    add("--builtin", choices=("tasks", "facts"), help="built-in data without --data: checkable tasks or fig4's "
        "facts (recipe)")
    add("--builtin-size", type=int, help="records of built-in data (recipe)")
    add("--recipe", choices=tuple(RECIPES), help="default settings, below (default: paper with --init, else demo)")
    add("--pack", action="store_true", help="pack several examples per row (attention and noise stay per document)")
    add("--max-len", type=int, help="tokens per example; longer ones are cut (recipe)")
    add("--epochs", type=int, help="passes over the training data (recipe)")
    add("--max-steps", type=int, help="stop after N optimizer steps instead (default: the epochs' steps)")
    add("--batch-size", type=int, help="global batch, examples per optimizer step over all ranks (recipe)")
    add("--micro-batch-size", type=int, help="examples per forward pass on one rank (recipe)")
    add("--lr", type=float, help="peak learning rate of AdamW (recipe)")
    add("--warmup", type=float, default=0.03, help="warmup fraction of the steps, then cosine to 0 (default: 0.03)")
    add("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default: 0, as the paper)")
    add("--clip", type=float, default=1.0, help="gradient-norm clipping (default: 1.0)")
    add("--grad-sync", choices=("every", "last"), default="every", help="reduce-scatter the gradients after every "
        "micro-batch (default: holds 1/world of them) or only after the last (fewer collectives, whole grads held)")
    add("--seed", type=int, default=1337, help="model init, data order, noise, LoRA: the same seed, the same run")
    add("--log-every", type=int, default=1, help="steps between lines of OUT/log.jsonl (default: 1)")
    add("--eval-every", type=int, help="steps between clean (noise-off) train and held-out losses (recipe)")
    add("--eval-examples", type=int, default=256, help="examples in each fixed clean-loss subset (default: 256)")
    add("--save-every", type=int, help="steps between resumable checkpoints (recipe)")
    add("--keep", type=int, default=2, help="resumable checkpoints kept (default: 2)")
    add("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    add("--device", choices=("cpu", "cuda"), help="default: cuda:LOCAL_RANK where CUDA exists, else cpu")
    add("--dtype", choices=("bf16", "fp32"), help="bf16: FSDP mixed precision on GPU, autocast on CPU (default: bf16 "
        "on GPU; on a CPU bf16 only where a quick matmul timing finds it faster; a resume keeps its checkpoint's)")
    add("--export-dtype", choices=("bf16", "fp32"), default="bf16", help="dtype of OUT/final (default: bf16, as Meta)")
    add("--export-hf", action="store_true", help="also write OUT/final_hf, a Hugging Face folder (safetensors)")
    add("--compile", action="store_true", help="torch.compile each transformer block")
    add("--act-ckpt", action="store_true", help="recompute each block's activations in backward (less memory)")
    add("--lora-rank", type=int, default=0, help="LoRA rank R: train adapters on a frozen base; 0 = full finetuning")
    add("--lora-alpha", type=float, default=16.0, help="LoRA alpha: the adapters' scale is alpha/R (default: 16)")
    add("--lora-dropout", type=float, default=0.05, help="dropout on the adapters' input (default: 0.05)")
    add("--lora-targets", nargs="+", default=list(lora.TARGETS), help="linears of each block to adapt (default: all 7)")
    add("--quantize", choices=("nf4",), help="QLoRA: hold the frozen base's linear weights in 4-bit NF4 (torchao), "
        "with --lora-rank and --init; bf16 compute")
    add("--check", action="store_true", help="check the flags, files and --init folder, then exit: a cheap run with "
        "plain python before a long torchrun launch")
    args = p.parse_args(argv)
    args.recipe = args.recipe or ("paper" if args.init else "demo")
    for k, v in RECIPES[args.recipe].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    check_args(args)
    return args


def check_args(args):
    """Every number and path, before any work or write: a mistake costs one line, not a run."""
    for a in args.alpha:
        number("--alpha", a, lo=0)
    number("--lr", args.lr, lo=0, hi=1e30)  # AdamW's step lr / (1 - beta1) must fit in fp32 (3.4e38)
    number("--weight-decay", args.weight_decay, lo=0)
    number("--clip", args.clip, above=0)
    number("--warmup", args.warmup, lo=0, hi=1)
    if not args.eval_data:
        number("--eval-frac", args.eval_frac, above=0, below=1)
    for k in ("max_len", "epochs", "batch_size", "micro_batch_size", "eval_every", "save_every", "max_steps",
              "log_every", "eval_examples", "keep", *(() if args.init else SCRATCH_ONLY)):
        if k != "max_steps" or args.max_steps is not None:
            number("--" + k.replace("_", "-"), getattr(args, k), lo=1)
    number("--seed", args.seed, lo=0, below=2**32)
    if not args.data:
        number("--builtin-size", args.builtin_size, lo=2)  # at least one training and one held-out record
    if args.micro_batch_size > args.batch_size:
        raise UserError(f"--micro-batch-size {args.micro_batch_size} is larger than --batch-size {args.batch_size}")
    if not args.init and (args.dim % args.n_heads or args.dim // args.n_heads % 2):
        raise UserError(f"--dim {args.dim} must be --n-heads {args.n_heads} x an even head size (RoPE rotates pairs)")
    if args.init and not Path(args.init).is_dir():
        raise UserError(f"{args.init}: --init folder not found")
    for flag, path in (("--data", args.data), ("--eval-data", args.eval_data)):
        if path and not Path(path).is_file():
            raise UserError(f"{path}: {flag} file not found")
    writable_folder("--out", args.out)
    number("--lora-rank", args.lora_rank, lo=0)  # 0 = full finetuning
    number("--lora-alpha", args.lora_alpha, above=0)
    number("--lora-dropout", args.lora_dropout, lo=0, below=1)
    if args.quantize:
        check_quantize(args)
    if lora.check_targets(args.lora_targets):
        unknown = " ".join(lora.check_targets(args.lora_targets))
        raise UserError(f"--lora-targets: unknown {unknown} (known: {' '.join(lora.TARGETS)})")


def check_quantize(args):
    """--quantize nf4: the combinations that cannot work, refused before any work."""
    if not args.lora_rank:
        raise UserError("--quantize nf4 needs --lora-rank R: a 4-bit base is frozen, only LoRA adapters train on it")
    if not args.init:
        raise UserError("--quantize nf4 needs --init: it quantizes a pretrained base (a model from scratch "
                        "would train nothing but adapters on random weights)")
    if args.dtype == "fp32":
        raise UserError("--quantize nf4 computes in bf16 (torchao dequantizes NF4 to bf16); drop --dtype fp32")
    if args.compile:  # torch.compile of blocks holding torchao's NF4 tensor subclass has not been tried here
        raise UserError("--compile with --quantize nf4 is not supported: drop one of them")
    qlora.torchao_nf4()  # torchao itself: imported only here, with --quantize
