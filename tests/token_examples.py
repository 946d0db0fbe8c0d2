"""Random (input_ids, labels) pairs for the batching, attention and kernel tests."""
import torch

from mtl_scale.data.formatting import IGNORE


def token_examples(lengths, seed=0, prompt=3):
    """One pair per length: ``prompt`` unlabelled tokens, then labelled ones (ids 5..249, any vocabulary)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(5, 250, (n,), generator=g).tolist()
        out.append((ids, [IGNORE] * min(prompt, n) + ids[prompt:]))
    return out
