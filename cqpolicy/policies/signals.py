"""Signal math shared by the dynamic policies (and by tracing): attention entropy and relative L1 change.

All functions run without gradients and return float32 results whatever the input dtype, so a policy's
decision does not depend on the model running in half precision.
"""
from __future__ import annotations

import math

import torch

# Largest attention-score block materialised at once (elements): 2**22 float32 values = 16 MiB.
# For DiT-XL (256 tokens) that is 64 (batch x head) pairs per chunk; the tiny test models fit in one.
DEFAULT_SCORE_BUDGET = 2 ** 22


def max_entropy(num_keys: int) -> float:
    """The largest possible row entropy of a softmax over ``num_keys`` keys: ``log(num_keys)`` nats."""
    if num_keys < 1:
        raise ValueError(f"num_keys must be at least 1, got {num_keys}")
    return math.log(num_keys)


@torch.no_grad()
def attention_entropy(q: torch.Tensor, k: torch.Tensor, scale: float | None = None,
                      score_budget: int = DEFAULT_SCORE_BUDGET) -> torch.Tensor:
    """Mean row entropy (nats) of ``softmax(q k^T * scale)`` per (batch, head): ``[B, H]``.

    ``q`` is ``[B, H, N, D]``, ``k`` is ``[B, H, M, D]``; ``scale`` defaults to ``1 / sqrt(D)`` (what
    ``scaled_dot_product_attention`` uses). Entropy of row ``i`` is ``-sum_j p_ij log p_ij``; the result
    averages it over the ``N`` query rows. Uniform attention gives ``log M``, one-hot attention 0.

    The ``[N, M]`` score matrices are built for a chunk of (batch, head) pairs at a time, at most
    ``score_budget`` elements (and at least one pair), so memory stays bounded for long sequences.
    """
    if q.ndim != 4 or k.ndim != 4 or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"attention_entropy needs q [B, H, N, D] and k [B, H, M, D], got {tuple(q.shape)} "
                         f"and {tuple(k.shape)}")
    b, h, n, d = q.shape
    m = k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    qf = q.reshape(b * h, n, d)
    kf = k.reshape(b * h, m, d)
    per_chunk = max(1, score_budget // max(1, n * m))
    out = torch.empty(b * h, dtype=torch.float32, device=q.device)
    for start in range(0, b * h, per_chunk):
        end = min(start + per_chunk, b * h)
        scores = torch.bmm(qf[start:end].float(), kf[start:end].float().transpose(1, 2)) * scale
        # H = -sum p log p = logsumexp(s) - sum p s: finite even where p underflows to 0 (no 0 * -inf)
        lse = torch.logsumexp(scores, dim=-1, keepdim=True)
        entropy = lse.squeeze(-1) - ((scores - lse).exp_() * scores).sum(-1)
        out[start:end] = entropy.mean(-1)
    return out.reshape(b, h)


@torch.no_grad()
def self_attention_qk(attn: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head queries and keys ``[B, H, N, D]`` that a diffusers ``Attention`` forms from its input ``x``.

    Mirrors ``AttnProcessor2_0`` for self-attention: optional ``group_norm``, ``to_q`` / ``to_k``, split into
    ``attn.heads`` heads, optional ``norm_q`` / ``norm_k``. ``x`` is ``[B, N, C]`` (or ``[B, C, H, W]``).
    ``spatial_norm`` (VAE attention, needs ``temb``) is not applied: DiT attention has none.
    """
    if x.ndim == 4:
        x = x.flatten(2).transpose(1, 2)
    if getattr(attn, "group_norm", None) is not None:
        x = attn.group_norm(x.transpose(1, 2)).transpose(1, 2)
    q = attn.to_q(x)
    k = attn.to_k(x)
    b, heads = x.shape[0], attn.heads
    q = q.view(b, -1, heads, q.shape[-1] // heads).transpose(1, 2)
    k = k.view(b, -1, heads, k.shape[-1] // heads).transpose(1, 2)
    if getattr(attn, "norm_q", None) is not None:
        q = attn.norm_q(q)
    if getattr(attn, "norm_k", None) is not None:
        k = attn.norm_k(k)
    return q, k


@torch.no_grad()
def self_attention_entropy(attn: torch.nn.Module, x: torch.Tensor, normalized: bool = True,
                           score_budget: int = DEFAULT_SCORE_BUDGET, max_queries: int | None = None) -> torch.Tensor:
    """Per-row attention entropy ``[B]`` of ``attn`` on input ``x``: mean over heads and query rows.

    With ``normalized`` the entropy is divided by its maximum ``log(N)``, so it lies in ``[0, 1]`` whatever
    the sequence length (a single token has entropy 0, reported as 0). Costs the ``to_q``/``to_k``
    projections plus ``q k^T``: about ``2 N C^2 + N^2 C`` MACs per row. With ``max_queries`` and longer
    sequences, the mean runs over that many evenly spaced query rows (each row's entropy stays exact: all
    keys are used), which cuts the ``N^2`` part on big models.
    """
    q, k = self_attention_qk(attn, x)
    if max_queries is not None and q.shape[2] > max_queries:
        q = q[:, :, torch.linspace(0, q.shape[2] - 1, max_queries, device=q.device).round().long()]
    entropy = attention_entropy(q, k, score_budget=score_budget).mean(dim=1)
    if normalized:
        top = max_entropy(k.shape[2])
        entropy = entropy / top if top > 0 else torch.zeros_like(entropy)
    return entropy


@torch.no_grad()
def relative_l1(current: torch.Tensor, reference: torch.Tensor, dim=None, eps: float = 1e-12) -> torch.Tensor:
    """``mean|current - reference| / mean|reference|`` in float32 (TeaCache's change indicator).

    ``dim=None`` reduces over every element (a 0-d tensor); otherwise over ``dim`` (e.g.
    ``dim=tuple(range(1, x.ndim))`` gives one value per batch row). ``eps`` keeps a zero reference finite.
    """
    if current.shape != reference.shape:
        raise ValueError(f"relative_l1 needs equal shapes, got {tuple(current.shape)} and {tuple(reference.shape)}")
    cur, ref = current.float(), reference.float()
    if dim is None:
        return (cur - ref).abs().mean() / ref.abs().mean().clamp_min(eps)
    return (cur - ref).abs().mean(dim=dim) / ref.abs().mean(dim=dim).clamp_min(eps)
