"""How the losses of a step's micro-batches are weighted: the normalisation contract.

A step runs gas = gradient_accumulation_steps micro-batches on each of ``world`` ranks; micro-batch
(r, m) of task t has summed completion-token NLL ``S_rm`` over ``T_rm`` tokens. DeepSpeed divides the
loss passed to ``backward`` by gas and ZeRO averages gradients over ranks, so the step's gradient is
the gradient of  (1 / (world * gas)) * sum_rm  loss_rm.  We pass  loss_rm = S_rm * scale[t]  with
scale chosen so that this equals the objective of the mode:

- ``token``:  L = sum_rm S_rm / T           (T = completion tokens of the whole step, all ranks):
  every completion token weighs the same; a task's weight is its share of the step's tokens.
  scale = world * gas / T.
- ``task``:   L = (1 / K) * sum_t S_t / T_t  (S_t, T_t summed over task t's micro-batches on all
  ranks, K = tasks in the step): each task's loss is its own token mean, tasks weigh equally
  (MFTCoder's balanced mode). scale[t] = world * gas / (K * T_t).
- ``manual``: L = sum_t w_t * S_t / T_t with w normalised over the step's tasks.
  scale[t] = world * gas * w_t / (sum_{t' in step} w_t' * T_t).
- ``dwa``:    the ``manual`` objective with weights that change from step to step (Dynamic Weight
  Average, mtl_scale/balancing.py: w_k = K * softmax(r_k / T) from all-reduced losses, so the same on
  every rank); the weights are fixed before the step's first backward, so the contract stays exact.

T and T_t need one all-reduce of K token counts per step, made before the first backward (all of
a step's micro-batches are assembled up front). Tested against a direct computation of L in
tests/test_loss_weighting.py and end to end in tests/test_equivalence.py.
"""
from __future__ import annotations

MODES = ("token", "task", "manual", "dwa")


def loss_scales(mode: str, task_tokens: dict[str, int], world: int, gas: int,
                weights: dict[str, float] | None = None) -> dict[str, float]:
    """Per-task factor that turns a micro-batch's summed NLL into the loss passed to ``backward``.

    ``task_tokens``: completion tokens per task in this step, summed over all ranks (tasks not in
    the step are absent). ``weights``: per-task weights for ``manual`` and ``dwa``.
    """
    if mode == "token":
        total = sum(task_tokens.values())
        return {t: world * gas / total for t in task_tokens}
    if mode == "task":
        k = len(task_tokens)
        return {t: world * gas / (k * n) for t, n in task_tokens.items()}
    if mode in ("manual", "dwa"):
        w = {t: float(weights[t]) for t in task_tokens}
        z = sum(w.values())
        if z == 0:  # every task in this step has weight 0: nothing to learn from it
            return {t: 0.0 for t in task_tokens}
        return {t: world * gas * w[t] / (z * n) for t, n in task_tokens.items()}
    raise ValueError(f"unknown loss weighting {mode!r}; choose one of {MODES}")
