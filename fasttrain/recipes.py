"""Training recipes: one frozen dataclass, the report's setups and the fast ones as constants.

`seed` recipes reproduce ../shared/seed/assignment2-report.txt exactly (fp32, eager, NCHW, the
report's batch sizes and constant learning rate). `fast` recipes keep the models and change only
what makes a GPU work harder per second; each value says why it was chosen.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

COMPILE_MODES = ("default", "max-autotune", "reduce-overhead")  # torch.compile's modes
LOADER_CHOICES = ("auto", "torch", "dali")  # fasttrain/data/loaders.py BACKENDS, and auto
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision's ImageNet weights were trained with these
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Recipe:
    name: str                      # "seed" or "fast"
    model: Literal["cnn", "resnet"]
    epochs: int                    # passes over the training set
    batch_size: int                # images per optimizer step (per GPU)
    lr: float                      # peak learning rate, after warm-up
    momentum: float                # SGD momentum
    nesterov: bool                 # Nesterov momentum
    weight_decay: float            # L2 penalty applied by SGD to every parameter
    warmup_epochs: float           # linear warm-up from lr * warmup_start to lr, in epochs
    schedule: Literal["constant", "cosine"]  # learning rate after warm-up
    label_smoothing: float         # CrossEntropyLoss(label_smoothing=...)
    dropout: float                 # CNN only: dropout before the first linear layer
    image_size: int                # side of the square training/eval crop, pixels
    crop_padding: int              # CNN: zero pixels padded before the random crop
    eval_resize: int               # ResNet: shorter side before the centre crop, pixels
    normalize: Literal["dataset", "imagenet"]  # per-channel mean/std source
    finetune: bool                 # ResNet: train every layer (else only the new head)
    weights: str                   # ResNet: "imagenet", "none" or a path to a state dict
    amp: bool | None               # mixed precision; None = on for CUDA, off for CPU
    compile: bool | None           # torch.compile; None = on for CUDA, off for CPU
    channels_last: bool            # NHWC memory format for model and inputs
    loader: str                    # "auto" picks the fastest loader available
    workers: int | None            # DataLoader processes / DALI threads; None = one per core
    cache: Literal["auto", "gpu", "none"]  # DALI: keep the decoded data set on the GPU (auto: if it fits)
    warmup_start: float = 0.1      # warm-up starts at this fraction of lr
    cache_augment: Literal["auto", "dali", "device"] = "auto"  # with the cache: batched tensor ops on the
                                   # device (airbench's way) or DALI's operators; auto = $FASTTRAIN_CACHE_AUGMENT,
                                   # else device, until a GPU measurement (benchmarks/gpu_check.sh) decides
    lr_scaling: Literal["linear", "none"] = "linear"  # lr for a --batch-size other than the recipe's:
                                   # linear = lr * batch / batch_size (Goyal et al. 2017); none = lr as given
    compile_mode: str = "default"  # torch.compile mode: default, max-autotune, reduce-overhead (CUDA graphs);
                                   # default until a GPU measurement says another is faster for the recipe

    def replace(self, **changes) -> "Recipe":
        return dataclasses.replace(self, **changes)


CNN_SEED = Recipe(
    name="seed", model="cnn",
    epochs=25,                     # report, part 1
    batch_size=32,                 # report, part 1
    lr=0.005,                      # report, part 1
    momentum=0.9,                  # report, part 1
    nesterov=False,                # plain SGD in the report
    weight_decay=1e-4,             # report, part 1
    warmup_epochs=0.0, schedule="constant",  # the report names no schedule
    label_smoothing=0.0,
    dropout=0.5,                   # the report's table shows a Dropout layer; 0.5 is nn.Dropout's default
    image_size=32, crop_padding=4,  # report: random crop + horizontal flip (torchvision idiom: 32, padding 4)
    eval_resize=32,
    normalize="dataset",           # report: mean/std of the whole training set
    finetune=True, weights="none",  # trained from scratch
    amp=False, compile=False, channels_last=False,  # the report's plain fp32 eager NCHW run
    loader="torch", workers=None, cache="none",  # the report's plain DataLoader
    lr_scaling="none",             # the report's lr whatever the batch: it is what the seed reproduces
)

CNN_FAST = CNN_SEED.replace(
    name="fast",
    # 16x the seed batch fills a GPU with the CNN's 1 GFLOP/image forward pass and keeps
    # the 32768x2048 linear layer's matmul large; shapes stay fixed (drop_last) for compile.
    batch_size=512,
    # linear scaling rule (Goyal et al. 2017): 0.005 * 512 / 32 = 0.08.
    lr=0.08,
    nesterov=True,                 # steadier than heavy-ball at the larger step size
    # large-batch SGD needs a warm-up; cosine decay to zero recovers the accuracy a constant
    # rate leaves on the table, so fewer epochs reach the seed's accuracy.
    warmup_epochs=2.0, schedule="cosine",
    epochs=18,
    label_smoothing=0.1,           # regularises the 71M-parameter head, cheap
    amp=None, compile=None, channels_last=True,  # bf16 tensor cores, fused kernels, NHWC convs on CUDA
    loader="auto", cache="auto",  # DALI when it imports; CIFAR's 180 MB of uint8 lives on the GPU
    lr_scaling="linear",           # as lr itself was derived from the seed's
)

RESNET_SEED = Recipe(
    name="seed", model="resnet",
    epochs=25,                     # report, part 2: 25 epochs as a feature extractor (40 fine-tuned)
    # the report does not state its batch size; its logged loss (0.648 at 3.5% accuracy,
    # about ln(200) / 8) is the per-image loss divided by a batch of 8.
    batch_size=8,
    lr=0.005,                      # report, part 2
    momentum=0.9,                  # as in part 1 and PyTorch's transfer-learning tutorial it follows
    nesterov=False,
    weight_decay=0.0,              # not stated in part 2
    warmup_epochs=0.0, schedule="constant",
    label_smoothing=0.0,
    dropout=0.0,
    image_size=224, crop_padding=0,  # random-resized-crop 224 + flip (report, part 2)
    eval_resize=256,               # resize 256 + centre crop 224, torchvision's ImageNet evaluation
    normalize="imagenet",          # the pretrained backbone expects ImageNet statistics
    finetune=False, weights="imagenet",
    amp=False, compile=False, channels_last=False,
    loader="torch", workers=None, cache="none",
    lr_scaling="none",
)

RESNET_SEED_FINETUNE = RESNET_SEED.replace(epochs=40, finetune=True)  # report, part 2

RESNET_FAST = RESNET_SEED.replace(
    name="fast",
    # 256 images of 224 px keep an H100 busy on ResNet-18 and are what DALI batches well.
    batch_size=256,
    # the new head starts from zero knowledge: linear scaling of the seed's 0.005 @ 8 would
    # be 0.16; 0.1 with warm-up is the usual ImageNet linear-probe rate for batch 256.
    lr=0.1, nesterov=True,
    warmup_epochs=1.0, schedule="cosine",
    epochs=15,                     # cosine schedule converges the head in fewer passes than a constant rate
    weight_decay=5e-5,
    label_smoothing=0.1,
    amp=None, compile=None, channels_last=True,
    loader="auto", cache="auto",  # decode once when the data set fits a quarter of free GPU memory
    lr_scaling="linear",
)

RESNET_FAST_FINETUNE = RESNET_FAST.replace(
    finetune=True,
    # pretrained features are destroyed by the head's rate; 0.02 at batch 256 is the
    # fine-tuning rate torchvision's recipes use (0.01-0.05 range), still with warm-up.
    lr=0.02,
    epochs=25,                     # fine-tuning gains more from longer schedules than the head does
    weight_decay=1e-4,
)

RECIPES: dict[tuple[str, str, bool], Recipe] = {
    ("cnn", "seed", True): CNN_SEED,
    ("cnn", "fast", True): CNN_FAST,
    ("resnet", "seed", False): RESNET_SEED,
    ("resnet", "seed", True): RESNET_SEED_FINETUNE,
    ("resnet", "fast", False): RESNET_FAST,
    ("resnet", "fast", True): RESNET_FAST_FINETUNE,
}


def get_recipe(model: str, name: str, finetune: bool = False) -> Recipe:
    """The named recipe for a model; the CNN is always trained end to end."""
    return RECIPES[(model, name, True if model == "cnn" else finetune)]


def value_text(value, none: str = "not set") -> str:
    """A recipe or run field's value as a person reads it: on/off for booleans, `none` for None,
    floats in %g form (5e-05, 0.08), anything else as str()."""
    if isinstance(value, bool) or value is None:
        return {True: "on", False: "off", None: none}[value]
    return f"{value:g}" if isinstance(value, float) else str(value)


def override(recipe: Recipe, changes: dict) -> Recipe:
    """The recipe with each change applied that is not None (None: the flag was not given)."""
    return dataclasses.replace(recipe, **{k: v for k, v in changes.items() if v is not None})


def recipe_from_dict(fields: dict) -> Recipe:
    """Rebuild a recipe saved in a checkpoint or summary.json. Fields an older one lacks take the
    values of the recipe it was (its model, name and finetune), so a seed run saved before
    `lr_scaling` existed keeps the seed's rule; unknown fields are dropped."""
    known = {f.name for f in dataclasses.fields(Recipe)}
    kept = {k: v for k, v in fields.items() if k in known}
    if known - set(kept) and fields.get("model") in ("cnn", "resnet") and fields.get("name") in ("fast", "seed"):
        return dataclasses.replace(get_recipe(fields["model"], fields["name"], fields.get("finetune", False)), **kept)
    return Recipe(**kept)


