"""``model.attn_implementation=sdpa_varlen``: attention over packed rows that costs per example, not per row.

A packed row holds several examples, each with position ids restarting at 0 (batching.collate_packed).
Under transformers' ``sdpa``, the model turns those into a dense (row x row) block-diagonal causal mask, so
attention computes every pair of the row and the mask is built and read in every layer. flash-attn's varlen
kernel computes each example's causal triangle only, but it is a CUDA package (flash_attention_2). This is
the same thing for any device: one causal ``scaled_dot_product_attention`` per example, its own fused
kernel with no mask (PyTorch's flash kernel on CPU too). PyTorch has no CPU varlen kernel to call instead:
``torch.nn.attention.varlen.varlen_attn`` is CUDA-only, and nested-tensor sdpa has no CPU backend.

On a GPU (bf16 or fp16, compute capability 8.0+, a torch with ``varlen_attn`` and its backward) every
example of every row runs in one call of that kernel per layer instead (``varlen_kernel``): what
flash_attention_2 computes, without the flash-attn package, which often has no wheel for the installed
torch and CUDA (none on the H200 lent for issue 17). A loop of one small kernel per example would be
host-bound there: ~50 GSM8K examples per 8,192-token micro-batch are ~800 launches per forward.

It is registered with transformers' attention and mask interfaces (``register``), so the model code is
stock: the mask function builds no mask for a forward with no padding mask and no cached prefix (a
training micro-batch, packed or not), and everything else, padded batches with an attention mask and
forwards that continue a KV cache (evaluation, generation), runs transformers' own sdpa unchanged. It is
for full causal attention: models with a sliding window or logit soft-capping are refused
(``check_model``), since per-example attention would silently drop them.
"""
from __future__ import annotations

import functools
import inspect
import weakref
from dataclasses import dataclass
from typing import Callable

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
    kernel = varlen_kernel(query.device, query.dtype, query.shape[-1], dropout)
    if kernel is not None and kwargs.get("cu_seq_lens_q") is not None:  # the engine's (varlen_kwargs): no sync
        return varlen_forward(kernel, query, key, value, kwargs["cu_seq_lens_q"], kwargs["max_length_q"],
                              scaling), None
    segs_per_row = row_segments(position_ids, query.shape[0])
    if kernel is not None:
        cu, longest = _device_cu_seqlens(segs_per_row, query.shape[2], query.device)
        return varlen_forward(kernel, query, key, value, cu, longest, scaling), None
    gqa = query.shape[1] != key.shape[1]
    rows = []
    # unbind and split, not slices: a slice's backward writes its gradient into a zero tensor of the
    # whole input, one per example per layer; split's backward is one concatenation (measured on CPU:
    # the zero-fills and adds cost more than the attention saved, docs/BENCHMARKS.md)
    for q, k, v, segs in zip(query.unbind(0), key.unbind(0), value.unbind(0), segs_per_row):
        sizes = [e - s for s, e in segs]
        # 4-D (1, H, n, D) per example: sdpa's fused CPU kernel takes 4-D inputs only (3-D runs its math
        # path); each output transposed to (1, n, H, D) and concatenated in that layout: the one copy the
        # model keeps besides the outputs sdpa's backward saves (the planner counts it, plan/estimate.py)
        rows.append(torch.cat([torch.nn.functional.scaled_dot_product_attention(
            qs.unsqueeze(0), ks.unsqueeze(0), vs.unsqueeze(0), dropout_p=dropout, is_causal=True, scale=scaling,
            enable_gqa=gqa).transpose(1, 2)
            for qs, ks, vs in zip(q.split(sizes, dim=1), k.split(sizes, dim=1), v.split(sizes, dim=1))], dim=1))
    return torch.cat(rows), None


@dataclass(frozen=True)
class VarlenKernel:
    """torch's flash varlen kernel and how this torch's ``varlen_attn`` is called: its signature changed
    between releases (``is_causal=True`` at first, ``window_size=(-1, 0)`` later; ``enable_gqa`` later still)."""
    fn: Callable
    causal: dict
    """The keyword that makes it causal."""
    gqa: bool
    """It takes ``enable_gqa`` (fewer KV heads than query heads); without it they are repeated."""


def kernel_from(fn: Callable, has_backward: bool) -> VarlenKernel | None:
    """How to call ``fn`` (a ``varlen_attn``), or None where it cannot train this model's attention: no
    backward, no ``scale`` (the earliest releases; models scale by more than the head size) or no way to
    ask for causal attention."""
    params = inspect.signature(fn).parameters
    if not has_backward or "scale" not in params:
        return None
    if "is_causal" in params:
        causal = {"is_causal": True}
    elif "window_size" in params:
        causal = {"window_size": (-1, 0)}
    else:
        return None
    return VarlenKernel(fn, causal, "enable_gqa" in params)


