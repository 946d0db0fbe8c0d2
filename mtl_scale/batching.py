"""How a task shard's examples are cut into micro-batches, and how a packed micro-batch is laid out.

Three modes (``batching.mode``, see docs/TRAINING.md):
- ``padded``: ``micro_batch_size`` examples in shard order, right-padded to the longest (sampling.py's
  ``take``; not this module).
- ``grouped``: each epoch's shuffled order is cut into windows; a window is sorted by length and cut into
  micro-batches of similar lengths, and all the epoch's micro-batches are shuffled again.
- ``packed``: each window is packed into as many rows of at most ``row_tokens`` tokens as best-fit-decreasing
  needs, the tokens (with attention per example: the compute) spread over them as evenly as it allows, and
  the shuffled rows dealt into micro-batches
  of at most max_tokens // row_tokens rows; examples share rows, each with its own
  position ids from 0, and no padding mask. ``collate_packed`` lays them out.

Only the *contents* of a micro-batch depend on the mode: the step's number of micro-batches is the task
schedule's (sampling.step_plan), the same on every rank, so ZeRO-3's collectives stay aligned.

Lists of example indices in, lists of micro-batches out; torch only to lay out the tensors.
"""
from __future__ import annotations

import bisect
import random
from typing import Callable, Sequence

import torch

from mtl_scale import attention
from mtl_scale.config import RunConfig
from mtl_scale.data.formatting import IGNORE, passes_keywords, real_tokens
from mtl_scale.data.formatting import collate as collate_padded
from mtl_scale.errors import UserError
from mtl_scale.model import DTYPES

GROUP_WINDOW_BATCHES = 50
"""grouped: a length-sorted window holds this many micro-batches' examples (HF's LengthGroupedSampler
uses 50 too): wide enough that neighbours have similar lengths, narrow enough that a micro-batch's
examples still come from all over the shard."""
PACK_WINDOW_EXAMPLES = 512
"""packed: examples per best-fit-decreasing window. Larger windows pack tighter; smaller ones keep the
examples that share a micro-batch more random from epoch to epoch."""

Batcher = Callable[[list[int], random.Random], list[list[int]]]
"""An epoch's shuffled example order and the epoch's RNG -> that epoch's micro-batches."""


def grouped_batches(order: Sequence[int], lengths: Sequence[int], micro_batch_size: int, max_tokens: int,
                    rng: random.Random) -> list[list[int]]:
    """Length-grouped micro-batches of ``order``: ``micro_batch_size`` examples each, or with ``max_tokens``
    > 0 as many as fit when padded (examples x longest <= max_tokens, at least one)."""
    window = GROUP_WINDOW_BATCHES * micro_batch_size
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: lengths[i])
        batches += _cut_sorted(chunk, lengths, micro_batch_size, max_tokens)
    rng.shuffle(batches)
    return batches


def _cut_sorted(chunk: list[int], lengths: Sequence[int], micro_batch_size: int, max_tokens: int) -> list[list[int]]:
    if max_tokens <= 0:
        return [chunk[i:i + micro_batch_size] for i in range(0, len(chunk), micro_batch_size)]
    batches, current = [], []
    for i in chunk:  # ascending: the newest example is the longest, so the padded size is len * count
        if current and (len(current) + 1) * lengths[i] > max_tokens:
            batches.append(current)
            current = []
        current.append(i)
    return batches + ([current] if current else [])


