"""Adaptive task balancing: a sampling distribution and loss weights that follow per-task signals.

The maths is pure functions of plain numbers:

    rule(state, signals, eta) -> (state, weights)        # RULES: progress, gap
    mix_floor(weights, floor) -> probabilities            # (1 - floor) * w + floor / K
    dwa_weights(ema, ema_prev, temperature) -> loss weights

A rule sets log-weights from a per-task delta, w_k ∝ base_k * exp(eta * delta_k): ``gap`` accumulates
(base = its previous weights, Sheared-LLaMA's dynamic batch loading, DoReMi's exponentiated update), so a
gap that persists keeps pulling; ``progress`` does not (base = the prior), because accumulated progress
is the whole loss drop so far, and a task that fell early would keep its draws after it went flat. Adding
a rule (a CoBa-like slope, a bandit) is one function of the same signature and one entry in RULES.

``Balancer`` holds the state between steps (K numbers per signal) and is saved in checkpoints. Every
signal it sees is all-reduced (the step's per-task loss sums and token counts, the evaluation's sums), so
every rank computes the same floats in the same order and hence the same probabilities; the schedule RNG
stays seeded by (seed, step) (sampling.step_plan), so draws are a function of (seed, step, probabilities).
This module imports nothing of mtl_scale but its error type.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from mtl_scale.errors import UserError

# Each rule's step size when sampling.adaptive.eta is not given. progress: deltas are relative decreases
# per update (~0.3 early, ~0.01 late); on the demo, add's share went 0.27 -> 0.54 at step 21 while its loss
# fell fastest and back to its prior 0.27 when every task was flat. gap: deltas are nats above the reference.
DEFAULT_ETA = {"progress": 5.0, "gap": 1.0}


@dataclass(frozen=True)
class Signals:
    """Per-task numbers one update sees. Tasks without a value (not drawn yet) are absent."""
    train: dict[str, float]
    """Exponential moving average of each task's train loss (token mean of its micro-batches, all ranks)."""
    eval: dict[str, float] | None = None
    """Held-out loss, when an evaluation ran at this update."""
    reference: dict[str, float] = field(default_factory=dict)
    """Per-task reference loss (the gap rule's target)."""


def normalise_log(log_w: dict[str, float]) -> dict[str, float]:
    """Shift log-weights so that their exponentials sum to 1 (log-sum-exp, stable for large values)."""
    top = max(log_w.values())
    z = top + math.log(sum(math.exp(v - top) for v in log_w.values()))
    return {t: v - z for t, v in log_w.items()}


def multiplicative_update(log_w: dict[str, float], delta: dict[str, float], eta: float) -> dict[str, float]:
    """w_k <- w_k * exp(eta * delta_k), renormalised; in log space."""
    return normalise_log({t: v + eta * delta.get(t, 0.0) for t, v in log_w.items()})


def relative_decrease(before: float, now: float) -> float:
    """(before - now) / before: 0.1 means the loss fell by 10%; negative when it rose."""
    return (before - now) / before if before > 0 else 0.0


def progress_rule(state: dict, signals: Signals, eta: float) -> tuple[dict, dict[str, float]]:
    """Tasks whose loss is still falling gain weight; flat or rising ones lose it: w_k ∝ prior_k * exp(eta * delta_k).

    delta_k is the relative decrease of task k's loss since the previous update: of the held-out loss when
    this update and an earlier one both have an evaluation of k, else of the train-loss EMA. Like is
    compared with like, because held-out and train losses differ by the generalisation gap. A task with
    no earlier value of either gets delta 0. The weights follow the latest progress only (they restart
    from the prior at every update): when every task is flat the distribution returns to the prior.
    """
    ev = signals.eval or {}
    delta = {}
    for t in state["log_w"]:
        if t in ev and t in state["prev_eval"]:
            delta[t] = relative_decrease(state["prev_eval"][t], ev[t])
        elif t in signals.train and t in state["prev_train"]:
            delta[t] = relative_decrease(state["prev_train"][t], signals.train[t])
    log_w = multiplicative_update(state["log_prior"], delta, eta)
    new = {**state, "log_w": log_w, "prev_train": {**state["prev_train"], **signals.train},
           "prev_eval": {**state["prev_eval"], **ev}}
    return new, {t: math.exp(v) for t, v in log_w.items()}


