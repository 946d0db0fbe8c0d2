"""``model.attn_implementation=sdpa_varlen``: attention over packed rows that costs per example, not per row.

A packed row holds several examples, each with position ids restarting at 0 (batching.collate_packed).
Under transformers' ``sdpa``, the model turns those into a dense (row x row) block-diagonal causal mask, so
attention computes every pair of the row and the mask is built and read in every layer. flash-attn's varlen
kernel computes each example's causal triangle only, but it is a CUDA package (flash_attention_2). This is
the same thing for any device: one causal ``scaled_dot_product_attention`` per example, its own fused
kernel with no mask (PyTorch's flash kernel on CPU too). PyTorch has no CPU varlen kernel to call instead:
``torch.nn.attention.varlen.varlen_attn`` is CUDA-only, and nested-tensor sdpa has no CPU backend.

It is registered with transformers' attention and mask interfaces (``register``), so the model code is
stock: the mask function builds no mask for a forward with no padding mask and no cached prefix (a
training micro-batch, packed or not), and everything else, padded batches with an attention mask and
forwards that continue a KV cache (evaluation, generation), runs transformers' own sdpa unchanged. It is
for full causal attention: models with a sliding window or logit soft-capping are refused
(``check_model``), since per-example attention would silently drop them.
"""
from __future__ import annotations

import weakref

import torch

from mtl_scale.errors import UserError

NAME = "sdpa_varlen"


def segments(positions: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each example in a row of position ids: an example starts where its position is 0
    (a row's right padding is one more such sequence)."""
    starts = [t for t, p in enumerate(positions) if p == 0]
    if not starts or starts[0] != 0:
        raise ValueError("packed position ids must start at 0 in every row")
    return list(zip(starts, starts[1:] + [len(positions)]))


def row_segments(position_ids: torch.Tensor, rows: int) -> list[list[tuple[int, int]]]:
    """``segments`` of every row, read from the device once per forward, not once per layer: every layer
    gets the same position_ids tensor, and on a GPU each ``.tolist()`` is a host sync that stalls the
    launch queue. Cached on that tensor object (a weak reference: a new micro-batch's position ids are a
    new object even where the allocator reuses the memory) and its version counter (in-place writes)."""
    global _SEGMENTS
    cacheable = not position_ids.is_inference()  # torch.inference_mode keeps no version counter: read every time
    ref, version, cached = _SEGMENTS
    if cacheable and ref() is position_ids and version == position_ids._version and len(cached) == rows:
        return cached
    cached = [segments(p) for p in position_ids.expand(rows, -1).tolist()]
    if cacheable:
        _SEGMENTS = (weakref.ref(position_ids), position_ids._version, cached)
    return cached


_SEGMENTS: tuple = (lambda: None, -1, [])


def sdpa_varlen_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                        position_ids=None, **kwargs):
    """transformers' attention-function signature: query (B, H, T, D), key and value (B, H_kv, T, D);
    returns the output as (B, T, H, D) and no weights."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if (attention_mask is not None or position_ids is None or query.shape[2] != key.shape[2]
            or kwargs.get("sliding_window") is not None or kwargs.get("softcap") is not None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, position_ids=position_ids, **kwargs)
    gqa = query.shape[1] != key.shape[1]
    rows = []
    # unbind and split, not slices: a slice's backward writes its gradient into a zero tensor of the
    # whole input, one per example per layer; split's backward is one concatenation (measured on CPU:
    # the zero-fills and adds cost more than the attention saved, docs/BENCHMARKS.md)
    for q, k, v, segs in zip(query.unbind(0), key.unbind(0), value.unbind(0),
                             row_segments(position_ids, query.shape[0])):
        sizes = [e - s for s, e in segs]
        # 4-D (1, H, n, D) per example: sdpa's fused CPU kernel takes 4-D inputs only (3-D runs its math
        # path); each output transposed to (1, n, H, D) and concatenated in that layout: the one copy the
        # model keeps besides the outputs sdpa's backward saves (the planner counts it, plan/estimate.py)
        rows.append(torch.cat([torch.nn.functional.scaled_dot_product_attention(
            qs.unsqueeze(0), ks.unsqueeze(0), vs.unsqueeze(0), dropout_p=dropout, is_causal=True, scale=scaling,
            enable_gqa=gqa).transpose(1, 2)
            for qs, ks, vs in zip(q.split(sizes, dim=1), k.split(sizes, dim=1), v.split(sizes, dim=1))], dim=1))
    return torch.cat(rows), None


def _mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, attention_mask=None, local_size=None,
          **kwargs):
    """No mask for a whole sequence without a padding mask (the attention function cuts it per example);
    sdpa's for a padding mask, a cached prefix (offsets, or fewer queries than keys) or a sliding window."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None and q_offset == kv_offset == 0 and q_length == kv_length and local_size is None:
        return None
    return sdpa_mask(batch_size, q_length, kv_length, q_offset=q_offset, kv_offset=kv_offset,
                     attention_mask=attention_mask, local_size=local_size, **kwargs)


def check_model(hf_config) -> None:
    """Refuse what one causal attention per example would compute wrongly: a sliding window (Mistral,
    Qwen2 with use_sliding_window, Gemma 2/3) or soft-capped attention logits (Gemma 2)."""
    window = getattr(hf_config, "sliding_window", None)
    if window and getattr(hf_config, "use_sliding_window", True):
        raise UserError(f"model.attn_implementation={NAME} computes full causal attention per example; this "
                        f"{hf_config.model_type} model has sliding_window={window}. Use sdpa or flash_attention_2")
    if getattr(hf_config, "attn_logit_softcapping", None):
        raise UserError(f"model.attn_implementation={NAME} has no attention logit soft-capping "
                        f"(this {hf_config.model_type} model uses it). Use eager or flash_attention_2")


def register() -> None:
    """Make ``attn_implementation="sdpa_varlen"`` loadable by ``from_pretrained`` (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, sdpa_varlen_forward)
    AttentionMaskInterface.register(NAME, _mask)
