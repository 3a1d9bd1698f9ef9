"""A command line people already know how to use (issue 12): quick help and --version without
torch, every recipe field as a flag with its defaults shown, recipe files that rerun a run, and
evaluation files a person can read."""

import csv
import dataclasses
import importlib.metadata
import json
import subprocess
import sys

import pytest

from fasttrain.cli import RECIPE_FLAGS, _shown, base_recipe, build_parser, main, recipe_overrides
from fasttrain.recipes import RECIPES, Recipe, override

HEAVY = ("torch", "torchvision", "nvidia.dali", "matplotlib")
SEED_CNN = ["--recipe", "seed", "--device", "cpu", "--batch-size", "8", "--workers", "0", "--loader", "torch"]

# what `python -m fasttrain ARGS` loaded by the time it exited, as the program runs it
_PROBE = r"""
import runpy, sys
sys.argv = ["fasttrain", *sys.argv[1:]]
try:
    runpy.run_module("fasttrain", run_name="__main__")
except SystemExit as exc:
    code = exc.code
print("LOADED", [m for m in %r if m in sys.modules], "EXIT", code)
""" % (HEAVY,)


def _loaded(*args):
    done = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, timeout=60)
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("LOADED"), done.stdout + done.stderr
    return last, done


@pytest.mark.parametrize("args, code", [(["--help"], 0), (["cnn", "--help"], 0), (["resnet", "--help"], 0),
                                        (["predict", "--help"], 0), (["export", "--help"], 0), (["--version"], 0),
                                        (["cnn", "--epochs", "-1"], 2), (["cnn", "--no-such-flag"], 2)])
def test_help_version_and_bad_flags_import_no_heavy_library(args, code):
    last, done = _loaded(*args)
    assert last == f"LOADED [] EXIT {code}", (last, done.stderr[-2000:])


