"""The compiled one-token decode step behind `sample.generate(..., compile=True)` and `sample.py --compile`
(gpt-fast's recipe): a static KV cache written in place, one graph per batch shape, replayed for every
token; on CUDA under mode "reduce-overhead" as a CUDA graph. bench.py's decode1 part measures it.
"""
import weakref

import torch

# Compiled decoding (gpt-fast's recipe): the one-token step is compiled once per batch shape and then
# replayed; on CUDA under mode "reduce-overhead" it replays as a CUDA graph, so a step costs one launch.
CACHE_BUCKET = 256  # compiled decoding rounds the cache length up to this: few shapes, few compiles
_compiled_steps = {}  # torch.compile'd decode_step per device type
_static_caches = weakref.WeakKeyDictionary()  # model -> {(batch, length, dtype, device): [KVCache per layer]}


def decode_step(model, tok, t, pad, mask):
    """generate()'s one-token step with the same shapes at every t, so that one compiled graph serves
    them all: the cache slot t is a 0-d tensor (a Python int would be baked into the graph), the new
    K/V are written in place at t, and the keys are the whole static cache, slots after t masked.
    tok (B,), pad (B,) left-padding per row, mask (B, cache length): True at real tokens."""
    key_mask = mask & (torch.arange(mask.shape[1], device=mask.device) <= t)
    return model(tok[:, None], cache_pos=t.view(1), mask=key_mask, positions=(t - pad)[:, None])[:, -1]


def matvec(a, b, out_dtype=None):
    """aten.mm for the compiled CPU step at batch 1, as a multiply-and-sum in fp32. MKL runs a batch-1
    mat-vec on one core at well under the memory bandwidth (bench.py decode1 profiles it); written
    this way, inductor emits one vectorised reduction per weight, split across the cores."""
    if a.shape[0] != 1 or out_dtype is not None:
        return NotImplemented  # batched decoding: a real matmul
    return (a.float()[:, :, None] * b.float()[None]).sum(1).to(a.dtype)


def compiled_step(device):
    if device.type not in _compiled_steps:
        if device.type == "cuda":  # the step replays as a CUDA graph: one launch per token
            backend = dict(mode="reduce-overhead")
        else:
            from torch._decomp import get_decompositions
            from torch._inductor.compile_fx import compile_fx
            from torch._inductor.decomposition import select_decomp_table
            # and attention as plain ops, which inductor fuses: the CPU flash kernel costs more per
            # call than the work of one query against a short cache (bench.py decode1 --profile)
            sdpa = get_decompositions([torch.ops.aten._scaled_dot_product_flash_attention_for_cpu])
            decomps = {**select_decomp_table(), **sdpa, torch.ops.aten.mm.default: matvec}

            def cpu_backend(gm, inputs):  # the compile caches key on the traced graph, not on these
                # decompositions: a plain torch.compile of the same step would be returned without them
                with torch._functorch.config.patch(enable_autograd_cache=False):
                    return compile_fx(gm, inputs, decompositions=decomps, config_patches={"fx_graph_cache": False})
            backend = dict(backend=cpu_backend)
        _compiled_steps[device.type] = torch.compile(decode_step, fullgraph=True, dynamic=False, **backend)
    return _compiled_steps[device.type]


def attach_static_cache(model, batch_size, max_len):
    """Caches for the compiled step live as long as the model, one set per shape, and are marked as
    static addresses: the compiled graph (a CUDA graph on GPU) is built for these very buffers and
    reused by every later call of that shape instead of being recompiled or re-recorded."""
    p = model.output.weight
    caches = _static_caches.setdefault(model, {})
    key = (batch_size, max_len, p.dtype, p.device)
    if key not in caches:
        model.setup_cache(batch_size, max_len)
        caches[key] = [layer.attention.cache for layer in model.layers]
        for c in caches[key]:
            torch._dynamo.mark_static_address(c.k)
            torch._dynamo.mark_static_address(c.v)
    for layer, c in zip(model.layers, caches[key]):
        c.k.zero_()  # stale slots are masked anyway; zeros keep them finite
        c.v.zero_()
        layer.attention.cache = c