@functools.cache
def torch_varlen() -> VarlenKernel | None:
    """This torch's ``varlen_attn``, where it can train (``kernel_from``); whether it runs is ``varlen_kernel``'s."""
    try:
        from torch.nn.attention import varlen
    except ImportError:  # torch < 2.9
        return None
    return kernel_from(varlen.varlen_attn, hasattr(varlen, "_varlen_attn_backward"))


@functools.cache
def _flash_capable(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) >= (8, 0)  # FlashAttention 2: Ampere and later


def varlen_kernel(device: torch.device | str, dtype: torch.dtype, head_dim: int,
                  dropout: float = 0.0) -> VarlenKernel | None:
    """torch's flash varlen kernel where it can compute this attention, else None (one sdpa per example):
    a CUDA device of compute capability 8.0+, bf16 or fp16, a head size flash supports, no dropout (the
    kernel has none)."""
    device = torch.device(device)
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16) or dropout:
        return None
    if head_dim % 8 or head_dim > 256 or not _flash_capable(device):
        return None
    return torch_varlen()


def packed_kernel(device: torch.device | str, dtype: torch.dtype, head_dim: int, dropout: float = 0.0) -> str:
    """Which kernel attends a packed row's examples under sdpa_varlen in training, in words (the run's first
    log line)."""
    if varlen_kernel(device, dtype, head_dim, dropout) is not None:
        return "torch's flash varlen kernel, one call per layer"
    return "one sdpa call per example"


def cu_seqlens(segments_per_row: list[list[tuple[int, int]]], row_length: int) -> tuple[list[int], int]:
    """The rows laid end to end as one sequence of tokens: where each example starts in it, then its end
    (flash's ``cu_seqlens``), and the longest example."""
    cu, longest = [0], 0
    for r, segs in enumerate(segments_per_row):
        for start, end in segs:
            cu.append(r * row_length + end)
            longest = max(longest, end - start)
    return cu, longest


def _device_cu_seqlens(segments_per_row, row_length: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """``cu_seqlens`` on the device, made once per forward: every layer gets the same segments list
    (``row_segments``' cache), so the copy is reused while that list is."""
    global _CU
    segs, length, where, cu, longest = _CU
    if segs is not segments_per_row or length != row_length or where != device:
        cu, longest = cu_seqlens(segments_per_row, row_length)
        # from host memory, asynchronously: a blocking copy would wait for every kernel already queued
        cu = torch.tensor(cu, dtype=torch.int32).to(device, non_blocking=True)
        _CU = (segments_per_row, row_length, device, cu, longest)
    return cu, longest


_CU: tuple = (None, -1, None, None, 0)


def varlen_forward(kernel: VarlenKernel, query, key, value, cu: torch.Tensor, longest: int,
                   scaling=None) -> torch.Tensor:
    """Every example of every row in one kernel call: query (B, H, T, D), key and value (B, H_kv, T, D) as
    (B*T, heads, D) token-major (the layout the projections made: transformers transposed it to heads-major
    for attention), returned as (B, T, H, D). ``cu``: the examples' bounds in the rows laid end to end
    (``cu_seqlens``, int32, on the device), ``longest`` the longest example."""
    b, h, t, d = query.shape
    h_kv = key.shape[1]
    q = query.transpose(1, 2).reshape(b * t, h, d)
    k, v = (x.transpose(1, 2).reshape(b * t, h_kv, d) for x in (key, value))
    gqa = {}
    if h != h_kv and kernel.gqa:
        gqa = {"enable_gqa": True}
    elif h != h_kv:  # query head i reads KV head i // (h / h_kv), as transformers' repeat_kv lays them out
        k, v = (x.repeat_interleave(h // h_kv, dim=1) for x in (k, v))
    out = kernel.fn(q, k, v, cu, cu, longest, longest, scale=scaling, **kernel.causal, **gqa)
    return out.view(b, t, h, d)


def varlen_kwargs(position_ids: torch.Tensor) -> dict:
    """transformers' flash-attention kwargs for a packed micro-batch, from its position ids on the host: each
    example's bounds in the rows laid end to end (int32) and the longest example.

    Given to the model, flash_attention_2 and sdpa_varlen's kernel take the example boundaries from them.
    Without them transformers derives the boundaries from the position ids on the device in every layer
    (a ``nonzero`` and a ``max``: host syncs), and only for a single row: with several rows it looks for no
    packed sequences at all (``modeling_flash_attention_utils._is_packed_sequence`` needs batch size 1), so
    flash attention would run causal over each whole row, across its examples."""
    cu, longest = cu_seqlens([segments(row) for row in position_ids.tolist()], position_ids.shape[1])
    cu = torch.tensor(cu, dtype=torch.int32)
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


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
