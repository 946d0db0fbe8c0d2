"""Adaptive balancing (mtl_scale/balancing.py): every update rule, the floor, DWA and the controller
against hand-computed values; its state survives a checkpoint round trip; references are read from
eval.json files and run directories with errors that name the file and the task."""
import logging
import json
import math

import pytest
import torch

from mtl_scale.balancing import (RULES, Balancer, BalancerConfig, Signals, dwa_weights, gap_rule, initial_state,
                                 mix_floor, progress_rule, reference_losses)
from mtl_scale.config import ConfigError, load_config
from mtl_scale.errors import UserError
from mtl_scale.trainer import make_balancer


def _state(prior, prev_train=None, prev_eval=None):
    return {**initial_state(prior), "prev_train": prev_train or {}, "prev_eval": prev_eval or {}}


def test_progress_rule_rewards_falling_losses():
    # a fell from 2.0 to 1.0 (delta 0.5), b stayed flat (delta 0): w ∝ (0.5 e^0.5, 0.5)
    state, w = progress_rule(_state({"a": 0.5, "b": 0.5}, prev_train={"a": 2.0, "b": 1.0}),
                             Signals(train={"a": 1.0, "b": 1.0}), eta=1.0)
    e = math.exp(0.5)
    assert w == pytest.approx({"a": e / (1 + e), "b": 1 / (1 + e)}, rel=1e-12)
    assert state["prev_train"] == {"a": 1.0, "b": 1.0}
    # a rising loss loses weight: c rose 1.0 -> 1.5 (delta -0.5), d fell 1.0 -> 0.5 (delta 0.5), eta 2
    _, w = progress_rule(_state({"c": 0.25, "d": 0.75}, prev_train={"c": 1.0, "d": 1.0}),
                         Signals(train={"c": 1.5, "d": 0.5}), eta=2.0)
    z = 0.25 * math.exp(-1) + 0.75 * math.exp(1)
    assert w == pytest.approx({"c": 0.25 * math.exp(-1) / z, "d": 0.75 * math.e / z}, rel=1e-12)


def test_progress_rule_follows_the_latest_progress_only():
    # after a falls (gains weight), a flat period brings the distribution back to the prior
    state, w1 = progress_rule(_state({"a": 0.5, "b": 0.5}, prev_train={"a": 2.0, "b": 1.0}),
                              Signals(train={"a": 1.0, "b": 1.0}), eta=1.0)
    assert w1["a"] > 0.6
    state, w2 = progress_rule(state, Signals(train={"a": 1.0, "b": 1.0}), eta=1.0)
    assert w2 == pytest.approx({"a": 0.5, "b": 0.5}, rel=1e-12)
    # the same progress twice gives the same weights, not twice the shift
    _, w3 = progress_rule(state, Signals(train={"a": 0.5, "b": 1.0}), eta=1.0)
    assert w3 == pytest.approx(w1, rel=1e-12)


def test_progress_rule_compares_held_out_with_held_out():
    # a: held-out now and before -> 4.0 -> 3.0 = 0.25; b: held-out now only -> its train EMA 2.0 -> 1.0 = 0.5;
    # c: no earlier value of either -> 0
    prior = {"a": 0.2, "b": 0.3, "c": 0.5}
    state, w = progress_rule(_state(prior, prev_train={"a": 9.0, "b": 2.0}, prev_eval={"a": 4.0}),
                             Signals(train={"a": 1.0, "b": 1.0, "c": 7.0}, eval={"a": 3.0, "b": 5.0, "c": 6.0}),
                             eta=4.0)
    raw = {"a": 0.2 * math.exp(1.0), "b": 0.3 * math.exp(2.0), "c": 0.5}
    z = sum(raw.values())
    assert w == pytest.approx({t: v / z for t, v in raw.items()}, rel=1e-12)
    assert state["prev_eval"] == {"a": 3.0, "b": 5.0, "c": 6.0}
    assert state["prev_train"] == {"a": 1.0, "b": 1.0, "c": 7.0}


def test_gap_rule_rewards_distance_to_reference():
    # a is 0.5 above its reference, b below its own (delta 0); eta 2: w ∝ (0.5 e^1, 0.5)
    state, w = gap_rule(initial_state({"a": 0.5, "b": 0.5}),
                        Signals(train={"a": 1.5, "b": 0.8}, reference={"a": 1.0, "b": 1.0}), eta=2.0)
    assert w == pytest.approx({"a": math.e / (1 + math.e), "b": 1 / (1 + math.e)}, rel=1e-12)
    # held-out loss replaces the train EMA when there is one: a at 1.0 is at its reference, b 0.25 above
    _, w = gap_rule(state, Signals(train={"a": 1.5, "b": 0.8}, eval={"a": 1.0, "b": 1.25},
                                   reference={"a": 1.0, "b": 1.0}), eta=2.0)
    raw = {"a": math.e, "b": math.exp(0.5)}
    assert w == pytest.approx({t: v / sum(raw.values()) for t, v in raw.items()}, rel=1e-12)
    assert set(RULES) == {"progress", "gap"}