def gap_rule(state: dict, signals: Signals, eta: float) -> tuple[dict, dict[str, float]]:
    """Tasks further above their reference loss gain weight: delta_k = max(loss_k - ref_k, 0).

    loss_k is the held-out loss when this update has an evaluation, else the train-loss EMA (which runs
    below the held-out loss by the generalisation gap: between evaluations the gap rule is optimistic).
    A task that reached its reference, or has no loss yet, gets delta 0 and loses weight relative to others.
    """
    loss = {**signals.train, **(signals.eval or {})}
    delta = {t: max(loss[t] - signals.reference[t], 0.0) for t in state["log_w"] if t in loss}
    log_w = multiplicative_update(state["log_w"], delta, eta)
    return {**state, "log_w": log_w}, {t: math.exp(v) for t, v in log_w.items()}


Rule = Callable[[dict, Signals, float], tuple[dict, dict[str, float]]]
RULES: dict[str, Rule] = {"progress": progress_rule, "gap": gap_rule}


def initial_state(prior: dict[str, float]) -> dict:
    """A rule's state before any signal: log-weights at the prior, no history."""
    log_prior = normalise_log({t: math.log(max(p, 1e-300)) for t, p in prior.items()})
    return {"log_prior": log_prior, "log_w": dict(log_prior), "prev_train": {}, "prev_eval": {}}


def mix_floor(weights: dict[str, float], floor: float) -> dict[str, float]:
    """p_k = (1 - floor) * w_k + floor / K: every task keeps at least floor / K of the draws, so a task the
    rule has written off (saturated, at its reference) is still rehearsed and cannot be forgotten."""
    k = len(weights)
    return {t: (1 - floor) * w + floor / k for t, w in weights.items()}


def ema(prev: float | None, value: float, decay: float) -> float:
    """decay * prev + (1 - decay) * value; the first value starts the average."""
    return value if prev is None else decay * prev + (1 - decay) * value


def dwa_weights(tasks: list[str], ema_now: dict[str, float], ema_prev: dict[str, float],
                temperature: float) -> dict[str, float]:
    """Dynamic Weight Average (Liu et al. 2019): w_k = K * softmax(r_k / T), r_k = L_k(t-1) / L_k(t-2).

    L_k is task k's train-loss EMA after the previous step (t-1) and the one before (t-2); a task lacking
    either value has r_k = 1. A task whose loss fell less (r near or above 1) gets more weight. sum w = K.
    """
    r = {t: ema_now[t] / ema_prev[t] if t in ema_now and t in ema_prev and ema_prev[t] > 0 else 1.0
         for t in tasks}
    top = max(r.values()) / temperature
    e = {t: math.exp(v / temperature - top) for t, v in r.items()}
    z = sum(e.values())
    return {t: len(tasks) * v / z for t, v in e.items()}


@dataclass
class BalancerConfig:
    """What the Balancer needs from the run config (plain numbers; see config.AdaptiveConfig, DwaConfig)."""
    rule: str | None = None
    """Sampling rule (RULES), or None for a fixed distribution."""
    eta: float = 1.0
    floor: float = 0.1
    every_steps: int = 10
    ema_decay: float = 0.9
    reference: dict[str, float] = field(default_factory=dict)
    dwa_temperature: float | None = None
    """DWA loss weighting's T, or None without it."""
    dwa_ema_decay: float = 0.9


