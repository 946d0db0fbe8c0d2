"""What the benchmark scripts share: memory counters (bench.memory_check; the tests' live-tensor peaks),
FLOP and MFU arithmetic and the throughput worker's result line and timed window (bench.throughput,
bench.throughput_worker), and the models and data they build (a random-init Llama of any size,
fixed-length tasks, realistic-length tasks)."""
from __future__ import annotations

import ctypes
import json
import math
import random
import string
import sys
import weakref
from pathlib import Path

import torch

from mtl_scale.base_model import RECIPE, build_tokenizer
from mtl_scale.model import cache_dir

ON_GPU = torch.cuda.is_available()
GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "test.jsonl"
"""GSM8K's test split, in ../shared/data beside the checkout (bench.throughput --data realistic)."""


# ---------------------------------------------------------------------------------------------
# Memory counters: CUDA's allocator on a GPU, the process's resident memory on CPU


def libc():
    return ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else None


def rss_kib(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def memory_now() -> int:
    """Bytes in use now: CUDA tensors on a GPU, resident memory (after trimming the heap) on CPU."""
    if ON_GPU:
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()
    if libc():
        libc().malloc_trim(0)
    return rss_kib() * 1024


def rss_parts() -> dict[str, int] | None:
    """CPU resident memory by kind (bytes): anonymous (heap, tensors), file-backed (code, mmapped
    files), shared memory (DeepSpeed's shm all-reduce buffers)."""
    if ON_GPU:
        return None
    return {k: rss_kib(k) * 1024 for k in ("RssAnon", "RssFile", "RssShmem")}


def reset_peak() -> None:
    if ON_GPU:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        memory_now()  # trim first, so that the reset peak starts from what is really in use
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to VmRSS (Linux >= 4.0)


def peak_since_reset() -> int:
    if ON_GPU:
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return rss_kib("VmHWM") * 1024


class LiveTensorBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Peak bytes of tensor storages created inside the mode and still alive (views and in-place
    results share an input's storage and are not counted again)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.keys = set()

    def _free(self, key: int, n: int) -> None:
        self.keys.discard(key)
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        leaves = torch.utils._pytree.tree_leaves
        inputs = {t.untyped_storage().data_ptr() for t in leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                st = t.untyped_storage()
                key = st.data_ptr()
                if key and key not in self.keys and key not in inputs:
                    self.keys.add(key)
                    self.live += st.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(st, self._free, key, st.nbytes())
        return out


# ---------------------------------------------------------------------------------------------
# FLOPs (unit-tested in tests/test_throughput_bench.py)

# Peak dense (no sparsity) bf16 tensor-core TFLOP/s per GPU, from the vendors' spec sheets, matched
# as substrings of torch.cuda.get_device_name(); the first match wins, so specific names go first.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100", 989.0),    # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989.0),
    ("A100", 312.0),
)


def flops_per_token(n_frozen: int, n_trainable: int, n_layers: int, hidden: int, seq: float) -> float:
    """Model FLOPs of one LoRA training token (forward + backward), the convention MFU is quoted in.

    - frozen weights: 2·N forward + 2·N backward (gradient w.r.t. activations only; a frozen weight
      gets no weight gradient);
    - trainable (LoRA) weights: 2·N forward + 4·N backward (activation and weight gradients);
    - attention scores and mixing (QKᵀ and AV): 4·hidden·seq per layer forward, twice that backward,
      counted over the full ``seq`` as in PaLM's MFU (the causal mask's skipped half counts too).
    N excludes the input embedding table (a lookup, no matmul); recomputation from gradient
    checkpointing is not counted (it is not useful work).
    """
    return 4 * n_frozen + 6 * n_trainable + 12 * n_layers * hidden * seq


def peak_tflops(device_name: str, override: float | None = None) -> float | None:
    """Peak dense bf16 TFLOP/s of one GPU: ``override`` if given, else the table, else None."""
    if override:
        return float(override)
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


def mfu(tokens_per_s: float, flops_per_tok: float, peak: float, n_devices: int) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the devices' summed peak."""
    return tokens_per_s * flops_per_tok / (peak * 1e12 * n_devices)


# ---------------------------------------------------------------------------------------------
# The throughput worker's measurement, as bench.throughput reads it

RESULT_TAG = "THROUGHPUT_RESULT"  # rank 0 of bench.throughput_worker prints "RESULT_TAG {json}" once


def window(marks: list[tuple[float, int, int]], warmup: int) -> dict:
    """Timed window of a run from its step-end marks (time, cumulative tokens, cumulative sequences):
    the steps after the first ``warmup``, i.e. from the end of step ``warmup`` to the last step's end."""
    if not 1 <= warmup < len(marks):
        raise ValueError(f"need 1 <= warmup < steps, got warmup={warmup} with {len(marks)} steps")
    start, end = marks[warmup - 1], marks[-1]
    return {"step_times": [b[0] - a[0] for a, b in zip(marks[warmup - 1:], marks[warmup:])],
            "elapsed": end[0] - start[0], "tokens": end[1] - start[1], "sequences": end[2] - start[2]}


# ---------------------------------------------------------------------------------------------
# Models and data


def build_model(args) -> Path:
    """A random-init Llama of the requested size with the tiny default's tokenizer, saved once.
    ``args`` has hidden, intermediate, layers, heads, kv_heads, vocab and seq_len (bench.memory_check's
    flags)."""
    from filelock import FileLock
    from transformers import LlamaConfig, LlamaForCausalLM
    name = (f"memcheck-h{args.hidden}-i{args.intermediate}-l{args.layers}-a{args.heads}-kv{args.kv_heads}"
            f"-v{args.vocab}-bytes")  # -bytes: the embedded base's byte-level tokenizer
    out = cache_dir() / name
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if not (out / "DONE").exists():
            tok = build_tokenizer(RECIPE["max_position_embeddings"])
            config = LlamaConfig(
                vocab_size=max(args.vocab, len(tok)), hidden_size=args.hidden, intermediate_size=args.intermediate,
                num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                max_position_embeddings=max(4096, args.seq_len), tie_word_embeddings=False,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            torch.manual_seed(0)
            model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)  # bf16 on disk; loaded in model.dtype
            model.save_pretrained(out)
            tok.save_pretrained(out)
            (out / "DONE").write_text("random init, by bench.common.build_model\n")
    return out


def fixed_length_data(seq_len: int) -> Path:
    """Examples of exactly seq_len tokens: a 1-character prompt and a completion longer than that,
    truncated (the tokenizer is one token per character)."""
    path = cache_dir() / f"memcheck-data-s{seq_len}.jsonl"
    if not path.exists():
        rng = random.Random(0)
        rows = [{"prompt": "x", "completion": "".join(rng.choices(string.ascii_lowercase, k=seq_len + 8))}
                for _ in range(64)]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tmp.rename(path)
    return path


def write_synthetic_tasks(tokenizer, out_dir: Path, n_tasks: int, n_examples: int, seq_len: int,
                          seed: int = 0) -> list[str]:
    """Fixed-length tasks for long-sequence benchmarks: random lowercase words, a prompt of about
    seq_len/2 tokens and a completion long enough that ``truncation=truncate`` cuts every example
    to exactly ``seq_len`` tokens. Returns the task overrides; both stacks tokenise these files with
    mtl_scale's own pipeline, so they train on identical token ids."""
    rng = random.Random(seed)

    def words(n: int) -> str:
        return " ".join("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8)))
                        for _ in range(n))

    sample = words(400)
    tokens_per_word = len(tokenizer(sample, add_special_tokens=False, verbose=False)["input_ids"]) / 400
    prompt_words = max(1, round(seq_len / 2 / tokens_per_word))
    completion_words = math.ceil(seq_len / tokens_per_word * 1.5) + 8  # margin: word lengths vary
    tasks = []
    for t in range(n_tasks):
        path = out_dir / f"synthetic{t}.jsonl"
        with path.open("w") as f:
            for _ in range(n_examples):
                f.write(json.dumps({"prompt": words(prompt_words), "completion": " " + words(completion_words)}) + "\n")
        tasks.append(f"{{name: synthetic{t}, source: '{path}', eval_size: 0}}")
    return [f"tasks=[{', '.join(tasks)}]", "truncation=truncate"]


def write_realistic_tasks(tokenizer, out_dir: Path, n_examples: int, max_seq_len: int, gsm8k: Path = GSM8K,
                          seed: int = 0) -> list[str]:
    """Realistic lengths for the batching comparison: GSM8K (question -> worked answer, its real length
    distribution) plus two long-tailed instruction tasks whose lengths are log-normal (median ~max_seq_len/8,
    sigma 1: most short, a few filling max_seq_len), prompt ~1/3 of each. Returns the task overrides."""
    if not gsm8k.is_file():
        raise SystemExit(f"--data realistic needs GSM8K at {gsm8k} (../shared/data beside the checkout)")
    rng = random.Random(seed)
    rows = [json.loads(line) for line in gsm8k.read_text().splitlines()[:n_examples]]
    tasks = [f"{{name: gsm8k, source: '{gsm8k}', num_examples: {len(rows)}, eval_size: 0, "
             "columns: {prompt: question, completion: answer}}"]
    sample = " ".join("".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 8))) for _ in range(400))
    tokens_per_char = len(tokenizer(sample, add_special_tokens=False, verbose=False)["input_ids"]) / len(sample)

    def text(n_tokens: int) -> str:
        out = ""
        while len(out) * tokens_per_char < n_tokens:
            out += "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8))) + " "
        return out.strip()

    for t in range(2):
        path = out_dir / f"instruct{t}.jsonl"
        with path.open("w") as f:
            for _ in range(n_examples):
                n = max(8, min(max_seq_len, round(rng.lognormvariate(math.log(max_seq_len / 8), 1.0))))
                f.write(json.dumps({"prompt": text(n // 3), "completion": " " + text(n - n // 3)}) + "\n")
        tasks.append(f"{{name: instruct{t}, source: '{path}', eval_size: 0}}")
    return [f"tasks=[{', '.join(tasks)}]", "truncation=truncate"]
