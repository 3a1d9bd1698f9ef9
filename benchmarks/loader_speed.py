"""Images per second of the input pipelines alone, side by side on the same files.

    python -m benchmarks.loader_speed --photos 512 --workers 2 --out results.json
    python -m benchmarks.loader_speed --data DIR --model resnet --loaders torch dali dali-cache device-cache
    python -m benchmarks.loader_speed --data CIFAR_DIR --model cnn --loaders dali-cache device-cache --train-epochs 3

With --photos N it first writes N bird-photo-sized JPEGs (500x375: smooth gradients, shapes and
fine texture, which decode like photographs; white noise would not) into a temporary folder.
Each loader runs one warm-up epoch, then --epochs timed epochs; on CUDA the device is
synchronised before the clock stops. Every batch is consumed on the training device, exactly as
the training loop receives it. Loaders: torch (DataLoader), dali (DALI from the files or host
arrays), dali-cache and device-cache (the decoded data set on the device, augmented by DALI's
operators or by batched tensor ops: FASTTRAIN_CACHE_AUGMENT=dali or device).

--train-epochs N also trains the fast recipe for N epochs with each loader, each in its own
process (`python -m fasttrain`), and records the run's images/s and data wait (the share of
training time spent waiting for the next batch): the loader on a busy GPU, not alone.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from fasttrain.data import build_loaders, open_dataset
from fasttrain.data.dali_loader import CACHE_AUGMENT_ENV
from fasttrain.data.datasets import cap
from fasttrain.device import device_name, resolve_device, synchronize
from fasttrain.recipes import get_recipe

from benchmarks.photos import write_photos

# loader name -> (--loader, --cache, FASTTRAIN_CACHE_AUGMENT or None)
LOADERS = {"torch": ("torch", "none", None), "dali": ("dali", "none", None),
           "dali-cache": ("dali", "gpu", "dali"), "device-cache": ("dali", "gpu", "device")}


def measure(loader, device: torch.device, epochs: int) -> tuple[float, int]:
    """Images per second over `epochs` timed epochs, after one warm-up epoch, and how many images
    arrived in them (counted batch by batch: a file that fails to decode shrinks its batch)."""
    for _ in loader:
        pass
    synchronize(device)
    start, images = time.perf_counter(), 0
    for _ in range(epochs):
        for batch, _ in loader:
            images += batch.shape[0]
    synchronize(device)
    seconds = time.perf_counter() - start
    if not images:
        raise SystemExit("the loader delivered no images: nothing to time")
    return images / seconds, images


def with_augment(augment: str | None) -> dict:
    """The environment with FASTTRAIN_CACHE_AUGMENT set to `augment` (as it is when None)."""
    return {**os.environ, **({CACHE_AUGMENT_ENV: augment} if augment else {})}


def train_run(name: str, root: Path, args, device: torch.device, runs: Path) -> dict:
    """The fast recipe for args.train_epochs epochs with one loader, in its own process: the
    summary's images/s, data wait and compile time, and each epoch's."""
    loader, cache, augment = LOADERS[name]
    out = runs / name
    command = [sys.executable, "-m", "fasttrain", args.model, "--data", str(root), "--loader", loader, "--cache",
               cache, "--epochs", str(args.train_epochs), "--device", str(device), "--save-every", "0",
               "--out", str(out), *shlex.split(args.train_args)]
    started = time.perf_counter()
    try:
        proc = subprocess.run(command, env=with_augment(augment), capture_output=True, text=True,
                              timeout=args.train_timeout)
        code, tail = proc.returncode, (proc.stdout + proc.stderr).strip().splitlines()[-3:]
    except subprocess.TimeoutExpired:
        code, tail = "timeout", []
    result = {"command": " ".join(([f"{CACHE_AUGMENT_ENV}={augment}"] if augment else [])
                                  + ["python", "-m", "fasttrain", *command[3:]]),
              "exit": code, "wall_s": time.perf_counter() - started}
    if code != 0:
        result["output_tail"] = tail
    if (out / "summary.json").is_file():
        summary = json.loads((out / "summary.json").read_text())
        epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        result.update(loader=summary.get("loader"), images_per_sec=summary.get("mean_images_per_sec"),
                      data_wait_fraction=summary.get("mean_data_wait_fraction"),
                      compile_s=summary.get("compile_time_s"), train_s=summary.get("train_time_s"),
                      # the process's wall clock in parts; after gpu_check.sh's recipe runs, compile_s
                      # here is a warm compile (torch.compile's caches filled by the same recipe)
                      time=summary.get("time"),
                      epochs=[{k: e.get(k) for k in ("epoch", "images_per_sec", "data_wait_fraction", "epoch_time_s")}
                              for e in epochs])
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="an image folder or CIFAR pickles (default: --photos)")
    parser.add_argument("--photos", type=int, default=512, help="generate this many 500x375 JPEGs")
    parser.add_argument("--model", choices=["cnn", "resnet"], default="resnet")
    parser.add_argument("--loaders", nargs="+", default=["torch", "dali"], choices=list(LOADERS))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, help="DataLoader processes and DALI threads (default: cores)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--limit", type=int, help="use at most this many training images (timing only)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--train-epochs", type=int, default=0,
                        help="also train the fast recipe this many epochs with each loader (0: no)")
    parser.add_argument("--train-args", default="", help="more arguments for those runs, e.g. '--train-limit 512'")
    parser.add_argument("--train-timeout", type=int, default=120, help="seconds each training run may take")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from fasttrain.data.torch_loader import default_workers
    device = resolve_device(args.device)
    workers = args.workers if args.workers is not None else default_workers()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data or write_photos(Path(tmp), args.photos)
        data = cap(open_dataset(args.model, root), args.limit, None)
        rows = []
        for name in args.loaders:
            loader, cache, augment = LOADERS[name]
            recipe = get_recipe(args.model, "fast").replace(loader=loader, cache=cache, batch_size=args.batch_size)
            saved = os.environ.get(CACHE_AUGMENT_ENV)
            if augment:  # read when the loaders are built
                os.environ[CACHE_AUGMENT_ENV] = augment
            try:
                loaders = build_loaders(data, recipe, device, workers, seed=0)
            finally:
                if saved is None:
                    os.environ.pop(CACHE_AUGMENT_ENV, None)
                else:
                    os.environ[CACHE_AUGMENT_ENV] = saved
            rate, images = measure(loaders.train, device, args.epochs)
            expected = args.epochs * len(loaders.train) * args.batch_size  # whole batches, no file skipped
            rows.append({"loader": loaders.backend, "images_per_sec": rate, "images": images,
                         "expected_images": expected})
            short = f", {expected - images} fewer than {expected}: undecodable files" if images != expected else ""
            print(f"{loaders.backend:>12}: {rate:9.1f} images/s ({images} images{short}, {workers} workers/threads)",
                  flush=True)
            del loaders  # the cache and DALI's buffers go before the next loader is built
        for row, name in zip(rows, args.loaders):
            if args.train_epochs:
                row["train"] = train_run(name, root, args, device, Path(tmp) / "runs")
                t = row["train"]
                wait = t.get("data_wait_fraction")
                print(f"{name:>12}: training {t.get('images_per_sec') or 0:9.1f} images/s, data wait "
                      f"{'n/a' if wait is None else f'{100 * wait:.1f}%'} (exit {t['exit']}, {t['wall_s']:.0f}s)",
                      flush=True)
    base = rows[0]["images_per_sec"]
    for row in rows:
        row["speedup"] = row["images_per_sec"] / base
    print("  ".join(f"{r['loader']} {r['speedup']:.2f}x" for r in rows))
    if args.out:
        from fasttrain.session import versions
        record = {"command": "python -m benchmarks.loader_speed " + " ".join(
                      f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else shlex.quote(str(v))}"
                      for k, v in vars(args).items() if v not in (None, "") and k != "out"),
                  "device": device_name(device), "workers": workers, "model": args.model,
                  "batch_size": args.batch_size, "data": str(args.data) if args.data else f"{args.photos} generated 500x375 JPEGs",
                  "train_images": len(data.train), "versions": versions(),
                  "date": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": rows}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2))
    return 0 if all(r.get("train", {}).get("exit", 0) == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
