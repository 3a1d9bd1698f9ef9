"""NVIDIA DALI pipelines: decode, crop, flip and normalise on the GPU (or the CPU without one).

Each pipeline is defined once; `Placement` picks `mixed`/`gpu` operators when the training
device is CUDA and `cpu` operators otherwise (DALI `device_id=None`), so tests and CPU-only users
run the very same graphs. Outputs are HWC float32, so `permute(0, 3, 1, 2)` is a channels_last
NCHW tensor over the same storage: no copy.

The augmentation matches the torch baseline (fasttrain/data/transforms.py):
- CNN, training: zero-pad 4, a random integer offset in [0, 8] per axis, 32 x 32 window, flip
  with p = 0.5, normalise; evaluation: normalise only. Image files are first fitted to 32 px.
- ResNet, training: random crop of area 0.08-1 and aspect 3/4-4/3, fused into decoding (ROI
  decode), resized to 224, flip, normalise; evaluation: shorter side 256, centre 224, normalise.

Sources: raw uint8 arrays (CIFAR) come through an external source that shuffles with its own
seeded generator every epoch; image files come through DALI's file reader. Decoded data sets can
also be kept on the training device (`decode_to_device`) and served through the same operators.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fasttrain.data.datasets import ArraySplit, FileSplit
from fasttrain.errors import UserError
from fasttrain.recipes import Recipe

DALI_PACKAGE = "nvidia-dali-cuda130"
CACHE_SHARE = 0.25  # --cache auto keeps a data set on the GPU when it takes at most this share of free memory
READER = "Reader"


def import_dali():
    """The nvidia.dali modules, or a one-line error naming the package to install."""
    try:
        from nvidia import dali
        from nvidia.dali import fn, types
        from nvidia.dali.plugin import pytorch as dali_torch
    except ImportError as exc:
        raise UserError(f"--loader dali needs NVIDIA DALI: pip install {DALI_PACKAGE} "
                        f"(or use --loader torch) [{exc}]") from None
    except Exception as exc:  # a wheel built for another CUDA major version fails here
        raise UserError(f"NVIDIA DALI did not load ({type(exc).__name__}: {exc}); install {DALI_PACKAGE} "
                        f"for CUDA 13, or use --loader torch") from None
    return dali, fn, types, dali_torch


def dali_available() -> bool:
    try:
        import_dali()
    except UserError:
        return False
    return True


@dataclass(frozen=True)
class Placement:
    """Where each stage runs: decoding ("mixed" = CPU parse + GPU decode) and the other operators."""

    device_id: int | None
    decoder: str
    ops: str

    @classmethod
    def for_device(cls, device: torch.device) -> "Placement":
        if device.type == "cuda":
            return cls(device.index if device.index is not None else torch.cuda.current_device(), "mixed", "gpu")
        return cls(None, "cpu", "cpu")

    @property
    def on_gpu(self) -> bool:
        return self.ops == "gpu"


# ---- the augmentation graphs, shared by every source --------------------------------------------


def _normalise(fn, types, images, mean, std, mirror=None, crop=None):
    """One crop_mirror_normalize: optional centre crop and flip, [0, 255] -> (x / 255 - mean) / std, HWC."""
    kwargs = {"crop": crop} if crop else {}
    if mirror is not None:
        kwargs["mirror"] = mirror
    return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="HWC",
                                    mean=[255 * m for m in mean], std=[255 * s for s in std], **kwargs)


def _pad_crop(fn, types, images, size: int, padding: int):
    """torchvision's RandomCrop(size, padding): zero padding, integer offset uniform in [0, 2 * padding]."""
    offsets = [float(v) for v in range(-padding, padding + 1)]
    anchor = fn.random.uniform(values=offsets, shape=2)  # (y, x) of the window's corner in the unpadded image
    return fn.slice(images, anchor, fn.constant(fdata=[float(size), float(size)]), axes=[0, 1],
                    normalized_anchor=False, normalized_shape=False, out_of_bounds_policy="pad", fill_values=0)


def _fit(fn, images, size: int):
    """Files of any size -> size x size: shorter side to size, centre crop (torchvision Resize + CenterCrop)."""
    images = fn.resize(images, resize_shorter=size, antialias=True)
    return fn.crop(images, crop=(size, size))


