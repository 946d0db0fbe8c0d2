import json
import re
from pathlib import Path

import pytest

from mtl_scale.config import ConfigError, RunConfig, load_config, valid_keys
from mtl_scale.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted((ROOT / "configs").glob("*.yaml")) + sorted((ROOT / "bench" / "configs").glob("*.yaml"))


def test_there_are_shipped_configs():
    assert len(SHIPPED) >= 3


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig) and cfg.tasks


def test_public_keys_exist():
    keys = set(valid_keys())
    for k in ["model.path", "model.dtype", "sharing", "lora.r", "lora.alpha", "lora.dropout", "lora.target_modules",
              "tasks", "max_steps", "micro_batch_size", "max_seq_len", "lr", "seed", "output_dir", "deepspeed_config"]:
        assert k in keys


def test_dotted_overrides(tmp_path):
    cfg = load_config(ROOT / "configs/demo.yaml",
                      ["lora.r=4", "sharing=hard", "lr=1e-3", "sampling.strategy=temperature", "sampling.temperature=2",
                       "lora.target_modules=[q_proj, v_proj]", "tasks.1.eval_size=7", "model.gradient_checkpointing=true"])
    assert cfg.lora.r == 4 and cfg.sharing == "hard" and cfg.lr == 1e-3
    assert cfg.sampling.strategy == "temperature" and cfg.sampling.temperature == 2.0
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.tasks[1].eval_size == 7 and cfg.tasks[0].eval_size == 100
    assert cfg.model.gradient_checkpointing is True


def _yaml(tmp_path, text):
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


TASK = "tasks: [{name: a, source: 'builtin:copy'}]\n"


def test_unknown_key_lists_valid_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key lora\.rank; valid keys under lora: r, alpha, dropout, target_modules"):
        load_config(_yaml(tmp_path, TASK + "lora: {rank: 8}\n"))
    with pytest.raises(ConfigError, match=r"unknown key max_step;.*max_steps"):
        load_config(_yaml(tmp_path, TASK), ["max_step=3"])
    with pytest.raises(ConfigError, match=r"unknown key tasks\.0\.fromat|unknown key tasks\.0\.|valid keys under tasks"):
        load_config(_yaml(tmp_path, "tasks: [{name: a, source: x, fromat: chat}]\n"))


@pytest.mark.parametrize("override, message", [
    ("sharing=medium", r"sharing='medium' is not allowed; choose one of: hard, soft"),
    ("lora.r=0", r"lora.r must be > 0"),
    ("lora.r=eight", r"lora.r must be an integer, got 'eight'"),
    ("lr=fast", r"lr must be a number"),
    ("model.dtype=fp8", r"model.dtype='fp8' is not allowed; choose one of: fp32, bf16, fp16"),
    ("lora.dropout=1.5", r"lora.dropout must be in \[0, 1\)"),
    ("tasks.0.format=xml", r"tasks.0.format \(task 'a'\)='xml' is not allowed; choose one of: prompt_completion, alpaca, chat"),
    ("sampling.strategy=manual", r"sampling.weights must give one weight per task; missing: \['a'\]"),
    ("noequals", r"must look like key=value"),
    ("surgery.method=pcgrad", r"surgery.method=pcgrad acts on the adapter the tasks share, and sharing=soft has none"),
    ("surgery.method=graddrop", r"surgery.method='graddrop' is not allowed; choose one of: sum, mean, pcgrad, mgda"),
    ("soft.coupling=0.1 sharing=hard", None),
    ("tasks.0.name=shared", r"tasks.0.name='shared' is reserved for the shared adapter"),
    ("loss.task_weighting=manual", r"loss.weights must give one weight per task; missing: \['a'\]"),
])
def test_bad_values_name_key_and_allowed(tmp_path, override, message):
    if message is None:  # two overrides that only conflict together
        with pytest.raises(ConfigError, match="soft.coupling couples per-task adapters; it needs sharing=soft"):
            load_config(_yaml(tmp_path, TASK), override.split())
        return
    with pytest.raises(ConfigError, match=message):
        load_config(_yaml(tmp_path, TASK), [override])


