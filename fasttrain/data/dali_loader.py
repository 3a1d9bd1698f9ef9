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

Every pipeline is fed by one external source that visits samples in the order of
fasttrain/data/order.py (a permutation seeded by seed and epoch, so a resumed run sees the same
next epoch): raw uint8 arrays (CIFAR), or encoded file paths that DALI's own threads read
(fn.io.file.read) and decode.

The cache (`--cache gpu`, or `auto` on CUDA when it fits) keeps the decoded data set on the
training device (`decode_to_device`; CIFAR's arrays as they are). Its batches are augmented one
of two ways, chosen by --cache-augment (the recipe's cache_augment; its "auto" reads the
environment variable FASTTRAIN_CACHE_AUGMENT; see `cache_augment`):
- "device" (the default): batched tensor ops on the training stream, airbench's way
  (fasttrain/data/device_augment.py); the loader is named "device-cache".
- "dali": gathered on a side stream and fed to the same DALI operators as above; the loader is
  named "dali-cache".
Issue 10 asks for the faster of the two on a saturated GPU; `bash benchmarks/gpu_check.sh`
measures both (loader alone, and data wait while training the fast CNN recipe).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from fasttrain.data.decode import POLICY_VERSION, decode_failure, open_rgb, problem
from fasttrain.data.index import cache_dir, shown
from fasttrain.data.splits import ArraySplit, FileSplit
from fasttrain.data.order import EpochOrder
from fasttrain.errors import UserError
from fasttrain.recipes import Recipe

DALI_PACKAGE = "nvidia-dali-cuda130"
PREFETCH = 2  # DALI's prefetch_queue_depth for the training and evaluation pipelines
CACHE_SHARE = 0.25  # --cache auto keeps a data set on the GPU when it takes at most this share of free memory
CACHE_AUGMENT_ENV = "FASTTRAIN_CACHE_AUGMENT"  # how the cache's batches are augmented: "device" or "dali"
CACHE_AUGMENT_DEFAULT = "device"  # until a GPU measurement (benchmarks/gpu_check.sh) says otherwise


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


class BatchSource:
    """DALI external source: batches of (data, labels) in the order EpochOrder gives.

    DALI calls iter() once per epoch (and again after each reset), so every call starts the next
    epoch. `fetch(index)` turns sample indices into the batch's data: raw uint8 HWC arrays (CIFAR),
    a gather from a device-resident tensor (the cache), or encoded file paths for fn.io.file.read.
    The last few index batches handed out are kept, to find the culprit when decoding fails.
    """

    def __init__(self, order: EpochOrder, fetch: Callable[[np.ndarray], tuple], on_device: bool = False):
        self.order, self.fetch, self.on_device = order, fetch, on_device
        self.inflight: collections.deque = collections.deque(maxlen=8)

    def __len__(self) -> int:
        return self.order.steps()

    def __iter__(self):
        self.first_step = self.order.start_step  # > 0 when resumed mid-epoch, or restarted after a bad file
        self.indices, self.position = self.order.next_epoch(), 0
        return self

    def __next__(self):
        if self.position >= len(self.indices):
            raise StopIteration
        index = self.indices[self.position:self.position + self.order.batch_size]
        self.position += len(index)
        self.inflight.append(index)
        return self.fetch(index)


def host_arrays(images: np.ndarray, labels: np.ndarray):
    return lambda index: (images[index], labels[index, None])


class DeviceGather:
    """Fetch for the DALI cache path: gather batches from a device-resident uint8 tensor, never waiting.

    The index goes to the device from pinned memory and the gather runs on a side stream, so the
    host queues them and returns at once. DALI's external source is told this stream
    (`_external`: fn.external_source(cuda_stream=...)), so it copies each batch on the same
    stream, after the gather: no stream.synchronize() per batch, and the training kernels queued
    on the default stream are never waited on. The last few batches are kept referenced, so no
    gathered buffer is freed (and reused) before DALI's copy of it has run.
    """

    def __init__(self, images: torch.Tensor, labels: np.ndarray):
        self.images = images
        self.labels = torch.as_tensor(labels, device=images.device)
        self.stream = torch.cuda.Stream(images.device)
        self.stream.wait_stream(torch.cuda.current_stream(images.device))  # the cache was written there
        self.alive: collections.deque = collections.deque(maxlen=PREFETCH + 2)

    def __call__(self, index: np.ndarray):
        with torch.cuda.stream(self.stream):
            picked = torch.from_numpy(np.ascontiguousarray(index)).pin_memory().to(self.images.device,
                                                                                  non_blocking=True)
            batch, batch_labels = self.images[picked], self.labels[picked][:, None]
        self.alive.append((batch, batch_labels))
        return batch, batch_labels


class FilePaths:
    """Fetch for fn.io.file.read: the encoded paths of a batch, and its labels; DALI's threads read the files.

    Paths are bytes to the OS: os.fsencode keeps names that are not valid UTF-8 as they are on disk.
    """

    def __init__(self, files: list[Path], labels: np.ndarray):
        self.encoded = [np.frombuffer(os.fsencode(f), dtype=np.uint8) for f in files]
        self.labels = labels

    def replace(self, i: int, path: Path) -> None:
        self.encoded[i] = np.frombuffer(os.fsencode(path), dtype=np.uint8)

    def __call__(self, index: np.ndarray):
        return [self.encoded[i] for i in index], self.labels[index, None]



def _transcoded(path: Path) -> Path:
    """Where the decode policy's pixels of `path` are kept as a lossless PNG, keyed by the policy's
    version and the file's path, size and modification time."""
    st = os.stat(path)
    key = hashlib.sha1(os.fsencode(os.path.realpath(path))
                       + f"|{st.st_size}|{st.st_mtime_ns}|{POLICY_VERSION}".encode()).hexdigest()
    return cache_dir() / "decoded" / key[:2] / f"{key}.png"


def _transcode(path: Path) -> Path | str:
    """The PNG DALI reads instead of `path` (made once), or why `path` cannot be decoded.

    Raises UserError when the copy cannot be written (a full disk, a read-only cache folder).
    """
    try:
        target = _transcoded(path)
        if target.is_file():
            return target
        image = open_rgb(path)
    except Exception as exc:  # reading the user's file: a damaged or vanished file is left out
        return decode_failure(exc)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        image.save(tmp, format="PNG", compress_level=1)
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write a decoded copy of {shown(path)} in {shown(cache_dir() / 'decoded')} "
                        f"({exc.strerror or exc}); set FASTTRAIN_CACHE to a writable folder, or use --loader torch") \
            from None
    return target


