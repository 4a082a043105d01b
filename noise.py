"""NEFTune in one function: noise added to the token embeddings during instruction finetuning.

    embeds = neftune(model.tok_embeddings(tokens), mask, alpha=5.0)  # training steps only

Jain et al. 2023, "NEFTune: Noisy Embeddings Improve Instruction Finetuning", Algorithm 1.
train.py calls it in one line; everything about the noise is here.
"""
import math

import torch

KINDS = ("uniform", "gaussian")


def noise_lengths(mask, segment_ids=None):
    """L of Algorithm 1 for every position: the number of real tokens in its sequence, or in its
    document when a packed row holds several (segment_ids), so packing changes nothing."""
    if segment_ids is None:
        return mask.sum(dim=1, keepdim=True).expand_as(mask)
    counts = torch.zeros(mask.shape[0], int(segment_ids.max()) + 1, device=mask.device, dtype=torch.long)
    counts.scatter_add_(1, segment_ids, mask.long())  # real tokens per (row, document)
    return counts.gather(1, segment_ids)


@torch.no_grad()
def draw_noise(shape, kind, generator, device):
    """eps of Algorithm 1, in fp32 whatever the model's dtype (bf16 has too few bits for small noise).
    generator: None (torch's global RNG), one torch.Generator for the batch, or a list of one
    Generator per row: then row b's noise depends on its own seed only, not on which other rows
    share its batch, how many ranks there are, or where a run was resumed (train.py does this)."""
    B, T, d = shape
    if isinstance(generator, (list, tuple)):
        return torch.cat([draw_noise((1, T, d), kind, g, device) for g in generator])
    if kind == "uniform":
        return torch.rand(shape, generator=generator, device=device) * 2 - 1  # Uniform(-1, 1)
    return torch.randn(shape, generator=generator, device=device)


def neftune(embeds, mask, alpha, kind="uniform", generator=None, segment_ids=None):
    """Return embeds + alpha / sqrt(L * d) * eps  (Algorithm 1), eps iid Uniform(-1, 1).

    embeds: (B, T, d) token embeddings; mask: (B, T) bool, True at real tokens (None: all real).
    L is each sequence's own number of real tokens, as in the authors' code
    (`input_lengths * dims`), not the padded length T: HF Trainer / TRL scale every row by T,
    which gives the short rows of a long batch too little noise. Padding gets exactly zero.
    With uniform eps, E||noise||_F^2 = L*d * alpha^2/(L*d) * E[eps^2] = alpha^2/3, so the noise
    has norm ~alpha/sqrt(3) whatever the sequence length. kind="gaussian" draws eps ~ N(0, 1)
    at the same scale (norm ~alpha): the paper's Table 6 does not state its Gaussian scale, and
    keeping the formula and swapping only the distribution is the smallest change.
    The noise is a constant to autograd (gradients w.r.t. embeds are unchanged).
    """
    if alpha < 0:
        raise ValueError(f"NEFTune alpha must be >= 0, got {alpha}")
    if kind not in KINDS:
        raise ValueError(f"noise kind must be one of {KINDS}, got {kind!r}")
    if alpha == 0:
        return embeds
    B, T, d = embeds.shape
    mask = torch.ones(B, T, dtype=torch.bool, device=embeds.device) if mask is None else mask.bool()
    L = noise_lengths(mask, segment_ids).clamp(min=1)
    scale = (alpha / torch.sqrt(L * float(d))) * mask  # (B, T), zero at padding
    eps = draw_noise((B, T, d), kind, generator, embeds.device)
    return embeds + (eps * scale[..., None]).to(embeds.dtype)