def packed_batches(order: Sequence[int], lengths: Sequence[int], max_tokens: int, row_tokens: int,
                   rng: random.Random, attention_length: float = 0) -> list[list[int]]:
    """Micro-batches of at most ``max_tokens`` tokens made of rows of at most ``row_tokens``: each window of
    ``order`` is packed into as many rows as best-fit-decreasing needs, with the load spread evenly over
    them (``balanced_bins``: tokens, or with ``attention_length`` each example's compute), the rows are
    shuffled and dealt into micro-batches of at most max_tokens // row_tokens rows, as even in count as
    they can be. Every example must fit a row (``lengths[i] <= row_tokens``, checked by the config).

    Why even: every rank runs its own micro-batch at each micro-step and ZeRO-3's collectives wait for the
    slowest. Plain best-fit-decreasing fills every row but the last, so each window ends in a stub (41
    tokens against 4,096 on the benchmark's short task) that one rank runs while the other waits on a full
    one."""
    per_batch = max(1, max_tokens // row_tokens)
    batches = []
    for start in range(0, len(order), PACK_WINDOW_EXAMPLES):
        rows = balanced_bins(order[start:start + PACK_WINDOW_EXAMPLES], lengths, row_tokens, attention_length)
        rng.shuffle(rows)
        n = -(-len(rows) // per_batch)  # micro-batches: as few as the rows need
        cuts = [len(rows) * k // n for k in range(n + 1)]
        batches += [sum(rows[a:b], []) for a, b in zip(cuts, cuts[1:])]
    rng.shuffle(batches)
    return batches


def balanced_bins(items: Sequence[int], lengths: Sequence[int], capacity: int,
                  attention_length: float = 0) -> list[list[int]]:
    """As many bins as ``best_fit_decreasing`` needs at ``capacity``, the load spread as evenly as it allows.

    The load is tokens: best-fit-decreasing's packing at the smallest capacity (down to the mean load) that
    needs no more bins, found by bisection (the examples bound it: [10, 10, 10, 1] in 2 bins stays 20 + 11).

    With ``attention_length`` (attention per example: flash-attn varlen, sdpa_varlen) the load is each
    example's compute, n + n**2 / attention_length (``example_cost``): two rows of equal tokens cost
    unequal time when one holds the long examples, and the rank with the cheaper row waits for the other.
    The same number of bins is filled longest-processing-time first (each example, costliest first, into
    the cheapest bin with room). Where the rows are filled so tightly that this strands an example (short
    of room everywhere), best-fit-decreasing runs under a cap on each bin's compute as well, the cap
    bisected down as far as it needs no more bins: never costlier than the token packing's dearest bin."""
    best = best_fit_decreasing(items, lengths, capacity)
    lo = max([-(-sum(lengths[i] for i in items) // max(1, len(best)))] + [lengths[i] for i in items])
    hi = capacity
    while lo < hi:
        mid = (lo + hi) // 2
        trial = best_fit_decreasing(items, lengths, mid)
        if len(trial) <= len(best):
            best, hi = trial, mid
        else:
            lo = mid + 1
    if attention_length <= 0 or len(best) < 2:
        return best
    cost = {i: example_cost(lengths[i], attention_length) for i in items}
    by_compute = _cheapest_first(items, lengths, capacity, cost, len(best))
    if by_compute is not None:
        return by_compute
    low = max(sum(cost.values()) / len(best), max(cost.values()))
    high = max(sum(cost[i] for i in b) for b in best)  # the token packing's dearest bin
    while high - low > 1:  # to one token-equivalent
        cap = (low + high) / 2
        trial = _best_fit_capped(items, lengths, capacity, cost, cap)
        if len(trial) <= len(best):
            best, high = trial, cap
        else:
            low = cap
    return best


def _cheapest_first(items: Sequence[int], lengths: Sequence[int], capacity: int, cost: dict[int, float],
                    n_bins: int) -> list[list[int]] | None:
    """``n_bins`` bins filled costliest example first, each into the cheapest bin with room; None if one
    finds no room."""
    bins: list[list[int]] = [[] for _ in range(n_bins)]
    load, room = [0.0] * n_bins, [capacity] * n_bins
    for i in sorted(items, key=lambda i: -lengths[i]):  # the cost grows with the length: costliest first
        fits = [b for b in range(n_bins) if room[b] >= lengths[i]]
        if not fits:
            return None
        b = min(fits, key=load.__getitem__)
        bins[b].append(i)
        load[b] += cost[i]
        room[b] -= lengths[i]
    return bins


def _best_fit_capped(items: Sequence[int], lengths: Sequence[int], capacity: int, cost: dict[int, float],
                     cap: float) -> list[list[int]]:
    """Best-fit-decreasing with two limits per bin, ``capacity`` tokens and ``cap`` compute: longest first,
    each into the costliest bin it still fits in (a new bin if none)."""
    bins: list[list[int]] = []
    load: list[float] = []
    room: list[int] = []
    for i in sorted(items, key=lambda i: -lengths[i]):
        fits = [b for b in range(len(bins)) if room[b] >= lengths[i] and load[b] + cost[i] <= cap]
        if not fits:
            bins.append([])
            load.append(0.0)
            room.append(capacity)
            fits = [len(bins) - 1]
        b = max(fits, key=load.__getitem__)  # max keeps the first on ties: deterministic
        bins[b].append(i)
        load[b] += cost[i]
        room[b] -= lengths[i]
    return bins


def example_cost(n: int, attention_length: float) -> float:
    """An example's compute in token-equivalents: n tokens through the linear maps plus causal attention
    over them, which grows as n**2 and equals the linear maps' at n = attention_length. Forward FLOPs: the
    backward scales both terms by about as much (the frozen weights' by 2, attention's by 2-2.5), and the
    balance barely depends on the exact ratio (a quarter of attention_length balances the benchmark's rows
    as well: docs/TRAINING.md)."""
    return n + n * n / attention_length if attention_length > 0 else float(n)


def attention_length(hf_config) -> float:
    """The example length at which a decoder layer's causal attention costs as many FLOPs as its linear
    maps: attention over n tokens is 2·n²·heads·head_dim FLOPs forward (QKᵀ and the weighted sum, half the
    pairs), the linear maps 2·P·n (P: the layer's q, k, v, o and gated-MLP weights), so an example costs
    n + n²/(P / (heads·head_dim)). 1,664 for the built-in tiny model, 49,408 for Llama-2-7B: long
    examples there cost little more than their tokens. 0 (balance tokens) for a config without the fields.
    A weight for balancing, not an exact count: an MoE layer counts one expert, a non-gated MLP three
    matrices."""
    c = _text_config(hf_config)
    hidden, heads, inter = (getattr(c, k, None) for k in ("hidden_size", "num_attention_heads",
                                                             "intermediate_size"))
    if not (hidden and heads and inter):
        return 0.0
    head_dim = _head_dim(c)
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    weights = hidden * head_dim * (2 * heads + 2 * kv_heads) + 3 * hidden * inter
    return weights / (heads * head_dim)


def _text_config(hf_config):
    """The language model's config (a multimodal config nests it)."""
    return hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config


def _head_dim(text_config) -> int:
    return getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads


def best_fit_decreasing(items: Sequence[int], lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of ``items`` whose lengths sum to at most ``capacity``: longest first, each into the fullest bin
    it still fits in (a new bin if none; the first such bin on ties)."""
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin), sorted: the best fit is the first with room >= n
    for i in sorted(items, key=lambda i: -lengths[i]):  # stable: ties keep the shuffled order
        n = lengths[i]
        at = bisect.bisect_left(free, (n, -1))
        if at == len(free):
            if n > capacity:
                raise ValueError(f"an example of {n} tokens does not fit a micro-batch of {capacity} tokens")
            bins.append([])
            room, b = capacity, len(bins) - 1
        else:
            room, b = free.pop(at)
        bins[b].append(i)
        bisect.insort(free, (room - n, b))
    return bins


def rows_for(lengths: Sequence[int], row_tokens: int) -> list[list[int]]:
    """Positions (into ``lengths``) cut into rows of at most ``row_tokens`` tokens in the order given (0: one
    row): a row takes examples until the next one does not fit. packed_batches hands a micro-batch over row
    by row, and each of its rows opens at most one row here, so a micro-batch never has more rows than it was
    packed into, and stays within batching.max_tokens, the size the planner budgets memory for (packing
    afresh, best-fit-decreasing is not optimal and could need a row more)."""
    if row_tokens <= 0:
        return [list(range(len(lengths)))]
    rows: list[list[int]] = []
    used = row_tokens
    for i, n in enumerate(lengths):
        if n > row_tokens:
            raise ValueError(f"an example of {n} tokens does not fit a row of {row_tokens} tokens")
        if used + n > row_tokens:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += n
    return rows


def collate_packed(examples: list[tuple[list[int], list[int]]], pad_id: int, row_tokens: int = 0
                   ) -> dict[str, torch.Tensor]:
    """Pack (input_ids, labels) pairs into rows of at most ``row_tokens`` tokens (0: one row), in the order
    given (``rows_for``), right-padded to the longest row.

    Each example gets position ids 0..n-1: transformers derives from restarting position ids, when no
    attention_mask is given, a block-diagonal causal mask (sdpa, eager, flex), so attention never crosses
    examples; flash_attention_2 and sdpa_varlen get the boundaries from the engine
    (``attention.varlen_kwargs``: transformers' flash path finds packed examples by itself in a single row
    only). Each example's first label is masked, so the previous example's last token predicts nothing
    across the boundary (its own first token is never predicted anyway). Right padding of the shorter rows
    is a sequence of its own, unlabelled; ``token_mask`` marks the real tokens (bookkeeping, not a model
    input).
    """
    rows = rows_for([len(ids) for ids, _ in examples], row_tokens)
    width = max(sum(len(examples[k][0]) for k in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    token_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for k in row:
            ids, lab = examples[k]
            n = len(ids)
            input_ids[r, at:at + n] = torch.tensor(ids)
            labels[r, at + 1:at + n] = torch.tensor(lab[1:])
            position_ids[r, at:at + n] = torch.arange(n)
            token_mask[r, at:at + n] = 1
            at += n
        position_ids[r, at:] = torch.arange(width - at)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "token_mask": token_mask}


def pad_fraction(batches: Sequence[dict[str, torch.Tensor]]) -> float:
    """Share of the positions the model computes that are padding."""
    real = sum(real_tokens(b) for b in batches)
    total = sum(b["input_ids"].numel() for b in batches)
    return 1 - real / total if total else 0.0


def batcher(cfg: RunConfig, lengths: Sequence[int], hf_config=None) -> Batcher:
    """grouped / packed: the function that cuts one task shard's epoch into micro-batches. ``hf_config``: the
    model's, for packed micro-batches balanced by compute where attention is per example."""
    b = cfg.batching
    if b.mode == "grouped":
        return lambda order, rng: grouped_batches(order, lengths, cfg.micro_batch_size, b.max_tokens, rng)
    if b.mode == "packed":
        attn = compute_balance(cfg, hf_config)
        return lambda order, rng: packed_batches(order, lengths, b.max_tokens, row_tokens(cfg), rng, attn)
    raise ValueError(f"batching.mode={b.mode} draws examples with TaskSampler.take, not with a batcher")


def collate(cfg: RunConfig, examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """One micro-batch of ``examples`` as ``batching.mode`` lays it out."""
    if cfg.batching.mode == "packed":
        return collate_packed(examples, pad_id, row_tokens(cfg))
    return collate_padded(examples, pad_id)


def row_tokens(cfg: RunConfig) -> int:
    """packed: tokens per row (``batching.row_tokens``, or its default; see config.BatchingConfig)."""
    if cfg.batching.row_tokens:
        return cfg.batching.row_tokens
    if per_example_attention(cfg):
        return cfg.batching.max_tokens
    # The longest example: sdpa and eager apply the block-diagonal mask densely, so attention costs the
    # square of the row. Measured (bench.throughput --data realistic, 2 CPU ranks, docs/BENCHMARKS.md):
    # rows of max_seq_len pad 3.8% and cost 1.55x less per token than rows of 2 x max_seq_len (1.5%).
    return cfg.max_seq_len


def compute_balance(cfg: RunConfig, hf_config) -> float:
    """The attention_length packed rows are balanced with (``balanced_bins``), 0 for tokens: under a dense
    block-diagonal mask (sdpa, eager) every row costs its full width squared, whatever it holds."""
    return attention_length(hf_config) if hf_config is not None and per_example_attention(cfg) else 0.0


def per_example_attention(cfg: RunConfig) -> bool:
    """Whether the attention implementation computes each packed example on its own (varlen), not the row."""
    return cfg.model.attn_implementation in ("flash_attention_2", attention.NAME)


def check_flash_rows(cfg: RunConfig, model) -> None:
    """Refuse packed micro-batches of several rows under flash_attention_2 for a model that cannot be given
    the examples' bounds (its forward takes no ``**kwargs``, so ``attention.varlen_kwargs`` cannot reach its
    attention): transformers' flash path finds packed examples itself only in a single row, and would
    attend across examples in each of several."""
    if (cfg.batching.mode == "packed" and cfg.model.attn_implementation == "flash_attention_2"
            and row_tokens(cfg) < cfg.batching.max_tokens and not passes_keywords(model)):
        raise UserError(f"batching.row_tokens={row_tokens(cfg)} puts several packed rows in a micro-batch of "
                        f"batching.max_tokens={cfg.batching.max_tokens}, and {type(model).__name__}'s forward "
                        "takes no **kwargs, so flash_attention_2 cannot be given where its examples end: set "
                        "batching.row_tokens to 0 (one row of max_tokens) or use sdpa")


def largest_micro_batch(cfg: RunConfig) -> tuple[int, int]:
    """(rows, tokens per row) of the largest micro-batch ``batching.mode`` can form, what activation memory
    grows with (the planner, mtl_scale/plan/cli.py). grouped with a budget: count x longest <= max_tokens,
    counted as whole rows of max_seq_len (at least the budget)."""
    b = cfg.batching
    if b.mode == "packed":
        return max(1, b.max_tokens // row_tokens(cfg)), row_tokens(cfg)
    if b.mode == "grouped" and b.max_tokens:
        return -(-b.max_tokens // cfg.max_seq_len), cfg.max_seq_len
    return cfg.micro_batch_size, cfg.max_seq_len


def describe(cfg: RunConfig, hf_config=None, device: torch.device | str = "cpu") -> str:
    """The batching of a run in words, for its first log line (``hf_config``: the model's, to say what
    packed rows are balanced by; ``device``: where they run, to say which kernel attends them)."""
    b = cfg.batching
    if b.mode == "padded":
        return f"padded ({cfg.micro_batch_size} examples per micro-batch)"
    if b.mode == "grouped":
        size = f"<= {b.max_tokens} padded tokens" if b.max_tokens else f"{cfg.micro_batch_size} examples"
        return f"grouped by length ({size} per micro-batch)"
    attn = compute_balance(cfg, hf_config)
    balance = f"compute (attention_length {attn:.0f})" if attn else "tokens"
    kernel = ""
    if cfg.model.attn_implementation == attention.NAME and hf_config is not None:
        c = _text_config(hf_config)
        dropout = getattr(c, "attention_dropout", 0.0)
        kernel = f" ({attention.packed_kernel(device, DTYPES[cfg.model.dtype], _head_dim(c), dropout)})"
    return (f"packed (<= {b.max_tokens} tokens per micro-batch, rows of <= {row_tokens(cfg)} balanced by "
            f"{balance}, {cfg.model.attn_implementation} attention{kernel} with position ids restarting per "
            f"example)")