def dali_files(split: FileSplit, threads: int) -> tuple[list[Path], list[tuple[int, str]]]:
    """The file DALI reads for each sample, and (index, reason) for samples that cannot be decoded.

    Files whose pixels DALI's decoder would not give as the decode policy does (split.host_decode:
    GIFs, CMYK, 16-bit, TIFF...) are decoded once by the policy and handed to DALI as lossless PNGs,
    so DALI and the DataLoader see the same pixels.
    """
    files = list(split.files)
    host = np.flatnonzero(split.host_decode) if split.host_decode is not None else []
    bad = []
    if len(host):
        with ThreadPoolExecutor(max(1, threads)) as pool:
            for i, result in zip(host, pool.map(_transcode, [files[i] for i in host])):
                if isinstance(result, str):
                    bad.append((int(i), result))
                else:
                    files[i] = result
    return files, bad


def _external(fn, source: BatchSource, placement: Placement, layout: str):
    device = "gpu" if source.on_device else "cpu"
    # device data: DALI copies it on the stream that made it (DeviceGather), ordered after the gather
    stream = {"cuda_stream": source.fetch.stream} if isinstance(source.fetch, DeviceGather) else {}
    data, labels = fn.external_source(source=source, num_outputs=2, layout=[layout, ""], cycle="raise",
                                      device=device, **stream)
    if placement.on_gpu and not source.on_device:
        labels = labels.gpu()
        if layout == "HWC":
            data = data.gpu()
    return data, labels


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
    """Loader contract over a DALI pipeline: (images, labels) on the device, channels_last when asked.

    `build(source)` makes a built pipeline around a BatchSource. When a file that passed the
    header check fails to decode, the loader names it, excludes it from every later epoch,
    rebuilds the pipeline and carries on from the same step; `on_skip(path, reason)` is told.
    """

    def __init__(self, build: Callable, source: BatchSource, channels_last: bool, train: bool,
                 files: list[Path] | None = None, raw: bool = False, names: list[Path] | None = None):
        self.build, self.source, self.channels_last, self.train = build, source, channels_last, train
        self.files, self.raw = files, raw
        self.names = names if names is not None else files  # the user's file behind each file DALI reads
        self.batch_size = source.order.batch_size
        self.prefetch_batches = PREFETCH  # batches DALI prepares ahead: ready at once after a compile
        self.on_skip: list[Callable[[Path, str], None]] = []
        self.iterator = self._iterator()

    def _iterator(self):
        _, _, _, dali_torch = import_dali()
        pipe = self.build(self.source)
        policy = dali_torch.LastBatchPolicy.DROP if self.train else dali_torch.LastBatchPolicy.PARTIAL
        return dali_torch.DALIGenericIterator(pipe, ["images", "labels"], last_batch_policy=policy, auto_reset=True,
                                              prepare_first_batch=False)

    def __len__(self) -> int:
        return self.source.order.steps()

    def close(self) -> None:
        """Release the pipeline (DALI's threads, its buffers) now rather than whenever the garbage
        collector meets it; the loader is not iterated again."""
        self.iterator = None

    def __iter__(self):
        delivered = 0  # batches served since the source last started (the epoch, or a restart in it)
        while True:
            try:
                for (batch,) in self.iterator:
                    delivered += 1
                    yield self._convert(batch)
                return
            except RuntimeError as exc:
                self._recover(exc, self.source.first_step + delivered)
                delivered = 0

    def _convert(self, batch):
        labels = batch["labels"].view(-1).long()
        if self.raw:
            return batch["images"], labels
        images = batch["images"].permute(0, 3, 1, 2)  # HWC storage = channels_last NCHW, no copy
        return (images if self.channels_last else images.contiguous()), labels

    def _recover(self, exc: RuntimeError, step: int) -> None:
        """Find the undecodable file among the batches in flight, exclude it, rebuild, go on at `step`."""
        text = str(exc)
        first_line = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
        if self.files is None or "decod" not in text.lower():
            raise UserError(f"DALI pipeline failed: {first_line}") from None
        suspects = list(dict.fromkeys(int(i) for batch in self.source.inflight for i in batch))
        bad = [(i, why) for i in suspects if (why := problem(self.names[i])) is not None]
        if not bad:
            # every suspect decodes with the policy, so DALI's decoder refused one that Pillow reads
            # (a PNG without its end chunk, say): decode the suspects the policy's way, then go on
            fresh = [i for i in suspects if self.files[i] == self.names[i]]
            if not fresh or not isinstance(self.source.fetch, FilePaths):
                named = ", ".join(shown(self.names[i]) for i in suspects)[:400]
                raise UserError(f"DALI could not decode an image among {named} ({first_line}); "
                                f"try --loader torch") from None
            for i in fresh:
                copy = _transcode(self.names[i])
                if isinstance(copy, str):  # it failed after all (the file changed): leave it out
                    bad.append((i, copy))
                else:
                    self.files[i] = copy
                    self.source.fetch.replace(i, copy)
        order = self.source.order
        for i, why in bad:
            order.excluded.add(i)
            for callback in self.on_skip:
                callback(self.names[i], why)
        order.epoch -= 1          # next_epoch() gives the same epoch again ...
        order.start_step = step   # ... from the first batch not yet delivered
        self.source.inflight.clear()
        self.iterator = self._iterator()


