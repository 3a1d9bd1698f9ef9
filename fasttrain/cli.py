"""Command line: `python -m fasttrain {cnn,resnet,predict,evaluate,preview,export} [flags]`.

Flags override fields of the chosen recipe (dataclasses.replace); run options (data, device,
output folder) are plain arguments. Bad input ends with one `error: ...` line and exit code 2.
Parsing imports neither torch nor DALI nor matplotlib: `--help`, `--version` and a mistyped flag
answer at once; each command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fasttrain import export
from fasttrain.data.decode import DEFAULT_MAX_PIXELS
from fasttrain.errors import RunError, UserError
from fasttrain.recipes import COMPILE_MODES, LOADER_CHOICES, RECIPES, Recipe, get_recipe, override, value_text

# recipe fields set by a flag of the same name (dashes for underscores); None: the flag was not given
RECIPE_FLAGS = ("epochs", "batch_size", "lr", "momentum", "nesterov", "weight_decay", "warmup_epochs",
                "warmup_start", "schedule", "label_smoothing", "dropout", "image_size", "crop_padding",
                "eval_resize", "normalize", "lr_scaling", "workers", "amp", "compile", "compile_mode",
                "channels_last", "loader", "cache", "cache_augment", "weights")

DESCRIPTION = """\
fasttrain: the fastest honest path from a folder of images to a trained CNN on one GPU.
python -m fasttrain COMMAND --help lists each command's flags and their defaults."""

# command -> one line for --help
COMMANDS = {
    "cnn": "train the seed report's CNN (32 px; CIFAR-100 by default, or your images)",
    "resnet": "train ResNet-18 from ImageNet weights (224 px; CUB-200-2011 by default, or your images)",
    "predict": "predict classes for images: a CSV ready for a Kaggle upload",
    "evaluate": "top-1/top-5, per-class accuracy and a confusion matrix for a checkpoint",
    "preview": "draw one batch after augmentation, as the model sees it",
    "export": "write a checkpoint as an ONNX model that takes raw images, checked with onnxruntime",
}


def versions_line() -> str:
    """fasttrain's version and those of Python, torch, torchvision and DALI, from the installed
    packages' metadata (importlib.metadata: nothing is imported)."""
    import platform

    from fasttrain import DALI_PACKAGES, __version__, installed_version

    parts = [f"fasttrain {__version__}", f"Python {platform.python_version()}"]
    for name, dists in (("torch", ("torch",)), ("torchvision", ("torchvision",)), ("DALI", DALI_PACKAGES)):
        found = installed_version(*dists)
        parts.append(f"{name} {found}" if found else f"{name} not installed")
    return ", ".join(parts)


