"""How long opening an image folder takes: the data index, cold and then from its cache.

    python -m benchmarks.index_speed --files 100000 --classes 100 --out results.json

Writes --files small JPEGs (64x48, about 1 KB each; every 10th a PNG, WebP or GIF, so several
decoders' headers are read) into class folders of a temporary folder, then opens it with
`fasttrain.data.open_dataset` three times, each in a fresh process so nothing is warm in memory:
1. cold: no index cache, every header read by a process pool over all cores;
2. warm: the same folder again, headers taken from the index cache (only stat() per file);
3. one changed: after rewriting one file, which alone is read again.
The page cache is warm in all three (the files were just written), as after any earlier run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from io import BytesIO
from pathlib import Path

from PIL import Image

OPEN = """
import json, sys, time
from pathlib import Path
started = time.perf_counter()
from fasttrain.data.datasets import load_image_folder
from fasttrain.data import index as index_module
seen = {}
build = index_module.build_index
def spy(*args, **kwargs):
    result = build(*args, **kwargs)
    seen.update(probed=result.probed, files=result.files, index_s=result.seconds)
    return result
import fasttrain.data.datasets as datasets
datasets.build_index = spy
data = load_image_folder(Path(sys.argv[1]), 0.1)
seen.update(total_s=time.perf_counter() - started, train=len(data.train), val=len(data.val))
print(json.dumps(seen))
"""


def _encoded(fmt: str, colour: tuple) -> bytes:
    buffer = BytesIO()
    image = Image.new("RGB", (64, 48), colour)
    image.save(buffer, format=fmt, **({"quality": 85} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def write_folder(root: Path, files: int, classes: int) -> None:
    kinds = [("JPEG", "jpg")] * 7 + [("PNG", "png"), ("WEBP", "webp"), ("GIF", "gif")]
    blobs = {(fmt, c): _encoded(fmt, (37 * c % 256, 91 * c % 256, 53 * c % 256)) for fmt, _ in set(kinds)
             for c in range(classes)}
    for c in range(classes):
        (root / f"class_{c:03d}").mkdir(parents=True)
    for i in range(files):
        c = i % classes
        fmt, ext = kinds[(i // classes) % len(kinds)]
        (root / f"class_{c:03d}" / f"{i:06d}.{ext}").write_bytes(blobs[(fmt, c)])


def open_in_fresh_process(root: Path, env: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", OPEN, str(root)], env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def commit() -> str:
    """The commit measured, with "+changes" when the work tree differs from it."""
    here = Path(__file__).resolve().parent.parent
    git = lambda *a: subprocess.run(["git", *a], cwd=here, capture_output=True, text=True).stdout.strip()  # noqa: E731
    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root, cache = Path(tmp) / "data", Path(tmp) / "cache"
        started = time.perf_counter()
        write_folder(root, args.files, args.classes)
        written_s = time.perf_counter() - started
        env = {**os.environ, "FASTTRAIN_CACHE": str(cache)}
        cold = open_in_fresh_process(root, env)
        warm = open_in_fresh_process(root, env)
        changed = next((root / "class_000").iterdir())
        changed.write_bytes(_encoded("PNG", (1, 2, 3)))
        one = open_in_fresh_process(root, env)
    from fasttrain.session import versions

    result = {"files": args.files, "classes": args.classes, "cores": len(os.sched_getaffinity(0)),
              "write_s": written_s, "cold": cold, "warm": warm, "one_changed": one, "versions": versions(), "commit": commit(),
              "command": " ".join(["python -m benchmarks.index_speed", *(argv or sys.argv[1:])])}
    for name in ("cold", "warm", "one_changed"):
        r = result[name]
        print(f"{name:12s} {r['files']:,} files, {r['probed']:,} headers read: index {r['index_s']:.1f}s, "
              f"load_image_folder in a fresh process {r['total_s']:.1f}s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
