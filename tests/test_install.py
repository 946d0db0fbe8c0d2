"""The package as a user installs it: a wheel built from the checkout, installed elsewhere, run from
another directory: the mtl-* commands start and the shipped DeepSpeed configs are found."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_installs_working_commands(tmp_path):
    # --no-deps: the dependencies are this venv's; --no-build-isolation: no download of build tools
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(ROOT)], check=True, capture_output=True, timeout=300)
    wheel, = (tmp_path / "dist").glob("mtl_scale-*.whl")
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(site)}  # ahead of this venv's editable checkout
    for command, expected in (("mtl-train", "--config"), ("mtl-eval", "--harness"), ("mtl-merge", "--method"),
                              ("mtl-plan", "--gpus-per-node")):
        res = subprocess.run([str(site / "bin" / command), "--help"], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=300)
        assert res.returncode == 0 and expected in res.stdout, f"{command}: {res.stdout[-2000:]}{res.stderr[-2000:]}"
    probe = ("import mtl_scale.ds_config as d; from mtl_scale.config import RunConfig; "
             "print(d.__file__); print(d.resolve_path(RunConfig().deepspeed_config))")
    res = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    module, shipped = res.stdout.split()
    assert module.startswith(str(site)) and shipped.startswith(str(site)) and Path(shipped).is_file(), res.stderr
