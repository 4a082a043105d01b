"""The one-token decode step of sample.generate, and its compiled form (gpt-fast's recipe): the static
KV cache is written in place at columns given as a tensor, so one graph per batch shape serves every
token; on CUDA it replays as a CUDA graph. `python -m bench --only decode1` measures it against eager.

    python sample.py --ckpt out/final --prompt "What is 17 + 25?" --compile     # generate(compile=True)
"""
import time

import torch

CACHE_BUCKET = 256  # compiled decoding rounds the cache length up to this: few shapes, few compiles
TIMED_STEPS = 6  # CPU: compiled and eager steps timed in turn before one of them is kept for a shape
_compiled = {}  # device type -> torch.compile'd decode_step
_shapes = set()  # the (batch, cache length, dtype) shapes compiled since the last reset
_choice = {}  # CPU: (batch, cache length, dtype) -> the step that was faster there


def decode_step(model, tok, pos, cache_len=None):
    """generate()'s step for every new token: row b's token tok[b] goes to column pos[b] of its row of
    the cache, which is also its RoPE position (every prompt starts at column 0 of its slot); the model
    hides the columns after pos[b], so what a slot's previous answer left there is never seen. pos is
    a tensor, so that a compiled graph is not specialised to the positions. cache_len (eager only):
    attend to the first cache_len columns, the ones in use (on a CPU, attention over all of a
    1024-column cache took half of a decode step)."""
    return model(tok[:, None], cache_pos=pos[:, None], cache_len=cache_len)[:, -1]


def batch_bucket(batch_size):
    """Compiled decoding runs batches (slots) of a power of two: 1..256 rows in 9 shapes."""
    return 1 << (batch_size - 1).bit_length()


def cache_length(n, compile):
    return CACHE_BUCKET * -(-n // CACHE_BUCKET) if compile else n


def matvec(a, b, out_dtype=None):
    """aten.mm for the compiled CPU step at batch 1, as a multiply-and-sum in fp32: inductor emits one
    vectorised reduction per weight, split across the cores, where the BLAS's mat-vec may use one."""
    if a.shape[0] != 1 or out_dtype is not None:
        return NotImplemented  # batched decoding: a real matmul
    return (a.float()[:, :, None] * b.float()[None]).sum(1).to(a.dtype)


def compiled_step(device):
    """torch.compile(decode_step) for this device type. On a CPU with two of inductor's private
    hooks: batch-1 mm lowered to matvec, and attention decomposed into plain ops that inductor fuses
    (the CPU flash kernel costs more per call than one query's work against a short cache). A plain
    torch.compile of the step is barely faster than eager on a CPU; with these it is ~2.7x faster
    (docs/performance.md, decode1, gives the machine and figures). Where the BLAS's mat-vec is already
    fast they can lose, which step_function's timing catches."""
    if device.type not in _compiled:
        if device.type == "cuda":  # the step replays as a CUDA graph: one launch per token
            backend = dict(mode="reduce-overhead")
        else:
            from torch._decomp import get_decompositions
            from torch._inductor.compile_fx import compile_fx
            from torch._inductor.decomposition import select_decomp_table
            sdpa = get_decompositions([torch.ops.aten._scaled_dot_product_flash_attention_for_cpu])
            decomps = {**select_decomp_table(), **sdpa, torch.ops.aten.mm.default: matvec}

            def cpu_backend(gm, inputs):  # the compile caches key on the traced graph, not on these
                # decompositions: a plain torch.compile of the same step would be returned without them
                with torch._functorch.config.patch(enable_autograd_cache=False):
                    return compile_fx(gm, inputs, decompositions=decomps, config_patches={"fx_graph_cache": False})
            backend = dict(backend=cpu_backend)
        _compiled[device.type] = torch.compile(decode_step, fullgraph=True, dynamic=False, **backend)
    return _compiled[device.type]


def step_function(model, batch_size, cache_len, compile):
    """Set up the model's static cache for this shape (only this shape's: another one replaces it)
    and return the decode step to call: decode_step, or its compiled form. dynamo compiles a graph per
    shape and refuses (fullgraph) past recompile_limit shapes: before that, the compiled graphs are
    dropped and compiling starts afresh, so no run meets the limit however many shapes it sees."""
    model.setup_cache(batch_size, cache_len)
    if not compile:
        return decode_step
    p = model.output.weight
    shape = (batch_size, cache_len, p.dtype)
    if shape not in _shapes and len(_shapes) >= torch._dynamo.config.recompile_limit:
        torch.compiler.reset()
        _compiled.clear(), _shapes.clear(), _choice.clear()
    _shapes.add(shape)
    for layer in model.layers:  # the compiled graph (a CUDA graph on GPU) is built for these very buffers
        torch._dynamo.mark_static_address(layer.attention.cache.k)
        torch._dynamo.mark_static_address(layer.attention.cache.v)
    compiled = compiled_step(p.device)
    return compiled if p.device.type == "cuda" else Faster(compiled, shape)


class Faster:
    """The CPU's compiled step is not faster everywhere: on a Xeon whose BLAS runs the mat-vecs near
    the memory bandwidth, eager decoding was measured faster. So the first steps of each shape time
    the compiled and the eager step in turn (both give the same tokens: these are real steps, not a
    rehearsal), and the faster one serves that shape from then on."""

    def __init__(self, compiled, shape):
        self.steps, self.shape, self.times, self.warm = (compiled, decode_step), shape, ([], []), False

    def __call__(self, *args):
        if self.shape in _choice:
            return _choice[self.shape](*args)
        if not self.warm:  # the first compiled call compiles: not timed
            self.warm = True
            return self.steps[0](*args)
        which = (len(self.times[0]) + len(self.times[1])) % 2
        t0 = time.perf_counter()
        out = self.steps[which](*args)
        self.times[which].append(time.perf_counter() - t0)
        if len(self.times[1]) == TIMED_STEPS // 2:
            _choice[self.shape] = self.steps[0] if min(self.times[0]) <= min(self.times[1]) else self.steps[1]
        return out
