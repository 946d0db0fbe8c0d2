"""Formats -> (prompt text, completion text) -> token ids with completion-only labels.

Loss is taken on completion tokens only: prompt positions get label -100. The sequence is
``[bos] prompt completion eos``. Prompt and completion are tokenised together, as one text, and split
where the first token reaching past the prompt's last character starts (by the fast tokenizer's
character offsets, as TRL does): tokenising them apart would give a byte-level BPE (Llama-3, Qwen) a
lone trailing-space token the model rarely saw, and SentencePiece a "▁" before the completion that the
joined text does not have. A token straddling the boundary belongs to the completion; generation at
evaluation starts from the same boundary.

The exact-match reference of an example is its completion as a generation of it would read: the
completion's tokens up to the first eos (where greedy generation stops), decoded without special
tokens, as generations are. For a chat template that is the assistant's content without the
template's end of turn (``<|im_end|>``, ``<|eot_id|>``), which the labels keep so the model learns
to stop.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field, fields, replace

import torch

from mtl_scale.errors import UserError

IGNORE = -100

ALPACA_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.\n\n"
                     "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


def render(row: dict, fmt: str, tokenizer) -> tuple[str, str]:
    """The prompt and completion text of one row of format ``fmt``."""
    if fmt == "prompt_completion":
        return row["prompt"], row["completion"]
    if fmt == "alpaca":
        template = ALPACA_WITH_INPUT if row.get("input") else ALPACA_NO_INPUT
        return template.format(instruction=row["instruction"], input=row.get("input") or ""), row["output"]
    if fmt == "chat":
        return _render_chat(row["messages"], tokenizer)
    raise ValueError(fmt)


def _render_chat(messages: list[dict], tokenizer) -> tuple[str, str]:
    """The last assistant turn is the completion; everything before it (rendered with the tokenizer's
    chat template and its generation prompt) is the prompt."""
    if _has_chat_template(tokenizer):
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        if not full.startswith(prompt):
            raise UserError("the tokenizer's chat template renders the conversation differently with and without "
                            "its last assistant turn, so the completion cannot be separated from the prompt")
        return prompt, full[len(prompt):]
    # No template (e.g. a base model): a plain, documented rendering.
    prompt = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages[:-1]) + "<|assistant|>\n"
    return prompt, messages[-1]["content"]


def _has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


@dataclass
class Encoded:
    """Tokenised examples of one task split, plus what truncation did to it."""
    input_ids: list[list[int]]
    labels: list[list[int]]
    prompt_lens: list[int]
    truncated: int = 0
    dropped: int = 0
    references: list[str] = field(default_factory=list)
    """The completions as exact match compares them (see the module docstring)."""
    prompt_texts: list[str] = field(default_factory=list)
    """The rendered prompts (metric=choice scores each option after them)."""
    overlaps: list[str] = field(default_factory=list)
    """The prompt's last characters that a token straddling the boundary carries into the completion (usually
    ""): dropped from the start of the reference and of generations, so both read as the completion."""

    def __len__(self) -> int:
        return len(self.input_ids)

    def rows(self, start: int, stop: int) -> Encoded:
        """Examples ``start:stop``, every per-example field cut alike (the truncation counts stay the split's)."""
        return replace(self, **{f.name: getattr(self, f.name)[start:stop] for f in fields(self)
                                if isinstance(getattr(self, f.name), list)})


def encode(rows: list[dict], fmt: str, tokenizer, max_seq_len: int, truncation: str = "truncate") -> Encoded:
    """Tokenise rows; examples longer than ``max_seq_len`` are cut at the end (``truncate``) or
    dropped (``drop``); an example left without completion tokens is always dropped. References are
    made from the whole completion, so a truncated example is still judged on its full answer."""
    if not rows:
        return Encoded([], [], [])
    pairs = [render(r, fmt, tokenizer) for r in rows]
    eos = tokenizer.eos_token_id
    prompts, completions, overlaps = tokenize_pairs(pairs, tokenizer)
    prompts = [_with_bos(p, fmt, tokenizer) for p in prompts]
    if eos is not None:
        completions = [c if c and c[-1] == eos else c + [eos] for c in completions]
    references = tokenizer.batch_decode([_until_eos(c, eos) for c in completions], skip_special_tokens=True)
    references = [drop_overlap(r, o) for r, o in zip(references, overlaps)]
    out = Encoded([], [], [])
    for p, c, ref, overlap, (prompt_text, _) in zip(prompts, completions, references, overlaps, pairs):
        if len(p) + len(c) > max_seq_len:
            if truncation == "drop" or len(p) >= max_seq_len:
                out.dropped += 1
                continue
            c = c[:max_seq_len - len(p)]
            out.truncated += 1
        out.input_ids.append(p + c)
        out.labels.append([IGNORE] * len(p) + c)
        out.prompt_lens.append(len(p))
        out.references.append(ref)
        out.prompt_texts.append(prompt_text)
        out.overlaps.append(overlap)
    return out


def tokenize_pairs(pairs: list[tuple[str, str]], tokenizer) -> tuple[list[list[int]], list[list[int]], list[str]]:
    """Token ids of each (prompt, completion) text pair, split at the boundary (module docstring): the
    prompt is the tokens that end within the prompt's characters. Also the overlap: the prompt characters
    in a token that straddles the boundary. A slow tokenizer has no offsets: there the two texts are
    tokenised apart, as before."""
    # verbose=False: lengths are policed by the caller, not by the tokenizer's model_max_length warning
    if not getattr(tokenizer, "is_fast", False):
        prompts = tokenizer([p for p, _ in pairs], add_special_tokens=False, verbose=False)["input_ids"]
        completions = tokenizer([c for _, c in pairs], add_special_tokens=False, verbose=False)["input_ids"]
        return prompts, completions, [""] * len(pairs)
    enc = tokenizer([p + c for p, c in pairs], add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    prompts, completions, overlaps = [], [], []
    for ids, offsets, (prompt, _) in zip(enc["input_ids"], enc["offset_mapping"], pairs):
        cut = next((i for i, (_, end) in enumerate(offsets) if end > len(prompt)), len(ids))
        prompts.append(ids[:cut])
        completions.append(ids[cut:])
        overlaps.append(prompt[offsets[cut][0]:] if cut < len(ids) and offsets[cut][0] < len(prompt) else "")
    return prompts, completions, overlaps


def drop_overlap(text: str, overlap: str) -> str:
    """``text`` without the straddled prompt characters it starts with (whitespace-tolerant: decoders differ
    on a leading space)."""
    if overlap.strip() and text.lstrip().startswith(overlap.strip()):
        return text.lstrip()[len(overlap.strip()):]
    return text


def encode_options(prompt_texts: list[str], option: str, fmt: str, tokenizer) -> Encoded:
    """Each prompt followed by ``option`` as its completion (no eos: the option's own likelihood), for
    metric=choice; nothing is truncated or dropped, so rows stay aligned with the prompts."""
    prompts, options, _ = tokenize_pairs([(p, option) for p in prompt_texts], tokenizer)
    prompts = [_with_bos(p, fmt, tokenizer) for p in prompts]
    return Encoded([p + o for p, o in zip(prompts, options)], [[IGNORE] * len(p) + o for p, o in zip(prompts, options)],
                   [len(p) for p in prompts], references=[option] * len(prompts), prompt_texts=list(prompt_texts))


def _with_bos(prompt: list[int], fmt: str, tokenizer) -> list[int]:
    """``prompt`` led by bos once. A chat template owns its special tokens (bos or none), as in
    ``apply_chat_template(tokenize=True)``; any other text gets bos unless it starts with its own."""
    bos = tokenizer.bos_token_id
    if bos is None or prompt[:1] == [bos] or (fmt == "chat" and _has_chat_template(tokenizer)):
        return prompt
    return [bos] + prompt


def _until_eos(ids: list[int], eos: int | None) -> list[int]:
    return ids[:ids.index(eos)] if eos is not None and eos in ids else ids


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad (input_ids, labels) pairs into a batch; padding is masked from attention and loss."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(examples):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        labels[i, :len(lab)] = torch.tensor(lab)
        attention_mask[i, :len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def completion_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Positions whose next token is a completion label (what ``token_loss_sum`` counts)."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def real_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Non-padding tokens of a padded (attention_mask) or packed (token_mask) micro-batch."""
    mask = batch["attention_mask"] if "attention_mask" in batch else batch["token_mask"]
    return int(mask.sum())


def example_count(batch: dict[str, torch.Tensor]) -> int:
    """Examples in a padded micro-batch (its rows) or a packed one (the segments whose position ids start
    at 0 on a real token; a row's right padding restarts at 0 too, on padding)."""
    if "attention_mask" in batch:
        return batch["input_ids"].shape[0]
    return int(((batch["position_ids"] == 0) & (batch["token_mask"] == 1)).sum())


VARLEN_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
"""transformers' FlashAttentionKwargs: packed examples' boundaries (``attention.varlen_kwargs``)."""


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the model's forward takes from a micro-batch. A packed one has position_ids and no
    attention_mask, and ``use_cache=False``: transformers looks for packed sequences only when there is
    no cache (masking_utils._preprocess_mask_arguments), and a Llama with config.use_cache makes one even
    in training, which would silently give each row one causal mask across its examples (load_model turns
    config.use_cache off; the packed path does not rely on it). With the example boundaries the engine
    adds for attention per example (``attention.varlen_kwargs``), those too."""
    if "position_ids" in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False,
                **{k: batch[k] for k in VARLEN_KEYS if k in batch}}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def loss_positions(labels: torch.Tensor) -> torch.Tensor:
    """The sequence positions whose next token is a label in some row: the only logits the loss reads.
    Taken on the host before the micro-batch goes to the device (``nonzero`` there would sync)."""
    return (labels[:, 1:] != IGNORE).any(dim=0).nonzero().flatten()


def takes_logits_to_keep(model) -> bool:
    """Whether the causal LM under ``model`` (a PeftModel, or the model itself) takes an index tensor as
    ``logits_to_keep``: every transformers 5 causal LM declares ``int | torch.Tensor``. A remote-code model
    may have no such argument, or one declared ``int`` that it slices with (``[:, -n:]``: a tensor would
    raise, or keep the wrong positions); both get the full logits."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return _takes_index_tensor(type(base))


def passes_keywords(model) -> bool:
    """Whether the causal LM under ``model`` passes extra keyword arguments on (``**kwargs``, as every
    transformers 5 model does, down to its attention): the engine's ``varlen_kwargs`` reach attention then."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return _takes_var_keywords(type(base))


@functools.cache
def _takes_var_keywords(cls: type) -> bool:
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(cls.forward).parameters.values())


@functools.cache
def _takes_index_tensor(cls: type) -> bool:
    param = inspect.signature(cls.forward).parameters.get("logits_to_keep")
    return param is not None and "Tensor" in str(param.annotation)


def summed_loss(model, batch: dict[str, torch.Tensor], in_model: bool = False) -> torch.Tensor:
    """The micro-batch's summed next-token NLL over its labelled positions (token_loss_sum's value).

    With ``batch["loss_positions"]`` (``loss_positions``; the engine adds it) the model computes logits
    at those positions only (transformers' ``logits_to_keep`` takes an index tensor): the prompt's
    positions predict nothing, and the (tokens x vocabulary) projection and its gradient are a real share
    of a step for a large vocabulary (a 128k-vocabulary Llama's lm_head is 7% of an 8B model's weights,
    21% of a 1B's). The positions are the union over the rows, so every row's labels are among them.

    ``in_model``: the model takes the loss itself from ``labels``. ``num_items_in_batch=1`` turns
    transformers' causal-LM loss, and Liger's fused linear cross-entropy that replaces it
    (model.liger_kernels), from a mean into this sum; the fused kernel then never materialises the
    (tokens x vocabulary) logits. With the positions, it gets the hidden states there only
    (``logits_to_keep``) and their targets already shifted (``shift_labels``): the fused kernel's matmul
    with ``lm_head`` then skips the prompts too. Else the loss is taken here, from the logits.
    """
    at = batch.get("loss_positions")
    if in_model and (at is None or not at.numel()):  # none labelled: Liger's chunking divides by the count
        return model(**model_inputs(batch), labels=batch["labels"], num_items_in_batch=1).loss
    if in_model:  # labels too: transformers' forward takes a loss only when it is given labels
        return model(**model_inputs(batch), labels=batch["labels"], shift_labels=batch["labels"][:, at + 1],
                     logits_to_keep=at, num_items_in_batch=1).loss
    if at is None:
        return token_loss_sum(model(**model_inputs(batch)).logits, batch["labels"])[0]
    return _nll_sum(model(**model_inputs(batch), logits_to_keep=at).logits, batch["labels"][:, at + 1])


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL over labelled positions and their count.

    logits (B, T, V), labels (B, T): position t predicts labels[t + 1].
    """
    return _nll_sum(logits[:, :-1], labels[:, 1:]), (labels[:, 1:] != IGNORE).sum()


def _nll_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits (B, n, V) against targets (B, n), IGNORE skipped; fp32 softmax: bf16 logits lose the small
    probabilities."""
    return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                                             ignore_index=IGNORE, reduction="sum")