def augment(fn, types, images, recipe: Recipe, mean, std, train: bool, stage: str):
    """The recipe's augmentation on decoded uint8 HWC images.

    stage: "native" (CIFAR arrays, or files decoded at their own size), "cropped" (ResNet training
    files whose random crop was fused into decoding) or "cache" (decoded once at the size the
    recipe's evaluation starts from).
    """
    if recipe.model == "cnn":
        if train:
            images = _pad_crop(fn, types, images, recipe.image_size, recipe.crop_padding)
            return _normalise(fn, types, images, mean, std, mirror=fn.random.coin_flip(probability=0.5))
        return _normalise(fn, types, images, mean, std)
    size = recipe.image_size
    if train:
        if stage != "cropped":
            images = fn.random_resized_crop(images, size=[size, size], random_area=[0.08, 1.0],
                                            random_aspect_ratio=[3 / 4, 4 / 3], antialias=True)
        return _normalise(fn, types, images, mean, std, mirror=fn.random.coin_flip(probability=0.5))
    if stage != "cache":
        images = fn.resize(images, resize_shorter=recipe.eval_resize, antialias=True)
    return _normalise(fn, types, images, mean, std, crop=(size, size))


def cache_size(recipe: Recipe) -> int:
    """Shorter side at which decoded files are cached: what evaluation starts from."""
    return recipe.image_size if recipe.model == "cnn" else recipe.eval_resize


# ---- sources ----------------------------------------------------------------------------------


class ArraySource:
    """Batches of uint8 HWC images and int64 labels for DALI's external source.

    Images are a host numpy array or, for the device cache, a CUDA tensor of the same shape.
    Training draws a new permutation every epoch from its own seeded generator and drops the
    partial last batch; evaluation keeps data-set order and every sample. With shards, each shard
    takes an equal, disjoint part of every epoch's order.
    """

    def __init__(self, images, labels: np.ndarray, batch_size: int, train: bool, seed: int,
                 shard_id: int = 0, num_shards: int = 1):
        self.images, self.batch_size, self.train = images, batch_size, train
        self.on_device = isinstance(images, torch.Tensor) and images.is_cuda
        self.labels = np.asarray(labels, dtype=np.int64)
        self.device_labels = torch.as_tensor(self.labels, device=images.device) if self.on_device else None
        self.rng = np.random.default_rng(seed)
        self.shard_id, self.num_shards = shard_id, num_shards
        # batches are gathered on a side stream and waited for there alone: DALI then copies a
        # finished buffer, and the training kernels queued on the default stream are never waited on
        self.stream = torch.cuda.Stream(images.device) if self.on_device else None

    def __len__(self) -> int:
        n, b = len(self.labels), self.batch_size
        return n // self.num_shards // b if self.train else math.ceil(math.ceil(n / self.num_shards) / b)

    def _order(self) -> np.ndarray:
        n = len(self.labels)
        if self.train:
            per = n // self.num_shards
            return self.rng.permutation(n)[self.shard_id * per:(self.shard_id + 1) * per]
        return np.array_split(np.arange(n), self.num_shards)[self.shard_id]

    def __iter__(self):
        self.order, self.position = self._order(), 0
        return self

    def __next__(self):
        stop = self.position + self.batch_size
        if self.position >= len(self.order) or (self.train and stop > len(self.order)):
            raise StopIteration
        index = self.order[self.position:stop]
        self.position = stop
        if self.on_device:
            with torch.cuda.stream(self.stream):
                picked = torch.as_tensor(index, device=self.images.device)
                images, labels = self.images[picked], self.device_labels[picked][:, None]
            self.stream.synchronize()
            return images, labels
        return self.images[index], self.labels[index, None]


def _external(fn, source: ArraySource, placement: Placement):
    device = "gpu" if source.on_device else "cpu"
    images, labels = fn.external_source(source=source, num_outputs=2, layout=["HWC", ""], cycle="raise",
                                        device=device)
    if placement.on_gpu and not source.on_device:
        images, labels = images.gpu(), labels.gpu()
    return images, labels


