"""Docs kept honest by tests: every ``launch/`` and ``bench/`` command in README.md and docs/*.md parses
with its entry point's own argument parser, and every dotted ``key=value`` they show names a key of the
config schema. Renaming a flag or a key without updating the docs fails here. The bench scripts are
modules of the ``bench`` package (``python -m bench.x``, ``deepspeed ... --module bench.x``): a doc
that runs one by its path fails too."""
from __future__ import annotations

import argparse
import dataclasses
import re
import runpy
import shlex
import sys
import typing
import warnings
from pathlib import Path

import pytest

from mtl_scale.config import RunConfig

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SCRIPT = re.compile(r"^(?:\./)?((?:launch|bench)/[\w/]+\.(?:py|sh))$")
MODULE = re.compile(r"bench\.(\w+)")  # after python's -m or the DeepSpeed launcher's --module
MODULE_FLAGS = ("-m", "--module")
KEY_VALUE = re.compile(r"(?<![\w.=-])([a-z_][a-z0-9_]*(?:\.[a-z0-9_]+)*)=(?!=)")
# key=value text in the docs that is not a run-config key: named here, with what it is
NOT_CONFIG = {
    "device_map": "transformers' from_pretrained argument",
    "weights_only": "torch.load's argument",
    "deepspeed": "HF TrainingArguments' argument",
    "train_sampling_strategy": "HF TrainingArguments' argument",
    "group_by_length": "HF TrainingArguments' argument (transformers 4)",
    "packing": "TRL SFTConfig's argument",
    "num_items_in_batch": "transformers' causal-LM loss argument",
    "key": "the placeholder in 'key=value'",
}


def _snippets(text: str) -> list[tuple[int, str]]:
    """(line, text) of every code line, fenced or indented by 4 spaces (continuations joined), and every inline
    code span."""
    out = []
    lines = text.split("\n")
    fenced, i = False, 0
    while i < len(lines):
        line, start = lines[i], i + 1
        indented = line.startswith("    ") and re.match(r"\s*(python|deepspeed|bash|mtl-)", line)
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif fenced or indented:
            while line.endswith("\\") and i + 1 < len(lines):
                i += 1
                line = line[:-1] + " " + lines[i]
            out.append((start, line))
        else:
            out += [(start, span) for span in re.findall(r"`([^`]+)`", line)]
        i += 1
    return out


def _variables(text: str) -> dict[str, str]:
    """Shell variables a doc defines in its code (``A="--hidden 512 ..."``), for the commands that use them."""
    return {k: v for k, v in re.findall(r'^([A-Z_]+)="([^"]*)"', text, flags=re.M)}


def documented_commands() -> list[tuple[str, str, str, list[str]]]:
    """(where, script, how, args) for every command that runs a launch/ or bench/ script: ``how`` is
    "path" (``python launch/train.py``, ``bash bench/gpu_smoke.sh``) or the flag that ran it as a module
    of the bench package ("-m" or "--module"; ``script`` is then the module's file, bench/x.py)."""
    out = []
    for doc in DOCS:
        text = doc.read_text()
        variables = _variables(text)
        for line, snippet in _snippets(text):
            snippet = re.sub(r"\$(\w+)", lambda m: variables.get(m.group(1), m.group(0)), snippet.split(" #")[0])
            try:
                tokens = shlex.split(snippet)
            except ValueError:
                continue
            where = f"{doc.relative_to(ROOT)}:{line}"
            for j, token in enumerate(tokens[1:], start=1):  # run by python, deepspeed or bash: a command,
                match = SCRIPT.match(token)                  # not a file named in prose
                module = MODULE.fullmatch(tokens[j + 1]) if token in MODULE_FLAGS and j + 1 < len(tokens) else None
                if match:
                    out.append((where, match.group(1), "path", tokens[j + 1:]))
                    break
                if module:
                    out.append((where, f"bench/{module.group(1)}.py", token, tokens[j + 2:]))
                    break
    return out


def documented_keys() -> list[tuple[str, str]]:
    """(where, dotted key) of every key=value in the docs' code."""
    out = []
    for doc in DOCS:
        for line, snippet in _snippets(doc.read_text()):
            out += [(f"{doc.relative_to(ROOT)}:{line}", key) for key in KEY_VALUE.findall(snippet)]
    return out


def is_config_key(dotted: str, cls=RunConfig) -> bool:
    """Whether ``dotted`` names a field of the schema: nested dataclasses by name, lists of them by
    index (``tasks.0.eval_size``), mappings by any key (``sampling.weights.copy``)."""
    parts = dotted.split(".")
    tp = cls
    for i, part in enumerate(parts):
        if dataclasses.is_dataclass(tp):
            hints = typing.get_type_hints(tp)
            if part not in hints:
                return False
            tp = hints[part]
        elif typing.get_origin(tp) is list and part.isdigit():
            tp = typing.get_args(tp)[0]
        elif typing.get_origin(tp) is dict:
            return i == len(parts) - 1  # a mapping's key, nothing below it
        else:
            return False
    return True


class _Parsed(Exception):
    """Raised by the patched parse_args: the entry point parsed its arguments; stop before it runs."""