def test_floor_mixes_in_uniform():
    assert mix_floor({"a": 0.8, "b": 0.2}, 0.5) == pytest.approx({"a": 0.65, "b": 0.35})
    assert mix_floor({"a": 1.0, "b": 0.0, "c": 0.0}, 0.3) == pytest.approx({"a": 0.8, "b": 0.1, "c": 0.1})


def test_dwa_weights():
    # r = (0.9, 1.0), T = 2: w = 2 softmax(0.45, 0.5)
    w = dwa_weights(["a", "b"], {"a": 0.9, "b": 1.0}, {"a": 1.0, "b": 1.0}, temperature=2.0)
    z = math.exp(0.45) + math.exp(0.5)
    assert w == pytest.approx({"a": 2 * math.exp(0.45) / z, "b": 2 * math.exp(0.5) / z}, rel=1e-12)
    # no history yet: r = 1 for all, every weight 1
    assert dwa_weights(["a", "b", "c"], {"a": 2.0}, {}, 2.0) == pytest.approx({"a": 1.0, "b": 1.0, "c": 1.0})


def _balancer(**kw):
    cfg = BalancerConfig(rule="progress", eta=2.0, floor=0.2, every_steps=2, ema_decay=0.5, **kw)
    return Balancer(["a", "b"], {"a": 0.75, "b": 0.25}, cfg)


def test_balancer_sequence_by_hand():
    b = _balancer()
    assert b.probs == pytest.approx({"a": 0.8 * 0.75 + 0.1, "b": 0.8 * 0.25 + 0.1})  # prior + floor
    b.observe_step({"a": 2.0})
    assert not b.update(1)                                    # not due: every 2 steps, no eval
    b.observe_step({"a": 1.0, "b": 4.0})                      # EMA a = 0.5 * 2 + 0.5 * 1 = 1.5, b = 4
    assert b.update(2)                                        # no history yet: p unchanged
    assert b.probs == pytest.approx({"a": 0.7, "b": 0.3})
    b.observe_step({"b": 2.0, "a": float("nan")})             # EMA b = 3; a NaN (skipped step) is left out
    assert b.state["train_ema"] == {"a": 1.5, "b": 3.0}
    assert b.update(3, {"a": 1.2})                            # due: an evaluation ran
    # a: held-out but no earlier held-out -> train EMA 1.5 -> 1.5, delta 0; b: 4 -> 3, delta 0.25
    raw = {"a": 0.75, "b": 0.25 * math.exp(2.0 * 0.25)}
    w = {t: v / sum(raw.values()) for t, v in raw.items()}
    assert b.probs == pytest.approx({t: 0.8 * v + 0.1 for t, v in w.items()}, rel=1e-12)
    assert b.loss_weights() is None


def test_balancer_dwa_uses_the_last_two_averages():
    b = Balancer(["a", "b"], {"a": 0.5, "b": 0.5}, BalancerConfig(dwa_temperature=1.0, dwa_ema_decay=0.5))
    b.observe_step({"a": 2.0, "b": 1.0})
    b.observe_step({"a": 1.0})                                # a: 2 -> 1.5 (r 0.75), b: no change (r 1)
    z = math.exp(0.75) + math.e
    assert b.loss_weights() == pytest.approx({"a": 2 * math.exp(0.75) / z, "b": 2 * math.e / z}, rel=1e-12)
    assert not b.update(10) and b.probs == {"a": 0.5, "b": 0.5}  # no sampling rule: a fixed distribution


def test_balancer_state_survives_a_checkpoint(tmp_path):
    def drive(b, steps):
        out = []
        for s in steps:
            b.observe_step({"a": 3.0 / s, "b": 1.0 + 0.01 * s})
            b.update(s, {"a": 2.0 / s, "b": 1.5} if s % 3 == 0 else None)
            out.append((dict(b.probs), b.loss_weights()))
        return out
    kw = {"dwa_temperature": 2.0}
    full = drive(_balancer(**kw), range(1, 13))
    first = _balancer(**kw)
    got = drive(first, range(1, 7))
    torch.save(first.state_dict(), tmp_path / "trainer_rank0.pt")
    resumed = _balancer(**kw)
    resumed.load_state_dict(torch.load(tmp_path / "trainer_rank0.pt", weights_only=True))
    got += drive(resumed, range(7, 13))
    assert got == full  # exactly: same floats in the same order
    assert full[-1][0]["a"] > 0.7  # a's loss kept falling faster: it gained draws


