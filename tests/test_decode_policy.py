"""The decode policy (fasttrain/data/decode.py) on a corpus of odd files, and both loaders agreeing on it.

The corpus is generated here: one small image of every kind people feed a trainer (phone JPEGs
stored sideways, 16-bit PNG/TIFF, palette and alpha PNGs, CMYK, GIF, WebP with EXIF, ...), all
drawn from one asymmetric pattern (WIDTH != HEIGHT, a red block top-left, a blue block
bottom-right), so that a file decoded on its side, upside down or mirrored cannot pass.

- open_rgb gives what a photo viewer shows, as 8-bit RGB;
- what DALI is handed for each file (the file itself, or its transcoded PNG) decodes, with DALI's
  own decoder, to exactly the policy's pixels, and `dali_decodes` / Probe.dali say which is which;
- the DataLoader, DALI from files and the DALI cache serve the same evaluation batches;
- transcoded copies are made once.
"""

from __future__ import annotations

import os
import struct
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fasttrain.data import build_loaders, open_dataset
from fasttrain.data import dali_loader
from fasttrain.data.decode import open_rgb
from fasttrain.data.index import build_index, cache_dir, probe
from fasttrain.recipes import CNN_SEED

CPU = torch.device("cpu")
# 50 x 40: the CNN recipe fits files to 32 px (shorter side 40 -> 32, then a centre 32 x 32 crop), so
# every loader resamples, by an exact factor 0.8 (40 x 32, crop offset 4): the loaders' resampling
# filters differ a little, their geometry does not.
WIDTH, HEIGHT = 50, 40


# ---- the corpus ----------------------------------------------------------------------------


