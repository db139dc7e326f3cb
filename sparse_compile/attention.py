"""Multi-head attention spelled out in plain ops, with the projections as callables: the one copy.

``nn.MultiheadAttention`` (``F.multi_head_attention_forward``) and the fused inference op of
``nn.TransformerEncoderLayer`` multiply by their packed ``in_proj`` weight themselves, so a linear
that should run differently (through the masked op, with Bi-Mask's backward mask, or as an
``mm`` the sparse pass can find) needs the attention's own steps around it. Three places do:

- the masked-linear pass (``passes/masked_linear.py``): self-attention whose projections run the
  masked op under compiled training;
- Bi-Mask on ``in_proj_weight`` (``training/nm_mask.py``): every projection with its backward mask;
- the decomposition of the fused encoder layer (``passes/fused_transformer.py``): plain linears.

They all call :func:`multi_head_attention`, which computes what ``F.multi_head_attention_forward``
computes (torch 2.11) for packed q/k/v projections without ``bias_k``/``bias_v``/``add_zero_attn``:
the projections, heads ``[N, H, len, E/H]``, attention (``scaled_dot_product_attention``, or the
explicit softmax when the weights are asked for), heads merged, the output projection.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["additive_mask", "multi_head_attention"]

#: ``project(x [N, len, E], rows)`` -> ``x @ W_in[rows]^T + b_in[rows]``, rows a slice of the packed
#: ``[3E, E]`` in_proj (``0:E`` q, ``E:2E`` k, ``2E:3E`` v, or several of them at once).
InProjection = Callable[[Tensor, slice], Tensor]


def additive_mask(mask: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """Bool masks (True = may not attend) -> 0/-inf; float masks are added as they are."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    return mask.to(dtype)


def multi_head_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    num_heads: int,
    in_projection: InProjection,
    out_projection: Callable[[Tensor], Tensor],
    *,
    batch_first: bool,
    attn_mask: Optional[Tensor] = None,
    key_padding_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    need_weights: bool = False,
    average_attn_weights: bool = True,
) -> tuple[Tensor, Optional[Tensor]]:
    """``nn.MultiheadAttention``'s forward with its projections replaced: ``(output, weights)``.

    ``query``/``key``/``value``: ``[L, N, E]`` (``[N, L, E]`` with ``batch_first``) or unbatched
    ``[L, E]``. Which inputs are the same tensor decides which projections are shared, as in torch:
    self-attention projects once over all three row blocks. ``out_projection`` maps ``[N, L, E]``
    to ``[N, L, E]``. ``weights`` is ``None`` unless ``need_weights`` (then averaged over heads
    unless ``average_attn_weights=False``). ``dropout_p`` is applied to the attention weights.
    """
    batched = query.dim() == 3
    self_attention = query is key and key is value
    kv_shared = key is value
    # Work batch-first: [N, len, E].
    if not batched:
        query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    elif not batch_first:
        query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
    n, tgt, e = query.shape
    src = key.shape[1]
    if self_attention:
        q, k, v = in_projection(query, slice(0, 3 * e)).split(e, dim=-1)
    else:
        q = in_projection(query, slice(0, e))
        if kv_shared:
            k, v = in_projection(key, slice(e, 3 * e)).split(e, dim=-1)
        else:
            k, v = in_projection(key, slice(e, 2 * e)), in_projection(value, slice(2 * e, 3 * e))
    q, k, v = (t.reshape(n, -1, num_heads, e // num_heads).transpose(1, 2) for t in (q, k, v))  # [N, H, len, hd]

    # One additive mask [N or 1, H or 1, L, S], as F.multi_head_attention_forward merges them.
    mask = additive_mask(attn_mask, q.dtype)
    if mask is not None:
        mask = mask.view(1, 1, tgt, src) if mask.dim() == 2 else mask.view(n, num_heads, tgt, src)
    pad = additive_mask(key_padding_mask, q.dtype)
    if pad is not None:
        pad = pad.view(n, 1, 1, src)
        mask = pad if mask is None else mask + pad
    weights = None
    if need_weights:
        scores = q.matmul(k.transpose(-2, -1)) / (e // num_heads) ** 0.5
        if mask is not None:
            scores = scores + mask
        weights = scores.softmax(dim=-1)
        if dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p)
        out = weights.matmul(v)
        if average_attn_weights:
            weights = weights.mean(dim=1)
        if not batched:
            weights = weights.squeeze(0)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    out = out_projection(out.transpose(1, 2).reshape(n, tgt, e))
    if not batched:
        out = out.squeeze(0)
    elif not batch_first:
        out = out.transpose(0, 1)
    return out, weights