class Balancer:
    """The controller: per-task signals in, sampling probabilities and loss weights out; resumable.

        b = Balancer(tasks, prior, cfg)
        b.observe_step(losses)            # after every step: this step's per-task train loss, all ranks
        b.update(step, eval_losses)       # after step `step`; updates p every cfg.every_steps or at an eval
        b.probs, b.loss_weights()
    """

    def __init__(self, tasks: list[str], prior: dict[str, float], cfg: BalancerConfig):
        self.tasks, self.cfg = list(tasks), cfg
        # Everything the next probabilities depend on, references included (so a resumed run does not re-read
        # files that may have changed since).
        self.state = {"rule": initial_state(prior), "reference": dict(cfg.reference), "train_ema": {},
                      "dwa_ema": {}, "dwa_ema_prev": {}, "updates": 0}
        self.probs = mix_floor({t: math.exp(v) for t, v in self.state["rule"]["log_w"].items()}, cfg.floor) \
            if cfg.rule else dict(prior)

    def observe_step(self, losses: dict[str, float]) -> None:
        """Fold one step's per-task train losses into the EMAs. Non-finite losses (a skipped step) are left
        out: one NaN would otherwise poison the average for the rest of the run."""
        st = self.state
        st["dwa_ema_prev"] = dict(st["dwa_ema"])
        for t, x in losses.items():
            if math.isfinite(x):
                st["train_ema"][t] = ema(st["train_ema"].get(t), x, self.cfg.ema_decay)
                st["dwa_ema"][t] = ema(st["dwa_ema"].get(t), x, self.cfg.dwa_ema_decay)

    def due(self, step: int, evaluated: bool) -> bool:
        return self.cfg.rule is not None and (step % self.cfg.every_steps == 0 or evaluated)

    def update(self, step: int, eval_losses: dict[str, float] | None = None) -> bool:
        """After optimizer step ``step`` (1-based): a rule update when due. Returns whether p changed."""
        if not self.due(step, bool(eval_losses)):
            return False
        ev = {t: x for t, x in (eval_losses or {}).items() if math.isfinite(x)} or None
        signals = Signals(dict(self.state["train_ema"]), ev, self.state["reference"])
        self.state["rule"], weights = RULES[self.cfg.rule](self.state["rule"], signals, self.cfg.eta)
        self.state["updates"] += 1
        self.probs = mix_floor(weights, self.cfg.floor)
        return True

    def loss_weights(self) -> dict[str, float] | None:
        """DWA's per-task loss weights for the next step, or None without dynamic loss weighting."""
        if self.cfg.dwa_temperature is None:
            return None
        return dwa_weights(self.tasks, self.state["dwa_ema"], self.state["dwa_ema_prev"], self.cfg.dwa_temperature)

    def state_dict(self) -> dict:
        return {"state": self.state, "probs": dict(self.probs)}  # plain floats: loads with weights_only=True

    def load_state_dict(self, saved: dict) -> None:
        self.state, self.probs = saved["state"], dict(saved["probs"])


def reference_losses(paths: list[str], tasks: list[str]) -> dict[str, float]:
    """Each task's reference loss for the gap rule, from eval.json files (launch/evaluate.py: the loss of the
    adapter evaluated on the task), run directories (the last ``eval/loss/<task>`` in metrics.jsonl), or
    ``task=loss`` items (a number measured once and written into the config, as configs/demo.yaml does).
    The first item that has a task gives its reference; a task none has is an error."""
    found: dict[str, float] = {}
    for path in paths:
        given = _given_reference(path)
        for t, loss in (given if given is not None else _read_reference(Path(path))).items():
            if t in tasks:
                found.setdefault(t, loss)
    missing = [t for t in tasks if t not in found]
    if missing:
        raise UserError(f"sampling.reference: no reference loss for task {missing[0]!r} in {', '.join(paths)} "
                        f"(tasks without one: {', '.join(missing)}); give an eval.json or run directory that "
                        "evaluated every task")
    return found


def _given_reference(item: str) -> dict[str, float] | None:
    """``task=loss`` -> {task: loss}; None for anything else (a path)."""
    task, sep, value = item.partition("=")
    if not sep or "/" in task or not task:
        return None
    try:
        loss = float(value)
    except ValueError:
        raise UserError(f"sampling.reference: {item!r} is not task=loss (a number after '='), an eval.json "
                        "or a run directory") from None
    if not loss >= 0:  # also refuses nan
        raise UserError(f"sampling.reference: {item!r}: a reference loss is a number >= 0")
    return {task: loss}


def _read_reference(path: Path) -> dict[str, float]:
    import json

    if path.is_dir():
        metrics = path / "metrics.jsonl"
        if not metrics.is_file():
            raise UserError(f"sampling.reference: {path} is a directory without metrics.jsonl; give a run "
                            "directory or an eval.json written by launch/evaluate.py")
        out = {}
        for lineno, line in enumerate(metrics.read_text().splitlines(), 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"sampling.reference: {metrics}:{lineno} is not valid JSON") from None
            out.update({k[len("eval/loss/"):]: v for k, v in record.items()
                        if k.startswith("eval/loss/") and isinstance(v, (int, float))})
        return out
    if not path.is_file():
        raise UserError(f"sampling.reference: {path} does not exist")
    try:
        results = json.loads(path.read_text())
        out: dict[str, float] = {}
        for per_task in results["adapters"].values():  # each task is evaluated with one adapter (or combo)
            for t, r in per_task.items():
                out.setdefault(t, float(r["loss"]))
        return out
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError) as e:
        raise UserError(f"sampling.reference: {path} is not an eval.json written by launch/evaluate.py "
                        f"(expected adapters -> task -> loss): {type(e).__name__}: {e}") from None