def _reader(fn, split: FileSplit, train: bool, seed: int, shard_id: int, num_shards: int):
    """DALI's file reader over the split's file list and labels (no files copied or linked).

    Training: the list is passed in a seeded random order and the reader's shuffle buffer holds the
    whole shard, so every epoch is freshly shuffled. Evaluation: data-set order, the last batch
    padded by the reader and the padding dropped by the iterator.
    """
    files, labels = [str(f) for f in split.files], split.labels.tolist()
    if train:
        order = np.random.default_rng(seed).permutation(len(files))
        files, labels = [files[i] for i in order], [labels[i] for i in order]
    return fn.readers.file(files=files, labels=labels, random_shuffle=train,
                           initial_fill=max(1, min(len(files) // num_shards, 4096)), shard_id=shard_id,
                           num_shards=num_shards, pad_last_batch=not train, name=READER, seed=seed)


def _decode(fn, types, jpegs, recipe: Recipe, train: bool, placement: Placement):
    extra = {"hw_decoder_load": 0.75} if placement.decoder == "mixed" else {}
    if train and recipe.model == "resnet":
        # the random crop is fused into decoding (ROI decode): only the window is decoded
        images = fn.decoders.image_random_crop(jpegs, device=placement.decoder, output_type=types.RGB,
                                               random_area=[0.08, 1.0], random_aspect_ratio=[3 / 4, 4 / 3],
                                               num_attempts=10, **extra)
        return fn.resize(images, resize_x=recipe.image_size, resize_y=recipe.image_size, antialias=True)
    return fn.decoders.image(jpegs, device=placement.decoder, output_type=types.RGB, **extra)


# ---- the loader --------------------------------------------------------------------------------


class DaliLoader:
    """Loader contract over a DALI pipeline: (images, labels) on the device, channels_last when asked."""

    def __init__(self, pipeline, steps: int, batch_size: int, channels_last: bool, train: bool,
                 reader: bool, files: list[Path] | None = None, raw: bool = False):
        _, _, _, dali_torch = import_dali()
        policy = dali_torch.LastBatchPolicy.DROP if train else dali_torch.LastBatchPolicy.PARTIAL
        self.pipeline, self.steps, self.batch_size = pipeline, steps, batch_size
        self.channels_last, self.files, self.raw = channels_last, files, raw
        try:
            self.iterator = dali_torch.DALIGenericIterator(
                pipeline, ["images", "labels"], reader_name=READER if reader else None, last_batch_policy=policy,
                auto_reset=True, prepare_first_batch=False)
        except RuntimeError as exc:
            raise self._explain(exc) from None

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        try:
            for (batch,) in self.iterator:
                if self.raw:
                    yield batch["images"], batch["labels"].view(-1).long()
                    continue
                images = batch["images"].permute(0, 3, 1, 2)  # HWC storage = channels_last NCHW, no copy
                if not self.channels_last:
                    images = images.contiguous()
                yield images, batch["labels"].view(-1).long()
        except RuntimeError as exc:
            raise self._explain(exc) from None

    def _explain(self, exc: RuntimeError) -> UserError:
        """Turn DALI's decoder errors into a message that names the file."""
        text = str(exc)
        if self.files is None or "decod" not in text.lower():
            return UserError(f"DALI pipeline failed: {text.splitlines()[0] if text else type(exc).__name__}")
        bad = find_undecodable(self.files)
        if bad:
            more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
            return UserError(f"cannot decode {bad[0]}{more}; remove or replace the file, or train with "
                             f"--loader torch")
        return UserError(f"DALI could not decode an image ({text.splitlines()[0]}); try --loader torch")


def find_undecodable(files: list[Path], limit: int = 20) -> list[Path]:
    """Files that PIL cannot fully decode: the culprits behind a DALI decoding error."""
    from PIL import Image

    bad = []
    for path in files:
        try:
            with Image.open(path) as image:
                image.load()
        except Exception:
            bad.append(path)
            if len(bad) >= limit:
                break
    return bad


def build_pipeline(kind: str, data, recipe: Recipe, mean, std, train: bool, device: torch.device, threads: int,
                   seed: int, shard_id: int = 0, num_shards: int = 1):
    """A built DALI pipeline and its steps per epoch.

    kind: "files" (data is a FileSplit, read and decoded by DALI), "arrays" (data is an ArraySource
    over CIFAR's raw arrays, on the host or on the device) or "cache" (an ArraySource over files
    decoded once at the size evaluation starts from).
    """
    dali, fn, types, _ = import_dali()
    placement = Placement.for_device(device)
    batch = recipe.batch_size

    @dali.pipeline_def
    def pipeline():
        if kind == "files":
            jpegs, labels = _reader(fn, data, train, seed, shard_id, num_shards)
            images = _decode(fn, types, jpegs, recipe, train, placement)
            if recipe.model == "cnn":
                images = _fit(fn, images, recipe.image_size)
            stage = "cropped" if train and recipe.model == "resnet" else "native"
            if placement.on_gpu:
                labels = labels.gpu()
        else:
            images, labels = _external(fn, data, placement)
            stage = "cache" if kind == "cache" else "native"
        return augment(fn, types, images, recipe, mean, std, train, stage), labels

    if kind == "files":
        n = len(data)
        steps = n // num_shards // batch if train else math.ceil(math.ceil(n / num_shards) / batch)
    else:
        steps = len(data)
    pipe = pipeline(batch_size=batch, num_threads=max(1, threads), device_id=placement.device_id,
                    seed=seed + 7919 * shard_id + (0 if train else 1), prefetch_queue_depth=2)
    try:
        pipe.build()
    except RuntimeError as exc:
        raise UserError(f"DALI pipeline could not be built: {str(exc).splitlines()[0]}") from None
    return pipe, steps


def decode_to_device(split: FileSplit, recipe: Recipe, device: torch.device, threads: int) -> torch.Tensor | np.ndarray:
    """Decode every file once: shorter side to the evaluation size, centre square, uint8 HWC, on the device.

    The square keeps the tensor dense (one index per batch); evaluation crops inside it, so eval
    batches are the same as from files; training crops see the central square of each photo.
    """
    dali, fn, types, dali_torch = import_dali()
    placement = Placement.for_device(device)
    size, batch = cache_size(recipe), 256

    @dali.pipeline_def
    def pipeline():
        jpegs, labels = _reader(fn, split, False, 0, 0, 1)
        images = _fit(fn, _decode(fn, types, jpegs, recipe, False, placement), size)
        return images, labels

    pipe = pipeline(batch_size=batch, num_threads=max(1, threads), device_id=placement.device_id, seed=0)
    pipe.build()
    loader = DaliLoader(pipe, math.ceil(len(split) / batch), batch, channels_last=True, train=False, reader=True,
                        files=list(split.files), raw=True)
    out = torch.empty((len(split), size, size, 3), dtype=torch.uint8, device=device)
    filled = 0
    for images, _ in loader:
        out[filled:filled + len(images)] = images
        filled += len(images)
    return out if device.type == "cuda" else out.numpy()


def cache_bytes(data, recipe: Recipe) -> int:
    """Bytes the decoded data set takes as uint8: raw CIFAR arrays, or files at the cache size."""
    if isinstance(data.train, ArraySplit):
        return data.train.images.nbytes + data.val.images.nbytes
    side = cache_size(recipe)
    return (len(data.train) + len(data.val)) * side * side * 3


def choose_cache(mode: str, data, recipe: Recipe, device: torch.device) -> tuple[bool, str]:
    """Whether to keep the decoded data set on the device, and why, in words."""
    size = cache_bytes(data, recipe)
    gb = f"{size / 2**30:.2f} GiB"
    if mode == "none":
        return False, "cache off (--cache none)"
    if mode == "gpu":
        where = "GPU memory" if device.type == "cuda" else "host memory (no GPU)"
        return True, f"cache on: {gb} decoded once into {where}"
    if device.type != "cuda":
        return False, "cache off: no GPU (--cache gpu keeps it in host memory)"
    free, _ = torch.cuda.mem_get_info(device)
    if size <= CACHE_SHARE * free:
        return True, f"cache on: {gb} decoded once, {CACHE_SHARE:.0%} of free GPU memory allows {CACHE_SHARE * free / 2**30:.1f} GiB"
    return False, f"cache off: {gb} is more than {CACHE_SHARE:.0%} of the {free / 2**30:.1f} GiB free"


def dali_loaders(data, recipe: Recipe, device: torch.device, threads: int, seed: int, mean, std,
                 shard_id: int = 0, num_shards: int = 1) -> tuple[DaliLoader, DaliLoader, str, list[str]]:
    """Training and evaluation loaders, the variant's name and what was decided on the way."""
    import_dali()
    cache, why = choose_cache(recipe.cache, data, recipe, device)
    common = dict(recipe=recipe, mean=mean, std=std, device=device, threads=threads, shard_id=shard_id,
                  num_shards=num_shards)

    def make(split, train: bool) -> DaliLoader:
        batch, split_seed = recipe.batch_size, seed + (0 if train else 1)
        if isinstance(split, ArraySplit):
            images = torch.as_tensor(split.images, device=device) if cache and device.type == "cuda" else split.images
            source = ArraySource(images, split.labels, batch, train, split_seed, shard_id, num_shards)
            pipe, steps = build_pipeline("arrays", source, train=train, seed=split_seed, **common)
            return DaliLoader(pipe, steps, batch, recipe.channels_last, train, reader=False)
        if cache:
            source = ArraySource(decode_to_device(split, recipe, device, threads), split.labels, batch, train,
                                 split_seed, shard_id, num_shards)
            pipe, steps = build_pipeline("cache", source, train=train, seed=split_seed, **common)
            return DaliLoader(pipe, steps, batch, recipe.channels_last, train, reader=False)
        pipe, steps = build_pipeline("files", split, train=train, seed=split_seed, **common)
        return DaliLoader(pipe, steps, batch, recipe.channels_last, train, reader=True, files=list(split.files))

    variant = "dali-cache" if cache else ("dali" if device.type == "cuda" else "dali-cpu")
    return make(data.train, True), make(data.val, False), variant, [why]