def read_recipe_file(path: Path) -> Recipe:
    """A recipe saved by an earlier run: RUN/recipe.json, RUN/summary.json (its "recipe"), or a TOML
    or JSON file of the same fields (a TOML file may hold them at the top or under [recipe]).

    Fields missing from an older file take the defaults of the named recipe; unknown fields are
    refused. Raises UserError (one line) for a file that cannot be read or is not a recipe.
    """
    import json

    from fasttrain.errors import UserError

    try:
        text = path.read_bytes()
    except OSError as exc:
        raise UserError(f"--recipe {path}: cannot read it ({exc.strerror})") from None
    try:
        if path.suffix.lower() == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            fields = tomllib.loads(text.decode("utf-8"))
        else:
            fields = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"--recipe {path}: not a TOML or JSON recipe ({str(exc).splitlines()[0]})") from None
    if isinstance(fields, dict) and isinstance(fields.get("recipe"), dict):
        fields = fields["recipe"]  # summary.json, or [recipe] in TOML
    if not isinstance(fields, dict) or fields.get("model") not in ("cnn", "resnet"):
        raise UserError(f"--recipe {path}: no recipe in it (a recipe has a model field, cnn or resnet)")
    known = {f.name for f in dataclasses.fields(Recipe)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise UserError(f"--recipe {path}: unknown field{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}")
    base = get_recipe(fields["model"], fields.get("name", "fast"), fields.get("finetune", False)) \
        if fields.get("name", "fast") in ("fast", "seed") else get_recipe(fields["model"], "fast")
    try:
        return dataclasses.replace(base, **fields)
    except TypeError as exc:
        raise UserError(f"--recipe {path}: {exc}") from None