def test_reference_from_eval_json_and_run_dirs(tmp_path):
    ev = {"adapters": {"shared": {"a": {"loss": 0.5, "exact_match": 1.0}}, "b": {"b": {"loss": 0.7}}}}
    (tmp_path / "eval.json").write_text(json.dumps(ev))
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 10, "eval/loss/c": 2.0}) + "\n" +
                                       json.dumps({"step": 20, "loss/c": 1.0, "eval/loss/c": 1.25}) + "\n")
    assert reference_losses([str(tmp_path / "eval.json"), str(run)], ["a", "b", "c"]) == {"a": 0.5, "b": 0.7, "c": 1.25}
    # task=loss items, first item wins: a given number before the files, the files for the rest
    assert reference_losses(["b=0.25", "c=1e-1", str(tmp_path / "eval.json")], ["a", "b", "c"]) == \
        {"a": 0.5, "b": 0.25, "c": 0.1}
    with pytest.raises(UserError, match=r"'add=low' is not task=loss"):
        reference_losses(["add=low"], ["add"])
    with pytest.raises(UserError, match=r"'add=-1': a reference loss is a number >= 0"):
        reference_losses(["add=-1"], ["add"])
    with pytest.raises(UserError, match=r"no reference loss for task 'c' in .*eval.json \(tasks without one: c\)"):
        reference_losses([str(tmp_path / "eval.json")], ["a", "c"])
    with pytest.raises(UserError, match=r"is a directory without metrics.jsonl"):
        reference_losses([str(tmp_path)], ["a"])
    with pytest.raises(UserError, match=r"sampling.reference: .*nope.json does not exist"):
        reference_losses([str(tmp_path / "nope.json")], ["a"])
    (tmp_path / "other.json").write_text(json.dumps({"a": 1}))
    with pytest.raises(UserError, match=r"other.json is not an eval.json written by launch/evaluate.py"):
        reference_losses([str(tmp_path / "other.json")], ["a"])


@pytest.mark.parametrize("override, message", [
    (["sampling.adaptive.rule=bandit"], "sampling.adaptive.rule='bandit' is not allowed; choose one of: progress, gap"),
    (["sampling.adaptive.rule=gap"], "sampling.adaptive.rule=gap needs sampling.reference"),
    (["sampling.adaptive.floor=1.5"], "sampling.adaptive.floor must be in [0, 1], got 1.5"),
    (["sampling.adaptive.ema_decay=1"], "sampling.adaptive.ema_decay must be in [0, 1), got 1.0"),
    (["sampling.adaptive.every_steps=0"], "sampling.adaptive.every_steps must be > 0"),
    (["loss.dwa.temperature=0"], "loss.dwa.temperature must be > 0"),
])
def test_adaptive_config_errors(override, message, caplog, monkeypatch):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load_config("configs/demo.yaml", ["sampling.strategy=adaptive", "sampling.reference=[]", *override])
    # references another strategy does not read are ignored with a warning (a layered config may carry them)
    cfg = load_config("configs/demo.yaml", ["sampling.strategy=temperature"])
    with caplog.at_level(logging.WARNING, logger="mtl_scale.trainer"):
        assert make_balancer(cfg, {"copy": 1, "reverse": 1, "sort": 1, "add": 1}) is None
    assert "sampling.reference is ignored: only sampling.strategy=adaptive with sampling.adaptive.rule=gap" in caplog.text
    caplog.clear()
    monkeypatch.setenv("RANK", "1")  # the other ranks stay quiet: one warning per run, not per rank
    with caplog.at_level(logging.WARNING, logger="mtl_scale.trainer"):
        assert make_balancer(cfg, {"copy": 1, "reverse": 1, "sort": 1, "add": 1}) is None
    assert "sampling.reference is ignored" not in caplog.text
    cfg = load_config("configs/demo.yaml", ["sampling.strategy=adaptive", "sampling.adaptive.rule=gap",
                                            "sampling.reference=runs/x", "loss.task_weighting=dwa"])
    assert cfg.sampling.reference == ["runs/x"] and cfg.sampling.adaptive.eta is None