def pipeline_builder(kind: str, recipe: Recipe, mean, std, train: bool, device: torch.device, threads: int,
                     seed: int) -> Callable[[BatchSource], object]:
    """A function that builds the DALI pipeline around a source.

    kind: "files" (the source yields encoded paths; DALI reads and decodes), "arrays" (CIFAR's raw
    uint8 arrays, on the host or the device) or "cache" (files decoded once at the size evaluation
    starts from, on the device).
    """
    dali, fn, types, _ = import_dali()
    placement = Placement.for_device(device)

    def build(source: BatchSource):
        @dali.pipeline_def
        def pipeline():
            if kind == "files":
                paths, labels = _external(fn, source, placement, layout="")
                images = _decode(fn, types, fn.io.file.read(paths), recipe, train, placement)
                if recipe.model == "cnn":
                    images = _fit(fn, images, recipe.image_size)
                stage = "cropped" if train and recipe.model == "resnet" else "native"
            else:
                images, labels = _external(fn, source, placement, layout="HWC")
                stage = "cache" if kind == "cache" else "native"
            return augment(fn, types, images, recipe, mean, std, train, stage), labels

        pipe = pipeline(batch_size=source.order.batch_size, num_threads=max(1, threads),
                        device_id=placement.device_id, seed=seed + 7919 * source.order.shard_id + (0 if train else 1),
                        prefetch_queue_depth=PREFETCH)
        try:
            pipe.build()
        except RuntimeError as exc:
            raise UserError(f"DALI pipeline could not be built: {str(exc).splitlines()[0]}") from None
        return pipe

    return build


