"""Checkpoints and exact resume: a run killed mid-way and resumed ends with the same adapters as an
uninterrupted run; incomplete checkpoints are never picked; SIGTERM checkpoints and exits 0; a tampered
checkpoint is refused without running it; a new max_steps keeps the LR schedule."""
import json
import shutil
import signal
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from dist import ROOT, kill_all, launch, start_srun_style
from mtl_scale import checkpoint
from mtl_scale.config import load_config, to_dict
from mtl_scale.base_model import RECIPE_SHA256, model_name
from mtl_scale.errors import UserError
from mtl_scale.model import base_model_record
from mtl_scale.process_group import run_group
from mtl_scale.trainer import lr_lambda

ARGS = ["configs/demo.yaml", "micro_batch_size=4", "sampling.tasks_per_step=3", "eval.every_steps=0",
        "eval.max_examples=2", "sharing=hybrid", "surgery.method=pcgrad", "lr=5e-3", "sampling.strategy=temperature"] + \
       [f"tasks.{i}.{k}" for i in range(4) for k in ("num_examples=40", "eval_size=2")]


def _adapters(out):
    return {p.name: load_file(p / "adapter_model.safetensors") for p in sorted((out / "adapters").iterdir())}


# The adaptive controller updates at steps 2, 4 (with an evaluation), 6, 8, so the kill at step 5 falls between
# updates and the checkpoint at step 3 must carry its moving averages and weights; DWA reweights every step.
ADAPTIVE = ["sampling.strategy=adaptive", "sampling.adaptive.rule=progress", "sampling.adaptive.every_steps=2",
            "sampling.adaptive.eta=50",
            "loss.task_weighting=dwa", "loss.dwa.temperature=0.05", "eval.every_steps=4", "eval.max_new_tokens=2"]
# packed: the sampler's cursor counts micro-batches of a packed epoch (a shard of 19 examples is ~3 of them,
# so the 24 micro-batches of a task cross many epochs, and the checkpoint lands mid-epoch).
PACKED = ["batching.mode=packed", "batching.max_tokens=128", "batching.row_tokens=64"]


