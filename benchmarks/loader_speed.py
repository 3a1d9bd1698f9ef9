"""Images per second of the input pipelines alone, side by side on the same files.

    python -m benchmarks.loader_speed --photos 512 --workers 2 --out results.json
    python -m benchmarks.loader_speed --data DIR --model resnet --loaders torch dali dali-cache

With --photos N it first writes N bird-photo-sized JPEGs (500x375: smooth gradients, shapes and
fine texture, which decode like photographs; white noise would not) into a temporary folder.
Each loader runs one warm-up epoch, then --epochs timed epochs; on CUDA the device is
synchronised before the clock stops. Every batch is consumed on the training device, exactly as
the training loop receives it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from fasttrain.data import build_loaders, open_dataset
from fasttrain.device import device_name, resolve_device, synchronize
from fasttrain.recipes import get_recipe

from benchmarks.photos import write_photos


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="an image folder or CIFAR pickles (default: --photos)")
    parser.add_argument("--photos", type=int, default=512, help="generate this many 500x375 JPEGs")
    parser.add_argument("--model", choices=["cnn", "resnet"], default="resnet")
    parser.add_argument("--loaders", nargs="+", default=["torch", "dali"], help="torch, dali, dali-cache")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, help="DataLoader processes and DALI threads (default: cores)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from fasttrain.data.torch_loader import default_workers
    device = resolve_device(args.device)
    workers = args.workers if args.workers is not None else default_workers()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data or write_photos(Path(tmp), args.photos)
        data = open_dataset(args.model, root)
        rows = []
        for name in args.loaders:
            loader, cache = ("dali", "gpu") if name == "dali-cache" else (name, "none")
            recipe = get_recipe(args.model, "fast").replace(loader=loader, cache=cache, batch_size=args.batch_size)
            loaders = build_loaders(data, recipe, device, workers, seed=0)
            rate, images = measure(loaders.train, device, args.epochs)
            expected = args.epochs * len(loaders.train) * args.batch_size  # whole batches, no file skipped
            rows.append({"loader": loaders.backend, "images_per_sec": rate, "images": images,
                         "expected_images": expected})
            short = f", {expected - images} fewer than {expected}: undecodable files" if images != expected else ""
            print(f"{loaders.backend:>10}: {rate:8.1f} images/s ({images} images{short}, {workers} workers/threads)",
                  flush=True)
    base = rows[0]["images_per_sec"]
    for row in rows:
        row["speedup"] = row["images_per_sec"] / base
    print("  ".join(f"{r['loader']} {r['speedup']:.2f}x" for r in rows))
    if args.out:
        from fasttrain.session import versions
        record = {"command": "python -m benchmarks.loader_speed " + " ".join(
                      f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                      for k, v in vars(args).items() if v is not None and k != "out"),
                  "device": device_name(device), "workers": workers, "model": args.model,
                  "batch_size": args.batch_size, "data": str(args.data) if args.data else f"{args.photos} generated 500x375 JPEGs",
                  "train_images": len(data.train), "versions": versions(),
                  "date": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": rows}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