class _Version(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        print(versions_line())
        parser.exit(0)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _fraction_or_zero(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 0 and below 1, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


for _f, _name in ((_positive_int, "positive integer"), (_non_negative_int, "integer"),
                  (_positive_float, "number"), (_fraction, "fraction"), (_non_negative_float, "number"),
                  (_fraction_or_zero, "fraction")):
    _f.__name__ = _name  # argparse names the type in "invalid <name> value" messages


def _shown(value) -> str:
    """A recipe value for --help; None reads "auto" there (amp, compile: decided by the device)."""
    return value_text(value, none="auto")


def _defaults(model: str, field: str) -> str:
    """' (fast: X; seed: Y)': the field's value in the model's recipes, for --help. ResNet's
    recipes differ with --finetune, and both values are shown where they do."""
    def value(name: str) -> str:
        frozen, tuned = RECIPES[(model, name, model == "cnn")], RECIPES[(model, name, True)]
        a, b = _shown(getattr(frozen, field)), _shown(getattr(tuned, field))
        return a if a == b else f"{a}, {b} with --finetune"
    return f" (fast: {value('fast')}; seed: {value('seed')})"


def _recipe_flags(p: argparse.ArgumentParser, model: str) -> None:
    """One flag per recipe field (RECIPE_FLAGS); each help shows the field in the fast and seed recipes."""
    flag = argparse.BooleanOptionalAction
    d = lambda field: _defaults(model, field)  # noqa: E731
    p.add_argument("--epochs", type=_positive_int, help="passes over the training set" + d("epochs"))
    p.add_argument("--batch-size", type=_positive_int, help="images per step, per GPU" + d("batch_size"))
    p.add_argument("--lr", type=_positive_float,
                   help="peak learning rate; without it a --batch-size of your own scales it by the recipe's "
                        "--lr-scaling rule" + d("lr"))
    p.add_argument("--momentum", type=_fraction_or_zero, help="SGD momentum" + d("momentum"))
    p.add_argument("--nesterov", action=flag, help="Nesterov momentum" + d("nesterov"))
    p.add_argument("--weight-decay", type=_non_negative_float, help="SGD's L2 penalty" + d("weight_decay"))
    p.add_argument("--warmup-epochs", type=_non_negative_float,
                   help="linear warm-up of the lr, in epochs" + d("warmup_epochs"))
    p.add_argument("--warmup-start", type=_fraction_or_zero,
                   help="warm-up starts at this fraction of the lr" + d("warmup_start"))
    p.add_argument("--schedule", choices=["constant", "cosine"], help="lr after warm-up" + d("schedule"))
    p.add_argument("--label-smoothing", type=_fraction_or_zero,
                   help="CrossEntropyLoss label smoothing" + d("label_smoothing"))
    p.add_argument("--lr-scaling", choices=["linear", "none"],
                   help="lr for a --batch-size of your own: linear (lr x batch / recipe batch) or none"
                        + d("lr_scaling"))
    p.add_argument("--normalize", choices=["dataset", "imagenet"],
                   help="per-channel mean/std: the training set's or ImageNet's" + d("normalize"))
    if model == "cnn":
        p.add_argument("--dropout", type=_fraction_or_zero, help="dropout before the first linear layer"
                       + d("dropout"))
        p.add_argument("--crop-padding", type=_non_negative_int,
                       help="zero pixels padded before the random 32 px crop" + d("crop_padding"))
    else:
        p.add_argument("--image-size", type=_positive_int, help="side of the training and evaluation crop, px"
                       + d("image_size"))
        p.add_argument("--eval-resize", type=_positive_int,
                       help="evaluation: shorter side before the centre crop, px" + d("eval_resize"))


def _add_train_flags(p: argparse.ArgumentParser, model: str) -> None:
    flag = argparse.BooleanOptionalAction
    p.add_argument("--recipe", default="fast", metavar="{fast,seed,PATH}",
                   help="fast: tuned for throughput (default); seed: the report's setup exactly; or a recipe "
                        "file an earlier run wrote (RUN/recipe.json, RUN/summary.json) or a TOML/JSON file of "
                        "the same fields")
    p.add_argument("--data", type=Path, help="data folder (default: $FASTTRAIN_DATA, else ./data)")
    _add_download(p, model)
    p.add_argument("--synthetic", action="store_true", help="random data of the recipe's shape; no files needed")
    p.add_argument("--num-classes", type=_positive_int, help="classes for --synthetic and --summary")
    p.add_argument("--train-limit", type=_positive_int, metavar="N", help="use at most N training images")
    p.add_argument("--val-limit", type=_positive_int, metavar="N", help="use at most N validation images")
    p.add_argument("--val-fraction", type=_fraction, default=0.1,
                   help="share of each class held out when a folder has no val/ or test/ (default 0.1)")
    p.add_argument("--loader", choices=LOADER_CHOICES,
                   help="input pipeline; auto: DALI when it imports, else the DataLoader" + _defaults(model, "loader"))
    p.add_argument("--cache", choices=["auto", "gpu", "none"],
                   help="DALI: decode the data set once and keep it on the GPU (auto: when it fits)"
                        + _defaults(model, "cache"))
    p.add_argument("--cache-augment", choices=["auto", "device", "dali"],
                   help="with the cache: augment with batched tensor ops on the device (device) or with DALI's "
                        "operators (dali); auto: $FASTTRAIN_CACHE_AUGMENT, else device")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N")
    _recipe_flags(p, model)
    p.add_argument("--workers", type=_non_negative_int,
                   help="DataLoader processes / DALI threads (default: one per core)")
    p.add_argument("--amp", action=flag, help="mixed precision: bf16 where supported, else fp16"
                   + _defaults(model, "amp").replace("auto", "on CUDA"))
    p.add_argument("--compile", action=flag, help="torch.compile the training step: model and loss, with fused SGD"
                   + _defaults(model, "compile").replace("auto", "on CUDA"))
    p.add_argument("--compile-mode", choices=COMPILE_MODES,
                   help="torch.compile mode; reduce-overhead replays CUDA graphs" + _defaults(model, "compile_mode"))
    p.add_argument("--save-every", type=_non_negative_int, default=1, metavar="N",
                   help="write last.pt every N epochs, in the background (default 1; 0: only at the end and "
                        "on Ctrl-C/SIGTERM)")
    p.add_argument("--channels-last", action=flag, help="NHWC memory format" + _defaults(model, "channels_last"))
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--out", type=Path, help="run folder (default runs/<model>-<timestamp>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint, on the data and with the flags it "
                        "started with (--epochs may grow; other changes need --allow-changes)")
    p.add_argument("--allow-changes", action="store_true",
                   help="with --resume: accept flags that change the data, the batch or the optimisation "
                        "(a new batch only at an epoch boundary)")
    p.add_argument("--tensorboard", action=argparse.BooleanOptionalAction,
                   help="also write TensorBoard event files to RUN/tensorboard (pip install tensorboard; "
                        "view with: tensorboard --logdir RUN); --resume keeps what the run started with "
                        "(default: off)")
    p.add_argument("--summary", action="store_true", help="print the layers and parameter counts, then exit")
    p.add_argument("--strict", action="store_true",
                   help="decode every image file fully before training and refuse damaged ones (exit 2) "
                        "instead of leaving them out")
    _add_max_pixels(p)
    p.add_argument("--sync-bn", action=flag, default=False,
                   help="under torchrun: BatchNorm statistics over the global batch (default: per process)")
    if model == "resnet":
        p.add_argument("--finetune", action=flag,
                       help="train every layer (default: only the new head, backbone frozen; a --recipe file "
                            "says itself)")
        p.add_argument("--weights", help="imagenet (torchvision's weights and cache), none, or PATH to a state dict"
                       + _defaults(model, "weights"))


def _add_download(p: argparse.ArgumentParser, model: str | None) -> None:
    own = {"cnn": "CIFAR-100", "resnet": "CUB-200-2011"}.get(model, "the model's data set")
    p.add_argument("--download", action="store_true",
                   help=f"download {own} into --data when that folder is missing or empty (without "
                        f"--download that is an error; the default folder is downloaded into anyway)")


def _max_pixels(text: str) -> int | None:
    """--max-image-pixels: a pixel count, or 0 for no limit (None, as the data index takes it)."""
    return _non_negative_int(text) or None


_max_pixels.__name__ = "integer"


def _add_max_pixels(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-image-pixels", type=_max_pixels, metavar="N", default=DEFAULT_MAX_PIXELS,
                   help=f"leave out images of more pixels, a guard against decompression bombs "
                        f"(default {DEFAULT_MAX_PIXELS:,}, where Pillow refuses; 0 allows any size)")


def _add_inference_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N (default auto)")
    p.add_argument("--batch-size", type=_positive_int, default=256, help="images per batch (default 256)")
    p.add_argument("--workers", type=_non_negative_int,
                   help="DataLoader processes / DALI threads (default: one per core)")
    p.add_argument("--loader", choices=LOADER_CHOICES, default="auto",
                   help="auto (default): DALI when it imports, else the DataLoader")
    _add_max_pixels(p)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fasttrain", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action=_Version, nargs=0,
                        help="print the versions of fasttrain, Python, torch, torchvision and DALI, then exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")
    for model in ("cnn", "resnet"):
        _add_train_flags(sub.add_parser(model, help=COMMANDS[model], description=COMMANDS[model]), model)
    p = sub.add_parser("predict", help=COMMANDS["predict"], description=COMMANDS["predict"])
    p.add_argument("--checkpoint", type=Path, required=True, help="a run's best.pt or last.pt")
    p.add_argument("--data", type=Path, required=True, help="a folder of images (searched recursively) or a CIFAR pickle")
    p.add_argument("--out", type=Path, default=Path("predictions.csv"), help="the CSV to write (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (default: refuse)")
    p.add_argument("--top-k", type=_positive_int, default=1, help="add the k best classes with probabilities")
    _add_inference_flags(p)
    p = sub.add_parser("evaluate", help=COMMANDS["evaluate"], description=COMMANDS["evaluate"])
    p.add_argument("--checkpoint", type=Path, required=True, help="a run's best.pt or last.pt")
    p.add_argument("--data", type=Path, help="data set folder, as for training; its val/test split is evaluated")
    _add_download(p, None)
    p.add_argument("--split", choices=["val", "test", "all"], default="val",
                   help="val: the validation split training used (default); test: the test/ folder beside "
                        "train/ and valid/; all: every image under --data, as class folders")
    p.add_argument("--out", type=Path, default=Path("evaluation"),
                   help="folder for metrics.json, per_class.csv, confusion.csv and confusion.png "
                        "(default: %(default)s)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier evaluation in --out (default: refuse)")
    _add_inference_flags(p)
    p = sub.add_parser("preview", help=COMMANDS["preview"], description=COMMANDS["preview"])
    p.add_argument("model", choices=["cnn", "resnet"])
    p.add_argument("--data", type=Path, help="data folder (default: $FASTTRAIN_DATA, else ./data)")
    _add_download(p, None)
    p.add_argument("--loader", choices=["dali", "torch"], default="dali")
    p.add_argument("--cache", choices=["gpu", "none"], default="none",
                   help="DALI: serve the batch from the decoded cache, as training with --cache gpu does "
                        "(on a machine without a GPU the cache sits in host memory)")
    p.add_argument("--workers", type=_non_negative_int, default=2, help="DataLoader processes / DALI threads")
    _add_max_pixels(p)
    p.add_argument("--split", choices=["train", "val"], default="train",
                   help="val: the first batch in data-set order, to compare loaders picture to picture")
    p.add_argument("--out", type=Path, default=Path("preview.png"), help="the PNG to write (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (default: refuse)")
    p.add_argument("--recipe", choices=["fast", "seed"], default="fast")
    p.add_argument("--batch-size", type=_positive_int, default=32)
    p.add_argument("--device", default="auto")
    p.add_argument("--val-fraction", type=_fraction, default=0.1)
    export.add_parser(sub, COMMANDS["export"])
    return parser


def recipe_overrides(args: argparse.Namespace) -> dict:
    """The recipe fields set on the command line; None where a flag was not given."""
    return {k: getattr(args, k, None) for k in RECIPE_FLAGS}


def print_summary(model_name: str, recipe: Recipe, num_classes: int) -> None:
    import torchinfo

    from fasttrain.models import INPUT_SIZE, build_model

    model = build_model(model_name, num_classes, recipe, weights="none")
    size = INPUT_SIZE[model_name]
    stats = torchinfo.summary(model, input_size=(2, 3, size, size), col_names=("output_size", "num_params"),
                              depth=4, mode="eval", verbose=0, device="cpu")
    # torchinfo's own line reads "Total mult-adds (Units.GIGABYTES)" and counts the whole batch of 2
    macs = stats.total_mult_adds / 2
    print("\n".join(f"Forward pass per image: {macs / 1e9:.3f} G multiply-adds = {2 * macs / 1e9:.2f} GFLOPs"
                     if line.startswith("Total mult-adds") else line for line in str(stats).splitlines()))
    if model_name == "resnet":
        print(f"ResNet-18, {'fine-tuned' if recipe.finetune else 'frozen backbone, head only'}, {num_classes} classes")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command in ("preview", "predict", "evaluate", "export"):
            return {"preview": run_preview, "predict": run_predict, "evaluate": run_evaluate,
                    "export": export.run}[args.command](args)
        return run_train(args, argv if argv is not None else sys.argv[1:])
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        # a lost torchrun peer; torch is loaded by then (checked without importing it for --help)
        dist_error = getattr(getattr(sys.modules.get("torch"), "distributed", None), "DistError", None)
        if dist_error is None or not isinstance(exc, dist_error):
            raise
        from fasttrain.distributed import lost_rank_error
        print(f"error: {lost_rank_error(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # before a training run started, or in predict/evaluate/preview (they write last)
        print("stopped (Ctrl-C) before anything was written", file=sys.stderr)
        return 130


def run_predict(args: argparse.Namespace) -> int:
    from fasttrain.inference import predict

    from fasttrain.data.index import shown

    result = predict(args.checkpoint, args.data, args.out, args.top_k, args.device, args.batch_size, args.workers,
                     args.loader, args.max_image_pixels, overwrite=args.overwrite)
    for path, why in result["skipped"]:
        print(f"no row for {shown(path)}: {why}")
    ignored = f", {len(result['ignored'])} ignored ({_rules(result['ignored'])})" if result["ignored"] else ""
    print(f"wrote {shown(args.out)}: {result['images']} predictions, {len(result['skipped'])} files with no "
          f"row{ignored} ({result['backend']} on {result['device']})")
    return 0


def _rules(ignored: list) -> str:
    from fasttrain.data.splits import ignored_by_rule

    return ", ".join(f"{n} {rule}" for rule, n in ignored_by_rule(ignored).items())


def run_evaluate(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from fasttrain.inference import evaluate_checkpoint

    from fasttrain.data.index import shown

    result = evaluate_checkpoint(args.checkpoint, args.data, args.out, args.device, args.batch_size, args.workers,
                                 args.loader, args.max_image_pixels, args.split, overwrite=args.overwrite,
                                 download=args.download)
    for note in result["notes"]:
        print(f"note: {note}")
    for item in result["skipped"][:5]:
        print(f"not scored {item['path']}: {item['reason']}")
    if len(result["skipped"]) > 5:
        print(f"... {len(result['skipped']) - 5} more not scored: all in {shown(args.out / 'metrics.json')}")
    rows = sorted(result["per_class"], key=lambda r: (r["accuracy"] is None, r["accuracy"] or 0))
    listed = rows if len(rows) <= 30 else rows[:10] + rows[-10:]
    table = Table("class", "images", "correct", "accuracy",
                  title="accuracy per class" + (" (10 worst, 10 best)" if len(rows) > 30 else ""))
    for r in listed:
        table.add_row(shown(r["class"]), str(r["images"]), str(r["correct"]),
                      "-" if r["accuracy"] is None else f"{100 * r['accuracy']:.1f}%")
    console = Console()
    console.print(table)
    # short lines: a log at 80 columns shows each whole
    skipped = len(result["skipped"])
    not_scored = f" ({skipped} file{'s' if skipped > 1 else ''} not scored)" if skipped else ""
    print(result["data"])
    print(f"top-1 {100 * result['top1']:.2f}%  top-5 {100 * result['top5']:.2f}%  on {result['images']} images"
          + not_scored)
    print(f"wrote {shown(args.out)}: metrics.json, per_class.csv, confusion.csv, confusion.png")
    return 0


def run_preview(args: argparse.Namespace) -> int:
    from fasttrain.preview import preview

    out = preview(args.model, args.data, args.loader, args.split, args.out, args.recipe, args.batch_size,
                  args.device, workers=args.workers, val_fraction=args.val_fraction, cache=args.cache,
                  max_pixels=args.max_image_pixels, overwrite=args.overwrite, download=args.download)
    print(f"wrote {out}")
    return 0


def base_recipe(args: argparse.Namespace) -> Recipe:
    """The recipe the flags apply to: --recipe fast|seed for the command's model (and --finetune),
    or a recipe file (fasttrain.recipes.read_recipe_file), whose finetune --finetune may change.
    Raises UserError for a file of the other model."""
    finetune = getattr(args, "finetune", None)
    if args.recipe in ("fast", "seed"):
        return get_recipe(args.command, args.recipe, bool(finetune))
    from fasttrain.recipes import read_recipe_file

    recipe = read_recipe_file(Path(args.recipe))
    if recipe.model != args.command:
        raise UserError(f"--recipe {args.recipe}: a {recipe.model} recipe; run it with python -m fasttrain "
                        f"{recipe.model} --recipe {args.recipe}")
    return recipe if finetune is None else recipe.replace(finetune=finetune)


def run_train(args: argparse.Namespace, argv: list[str]) -> int:
    from fasttrain.models import DEFAULT_CLASSES

    base = base_recipe(args)
    recipe = override(base, recipe_overrides(args))
    args.recipe_base = base  # what a --batch-size of the user's own is scaled from
    if args.summary:
        print_summary(args.command, recipe, args.num_classes or DEFAULT_CLASSES[args.command])
        return 0
    from fasttrain.session import TrainingSession

    session = TrainingSession(args, recipe, recipe_overrides(args), argv)
    try:
        return session.run()
    except KeyboardInterrupt:  # a second Ctrl-C, or one while setting up: a write in flight is abandoned
        if session.dist.is_main:
            session.run_dir.remove_temporary()
            print(session.stopped_at_once(), file=sys.stderr)
        return 130
    finally:
        session.release()
        if session.dist.is_main:
            session.run_dir.remove_if_unused()

