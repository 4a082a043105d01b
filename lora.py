"""LoRA (Hu et al. 2021, arXiv 2106.09685): finetune a frozen model through low-rank side paths,
h = W x + (alpha / r) B A x, with A random and B zero so that step 0 is exactly the base model.

    torchrun --standalone --nproc_per_node=1 train.py --init llama-2-7b --data alpaca.json --lora-rank 16
    lora.add_lora(model, rank=16, alpha=16, dropout=0.05)          # what --lora-rank does
    plain = lora.merge_state_dict(model.state_dict(), 16 / 16)     # the export's merge: W + (alpha/r) B A

Base weights keep their Meta key names (layers.0.attention.wq.weight) and the adapters sit beside
them (layers.0.attention.wq.lora_a, .lora_b), so a Meta checkpoint still loads into the base.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from checks import atomic

TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")  # every linear of a block; QLoRA found all were needed
ADAPTER_KEYS = ("lora_a", "lora_b")
NF4_PARTS = 4  # an NF4 base weight of NF4_SPLIT values or more is multiplied this many row blocks at a time
NF4_SPLIT = 1 << 21  # (base_linear): int64 codes of 16 MB and more


def is_nf4(t):
    return hasattr(t, "quantized_data")  # torchao's NF4Tensor (QLoRA, qlora.py), without importing torchao


def base_linear(x, weight):
    """x W^T through the frozen base weight. An NF4 weight (QLoRA) goes a quarter of its rows at a time:
    torchao dequantizes the weight it multiplies whole, through int64 codes (8 bytes an element: 23 MB
    for a 1024 x 2816 w1, more than its bf16 form and NF4 codes together), in the forward and again in
    the backward, the largest temporary of a QLoRA worker. NF4Tensor's own split cuts along rows at
    whole blocks without copying (as FSDP2 shards it), so each part holds a quarter of that. Smaller
    weights go whole: their temporary is small, and four calls instead of one made a QLoRA step of a
    dim-512 model 15% slower on a CPU."""
    if not is_nf4(weight) or weight.numel() < NF4_SPLIT:
        return F.linear(x, weight)
    parts = math.gcd(NF4_PARTS, weight.shape[0], weight.quantization_factor.numel())  # whole scaler blocks
    return torch.cat([F.linear(x, w) for w in weight.split(weight.shape[0] // parts)], dim=-1)


class LoRALinear(nn.Module):
    """A frozen nn.Linear (no bias, as in LLaMA) plus the side path x -> dropout -> A -> B -> scale,
    as torchtune's LoRALinear: the d_out x d_in delta B A is never formed while training."""

    def __init__(self, base: nn.Linear, rank, alpha, dropout):
        super().__init__()
        self.weight = base.weight  # same Parameter, same key name
        self.weight.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()  # Identity: no copy of x kept
        # adapters in fp32 whatever the base's dtype: they are the trained (master) weights
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))

    def forward(self, x):
        # .to: fp32 adapters on a bf16 base outside autocast/FSDP (e.g. load_adapters, then eval)
        side = F.linear(F.linear(self.dropout(x), self.lora_a.to(x.dtype)), self.lora_b.to(x.dtype))
        return base_linear(x, self.weight) + self.scale * side

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, rank={self.lora_a.shape[0]}, scale={self.scale:g}"


def check_targets(targets):
    """Unknown target names, as a list (empty when all are known)."""
    return [t for t in targets if t not in TARGETS]


def add_lora(model, rank, alpha, dropout=0.0, targets=TARGETS, seed=0):
    """Freeze every parameter of model and wrap the targeted linears of each block in LoRALinear,
    in place, with the adapters of initial_adapters(model, seed). A model on the meta device (a
    sharded run fills its shards later) gets them uninitialised. Returns the model."""
    if check_targets(targets):
        raise ValueError(f"unknown LoRA targets {check_targets(targets)}; known: {' '.join(TARGETS)}")
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in model.layers:
        for parent in (layer.attention, layer.feed_forward):
            for name in TARGETS:
                if name in targets and isinstance(getattr(parent, name, None), nn.Linear):
                    setattr(parent, name, LoRALinear(getattr(parent, name), rank, alpha, dropout))
    if next(model.parameters()).device.type != "meta":
        with torch.no_grad():
            for k, v in initial_adapters(model, seed).items():
                model.get_parameter(k).copy_(v)
    return model


def initial_adapters(model, seed):
    """{key: tensor} of every adapter at step 0, on the CPU: microsoft/LoRA's init, A as nn.Linear's
    default (Kaiming-uniform, a=sqrt(5)) and B = 0. A is drawn from one generator seeded by `seed`,
    in module order, so every rank of a run, and every world size, builds the same adapters."""
    gen, out = torch.Generator().manual_seed(seed), {}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            out[f"{name}.lora_a"] = nn.init.kaiming_uniform_(torch.empty(m.lora_a.shape), a=math.sqrt(5), generator=gen)
            out[f"{name}.lora_b"] = torch.zeros(m.lora_b.shape)
    return out


def is_adapter(key):
    return key.rsplit(".", 1)[-1] in ADAPTER_KEYS


def lora_state_dict(state):
    """The adapters alone, from a model's (full) state dict: a few MB where the model has GBs."""
    return {k: v for k, v in state.items() if is_adapter(k)}


@torch.no_grad()
def merge_state_dict(state, scale, dtype=torch.float32):
    """A plain model's state dict in Meta's key names: each adapted W becomes W + scale * B A, summed
    in fp32 and then cast to dtype (once: a bf16 base is not rounded twice); the adapter keys are
    dropped and every other tensor is passed through unchanged."""
    merged = {k: v for k, v in state.items() if not is_adapter(k)}
    for k in state:
        if k.endswith(".lora_a"):
            stem = k[: -len(".lora_a")]
            a, b = state[k].float(), state[stem + ".lora_b"].float()
            merged[stem + ".weight"] = (state[stem + ".weight"].float() + scale * (b @ a)).to(dtype)
    return merged


def save_adapters(path, state, rank, alpha, dropout, targets, quantize=None):
    """The adapters and what re-applies them (load_adapters), loadable with weights_only=True,
    written under a temporary name and renamed: a crash never leaves half a file. quantize: "nf4"
    when they were trained on QLoRA's NF4 base, recorded since they fit that base best."""
    with atomic(path) as tmp:
        torch.save({"rank": rank, "alpha": alpha, "dropout": dropout, "targets": list(targets),
                    **({"quantize": quantize} if quantize else {}),
                    "adapters": {k: v.detach().cpu().contiguous() for k, v in lora_state_dict(state).items()}}, tmp)


def load_adapters(model, path):
    """Re-apply a save_adapters file to a base model (e.g. load_meta of the --init folder), in place."""
    d = torch.load(path, map_location="cpu", weights_only=True)
    add_lora(model, d["rank"], d["alpha"], d["dropout"], d["targets"])
    dev = next(model.parameters()).device
    result = model.load_state_dict({k: v.to(dev) for k, v in d["adapters"].items()}, strict=False)
    missing = [k for k in result.missing_keys if is_adapter(k)]
    if missing or result.unexpected_keys:
        raise ValueError(f"{path}: adapters do not fit this model "
                         f"(missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})")
    return model