def test_version_names_every_library_without_importing_them():
    done = subprocess.run([sys.executable, "-m", "fasttrain", "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    line = done.stdout.strip()
    assert line.startswith("fasttrain 0.") and f"torch {importlib.metadata.version('torch')}" in line
    assert f"torchvision {importlib.metadata.version('torchvision')}" in line and "DALI " in line


def test_the_top_level_help_lists_every_command_in_plain_text():
    done = subprocess.run([sys.executable, "-m", "fasttrain", "--help"], capture_output=True, text=True, timeout=60)
    for command in ("cnn", "resnet", "predict", "evaluate", "preview", "export"):
        assert f"\n    {command} " in done.stdout, command
    assert "`" not in done.stdout


# recipe fields with no flag of their own: the recipe's name and model are --recipe and the command
NOT_FLAGS = {"name", "model", "finetune"}
ONLY = {"dropout": "cnn", "crop_padding": "cnn", "image_size": "resnet", "eval_resize": "resnet",
        "weights": "resnet"}


def _value_for(field: dataclasses.Field, model: str) -> tuple[str | None, object]:
    """A command-line value for the field, other than the fast recipe's, and what it parses to."""
    current = getattr(RECIPES[(model, "fast", True)], field.name)
    choices = {"schedule": ["constant", "cosine"], "normalize": ["dataset", "imagenet"], "lr_scaling": ["linear", "none"],
               "loader": ["torch", "dali"], "cache": ["gpu", "none"], "cache_augment": ["dali", "device"],
               "compile_mode": ["max-autotune", "default"], "weights": ["none", "imagenet"]}
    if field.name in choices:
        value = next(v for v in choices[field.name] if v != current)
        return value, value
    if field.name == "workers":  # None: one per core
        return "3", 3
    if isinstance(current, bool) or current is None:
        return None, not current  # --flag / --no-flag
    if isinstance(current, int):
        return str(current + 1), current + 1
    return str(current / 2 if current else 0.5), current / 2 if current else 0.5


@pytest.mark.parametrize("model", ["cnn", "resnet"])
def test_every_recipe_field_is_a_flag_with_its_defaults_in_help(model):
    parser = build_parser()._subparsers._group_actions[0].choices[model]
    help_text = parser.format_help()
    help_text = " ".join(help_text.split())  # argparse wraps lines
    fast, seed = RECIPES[(model, "fast", model == "cnn")], RECIPES[(model, "seed", model == "cnn")]
    checked = 0
    for field in dataclasses.fields(Recipe):
        if field.name in NOT_FLAGS or ONLY.get(field.name, model) != model:
            continue
        assert field.name in RECIPE_FLAGS, field.name
        flag = "--" + field.name.replace("_", "-")
        text, expected = _value_for(field, model)
        if text is None:
            argv = [model, flag if expected else "--no-" + flag[2:]]
        else:
            argv = [model, flag, text]
        args = build_parser().parse_args(argv)
        recipe = override(base_recipe(args), recipe_overrides(args))
        assert getattr(recipe, field.name) == expected, (field.name, argv)
        assert flag in help_text, flag
        if field.name not in ("cache_augment", "workers"):  # these say what their "auto"/None does instead
            action = next(a for a in parser._actions if flag in a.option_strings)
            value = lambda recipe: _shown(getattr(recipe, field.name))  # noqa: E731
            said = action.help.replace("on CUDA", "auto")
            assert f"fast: {value(fast)}" in said and f"seed: {value(seed)}" in said, (flag, action.help)
        checked += 1
    assert checked >= 20
    # each flag's help carries the value of both recipes
    lr = f"fast: {fast.lr:g}"
    assert lr in help_text and f"seed: {seed.lr:g}" in help_text
    assert f"images per step, per GPU (fast: {fast.batch_size}; seed: {seed.batch_size})" in help_text


def test_out_defaults_are_shown_in_help():
    sub = build_parser()._subparsers._group_actions[0].choices
    for command, default in (("predict", "predictions.csv"), ("evaluate", "evaluation"), ("preview", "preview.png")):
        assert f"(default: {default})" in " ".join(sub[command].format_help().split()), command


def test_a_run_reruns_from_its_recipe_file(cifar_root, tmp_path, capsys):
    first = tmp_path / "first"
    assert main(["cnn", "--data", str(cifar_root), "--out", str(first), "--epochs", "1", "--momentum", "0.8",
                 "--label-smoothing", "0.05", "--weight-decay", "0.001", "--no-nesterov", *SEED_CNN]) == 0
    recipe = json.loads((first / "summary.json").read_text())["recipe"]
    assert (recipe["momentum"], recipe["label_smoothing"], recipe["weight_decay"]) == (0.8, 0.05, 0.001)
    again = tmp_path / "again"
    assert main(["cnn", "--data", str(cifar_root), "--out", str(again), "--recipe", str(first / "summary.json"),
                 "--device", "cpu"]) == 0
    assert json.loads((again / "summary.json").read_text())["recipe"] == recipe
    a = [json.loads(x)["train_loss"] for x in (first / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x)["train_loss"] for x in (again / "metrics.jsonl").read_text().splitlines()]
    assert a == b  # the same recipe, the same seed, on the CPU: the same losses
    # a TOML file of a few fields: the rest from the named recipe; flags apply on top
    toml = tmp_path / "mine.toml"
    toml.write_text('[recipe]\nmodel = "cnn"\nname = "seed"\nmomentum = 0.7\nbatch_size = 8\nloader = "torch"\n'
                    'workers = 0\nepochs = 1\n')
    third = tmp_path / "third"
    assert main(["cnn", "--data", str(cifar_root), "--out", str(third), "--recipe", str(toml), "--device", "cpu",
                 "--label-smoothing", "0.1"]) == 0
    got = json.loads((third / "summary.json").read_text())["recipe"]
    assert (got["momentum"], got["label_smoothing"], got["lr"], got["batch_size"]) == (0.7, 0.1, 0.005, 8)


@pytest.mark.parametrize("content, fragment", [
    ('{"recipe": {"model": "resnet", "name": "fast"}}', "a resnet recipe; run it with python -m fasttrain resnet"),
    ('{"model": "cnn", "learning_rate": 0.1}', "unknown field learning_rate"),
    ('{"epochs": 3}', "no recipe in it"),
    ("model = cnn", "not a TOML or JSON recipe")])
def test_a_bad_recipe_file_is_one_line(content, fragment, tmp_path, capsys):
    path = tmp_path / ("r.toml" if "=" in content and "{" not in content else "r.json")
    path.write_text(content)
    assert main(["cnn", "--recipe", str(path), "--synthetic", "--device", "cpu", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --recipe ") and fragment in err[0], err


def test_summary_prints_gflops_per_image(capsys):
    assert main(["cnn", "--summary"]) == 0
    out = capsys.readouterr().out
    assert "Units." not in out and "Total params: 71,345,252" in out
    assert "Forward pass per image: 0.525 G multiply-adds = 1.05 GFLOPs" in out  # the report's CNN, 32 px


def test_evaluation_files_are_labelled_and_its_lines_fit_80_columns(cifar_root, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["cnn", "--data", str(cifar_root), "--out", str(run), "--epochs", "1", *SEED_CNN]) == 0
    out = tmp_path / "a-longer-folder-name-for-the-evaluation-files"
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(run / "best.pt"), "--data", str(cifar_root), "--out", str(out),
                 "--device", "cpu", "--loader", "torch"]) == 0
    printed = capsys.readouterr().out.splitlines()
    top1 = next(line for line in printed if line.startswith("top-1"))
    assert len(top1) <= 80 and "wrote" not in top1, top1  # the numbers on a line of their own, whole in a log
    assert printed[-1].startswith("wrote ") and "confusion.csv" in printed[-1]
    with open(out / "confusion.csv", newline="") as f:
        rows = list(csv.reader(f))
    classes = ["apple", "bee", "cloud"]
    assert rows[0] == ["true \\ predicted", *classes]
    assert [r[0] for r in rows[1:]] == classes
    counts = [[int(n) for n in r[1:]] for r in rows[1:]]
    per_class = json.loads((out / "metrics.json").read_text())
    assert sum(map(sum, counts)) == per_class["images"] == 20
    assert sum(counts[i][i] for i in range(3)) / 20 == pytest.approx(per_class["top1"])
