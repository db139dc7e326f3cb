"""Decomposition of PyTorch's fused ``nn.TransformerEncoderLayer`` inference op into plain ops.

In eval mode under no_grad, ``nn.TransformerEncoderLayer`` runs as one native op,
``aten._transformer_encoder_layer_fwd``, with its four linear weights as arguments: the
sparse-linear pass cannot see the projections inside it. Given to AOTAutograd as a
decomposition, this function traces the same computation (the layer's non-fused forward: linears, scaled dot-product
attention, layer norms) so the projections become ``mm``/``addmm`` like any other linear.

Only the unmasked case is decomposed; with a mask (whose encoding differs by ``mask_type``) the
function returns ``NotImplemented`` and the fused op stays, reported by the pass with its
weights' sparsity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sparse_compile.attention import multi_head_attention

aten = torch.ops.aten


def transformer_encoder_layer_fwd(
    src,
    embed_dim,
    num_heads,
    qkv_weight,
    qkv_bias,
    proj_weight,
    proj_bias,
    use_gelu,
    norm_first,
    eps,
    norm_weight_1,
    norm_bias_1,
    norm_weight_2,
    norm_bias_2,
    ffn_weight_1,
    ffn_bias_1,
    ffn_weight_2,
    ffn_bias_2,
    mask=None,
    mask_type=None,
):
    """``src`` ``[batch, seq, embed_dim]`` (the fast path is batch-first only) -> same shape."""
    if mask is not None or src.is_nested or src.dim() != 3:
        return NotImplemented

    def self_attention(x):
        def in_projection(inputs, rows):
            return F.linear(inputs, qkv_weight[rows], None if qkv_bias is None else qkv_bias[rows])

        def out_projection(inputs):
            return F.linear(inputs, proj_weight, proj_bias)

        return multi_head_attention(x, x, x, num_heads, in_projection, out_projection, batch_first=True)[0]

    def feed_forward(x):
        hidden = F.linear(x, ffn_weight_1, ffn_bias_1)
        hidden = F.gelu(hidden) if use_gelu else F.relu(hidden)
        return F.linear(hidden, ffn_weight_2, ffn_bias_2)

    def norm_1(x):
        return F.layer_norm(x, (embed_dim,), norm_weight_1, norm_bias_1, eps)

    def norm_2(x):
        return F.layer_norm(x, (embed_dim,), norm_weight_2, norm_bias_2, eps)

    if norm_first:
        x = src + self_attention(norm_1(src))
        return x + feed_forward(norm_2(x))
    x = norm_1(src + self_attention(src))
    return norm_2(x + feed_forward(x))


#: Decompositions the ``sparse`` backend adds to Inductor's for inference graphs.
DECOMPOSITIONS = {aten._transformer_encoder_layer_fwd.default: transformer_encoder_layer_fwd}