def decode_to_device(split: FileSplit, recipe: Recipe, device: torch.device, threads: int,
                     on_skip: Callable[[Path, str], None] | None = None):
    """Decode every file once: shorter side to the evaluation size, centre square, uint8 HWC, on the device.

    Returns (images, kept): images (len(kept), S, S, 3) uint8 (a device tensor on CUDA, else a
    numpy array), row r holding sample kept[r] of the split. A file that fails to decode is named
    to on_skip(path, reason) and has no row, so no image ever sits under another image's label.
    The square keeps the tensor dense (one index per batch); evaluation crops inside it, so eval
    batches are the same as from files; training crops see the central square of each photo.
    """
    dali, fn, types, _ = import_dali()
    placement = Placement.for_device(device)
    size = cache_size(recipe)
    files, bad = dali_files(split, threads)
    # the sample's own index travels as its label, so each decoded image lands in its own row
    source = BatchSource(EpochOrder(len(split), 256, train=False, seed=0),
                         FilePaths(files, np.arange(len(split), dtype=np.int64)))
    for i, _ in bad:
        source.order.excluded.add(i)

    def build(source):
        @dali.pipeline_def
        def pipeline():
            paths, labels = _external(fn, source, placement, layout="")
            return _fit(fn, _decode(fn, types, fn.io.file.read(paths), recipe, False, placement), size), labels

        pipe = pipeline(batch_size=256, num_threads=max(1, threads), device_id=placement.device_id, seed=0)
        try:
            pipe.build()
        except RuntimeError as exc:
            raise UserError(f"DALI pipeline could not be built: {str(exc).splitlines()[0]}") from None
        return pipe

    loader = DaliLoader(build, source, channels_last=True, train=False, files=files, raw=True,
                        names=list(split.files))
    position = {path: i for i, path in enumerate(split.files)}
    loader.on_skip.append(lambda path, reason: bad.append((position[path], reason)))
    out = torch.empty((len(split), size, size, 3), dtype=torch.uint8, device=device)
    filled = torch.zeros(len(split), dtype=torch.bool, device=device)
    for images, rows in loader:
        out[rows] = images
        filled[rows] = True
    for i, reason in bad:
        if on_skip is not None:
            on_skip(split.files[i], reason)
    kept = torch.nonzero(filled).view(-1).cpu().numpy()
    images = out[torch.as_tensor(kept, device=device)] if len(kept) < len(split) else out
    return (images if device.type == "cuda" else images.numpy()), kept


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
        return False, "cache off (cache none: --cache gpu keeps the decoded data set on the device)"
    if mode == "gpu":
        where = "GPU memory" if device.type == "cuda" else "host memory (no GPU)"
        return True, f"cache on: {gb} decoded once into {where}"
    if device.type != "cuda":
        return False, "cache off: no GPU (--cache gpu keeps it in host memory)"
    free, _ = torch.cuda.mem_get_info(device)
    if size <= CACHE_SHARE * free:
        return True, f"cache on: {gb} decoded once, {CACHE_SHARE:.0%} of free GPU memory allows {CACHE_SHARE * free / 2**30:.1f} GiB"
    return False, f"cache off: {gb} is more than {CACHE_SHARE:.0%} of the {free / 2**30:.1f} GiB free"


