"""``model.attn_implementation=sdpa_varlen``: attention over packed rows that costs per example, not per row.

A packed row holds several examples, each with position ids restarting at 0 (batching.collate_packed).
Under transformers' ``sdpa``, the model turns those into a dense (row x row) block-diagonal causal mask, so
attention computes every pair of the row and the mask is built and read in every layer. flash-attn's varlen
kernel computes each example's causal triangle only, but it is a CUDA package (flash_attention_2). This is
the same thing for any device: one causal ``scaled_dot_product_attention`` per example, its own fused
kernel with no mask (PyTorch's flash kernel on CPU too). PyTorch has no CPU varlen kernel to call instead:
``torch.nn.attention.varlen.varlen_attn`` is CUDA-only, and nested-tensor sdpa has no CPU backend.

It is registered with transformers' attention and mask interfaces (``register``), so the model code is
stock: the mask function builds no mask when the batch has no padding mask (packed micro-batches have
none), and everything else, padded batches with an attention mask and decoding with a KV cache (evaluation,
generation), runs transformers' own sdpa unchanged.
"""
from __future__ import annotations

import torch

NAME = "sdpa_varlen"


def segments(positions: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each example in a row of position ids: an example starts where its position is 0
    (a row's right padding is one more such sequence)."""
    starts = [t for t, p in enumerate(positions) if p == 0]
    if not starts or starts[0] != 0:
        raise ValueError("packed position ids must start at 0 in every row")
    return list(zip(starts, starts[1:] + [len(positions)]))


def sdpa_varlen_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                        position_ids=None, **kwargs):
    """transformers' attention-function signature: query (B, H, T, D), key and value (B, H_kv, T, D);
    returns the output as (B, T, H, D) and no weights."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_mask is not None or position_ids is None or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, position_ids=position_ids, **kwargs)
    gqa = query.shape[1] != key.shape[1]
    rows = []
    for b, positions in enumerate(position_ids.expand(query.shape[0], -1).tolist()):
        rows.append(torch.cat([torch.nn.functional.scaled_dot_product_attention(
            query[b:b + 1, :, s:e], key[b:b + 1, :, s:e], value[b:b + 1, :, s:e], dropout_p=dropout,
            is_causal=True, scale=scaling, enable_gqa=gqa) for s, e in segments(positions)], dim=2))
    return torch.cat(rows).transpose(1, 2).contiguous(), None


def _mask(*args, attention_mask=None, **kwargs):
    """No mask for a batch without a padding mask (the attention function cuts it per example); else sdpa's."""
    from transformers.masking_utils import sdpa_mask

    return None if attention_mask is None else sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register() -> None:
    """Make ``attn_implementation="sdpa_varlen"`` loadable by ``from_pretrained`` (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, sdpa_varlen_forward)
    AttentionMaskInterface.register(NAME, _mask)