@pytest.mark.dist
@pytest.mark.parametrize("extra", [[], ADAPTIVE, PACKED], ids=["fixed", "adaptive", "packed"])
def test_killed_and_resumed_run_equals_uninterrupted(tmp_path, tiny_model_dir, extra):
    full, cut = tmp_path / "full", tmp_path / "cut"
    launch("tests/scripts/train_faults.py", [*ARGS, *extra, "max_steps=8", f"output_dir={full}"])
    killed = launch("tests/scripts/train_faults.py", [*ARGS, *extra, "max_steps=8", "checkpoint.every_steps=3",
                                                      f"output_dir={cut}"],
                    env={"FAULT_RANK": "1", "FAULT_DIE_STEP": "5"}, check=False, timeout=300)
    assert killed.returncode != 0 and not (cut / "adapters").exists()
    assert [p.name for p in (cut / "checkpoints").iterdir()] == ["step_00000003"]
    launch("tests/scripts/train_faults.py", [*ARGS, *extra, "max_steps=8", "checkpoint.every_steps=3",
                                             "resume=auto", f"output_dir={cut}"])
    a, b = _adapters(full), _adapters(cut)
    assert a.keys() == b.keys()
    for name in a:
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), f"{name} {key} differs after resume"
    # the resumed run's history is the uninterrupted one's: no duplicated or missing steps
    steps = [json.loads(line)["step"] for line in (cut / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))

    def column(out, key):
        return [json.loads(line)[key] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert column(cut, "loss") == column(full, "loss")
    assert column(cut, "tokens") == column(full, "tokens")  # the same examples after resume
    # the same draws from the same target probabilities, bit for bit, and (DWA) the same loss weights
    draws = [{k: v for k, v in json.loads(line).items() if k.startswith(("sampling_prob/", "micro_batches/",
                                                                         "draws/", "loss_weight/", "samples/"))}
             for out in (full, cut) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert draws[:8] == draws[8:]  # samples/: the examples counted so far, carried by the checkpoint
    if extra is ADAPTIVE:  # the controller did move the distribution, after the checkpoint too
        probs = [sorted((k, v) for k, v in d.items() if k.startswith("sampling_prob/")) for d in draws[:8]]
        # probs[i] drew step i + 1; the update after step 2 only records history (progress needs two points)
        assert all(probs[i] != probs[i + 1] for i in (3, 5))
    assert [p.name for p in (cut / "checkpoints").iterdir()] == ["step_00000003", "step_00000006"]
    # the run and its checkpoints record the base they trained: the embedded default's version and checksum
    record = {"path": "builtin:tiny-llama", "resolved": str(tiny_model_dir), "name": model_name(),
              "sha256": RECIPE_SHA256}
    assert json.loads((cut / "train_summary.json").read_text())["base_model"] == record
    assert json.loads((cut / "checkpoints" / "step_00000006" / "base_model.json").read_text()) == record


def test_incomplete_checkpoints_are_never_picked(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "step_00000004").mkdir(parents=True)
    (root / "step_00000004" / "COMPLETE").write_text("step 4\n")
    (root / "step_00000008.partial").mkdir()             # killed while writing
    (root / "step_00000012").mkdir()                     # no COMPLETE marker
    (root / "step_00000016.partial").mkdir()             # killed between the marker and the rename
    (root / "step_00000016.partial" / "COMPLETE").write_text("step 16\n")
    assert checkpoint.latest_complete(tmp_path) == root / "step_00000004"
    assert checkpoint.latest_complete(tmp_path / "elsewhere") is None


def test_resume_from_a_different_config_is_refused(tmp_path):
    cfg = load_config(ROOT / "configs/demo.yaml", [f"output_dir={tmp_path}"])
    ckpt = tmp_path / "checkpoints" / "step_00000002"
    ckpt.mkdir(parents=True)
    (ckpt / "COMPLETE").write_text("")
    (ckpt / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    ok = load_config(ROOT / "configs/demo.yaml", [f"output_dir={tmp_path}", "resume=auto", "max_steps=900"])
    assert checkpoint.resolve_resume(ok) == ckpt  # max_steps may change
    bad = load_config(ROOT / "configs/demo.yaml", [f"output_dir={tmp_path}", "resume=auto", "lr=0.1", "lora.r=4"])
    with pytest.raises(UserError, match="written by a different config; differing keys: lora, lr"):
        checkpoint.resolve_resume(bad)
    with pytest.raises(UserError, match="is not a complete mtl_scale checkpoint"):
        checkpoint.resolve_resume(load_config(ROOT / "configs/demo.yaml", [f"resume={tmp_path}"]))
    # a checkpoint of another version of the embedded base (one path, builtin:tiny-llama, for all of them)
    (ckpt / "base_model.json").write_text(json.dumps({"path": "builtin:tiny-llama", "name": "tiny-llama-v3",
                                                      "sha256": "0a3a1a0f468420741353819e59b02a09e80e5a64"}))
    with pytest.raises(UserError, match=r"was trained on tiny-llama-v3 \(sha256 0a3a1a0f4684\.\.\.\), but "
                                        rf"builtin:tiny-llama is now {model_name()}"):
        checkpoint.resolve_resume(ok)
    (ckpt / "base_model.json").write_text(json.dumps(base_model_record("builtin:tiny-llama", "")))
    assert checkpoint.resolve_resume(ok) == ckpt


@pytest.mark.dist
def test_sigterm_checkpoints_and_exits_zero(tmp_path, tiny_model_dir):
    """Pre-emption as SLURM does it: SIGTERM to every task (here: srun-style processes)."""
    out = tmp_path / "run"
    procs = start_srun_style(["--config", *ARGS, "max_steps=500", f"output_dir={out}"])
    try:
        deadline = time.time() + 180
        while not (out / "metrics.jsonl").is_file() or len((out / "metrics.jsonl").read_text().splitlines()) < 3:
            assert time.time() < deadline and all(p.poll() is None for p in procs), "run did not start"
            time.sleep(0.5)
        for p in procs:
            p.send_signal(signal.SIGTERM)
        outs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        kill_all(procs)
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    ckpt = checkpoint.latest_complete(out)
    assert ckpt is not None and 3 <= int(ckpt.name.split("_")[1]) < 500
    assert not (out / "adapters").exists()  # not finished: only the checkpoint


def _train_one_rank(args: list[str]) -> tuple[int, str]:
    """``python launch/train.py --config ...``: a world of one, cheaper than two ranks when a test needs only
    a real DeepSpeed checkpoint. Returns the exit status and the output."""
    res = run_group([sys.executable, "launch/train.py", "--config", *args], timeout=300, cwd=ROOT)
    return res.returncode, res.stdout


def _lrs(out) -> dict[int, float]:
    return {r["step"]: r["lr"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory, tiny_model_dir):
    """An uninterrupted one-rank run of 6 steps (cosine decay from step 1) with checkpoints after steps 1-5."""
    out = tmp_path_factory.mktemp("six") / "run"
    rc, log = _train_one_rank([*ARGS, "max_steps=6", "warmup_steps=1", "checkpoint.every_steps=1",
                               "checkpoint.keep_last=5", f"output_dir={out}"])
    assert rc == 0, log[-5000:]
    return out


class _CreatesMarker:
    """Unpickling this calls open(path, "w"): what a tampered checkpoint could run instead."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def _tamper(pt_file, marker):
    sd = torch.load(pt_file, weights_only=False)  # trusted: the fixture's run just wrote it
    sd["extra"] = _CreatesMarker(marker)  # a key DeepSpeed ignores: a full load would go on unnoticed
    torch.save(sd, pt_file)


@pytest.mark.dist
@pytest.mark.parametrize("engine_file", ["zero_pp_rank_0_mp_rank_00_model_states.pt",
                                         "zero_pp_rank_0_mp_rank_00_optim_states.pt"])
def test_tampered_checkpoint_is_refused_without_running_it(six_steps, tmp_path, engine_file):
    ckpt = tmp_path / "step_00000004"
    shutil.copytree(six_steps / "checkpoints" / ckpt.name, ckpt)
    marker = tmp_path / "pwned"
    _tamper(ckpt / "engine" / engine_file, marker)
    rc, log = _train_one_rank([*ARGS, "max_steps=6", "warmup_steps=1", f"resume={ckpt}",
                               f"output_dir={tmp_path / 'run'}"])
    assert not marker.exists(), "resume ran code pickled in the checkpoint"
    assert rc == 2, log[-5000:]
    assert (f"mtl_scale: error: resume: refused to load {ckpt / 'engine' / engine_file}: Unsupported global: "
            "GLOBAL io.open was not an allowed global by default.") in log, log[-5000:]
    assert "can run arbitrary code" in log and "Traceback" not in log, log[-5000:]


def test_weights_only_load_refuses_pickled_code_and_allows_deepspeeds_classes(tmp_path):
    """What resume loads every file with (the per-rank trainer state too)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    good = {"loss_scaler": DynamicLossScaler(2.0 ** 16, 1000, 1, 2, False), "zero_stage": ZeroStageEnum.gradients,
            "slices": {"w": fragment_address(numel=4, start=8)}, "step": torch.tensor(3)}
    torch.save(good, tmp_path / "good.pt")
    back = checkpoint.load_weights_only(tmp_path / "good.pt")
    assert back["loss_scaler"].cur_scale == 2.0 ** 16 and back["zero_stage"] is ZeroStageEnum.gradients
    assert back["slices"]["w"] == fragment_address(numel=4, start=8)
    marker = tmp_path / "pwned"
    torch.save({"step": 3, "sampler": _CreatesMarker(marker)}, tmp_path / "trainer_rank0.pt")
    with pytest.raises(UserError, match=r"refused to load .*trainer_rank0.pt: Unsupported global: GLOBAL io.open"):
        checkpoint.load_weights_only(tmp_path / "trainer_rank0.pt")
    assert not marker.exists()


def test_lr_schedule_horizon_survives_a_new_max_steps():
    """The schedule's horizon is in LambdaLR's state_dict: loaded into a run with another max_steps, the LR
    follows the original curve and then stays at its 10% floor."""
    def scheduler(max_steps):
        cfg = load_config(ROOT / "configs/demo.yaml", [f"max_steps={max_steps}", "warmup_steps=2", "lr=1.0"])
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))

    def lrs(opt, sched, n):
        out = []
        for _ in range(n):
            opt.step()
            sched.step()
            out.append(sched.get_last_lr()[0])
        return out

    opt, original = scheduler(10)
    first = lrs(opt, original, 4)
    state = original.state_dict()
    rest = lrs(opt, original, 6)
    assert rest[-1] == pytest.approx(0.1)
    opt2, longer = scheduler(20)
    longer.load_state_dict(state)
    assert lrs(opt2, longer, 10) == rest + [rest[-1]] * 4
    assert first[0] < first[1] and first[-1] > rest[0]  # warmed up, then decaying


@pytest.mark.dist
def test_resume_with_a_new_max_steps_keeps_the_lr_schedule(six_steps, tmp_path):
    out = tmp_path / "longer"
    rc, log = _train_one_rank([*ARGS, "max_steps=9", "warmup_steps=1", "checkpoint.every_steps=0",
                               f"resume={six_steps / 'checkpoints' / 'step_00000003'}", f"output_dir={out}"])
    assert rc == 0, log[-5000:]
    full, resumed = _lrs(six_steps), _lrs(out)
    assert sorted(resumed) == list(range(4, 10))
    # steps 4-6: exactly the uninterrupted run's LRs; after its horizon, its final (floor) LR
    assert [resumed[s] for s in (4, 5, 6)] == [full[s] for s in (4, 5, 6)]
    assert [resumed[s] for s in (7, 8, 9)] == [full[6]] * 3 and full[6] == pytest.approx(0.1 * 5e-3)
    assert full[1] > full[3] > full[5]  # the test runs on a decaying part of the curve
    assert ("resume: max_steps is now 9, but the cosine LR schedule keeps the horizon it started with "
            "(max_steps=6): the LR stays at its 10% floor after step 6") in log
