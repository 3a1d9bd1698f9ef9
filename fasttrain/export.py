"""`export`: a checkpoint as one ONNX file that takes raw pixels, checked with onnxruntime before it counts.

The exported graph takes `images`, NCHW RGB at the recipe's input size with values 0-255 (uint8 by
default, or float32), and does the evaluation normalisation itself (/255, then the checkpoint's
mean and std), so a user feeds decoded, resized pixels and nothing else. It returns `logits` and
`probabilities` (softmax), batch axis dynamic. Class names, mean/std, the input size and the model
travel in the file's metadata_props. Resizing and cropping stay outside: they are the caller's, as
the recipe's evaluation transform does them (ResNet: shorter side to eval_resize, centre crop).

torch, onnx, onnxruntime and onnxscript are imported only when an export runs: the parser here is
built for every `--help`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
from pathlib import Path

from fasttrain.errors import UserError

PACKAGES = ("onnx", "onnxruntime", "onnxscript")  # onnxscript: torch's torch.export-based exporter needs it
INPUT_DTYPES = ("uint8", "float32")
EXAMPLE_BATCH = 2  # the batch torch.export traces (it specialises a size of 1, which cannot stand for any)
CHECK_BATCH = 3    # the batch onnxruntime is checked on: another size, so a fixed batch axis fails
# The check compares fp32 with fp32: onnxruntime and PyTorch sum in different orders and fold
# BatchNorm differently, which moves logits by ~1e-6 of their size (measured: 1e-6 on ResNet-18's
# logits of size 4, 5e-8 on the CNN's). A wrong graph
# (a lost op, a wrong constant, normalisation applied twice or not at all) moves them by their own
# size. So: 1e-3 of the largest reference logit, and at least 1e-4 for models whose logits are tiny.
REL_TOL = 1e-3
ABS_TOL = 1e-4
TITLES = {"cnn": "CNN", "resnet": "ResNet-18"}


def missing_packages() -> list[str]:
    return [name for name in PACKAGES if importlib.util.find_spec(name) is None]


def export_onnx(checkpoint: Path, out: Path, opset: int | None = None, input_dtype: str = "uint8",
                overwrite: bool = False) -> dict:
    """Export `checkpoint` to the ONNX file `out`, check it with onnxruntime, then write it atomically.

    Returns {"out", "model_name", "title", "classes", "opset", "input_dtype", "input_shape",
    "checked_images", "max_abs_diff", "tolerance", "bytes"}. Raises UserError for an existing
    `out` (unless `overwrite`) or an unwritable one, both before any work; for missing packages, a
    checkpoint that is not fasttrain's, an exporter failure, and an export that onnxruntime cannot
    run or that disagrees with PyTorch beyond the tolerance: then nothing is written and an
    earlier `out` is kept.
    """
    from fasttrain.inference import checked_out

    if input_dtype not in INPUT_DTYPES:
        raise UserError(f"--input-dtype {input_dtype}: choose one of {', '.join(INPUT_DTYPES)}")
    if opset is not None and opset < 7:
        raise UserError(f"--opset {opset}: ONNX opsets start at 7 (torch's exporter writes 18 or newer natively)")
    with checked_out(out, overwrite):
        missing = missing_packages()
        if missing:
            raise UserError(f"ONNX export needs {', '.join(PACKAGES)} ({', '.join(missing)} missing): "
                            f"pip install 'fasttrain[onnx]'")
        return _export(checkpoint, out, opset, input_dtype)


def _export(checkpoint: Path, out: Path, opset: int | None, input_dtype: str) -> dict:
    import torch

    import fasttrain
    from fasttrain.data.index import shown
    from fasttrain.inference import load_trained
    from fasttrain.outputs import atomic_write

    # The CPU is enough: tracing does not run kernels that need a GPU, and the graph is device-free.
    trained = load_trained(checkpoint, torch.device("cpu"))
    model = trained.model.to(memory_format=torch.contiguous_format).eval()
    wrapped = raw_pixel_model(model, trained.mean, trained.std)
    size = trained.recipe.image_size
    example = _pixels(EXAMPLE_BATCH, size, seed=0)
    # The torch.export-based exporter (dynamo=True): the default since torch 2.9 and the one still
    # maintained; the TorchScript exporter (dynamo=False) is still there in 2.11 and 2.14 but warns
    # that it is deprecated. It needs onnxscript, and takes the batch axis as a torch.export Dim.
    try:
        with _quiet("torch.onnx", "onnxscript"):
            program = torch.onnx.export(
                wrapped, (example if input_dtype == "uint8" else example.float(),), None, dynamo=True,
                input_names=["images"], output_names=["logits", "probabilities"], opset_version=opset,
                dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1)}}, verbose=False)
            proto = program.model_proto
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"--checkpoint {shown(checkpoint)}: torch.onnx.export failed"
                        f"{f' at --opset {opset}' if opset else ''} ({type(exc).__name__}: {first[:200]})") from None
    written_opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if opset is not None and written_opset != opset:  # below 18 the exporter converts, and may give up
        raise UserError(f"--opset {opset}: torch's exporter could not convert this model to it (it wrote opset "
                        f"{written_opset}); nothing was written")
    metadata = {
        "classes": json.dumps(trained.classes),  # in the order of the logits
        "mean": json.dumps(trained.mean),  # in [0, 1] units, applied inside the graph
        "std": json.dumps(trained.std),
        "input": f"images: NCHW, RGB, {input_dtype} 0-255, {size}x{size}",
        "input_size": str(size),
        "input_dtype": input_dtype,
        "eval_resize": str(trained.recipe.eval_resize),  # ResNet: shorter side before the centre crop
        "model": trained.model_name,
        "fasttrain_version": fasttrain.__version__,
        "torch_version": torch.__version__,
    }
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    data = proto.SerializeToString()
    # The check runs on the very bytes that are written, before they are.
    diff, tolerance = _check(data, model, trained.mean, trained.std, size, input_dtype, len(trained.classes))
    try:
        atomic_write(out, lambda f: f.write(data))
    except OSError as exc:
        raise UserError(f"--out {shown(out)}: cannot write there ({exc.strerror or exc})") from None
    return {"out": out, "model_name": trained.model_name, "title": TITLES.get(trained.model_name, trained.model_name),
            "classes": trained.classes, "opset": written_opset, "input_dtype": input_dtype,
            "input_shape": ["batch", 3, size, size], "checked_images": CHECK_BATCH, "max_abs_diff": diff,
            "tolerance": tolerance, "bytes": len(data)}


@contextlib.contextmanager
def _quiet(*names: str):
    """Silence these loggers: the exporter logs its progress, opset conversions and their tracebacks,
    where the command prints one line (a failure reaches the user as one UserError line)."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def raw_pixel_model(model, mean, std):
    """`model` behind the evaluation normalisation: images (N, 3, S, S), 0-255, any dtype ->
    (logits, probabilities). Built here, not at import, so that torch is imported only to export."""
    import torch

    class RawPixels(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

        def forward(self, images: torch.Tensor):
            # as eval_transform: ToDtype(float32, scale=True) divides by 255, then Normalize
            x = (images.to(torch.float32) / 255.0 - self.mean) / self.std
            logits = self.model(x)
            return logits, logits.softmax(dim=1)

    return RawPixels().eval()


def _pixels(n: int, size: int, seed: int):
    import torch

    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def reference_logits(model, images, mean, std):
    """PyTorch's fp32 logits for uint8 `images`, normalised by the torchvision functions the
    evaluation transform uses, not by the exported wrapper: the check covers the wrapper too."""
    import torch
    from torchvision.transforms.v2 import functional as F

    with torch.no_grad():
        return model(F.normalize(F.to_dtype(images, torch.float32, scale=True), list(mean), list(std)))


def _check(data: bytes, model, mean, std, size: int, input_dtype: str, n_classes: int) -> tuple[float, float]:
    """The largest |difference| between onnxruntime's outputs and PyTorch's on CHECK_BATCH random
    images, and the tolerance it passed; UserError when it did not."""
    import numpy as np
    import onnxruntime as ort

    images = _pixels(CHECK_BATCH, size, seed=1)
    feed = images.numpy() if input_dtype == "uint8" else images.numpy().astype(np.float32)
    try:
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        logits, probabilities = session.run(["logits", "probabilities"], {"images": feed})
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"the exported model does not run in onnxruntime on a batch of {CHECK_BATCH} "
                        f"({first[:200]}); nothing was written") from None
    reference = reference_logits(model, images, mean, std).numpy()
    if logits.shape != (CHECK_BATCH, n_classes):
        raise UserError(f"the exported model gives logits of shape {list(logits.shape)} for {CHECK_BATCH} "
                        f"images, not [{CHECK_BATCH}, {n_classes}]; nothing was written")
    expected = np.exp(reference - reference.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    diff = float(max(np.abs(logits - reference).max(), np.abs(probabilities - expected).max()))
    tolerance = max(ABS_TOL, REL_TOL * float(np.abs(reference).max()))
    if not diff <= tolerance:  # NaN fails too
        raise UserError(f"the exported model disagrees with PyTorch: max |diff| {diff:.3g} > tolerance "
                        f"{tolerance:.3g} on {CHECK_BATCH} images; nothing was written")
    return diff, tolerance


def add_parser(sub, summary: str = "write a checkpoint as an ONNX model that takes raw images, checked with "
                                    "onnxruntime") -> argparse.ArgumentParser:
    """The `export` subcommand on `sub` (argparse subparsers); run(args) carries it out."""
    p = sub.add_parser("export", help=summary, description=summary,
                       epilog="Exports and checks on the CPU; needs pip install 'fasttrain[onnx]'.")
    p.add_argument("--checkpoint", type=Path, required=True, help="a run's best.pt or last.pt")
    p.add_argument("--out", type=Path, default=Path("model.onnx"), help="the ONNX file to write (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (default: refuse)")
    p.add_argument("--input-dtype", choices=INPUT_DTYPES, default="uint8",
                   help="dtype of the images input, values 0-255 either way (default: %(default)s)")
    p.add_argument("--opset", type=int, help="ONNX opset to write (default: torch's exporter default)")
    return p


def run(args: argparse.Namespace) -> int:
    from fasttrain.data.index import shown

    r = export_onnx(args.checkpoint, args.out, args.opset, args.input_dtype, overwrite=args.overwrite)
    shape = ",".join(str(d) for d in r["input_shape"])
    print(f"wrote {shown(r['out'])}: {r['title']}, {len(r['classes'])} classes, opset {r['opset']}, input images "
          f"{r['input_dtype']} [{shape}], checked with onnxruntime on {r['checked_images']} images "
          f"(max |diff| {r['max_abs_diff']:.1e} <= tol {r['tolerance']:.1e})")
    return 0
