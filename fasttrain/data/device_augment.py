"""Augmentation as batched tensor ops over a data set that already lives on the training device.

With the cache on (`--cache gpu`, or `auto` on CUDA when it fits), the decoded data set is one
uint8 NHWC tensor on the device: CIFAR's arrays as given, or image files decoded once by
`dali_loader.decode_to_device` (shorter side to the recipe's evaluation size, centre square).
`DeviceCacheLoader` serves it the way airbench serves CIFAR-10: per batch one gather by index
and a few batched tensor ops, queued on the current (training) stream. The host never waits for
the device: the epoch's indices go to the device once, every random number is drawn on the
device, and nothing calls `.item()`, `.cpu()` or `synchronize`. DALI still decodes the files
(once, to build the cache); `FASTTRAIN_CACHE_AUGMENT=dali` keeps DALI's operators for the
augmentation too (fasttrain/data/dali_loader.py).

The rules, each from torchvision's transforms as fasttrain/data/transforms.py uses them:

- CNN, training: `RandomCrop(size, padding=p)` (zero padding; the window's corner uniform in
  [0, H + 2p - size] x [0, W + 2p - size] of the padded image, one draw per image), then
  `RandomHorizontalFlip(0.5)` per image, then `ToDtype(float32, scale=True)` + `Normalize`.
  airbench pads the batch and crops by translate groups with boolean masks; a boolean mask makes
  the host wait on CUDA, so here the padded image is never built: one gather reads each output
  pixel from its source pixel (flip folded into the column index), and pixels that fall in the
  padding are zeroed. Pixel for pixel this is pad, crop, flip.
- CNN, evaluation: normalise only.
- ResNet, training (the cache holds images at `recipe.eval_resize`, square): `RandomResizedCrop(
  image_size, scale=(0.08, 1), ratio=(3/4, 4/3))` with torchvision's sampling rule (10 tries of
  area and log-uniform aspect, rounded sides, else the centre fallback), all images at once, then
  flip p = 0.5 and normalise. The resize is `torchvision.ops.roi_align(aligned=True,
  sampling_ratio=-1)`: bilinear at half-pixel centres, averaging ceil(crop / output) samples per
  axis in each output pixel. It differs from torchvision's and DALI's antialiased bilinear
  resize in two ways: when shrinking, its prefilter is a box of 1-2 bilinear taps per axis
  rather than a triangle as wide as the scale (from the cache, 256 px to 224 px shrinks by
  1.14x at most, so the two are close); and at the crop's edges it reads the neighbouring pixels
  outside the crop where torchvision (crop, then resize) repeats the edge pixel.
- ResNet, evaluation: `Resize(eval_resize)` + `CenterCrop(image_size)` + normalise. A cache already
  at eval_resize (decoded files) is cropped, no resampling: the pixels of DALI's cache path, and
  of the DataLoader up to the decoders and resize filters. Any other cache (CIFAR arrays) has
  its centre window resampled by roi_align: plain bilinear, as torchvision's for an enlargement.

Shapes and units: the cache is (N, H, W, 3) uint8 in [0, 255]; labels (N,) int64; batches are
float32 (B, 3, S, S), channels_last when the recipe asks (NHWC storage, no copy) else contiguous
NCHW, normalised as (x / 255 - mean) / std with mean and std in [0, 1] units.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from fasttrain.data.order import EpochOrder
from fasttrain.recipes import Recipe

FLIP_P = 0.5                       # RandomHorizontalFlip(p=0.5), transforms.py
RRC_SCALE = (0.08, 1.0)            # RandomResizedCrop scale: share of the image's area
RRC_RATIO = (3 / 4, 4 / 3)         # RandomResizedCrop ratio: width / height
RRC_TRIES = 10                     # torchvision draws this many times before the centre fallback


# ---- the ops: batched, on whatever device the tensors are on ------------------------------------


def normalise_nhwc(pixels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) in [0, 255] -> float32 (B, H, W, 3), (x / 255 - mean) / std.

    The same float operations as torchvision's ToDtype(float32, scale=True) then Normalize
    (multiply by 1/255, subtract, divide), so the values match the DataLoader's to the last bit.
    """
    return pixels.float().mul_(1.0 / 255).sub_(mean).div_(std)