def pattern() -> np.ndarray:
    """HEIGHT x WIDTH x 3 uint8: smooth ramps plus two blocks in opposite corners (asymmetric)."""
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    ramps = [x * 255 // (WIDTH - 1), y * 255 // (HEIGHT - 1), (x + 2 * y) * 255 // (WIDTH + 2 * HEIGHT - 3)]
    rgb = np.stack(ramps, -1).astype(np.uint8)
    rgb[4:14, 5:18] = (250, 20, 30)      # red block, top left
    rgb[26:34, 36:46] = (10, 10, 240)    # blue block, bottom right
    return rgb


def grey16() -> np.ndarray:
    """HEIGHT x WIDTH uint16 spanning 0..65535, with values either side of every 256 and 257 boundary."""
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    g = ((x * HEIGHT + y) * 65535 // (WIDTH * HEIGHT - 1)).astype(np.uint16)
    g[4:14, 5:18] = 65535
    g[26:34, 36:46] = 0
    g[0, :8] = [0, 1, 127, 128, 129, 255, 256, 383]
    g[1, :8] = [384, 385, 65151, 65152, 65279, 65280, 65407, 65408]
    return g


def rgb16() -> np.ndarray:
    """The pattern at 16 bits with low bytes that are not the high byte (so >> 8 differs from / 257)."""
    wide = pattern().astype(np.int64) * 256 + (np.arange(WIDTH)[None, :, None] * 37 + np.arange(3) * 91) % 256
    return wide.astype(np.uint16)


def as_cmyk(rgb: np.ndarray) -> np.ndarray:
    """The picture in CMYK with black in K, as prepress software writes it (Pillow's own RGB -> CMYK
    leaves K at 0, where DALI and Pillow happen to agree; with K they are a level apart)."""
    rgb = rgb.astype(np.float64)
    white = rgb.max(-1, keepdims=True)
    cmy = 255 - 255 * rgb / np.maximum(white, 1)
    return np.concatenate([cmy, 255 - white], -1).round().astype(np.uint8)


def write_png16(path: Path, pixels: np.ndarray, colour_type: int) -> None:
    """A 16-bit PNG written chunk by chunk (Pillow cannot save 16-bit RGB): colour type 0 grey, 2 RGB."""
    h, w = pixels.shape[:2]
    raw = b"".join(b"\x00" + pixels[i].astype(">u2").tobytes() for i in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def exif(orientation: int) -> Image.Exif:
    tags = Image.Exif()
    tags[0x0112] = orientation
    return tags


def upright(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """What a photo viewer shows for stored pixels with this EXIF orientation (1, 3, 6 or 8)."""
    # 6: the stored top row is the picture's right side -> turn clockwise; 8: counter-clockwise
    return {1: pixels, 3: np.rot90(pixels, 2), 6: np.rot90(pixels, -1), 8: np.rot90(pixels, 1)}[orientation]


def as_stored(picture: np.ndarray, orientation: int) -> Image.Image:
    """The pixels a camera held sideways stores for `picture`, to be shown upright by the EXIF tag."""
    turn = {1: 0, 3: 2, 6: 1, 8: -1}[orientation]
    return Image.fromarray(np.ascontiguousarray(np.rot90(picture, turn)))


def grey3(grey: np.ndarray) -> np.ndarray:
    return np.repeat(np.asarray(grey, dtype=np.uint8)[..., None], 3, axis=2)


@dataclass(frozen=True)
class Kind:
    file: str             # its name in the corpus (the extension is not always the format)
    expected: np.ndarray  # what a photo viewer shows, 8-bit RGB, HxWx3
    lossy: bool           # JPEG / lossy WebP: within JPEG_MEAN_TOLERANCE of `expected`, else exact
    dali: bool            # whether DALI's decoder gives the policy's pixels (Probe.dali)
    orientation: int = 1  # EXIF orientation stored in the file (its pixels are stored turned)


# lossy kinds (quality 95, 4:2:0 chroma) against the drawn pattern: at most this many 8-bit levels on
# average (measured about 3; the blocks' sharp colour edges lose up to ~110 levels at single values, so no
# maximum is asked). A picture turned or mirrored the wrong way is 60-120 levels away on average.
JPEG_MEAN_TOLERANCE = 5.0


def write_corpus(folder: Path) -> dict[str, Kind]:
    """Write one file of each kind into `folder`; returns kind name -> Kind."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = pattern()
    image = Image.fromarray(rgb, "RGB")
    grey = image.convert("L")
    palette = image.quantize(16)                   # a 16-colour palette image
    second = palette.transpose(Image.Transpose.FLIP_LEFT_RIGHT)  # a GIF's second frame: must not be shown
    alpha = np.full((HEIGHT, WIDTH), 255, np.uint8)
    alpha[:, :12], alpha[:, 12:24] = 0, 128
    hidden = rgb.copy()
    hidden[:, :12] = (0, 255, 0)                   # green under alpha 0: shown once alpha is dropped
    bilevel = grey.convert("1", dither=Image.Dither.NONE)
    cmyk = Image.fromarray(as_cmyk(rgb), "CMYK")
    kinds: dict[str, Kind] = {}

    def add(name, file, expected, lossy=False, dali=True, orientation=1, save=None):
        save(folder / file)
        kinds[name] = Kind(file, np.ascontiguousarray(expected), lossy, dali, orientation)

    # files with an EXIF orientation store the picture turned; every kind shows the same upright picture
    for o in (1, 3, 6, 8):
        add(f"jpeg-exif{o}", f"jpeg_exif{o}.jpg", rgb, lossy=True, orientation=o,
            save=lambda p, o=o: as_stored(rgb, o).save(p, quality=95, exif=exif(o)))
    add("png-exif6", "png_exif6.png", rgb, orientation=6, save=lambda p: as_stored(rgb, 6).save(p, exif=exif(6)))
    add("png-grey16", "png_grey16.png", grey3(grey16() >> 8), dali=False,
        save=lambda p: write_png16(p, grey16(), 0))
    add("png-rgb16", "png_rgb16.png", (rgb16() >> 8).astype(np.uint8), dali=False,
        save=lambda p: write_png16(p, rgb16(), 2))
    add("png-L", "png_L.png", grey3(grey), save=grey.save)
    add("png-P", "png_P.png", np.asarray(palette.convert("RGB")), save=palette.save)
    add("png-P-transparency", "png_P_trns.png", np.asarray(palette.convert("RGB")),
        save=lambda p: palette.save(p, transparency=0))
    add("png-LA", "png_LA.png", grey3(grey),
        save=Image.merge("LA", (grey, Image.fromarray(alpha))).save)
    add("png-RGBA", "png_RGBA.png", hidden, save=Image.fromarray(np.dstack([hidden, alpha]), "RGBA").save)
    add("png-1bit", "png_1bit.png", grey3(np.asarray(bilevel.convert("L"))), save=bilevel.save)
    add("jpeg-CMYK", "jpeg_cmyk.jpg", np.asarray(cmyk.convert("RGB")), lossy=True, dali=False,
        save=lambda p: cmyk.save(p, quality=95))
    add("jpeg-grey", "jpeg_grey.jpg", grey3(grey), lossy=True, save=lambda p: grey.save(p, quality=95))
    add("gif-animated", "gif.gif", np.asarray(palette.convert("RGB")), dali=False,
        save=lambda p: palette.save(p, save_all=True, append_images=[second], duration=100, loop=0))
    add("gif-named-jpg", "gif_named.jpg", np.asarray(palette.convert("RGB")), dali=False,
        save=lambda p: palette.save(p, format="GIF"))
    add("webp-lossless", "webp_lossless.webp", rgb, save=lambda p: image.save(p, lossless=True))
    add("webp-lossy", "webp_lossy.webp", rgb, lossy=True, save=lambda p: image.save(p, quality=95))
    add("webp-lossless-exif6", "webp_lossless_exif6.webp", rgb, dali=False, orientation=6,
        save=lambda p: as_stored(rgb, 6).save(p, lossless=True, exif=exif(6)))
    add("tiff-RGB", "tiff_rgb.tif", rgb, dali=False, save=image.save)
    add("tiff-grey16", "tiff_grey16.tif", grey3(grey16() >> 8), dali=False,
        save=Image.fromarray(grey16()).save)
    add("bmp", "bmp.bmp", rgb, save=image.save)
    add("ppm", "ppm.ppm", rgb, save=image.save)
    add("pgm", "pgm.pgm", grey3(grey), save=grey.save)
    return kinds


def _kind_names() -> list[str]:
    """The kinds' names, for parametrize: the corpus written once into a folder thrown away."""
    with tempfile.TemporaryDirectory() as folder:
        return sorted(write_corpus(Path(folder)))


KIND_NAMES = _kind_names()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(root, kinds, path of each kind): root/train/{a,b}/ plain JPEGs, root/val/{a,b}/ the corpus."""
    root = tmp_path_factory.mktemp("decode-corpus")
    kinds = write_corpus(root / "all")
    paths = {}
    for i, (name, kind) in enumerate(sorted(kinds.items())):
        target = root / "val" / "ab"[i % 2] / kind.file
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(root / "all" / kind.file, target)
        paths[name] = target
    (root / "all").rmdir()
    photo = Image.fromarray(pattern())
    for label in "ab":
        (root / "train" / label).mkdir(parents=True)
        for i in range(4):
            photo.rotate(90 * i, expand=True).save(root / "train" / label / f"{i}.jpg", quality=90)
    return root, kinds, paths


# ---- (a) the policy: what a photo viewer shows -------------------------------------------------


@pytest.mark.parametrize("name", KIND_NAMES)
def test_open_rgb_gives_what_a_photo_viewer_shows(name, corpus):
    _, kinds, paths = corpus
    kind = kinds[name]
    image = open_rgb(paths[name])
    assert image.mode == "RGB", name
    pixels = np.asarray(image)
    assert pixels.dtype == np.uint8 and pixels.shape == kind.expected.shape, (name, pixels.shape)
    diff = np.abs(pixels.astype(int) - kind.expected.astype(int))
    if kind.lossy:
        assert diff.mean() <= JPEG_MEAN_TOLERANCE, f"{name}: {diff.mean():.2f} levels from what a viewer shows"
    else:
        assert diff.max() == 0, f"{name}: {np.count_nonzero(diff)} values differ, up to {diff.max()} levels"


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_turns_the_stored_pixels_upright(orientation, corpus):
    _, _, paths = corpus
    path = paths[f"jpeg-exif{orientation}"]
    with Image.open(path) as stored:  # the pixels as stored, not turned
        assert stored.getexif().get(0x0112) == orientation
        raw = np.asarray(stored.convert("RGB"))
    sideways = orientation in (6, 8)
    assert raw.shape == ((WIDTH, HEIGHT, 3) if sideways else (HEIGHT, WIDTH, 3))
    shown = np.asarray(open_rgb(path))
    assert shown.shape == (HEIGHT, WIDTH, 3)  # for 6 and 8: height and width of the stored pixels swapped
    assert np.array_equal(shown, upright(raw, orientation))  # the same decode, turned: exact
    # the picture's red block is top left on screen, its blue block bottom right (± JPEG)
    red = np.abs(shown[6:12, 7:16].astype(int) - (250, 20, 30)).mean()
    blue = np.abs(shown[28:32, 38:44].astype(int) - (10, 10, 240)).mean()
    assert red < 12 and blue < 12, f"orientation {orientation}: the picture is not upright " \
                                   f"(top-left block {red:.1f}, bottom-right block {blue:.1f} levels off)"


@pytest.mark.parametrize("name", ["png-grey16", "tiff-grey16"])
def test_16_bit_grey_keeps_the_high_byte(name, corpus):
    _, _, paths = corpus
    with Image.open(paths[name]) as stored:
        assert stored.mode.startswith("I;16"), stored.mode
        values = np.asarray(stored).astype(np.int64)
    assert values.min() == 0 and values.max() == 65535
    pixels = np.asarray(open_rgb(paths[name]))
    assert (pixels < 255).mean() > 0.5, "16-bit grey decoded (almost) all white: values clipped to 255"
    for channel in range(3):
        assert np.array_equal(pixels[..., channel], (values >> 8).astype(np.uint8)), channel


# ---- (b) the three loaders serve the same evaluation batches -------------------------------------


def _levels(loaders) -> tuple[np.ndarray, np.ndarray]:
    """Evaluation images back in 8-bit levels (N, 32, 32, 3) float, and labels, in data-set order."""
    mean = torch.tensor(loaders.mean).view(1, 3, 1, 1)
    std = torch.tensor(loaders.std).view(1, 3, 1, 1)
    images, labels = zip(*loaders.val)
    images = (torch.cat(images) * std + mean) * 255
    return images.permute(0, 2, 3, 1).numpy(), torch.cat(labels).numpy()


def loaders_for(data, loader: str, cache: str = "none", augment: str = "auto"):
    recipe = CNN_SEED.replace(loader=loader, batch_size=8, cache=cache, channels_last=False, cache_augment=augment)
    return build_loaders(data, recipe, CPU, 2 if loader == "dali" else 0, seed=0)


# Torchvision's antialiased bilinear Resize and DALI's antialiased linear resize, both by 0.8 here, each
# rounding to uint8: per image, in 8-bit levels, at most RESAMPLING["max"] at any value and
# RESAMPLING["mean"] on average (measured: 1 level at most, 5 next to the 16-bit files' 0 | 65535 edges;
# 0.27 on average at most). A picture turned, mirrored or washed out is tens of levels away.
# The two DALI paths resample alike: they agree to float rounding (CACHE_ATOL levels; measured 0).
RESAMPLING = dict(mean=0.5, max=8.0)
CACHE_ATOL = 0.01


@pytest.fixture(scope="module")
def evaluation_batches(corpus):
    root, _, _ = corpus
    data = open_dataset("cnn", root)
    out = {"files": list(data.val.files), "labels": data.val.labels}
    for name, loader, cache, augment in (("torch", "torch", "none", "auto"), ("dali", "dali", "none", "auto"),
                                         ("dali-cache", "dali", "gpu", "dali"),
                                         ("device-cache", "dali", "gpu", "device")):
        loaders = loaders_for(open_dataset("cnn", root), loader, cache, augment)
        assert loaders.backend == {"torch": "torch", "dali": "dali-cpu"}.get(name, name)
        out[name] = _levels(loaders)
    return out


@pytest.mark.parametrize("name", KIND_NAMES)
@pytest.mark.parametrize("other", ["dali", "dali-cache", "device-cache"])
def test_the_loaders_serve_the_same_evaluation_pixels(name, other, corpus, evaluation_batches):
    _, _, paths = corpus
    files = evaluation_batches["files"]
    (base, base_labels), (images, labels) = evaluation_batches["torch"], evaluation_batches[other]
    assert len(base) == len(files) and len(images) == len(files), \
        f"{other}: {len(images)} images for {len(files)} files (torch {len(base)})"
    assert np.array_equal(base_labels, labels)
    assert np.array_equal(labels, evaluation_batches["labels"])  # data-set order
    i = files.index(paths[name])
    diff = np.abs(images[i] - base[i])
    worst, mean = float(diff.max()), float(diff.mean())
    assert mean <= RESAMPLING["mean"] and worst <= RESAMPLING["max"], \
        f"{name} ({paths[name].name}): {other} and torch differ by {worst:.2f} levels at most, {mean:.3f} on average"
    if other.endswith("-cache"):
        gap = float(np.abs(images[i] - evaluation_batches["dali"][0][i]).max())
        assert gap <= CACHE_ATOL, f"{name} ({paths[name].name}): the cache and the files differ by {gap:.4f} levels"


# ---- DALI's decoder against the policy: the file DALI is handed decodes to the policy's pixels ----


def dali_decode(path: Path) -> np.ndarray:
    """DALI's CPU decoder on one file, as fasttrain's pipelines call it (io.file.read + decoders.image)."""
    dali, fn, types, _ = dali_loader.import_dali()
    encoded = np.frombuffer(os.fsencode(path), dtype=np.uint8)

    @dali.pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def pipeline():
        data = fn.external_source(source=lambda: [encoded], batch=True)
        return fn.decoders.image(fn.io.file.read(data), device="cpu", output_type=types.RGB)

    pipe = pipeline()
    pipe.build()
    (out,) = pipe.run()
    return np.array(out.as_array()[0])


def test_what_dali_reads_decodes_to_the_policy_pixels(corpus):
    """For every file: DALI's decoder on what dali_files hands it (the file, or its transcoded PNG)
    gives exactly open_rgb's pixels. This keeps checking the measurement behind `dali_decodes`."""
    root, kinds, paths = corpus
    data = open_dataset("cnn", root)
    files, bad = dali_loader.dali_files(data.val, 1)
    assert bad == []
    handed = dict(zip(data.val.files, files))
    wrong = []
    for name, path in sorted(paths.items()):
        target = handed[path]
        try:
            got = dali_decode(target)
        except RuntimeError as exc:
            wrong.append(f"{name}: DALI failed on {'its transcoded copy' if target != path else 'the file'} "
                         f"({str(exc).strip().splitlines()[-1][:80]})")
            continue
        want = np.asarray(open_rgb(path))
        if got.shape != want.shape:
            wrong.append(f"{name}: DALI {got.shape} vs policy {want.shape}")
        elif not np.array_equal(got, want):
            diff = np.abs(got.astype(int) - want.astype(int))
            wrong.append(f"{name}: {np.count_nonzero(diff)} values differ, up to {diff.max()} levels "
                         f"({'transcoded' if target != path else 'decoded by DALI'})")
    assert not wrong, "DALI's pixels are not the policy's:\n" + "\n".join(wrong)


# ---- (c) the data index: every file used, Probe.dali right, the transcode path taken ---------------


def test_every_corpus_file_is_used_and_probe_dali_names_the_kinds_dali_cannot_match(corpus):
    root, kinds, paths = corpus
    index = build_index(root)
    assert index.left_out == [] and index.ignored == []
    by_path = {path: name for name, path in paths.items()}
    assert set(paths.values()) <= set(index.images)  # none left out
    wrong = [f"{name}: Probe.dali {index.images[path].dali}, expected {kinds[name].dali} "
             f"({index.images[path].format} {index.images[path].mode})"
             for path, name in sorted(by_path.items(), key=lambda item: item[1])
             if index.images[path].dali != kinds[name].dali]
    assert not wrong, "\n".join(wrong)
    for path, name in by_path.items():
        assert probe(str(path)).dali == kinds[name].dali, name  # the same without the index cache
    data = open_dataset("cnn", root)
    assert sorted(data.val.files) == sorted(paths.values()) and data.left_out == []
    host = {by_path[f]: bool(h) for f, h in zip(data.val.files, data.val.host_decode)}
    assert host == {name: not kind.dali for name, kind in kinds.items()}
    assert {"gif-animated", "gif-named-jpg", "png-grey16", "png-rgb16", "tiff-grey16", "tiff-RGB", "jpeg-CMYK",
            "webp-lossless-exif6"} <= {name for name, h in host.items() if h}
    # the transcode path: those files, and only those, reach DALI as PNGs in the cache
    files, bad = dali_loader.dali_files(data.val, 1)
    assert bad == []
    decoded = cache_dir() / "decoded"
    for original, handed in zip(data.val.files, files):
        name = by_path[original]
        if host[name]:
            assert handed != original and decoded in handed.parents and handed.suffix == ".png", name
            with Image.open(handed) as copy:
                assert copy.format == "PNG" and copy.mode == "RGB", name
        else:
            assert handed == original, name


# ---- (d) transcoded copies are made once ---------------------------------------------------------


def test_transcoded_copies_are_reused(corpus, tmp_path, monkeypatch):
    root, kinds, _ = corpus
    monkeypatch.setenv("FASTTRAIN_CACHE", str(tmp_path / "cache"))  # an empty cache: the first call writes
    data = open_dataset("cnn", root)
    decoded = tmp_path / "cache" / "decoded"

    def listing():
        return {p: (p.stat().st_mtime_ns, p.stat().st_ino) for p in decoded.rglob("*") if p.is_file()}

    first, bad = dali_loader.dali_files(data.val, 1)
    assert bad == []
    written = listing()
    assert len(written) == sum(not kind.dali for kind in kinds.values())
    assert not any(p.name.endswith(".tmp") for p in written)
    second, bad = dali_loader.dali_files(data.val, 1)
    assert bad == [] and second == first
    assert listing() == written, "the second call wrote transcoded copies again"