def cache_augment(choice: str | None = None) -> str:
    """How batches from the cache are augmented: "device" (batched tensor ops on the training
    stream, fasttrain/data/device_augment.py) or "dali" (DALI's operators, fed from the cache).

    choice (the recipe's cache_augment, --cache-augment) "device" or "dali" decides; None or "auto"
    reads $FASTTRAIN_CACHE_AUGMENT, else CACHE_AUGMENT_DEFAULT. Raises UserError for another value.
    """
    if choice in (None, "auto"):
        choice = os.environ.get(CACHE_AUGMENT_ENV, "").strip().lower() or CACHE_AUGMENT_DEFAULT
    if choice not in ("device", "dali"):
        raise UserError(f"unknown cache augmentation {choice!r} (from {CACHE_AUGMENT_ENV}?): "
                        f"use device or dali")
    return choice


def dali_loader(split, train: bool, recipe: Recipe, device: torch.device, threads: int, seed: int, mean, std,
                cache: bool = False, shard_id: int = 0, num_shards: int = 1, start_epoch: int = 1,
                start_step: int = 0, on_skip: Callable[[Path, str], None] | None = None,
                augment: str | None = None):
    """One split's loader: training (shuffled, whole batches) or evaluation (every sample, in order).

    With the cache, `augment` (see cache_augment) picks a DeviceCacheLoader or DALI's operators;
    both visit the samples in the same order. on_skip(path, reason) hears of every file found
    undecodable, while the loader is built (the cache, files decoded by the policy) and later
    mid-epoch; the loader leaves it out, label too.
    """
    tell = [on_skip] if on_skip is not None else []
    if cache:
        if isinstance(split, FileSplit):
            decoded, kept = decode_to_device(split, recipe, device, threads, on_skip)
            split, kind = FileSplit([split.files[i] for i in kept], split.labels[kept]), "cache"
        else:
            decoded, kind = split.images, "arrays"
        order = EpochOrder(len(split), recipe.batch_size, train, seed, shard_id, num_shards, start_epoch, start_step)
        if cache_augment(augment) == "device":
            from fasttrain.data.device_augment import DeviceCacheLoader

            loader = DeviceCacheLoader(torch.as_tensor(decoded, device=device),
                                       torch.as_tensor(split.labels, device=device), order, recipe, mean, std,
                                       train, seed)
        else:
            on_gpu = device.type == "cuda"
            fetch = DeviceGather(torch.as_tensor(decoded, device=device), split.labels) if on_gpu \
                else host_arrays(np.asarray(decoded), split.labels)
            loader = DaliLoader(pipeline_builder(kind, recipe, mean, std, train, device, threads, seed),
                                BatchSource(order, fetch, on_device=on_gpu), recipe.channels_last, train)
        loader.on_skip += tell
        return loader
    order = EpochOrder(len(split), recipe.batch_size, train, seed, shard_id, num_shards, start_epoch, start_step)
    files = None
    if isinstance(split, ArraySplit):
        kind = "arrays"
        source = BatchSource(order, host_arrays(split.images, split.labels))
    else:
        kind, (files, bad) = "files", dali_files(split, threads)
        for i, reason in bad:
            order.excluded.add(i)
            for callback in tell:
                callback(split.files[i], reason)
        source = BatchSource(order, FilePaths(files, split.labels))
    build = pipeline_builder(kind, recipe, mean, std, train, device, threads, seed)
    loader = DaliLoader(build, source, recipe.channels_last, train, files=files,
                        names=list(split.files) if files is not None else None)
    loader.on_skip += tell
    return loader