def test_structural_errors(tmp_path):
    with pytest.raises(ConfigError, match="tasks is empty"):
        load_config(_yaml(tmp_path, "max_steps: 3\n"))
    with pytest.raises(ConfigError, match="duplicate task name 'a'"):
        load_config(_yaml(tmp_path, "tasks: [{name: a, source: x}, {name: a, source: y}]\n"))
    with pytest.raises(ConfigError, match=r"tasks.0.source is missing for task 'a'"):
        load_config(_yaml(tmp_path, "tasks: [{name: a}]\n"))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_yaml(tmp_path, "tasks: [unclosed\n"))



@pytest.mark.parametrize("stage,device,sharing,message", [
    (2, "cpu", "soft", "needs ZeRO stage 3"),
    (1, "cpu", "hybrid", "needs ZeRO stage 3"),
    (3, "nvme", "soft", "offload_optimizer.device='nvme' with sharing=soft is not supported"),
])
def test_offload_with_task_adapters_refused_where_not_exact(tmp_path, stage, device, sharing, message):
    from mtl_scale.ds_config import build_ds_config

    ds = json.loads((ROOT / "ds_configs" / f"zero{3 if stage == 3 else 2}.json").read_text())
    ds["zero_optimization"].update(stage=stage, offload_optimizer={"device": device})
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    with pytest.raises(UserError, match=re.escape(message)) as e:
        build_ds_config(load_config("configs/demo.yaml", [f"sharing={sharing}", f"deepspeed_config={path}"]), 2, 128)
    assert str(path) in str(e.value)
    # one shared adapter gets a gradient in every micro-batch: offload is exact for it at any stage
    hard = build_ds_config(load_config("configs/demo.yaml", ["sharing=hard", f"deepspeed_config={path}"]), 2, 128)
    assert hard["zero_optimization"]["offload_optimizer"] == {"device": device}


def test_zero3_cpu_offload_with_soft_adapters_builds(tmp_path):
    from mtl_scale.ds_config import build_ds_config

    ds = json.loads((ROOT / "ds_configs" / "zero3.json").read_text())
    ds["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    built = build_ds_config(load_config("configs/demo.yaml", ["sharing=soft", f"deepspeed_config={tmp_path / 'ds.json'}"]),
                            2, 128)
    assert built["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}


def test_output_dir_that_is_a_file_is_refused(tmp_path):
    from mtl_scale.errors import UserError
    from mtl_scale.trainer import check_output_dir_path
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match=r"output_dir='.*/f' is a file, not a directory"):
        check_output_dir_path(str(tmp_path / "f"))
    with pytest.raises(UserError, match=r"output_dir='.*/f/run' lies under .*/f, which is a file, not a directory"):
        check_output_dir_path(str(tmp_path / "f" / "run"))
    check_output_dir_path(str(tmp_path / "new" / "run"))  # missing directories are fine: they get created
    check_output_dir_path(str(tmp_path))


def test_deepspeeds_synchronizing_throughput_timer_is_off_unless_configured(tmp_path):
    """DeepSpeed's throughput timer syncs the device twice per micro-batch by default; the built config
    turns it off (read back through DeepSpeed's own config parser), and keeps a config's own choice."""
    from deepspeed.runtime.config import DeepSpeedConfig
    from mtl_scale.ds_config import build_ds_config

    built = build_ds_config(load_config("configs/demo.yaml"), 1, 128)
    timer = DeepSpeedConfig(built).timers_config
    assert not timer.enabled
    ds = json.loads((ROOT / "ds_configs" / "zero3.json").read_text())
    ds["timers"] = {"throughput": {"enabled": True, "synchronized": False}}
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    own = build_ds_config(load_config("configs/demo.yaml", [f"deepspeed_config={tmp_path / 'ds.json'}"]), 1, 128)
    timer = DeepSpeedConfig(own).timers_config
    assert timer.enabled and not timer.synchronized