def pad_crop_flip(cache: torch.Tensor, picked: torch.Tensor, corner: torch.Tensor, flip: torch.Tensor,
                  size: int, padding: int) -> torch.Tensor:
    """RandomCrop(size, padding) + RandomHorizontalFlip as one gather from the cache.

    cache: (N, H, W, C) uint8; picked: (B,) int64 rows of the cache; corner: (B, 2) int64, the
    window's (top, left) in the zero-padded image, in [0, H + 2 padding - size] x [0, W + 2 padding
    - size]; flip: (B,) bool. Returns (B, size, size, C) uint8: window pixels that fall in the
    padding are 0, and a flipped window is read right to left.
    """
    _, height, width, _ = cache.shape
    steps = torch.arange(size, device=cache.device)
    rows = corner[:, :1] - padding + steps                                      # (B, size) source rows
    cols = corner[:, 1:] - padding + torch.where(flip[:, None], size - 1 - steps, steps)
    inside = ((rows >= 0) & (rows < height))[:, :, None] & ((cols >= 0) & (cols < width))[:, None, :]
    pixels = cache[picked[:, None, None], rows.clamp(0, height - 1)[:, :, None], cols.clamp(0, width - 1)[:, None, :]]
    return pixels * inside[..., None]


def random_resized_boxes(n: int, height: int, width: int, generator: torch.Generator,
                         device: torch.device) -> torch.Tensor:
    """torchvision RandomResizedCrop.get_params for n images of height x width at once.

    Returns (n, 4) float32 boxes (x1, y1, x2, y2) in pixels, integer corners as torchvision's: for
    each image the first of RRC_TRIES draws (area share uniform in RRC_SCALE, log aspect uniform in
    log RRC_RATIO, sides rounded half to even like Python's round) that fits, at a uniform integer
    position; where none fits, torchvision's fallback (the whole image clipped to the nearest
    allowed aspect, centred).
    """
    draws = torch.rand((2, n, RRC_TRIES), generator=generator, device=device)
    area = height * width * (RRC_SCALE[0] + (RRC_SCALE[1] - RRC_SCALE[0]) * draws[0])
    log_lo, log_hi = math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * draws[1])
    w, h = torch.sqrt(area * aspect).round(), torch.sqrt(area / aspect).round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.int().argmax(1, keepdim=True)                                   # first try that fits
    w, h, found = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0], fits.any(1)
    # the fallback, as torchvision: the image's own aspect, clipped to the allowed range, centred
    if width / height < RRC_RATIO[0]:
        fw, fh = width, round(width / RRC_RATIO[0])
    elif width / height > RRC_RATIO[1]:
        fw, fh = round(height * RRC_RATIO[1]), height
    else:
        fw, fh = width, height
    w, h = torch.where(found, w, float(fw)), torch.where(found, h, float(fh))
    place = torch.rand((2, n), generator=generator, device=device)               # randint(0, H - h + 1)
    top = torch.where(found, torch.floor(place[0] * (height - h + 1)).clamp_max(height - h), float((height - fh) // 2))
    left = torch.where(found, torch.floor(place[1] * (width - w + 1)).clamp_max(width - w), float((width - fw) // 2))
    return torch.stack([left, top, left + w, top + h], 1)


def centre_box(height: int, width: int, resize: int, size: int) -> tuple[float, float, float, float]:
    """Resize(resize) + CenterCrop(size) as a window (x1, y1, x2, y2) of the height x width source.

    torchvision's Resize(int) scales the shorter side to `resize` and the longer to int(resize *
    long / short); CenterCrop's corner is int(round((side - size) / 2)) in the resized image.
    """
    if height <= width:
        rh, rw = resize, int(resize * width / height)
    else:
        rh, rw = int(resize * height / width), resize
    top, left = int(round((rh - size) / 2.0)), int(round((rw - size) / 2.0))
    sy, sx = height / rh, width / rw
    return left * sx, top * sy, (left + size) * sx, (top + size) * sy


def resample(pixels: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Each image's box, resized to size x size: (B, H, W, C) uint8 + (B, 4) boxes -> (B, C, size, size) float32.

    roi_align(aligned=True) puts pixel centres at +0.5, as torchvision's and DALI's resizes do;
    sampling_ratio=-1 averages ceil(box side / size) bilinear samples per axis in each output pixel.
    """
    from torchvision.ops import roi_align

    rois = torch.cat([torch.arange(len(boxes), device=boxes.device, dtype=boxes.dtype)[:, None], boxes], 1)
    return roi_align(pixels.permute(0, 3, 1, 2).float(), rois, output_size=(size, size), spatial_scale=1.0,
                     sampling_ratio=-1, aligned=True)


# ---- the loader --------------------------------------------------------------------------------


class DeviceCacheLoader:
    """The loader contract (fasttrain/data/loaders.py) over a device-resident cache.

    images: (N, H, W, 3) uint8 and labels: (N,) int64, both on the training device; `order`
    visits them as every other backend does (fasttrain/data/order.py: the DALI cache path with the
    same seed visits the same samples in the same batches). Each `iter()` is the order's next
    epoch, from `order.start_step` when resumed. Random numbers come from one torch.Generator on
    the device, seeded per batch from (seed, shard, epoch, step), so a rerun, or a run resumed at
    any step, makes the same batches. Nothing is prepared ahead (`prefetch_batches` 0): a batch
    is a few kernels queued when the training loop asks for it. `on_skip` callbacks are never
    called: every image in the cache decoded already.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, order: EpochOrder, recipe: Recipe,
                 mean, std, train: bool, seed: int):
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
            raise ValueError(f"the cache must be (N, H, W, 3) uint8, not {tuple(images.shape)} {images.dtype}")
        self.images, self.labels, self.order = images.contiguous(), labels.to(images.device, torch.int64), order
        self.recipe, self.train, self.seed = recipe, train, seed
        self.device = images.device
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device)
        self.batch_size = order.batch_size
        self.channels_last = recipe.channels_last
        self.prefetch_batches = 0
        self.on_skip: list[Callable] = []
        self.generator = torch.Generator(self.device)
        _, height, width, _ = images.shape
        if recipe.model == "resnet" and min(height, width) != recipe.eval_resize:  # made once: no copy per batch
            self.centre = torch.tensor(centre_box(height, width, recipe.eval_resize, recipe.image_size),
                                       device=self.device)

    def __len__(self) -> int:
        return self.order.steps()

    def __iter__(self):
        first_step = self.order.start_step  # next_epoch() resets it
        positions = self.order.next_epoch()
        epoch = self.order.epoch
        if self.device.type == "cuda":  # pinned, so the one copy of the epoch's indices is asynchronous too
            index = torch.from_numpy(positions).pin_memory().to(self.device, non_blocking=True)
        else:
            index = torch.from_numpy(positions)
        entropy = np.random.SeedSequence([self.seed, self.order.shard_id, epoch]).generate_state(1, np.uint64)
        base = int(entropy[0]) >> 2  # + step stays below 2**64
        for step, start in enumerate(range(0, len(positions), self.batch_size), first_step):
            self.generator.manual_seed(base + step)  # sets the host-side seed: no device work, no wait
            yield self.batch(index[start:start + self.batch_size])

    def batch(self, picked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, labels) for the cache rows `picked` ((B,) int64 on the device), drawn from self.generator:
        images float32 (B, 3, S, S) normalised, channels_last when the recipe asks, labels int64 (B,)."""
        recipe, n = self.recipe, len(picked)
        _, height, width, _ = self.images.shape
        if recipe.model == "cnn":
            size, pad = recipe.image_size, recipe.crop_padding
            if self.train:
                draw = dict(generator=self.generator, device=self.device)
                corner = torch.stack([torch.randint(0, height + 2 * pad - size + 1, (n,), **draw),
                                      torch.randint(0, width + 2 * pad - size + 1, (n,), **draw)], 1)
                flip = torch.rand(n, **draw) < FLIP_P
                pixels = pad_crop_flip(self.images, picked, corner, flip, size, pad)
            else:
                pixels = self.images[picked]
            images = normalise_nhwc(pixels, self.mean, self.std).permute(0, 3, 1, 2)  # NHWC storage: channels_last
        else:
            images = self._resnet(picked, height, width)
        if not self.channels_last:
            images = images.contiguous()
        return images, self.labels[picked]

    def _resnet(self, picked: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """ResNet batches as channels_last float32 (B, 3, S, S), normalised."""
        size, resize = self.recipe.image_size, self.recipe.eval_resize
        mean, std = self.mean.view(1, 3, 1, 1), self.std.view(1, 3, 1, 1)
        if self.train:
            boxes = random_resized_boxes(len(picked), height, width, self.generator, self.device)
            flip = (torch.rand(len(picked), generator=self.generator, device=self.device) < FLIP_P).view(-1, 1, 1, 1)
            images = resample(self.images[picked], boxes, size)
            images = torch.where(flip, images.flip(-1), images)
        elif min(height, width) == resize:  # the cache is at eval_resize already: the centre crop is exact
            top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
            pixels = self.images[picked, top:top + size, left:left + size]
            return normalise_nhwc(pixels, self.mean, self.std).permute(0, 3, 1, 2)
        else:
            images = resample(self.images[picked], self.centre.expand(len(picked), 4), size)
        images = images.contiguous(memory_format=torch.channels_last)
        return images.mul_(1.0 / 255).sub_(mean).div_(std)