def variant_name(device: torch.device, cache: bool, augment: str | None = None) -> str:
    """How benchmarks and summaries name a DALI loader: device-cache or dali-cache (the cache, by
    cache_augment), dali (GPU) or dali-cpu."""
    if cache:
        return f"{cache_augment(augment)}-cache"
    return "dali" if device.type == "cuda" else "dali-cpu"


def _fixed_shard(split, shard_id: int, num_shards: int, seed: int, train: bool):
    """A process's fixed part of a split: equal sizes for training, everything once for evaluation."""
    if train:
        per = len(split) // num_shards
        order = np.random.default_rng([seed, 0]).permutation(len(split))
        return split.take(np.sort(order[shard_id * per:(shard_id + 1) * per]))
    return split.take(np.array_split(np.arange(len(split)), num_shards)[shard_id])


def dali_loaders(data, recipe: Recipe, device: torch.device, threads: int, seed: int, mean, std,
                 shard_id: int = 0, num_shards: int = 1, start_epoch: int = 1, start_step: int = 0,
                 on_skip: Callable[[str, Path, str], None] | None = None, augment: str | None = None
                 ) -> tuple[object, object, str, list[str]]:
    """Training and evaluation loaders, the variant's name and what was decided on the way.

    on_skip(split, path, reason), split "train" or "val", hears of each file found undecodable.
    augment: how the cache's batches are augmented (cache_augment; None: $FASTTRAIN_CACHE_AUGMENT).
    """
    import_dali()
    cache, why = choose_cache(recipe.cache, data, recipe, device)
    if cache and num_shards > 1:
        # the cache of each process holds its own fixed shard only; epochs reshuffle within it
        data = dataclasses.replace(data, train=_fixed_shard(data.train, shard_id, num_shards, seed, True),
                                   val=_fixed_shard(data.val, shard_id, num_shards, seed, False))
        shard_id, num_shards = 0, 1
        why += " (this process's shard)"
    notes = [why]
    if cache:
        augment = cache_augment(augment)
        notes.append("cache augmentation: batched tensor ops on the training stream (device-cache; "
                     "--cache-augment dali runs DALI's operators instead)" if augment == "device" else
                     "cache augmentation: DALI's operators, fed from the cache (dali-cache; "
                     "--cache-augment device runs batched tensor ops instead)")
    common = dict(recipe=recipe, device=device, threads=threads, seed=seed, mean=mean, std=std, cache=cache,
                  shard_id=shard_id, num_shards=num_shards, augment=augment)
    tell = (lambda split: (lambda path, reason: on_skip(split, path, reason))) if on_skip else (lambda split: None)
    train = dali_loader(data.train, True, start_epoch=start_epoch, start_step=start_step, on_skip=tell("train"),
                        **common)
    val = dali_loader(data.val, False, on_skip=tell("val"), **common)
    return train, val, variant_name(device, cache, augment), notes
