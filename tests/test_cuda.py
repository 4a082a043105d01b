"""On a CUDA machine (skipped elsewhere): bf16 compiled generation, training in bf16 over NCCL with the
CUDA RNG in its checkpoints, and the device checks of train.py."""
import json

import pytest
import torch
from conftest import PROMPTS, tiny_model, train_run
from torch._dynamo.utils import counters

from sample import generate

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def graphs():
    return counters["stats"]["unique_graphs"]


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_compiled_generation(dtype):
    model = tiny_model().to("cuda", dtype)
    before = graphs()
    got = generate(model, PROMPTS, 8, repetition_penalty=1.2, compile=True)  # mode "reduce-overhead": a CUDA graph
    again = generate(model, PROMPTS, 8, repetition_penalty=1.2, compile=True)  # replays the same graph
    ref = generate(model, PROMPTS, 8, repetition_penalty=1.2)
    assert graphs() - before == 1 and got == again
    if dtype == torch.float32:
        assert got == ref
    else:  # eager rounds each bf16 op, the compiled step fuses them: the first (prefilled) token always agrees
        assert [g[0] for g in got] == [r[0] for r in ref]
        assert all(len(g) == 8 and 0 <= min(g) and max(g) < 97 for g in got)


@cuda
def test_cuda_train_bf16_nccl_resume(tmp_path):
    common = ["--out", str(tmp_path / "run"), "--max-steps", "4", "--save-every", "2", "--seed", "3"]
    losses = lambda: [json.loads(line)["loss"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    r = train_run(common)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.splitlines()[0].startswith("dtype: bf16 (CUDA default")
    assert "bfloat16 on cuda" in r.stdout and "world 1" in r.stdout  # NCCL process group of one
    rng = torch.load(tmp_path / "run" / "ckpt" / "step_0000002" / "rng_0.pt", weights_only=True)
    assert rng["cuda"] is not None and rng["cuda"].dtype == torch.uint8  # the CUDA RNG state is saved
    full = losses()
    r = train_run([*common, "--resume"])  # the newest checkpoint is step 2: steps 3 and 4 again
    assert r.returncode == 0, r.stderr[-2000:]
    assert "kept from the checkpoint" in r.stdout.splitlines()[0] and "at step 2" in r.stdout
    again = losses()
    assert len(full) == len(again) == 4 and again[:2] == full[:2]
    # bf16 on CUDA: atomics in attention's backward may reorder sums, so close rather than bit-equal
    assert max(abs(x - y) for x, y in zip(full, again)) < 1e-2 * max(full), (full, again)
    assert (tmp_path / "run" / "final" / "consolidated.00.pth").is_file()