def parse_with_entry_point(script: str, args: list[str], monkeypatch, module: bool = False) -> argparse.Namespace:
    """Run ``script``'s own main() with ``args`` until its argument parser has parsed them: by its path, or
    (``module``) as its module, the way ``python -m`` runs it."""
    for name in ("parse_args", "parse_intermixed_args"):
        parse = getattr(argparse.ArgumentParser, name)

        def parse_and_stop(self, args=None, namespace=None, parse=parse):
            raise _Parsed(parse(self, args, namespace))

        monkeypatch.setattr(argparse.ArgumentParser, name, parse_and_stop)
    monkeypatch.setattr(sys, "argv", [str(ROOT / script), *args])
    try:
        if module:
            with warnings.catch_warnings():  # imported already by another test: harmless, the run has its own globals
                warnings.filterwarnings("ignore", r"'bench\.\w+' found in sys.modules", RuntimeWarning)
                runpy.run_module(script.removesuffix(".py").replace("/", "."), run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(str(ROOT / script), run_name="__main__")
    except _Parsed as parsed:
        return parsed.args[0]
    raise AssertionError(f"{script} finished without parsing its arguments with argparse")


COMMANDS = documented_commands()


def test_docs_show_commands_and_keys():
    scripts = {script for _, script, _, _ in COMMANDS}
    assert {"launch/train.py", "launch/evaluate.py", "launch/merge.py", "launch/plan.py"} <= scripts
    hows = {how for _, script, how, _ in COMMANDS if script.startswith("bench/")}
    assert {"-m", "--module"} <= hows  # python -m bench.x and deepspeed ... --module bench.x are both checked
    assert len(documented_keys()) >= 10


@pytest.mark.parametrize("where,script,how,args", COMMANDS, ids=[f"{w} {s}" for w, s, _, _ in COMMANDS])
def test_documented_command_parses(where, script, how, args, monkeypatch, capsys):
    assert (ROOT / script).is_file(), f"{where}: {script} does not exist"
    if script.endswith(".sh"):
        return  # shell wrappers: their python commands are documented and checked on their own
    if script.startswith("bench/") and how == "path":
        pytest.fail(f"{where}: {script} is a module of the bench package: run it from the checkout as "
                    f"`python -m {script[:-3].replace('/', '.')}` (under DeepSpeed: `--module ...`), not by its path")
    try:
        parse_with_entry_point(script, args, monkeypatch, module=how != "path")
    except SystemExit as e:
        pytest.fail(f"{where}: `{script} {' '.join(args)}` is refused by its parser (exit {e.code}):\n"
                    f"{capsys.readouterr().err}")


def test_documented_keys_are_config_keys():
    wrong = [f"{where}: {key}" for where, key in documented_keys()
             if key.split(".")[0] not in NOT_CONFIG and not is_config_key(key)]
    assert not wrong, "keys in the docs that the config schema does not have:\n" + "\n".join(wrong)


def test_the_checks_catch_a_rename(monkeypatch, capsys):
    assert not is_config_key("lora.rank") and is_config_key("lora.r") and is_config_key("tasks.0.eval_size")
    assert is_config_key("sampling.weights.copy") and not is_config_key("sampling.weights.copy.x")
    with pytest.raises(SystemExit):
        parse_with_entry_point("launch/merge.py", ["runs/demo", "--methods", "ties"], monkeypatch)
    assert "--methods" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a bench module, run as python -m runs it
        parse_with_entry_point("bench/throughput.py", ["--rounds", "2", "--warm-up", "5"], monkeypatch, module=True)
    assert "--warm-up" in capsys.readouterr().err


def test_memory_md_shows_what_the_planner_prints(capsys):
    """Golden file: the plan printed in docs/MEMORY.md for the shipped 8-GPU example is what
    `python launch/plan.py --config configs/llama3_8b_8gpu.yaml` prints today."""
    from mtl_scale.plan.cli import main

    text = (ROOT / "docs" / "MEMORY.md").read_text()
    block = re.search(r"What it printed for the shipped 8-GPU example[^\n]*\n\n```\n(.*?)```", text, re.S)
    assert block, "docs/MEMORY.md lost the 8-GPU example's printout"
    main(["--config", "configs/llama3_8b_8gpu.yaml"])
    assert capsys.readouterr().out == block.group(1)


def test_readme_layout_names_every_module():
    """The README's layout lists every module of the package (a new module without a line fails)."""
    layout = (ROOT / "README.md").read_text().split("## Layout", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"(\w+)\.py", layout))
    modules = {p.stem for p in (ROOT / "mtl_scale").rglob("*.py") if p.stem != "__init__"}
    assert modules - named == set(), f"modules missing from README.md's layout: {sorted(modules - named)}"


RELATIVE_RELEASE = re.compile(r"\b(?:this|the previous|previous|last|that|the next) release\b|\breleases? ago\b|"
                              r"\bthe one before( that)?\b", re.I)


def test_versions_not_relative_release_labels():
    """Numbers in the docs name the version that measured them (CHANGELOG.md), and the newest CHANGELOG entry
    is the package's version: a relative label ("the previous release") goes stale with the next commit."""
    import tomllib

    import mtl_scale

    stale = [f"{doc.relative_to(ROOT)}:{i}: {line.strip()}" for doc in DOCS
             for i, line in enumerate(doc.read_text().split("\n"), start=1) if RELATIVE_RELEASE.search(line)]
    assert not stale, "relative release labels (name the version instead):\n" + "\n".join(stale)
    assert RELATIVE_RELEASE.search("1.99x two releases ago") and RELATIVE_RELEASE.search("This release's code")
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    newest = re.search(r"^## (\S+) — (\d{4}-\d{2}-\d{2})$", (ROOT / "CHANGELOG.md").read_text(), flags=re.M)
    assert newest and newest.group(1) == version == mtl_scale.__version__
