"""NEFTune: noise added to the token embeddings during instruction finetuning, and nothing else.

    torchrun --standalone --nproc_per_node=2 train.py --alpha 5     # every training step draws it
    noise = neftune_noise(mask, dim=4096, alpha=5.0)      # train.py: (B, T, dim), training steps only
    embeds = neftune(model.tok_embeddings(tokens), mask, alpha=5.0)   # the same, on embeddings in hand

Jain et al. 2023, "NEFTune: Noisy Embeddings Improve Instruction Finetuning", Algorithm 1. train.py
draws the noise in one line and the model adds it to its embeddings before the first block.
"""
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


def draw(shape, kind, generator, device):
    """eps of Algorithm 1, in fp32 whatever the model's dtype (bf16 has too few bits for small noise).
    generator: None (torch's global RNG), one torch.Generator for the batch, or a list of one
    Generator per row: then row b's noise depends on its own seed only, not on which other rows
    share its batch, how many ranks there are, or where a run was resumed (train.py does this)."""
    B, T, d = shape
    if isinstance(generator, (list, tuple)):
        return torch.cat([draw((1, T, d), kind, g, device) for g in generator])
    if kind == "uniform":
        return torch.rand(shape, generator=generator, device=device) * 2 - 1  # Uniform(-1, 1)
    return torch.randn(shape, generator=generator, device=device)


@torch.no_grad()
def neftune_noise(mask, dim, alpha, kind="uniform", generator=None, segment_ids=None):
    """alpha / sqrt(L * d) * eps, eps iid Uniform(-1, 1), for embeddings of shape (B, T, dim).

    mask: (B, T) bool, True at real tokens. L is each sequence's own number of real tokens, as in
    the authors' code (`input_lengths * dims`), not the padded length T: HF Trainer and TRL scale
    every row by T, which gives the short rows of a long batch too little noise. Padding gets zero.
    Every real token is noised, the prompt's too, as in the authors' code, though only response
    tokens are in the loss.

    Sizes. With uniform eps, E[eps^2] = 1/3, so the whole sequence's noise has norm about
    sqrt(L d * alpha^2 / (L d) / 3) = alpha / sqrt(3) whatever its length, and one token's noise
    vector has norm alpha / sqrt(3 L): it shrinks like 1/sqrt(L), so a long answer's tokens each
    get little. At the paper's alpha 5, d = 4096 and L = 100, every entry lies within
    +-5 / sqrt(409600) = +-0.0078 (standard deviation 0.0045), a quarter of the 0.02 standard
    deviation of an embedding entry initialised as ours are (Transformer.__init__).
    kind="gaussian" draws eps ~ N(0, 1) at the same scale (sequence norm about alpha): the paper's
    comparison of noise kinds does not state its Gaussian scale, and keeping the formula and
    swapping only the distribution is the smallest change. The noise is a constant to autograd."""
    if not alpha >= 0:
        raise ValueError(f"NEFTune alpha must be >= 0, got {alpha}")
    if kind not in KINDS:
        raise ValueError(f"noise kind must be one of {KINDS}, got {kind!r}")
    L = noise_lengths(mask.bool(), segment_ids).clamp(min=1)
    scale = alpha / torch.sqrt(L * float(dim)) * mask  # (B, T), zero at padding
    return draw((*mask.shape, dim), kind, generator, mask.device) * scale[..., None]


def neftune(embeds, mask, alpha, kind="uniform", generator=None, segment_ids=None):
    """embeds + neftune_noise(...): Algorithm 1 on embeddings (B, T, d) in hand; mask None = all real."""
    if alpha == 0:
        return embeds
    if mask is None:
        mask = torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device)
    noise = neftune_noise(mask, embeds.shape[-1], alpha, kind, generator, segment_ids)
    return embeds + noise.to(embeds.dtype)
