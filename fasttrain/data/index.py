"""The data index: a data folder walked once, every file in it classified once.

Each file under the folder is one of three things:
- an image to use: Pillow recognised one of fasttrain's formats from its bytes (the name and
  extension do not matter), with a sane size;
- a file left out, with a reason: damaged, not an image, too large, in no class folder...;
- a file ignored by rule: operating-system litter (`.DS_Store`, `Thumbs.db`, `desktop.ini`,
  AppleDouble `._*` files, `__MACOSX/`) and hidden files and folders.

Only file headers are read (format, size, mode), not pixels, so indexing stays cheap; headers are
read by the machine's cores in parallel and remembered in an index cache keyed by each file's path,
size and modification time, so the next run over the same folder reads only what changed.
`verify` decodes files fully (for --strict) and remembers the verdicts the same way.
Every command (training, preview, predict, evaluate) reads data folders through this module.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import stat
import sys
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

from fasttrain.data.decode import DEFAULT_MAX_PIXELS, FORMATS, POLICY_VERSION, describe

INDEX_VERSION = 2
POOL_THRESHOLD = 2_000   # files to probe before a process pool pays for its start-up
PROGRESS_AFTER_S = 1.0   # show a progress bar for work that takes longer than this

IGNORED_NAMES = {".ds_store": "macOS folder metadata", "thumbs.db": "Windows thumbnail cache",
                 "desktop.ini": "Windows folder settings", "ehthumbs.db": "Windows thumbnail cache"}
IGNORED_FOLDERS = {"__MACOSX": "macOS archive metadata (__MACOSX/)"}


def cache_dir() -> Path:
    """Where fasttrain keeps what it can rebuild: $FASTTRAIN_CACHE, else ~/.cache/fasttrain."""
    if os.environ.get("FASTTRAIN_CACHE"):
        return Path(os.environ["FASTTRAIN_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fasttrain"


def shown(path: Path | str) -> str:
    """A path as one line of text that any terminal or UTF-8 file can take: undecodable name bytes
    as \\xNN, tabs and line breaks in names as \\t, \\n, \\r (skipped.txt is tab-separated)."""
    text = os.fsencode(path).decode("utf-8", "backslashreplace")
    return text.replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


@dataclass(frozen=True)
class Probe:
    """What a file's header says: Pillow's format and mode and the size in pixels, or why it is no image."""

    format: str | None
    mode: str | None
    width: int
    height: int
    problem: str | None  # why a file cannot be used; its category is the text before " (": "damaged", "empty"...
    dali: bool = False   # DALI's decoder gives the decode policy's pixels (decode.dali_decodes)
    transient: bool = False  # the file could not be read (permissions, I/O): not remembered, read again next run


def probe(path: str) -> Probe:
    """Read one file's header (never its pixels). Never raises: a failure is a Probe with a problem."""
    from PIL import Image

    from fasttrain.data.decode import dali_decodes

    Image.MAX_IMAGE_PIXELS = None  # the index compares sizes with --max-image-pixels itself
    try:
        with open(path, "rb") as f:
            if not f.read(1):
                return Probe(None, None, 0, 0, "empty (0 bytes)")
    except OSError as exc:
        return Probe(None, None, 0, 0, f"unreadable ({exc.strerror or describe(exc)})", transient=True)
    try:
        with Image.open(path, formats=FORMATS) as image:
            width, height = image.size
            fmt, mode, dali = image.format, image.mode, dali_decodes(image)
    except Image.UnidentifiedImageError:
        return Probe(None, None, 0, 0, "not an image")
    except Exception as exc:  # a header Pillow recognises but cannot parse
        return Probe(None, None, 0, 0, f"damaged ({describe(exc)})")
    if width < 1 or height < 1:
        return Probe(fmt, mode, width, height, "damaged (an image of size 0)")
    return Probe(fmt, mode, width, height, None, dali)


def _probe_many(paths: list[str]) -> list[Probe]:
    return [probe(p) for p in paths]


@dataclass
class Index:
    """Every file found under `root`, classified.

    images: path -> Probe for each file that is an image, in sorted path order.
    left_out: (path, category, detail) for files that cannot be used; `category` is what
    summary.json counts, `detail` what skipped.txt adds. ignored: (path, rule) for files ignored by
    rule. folders: every folder walked (not ignored), relative to root, as path parts.
    """

    root: Path
    images: dict[Path, Probe] = field(default_factory=dict)
    left_out: list[tuple[Path, str, str]] = field(default_factory=list)
    ignored: list[tuple[Path, str]] = field(default_factory=list)
    folders: set[tuple[str, ...]] = field(default_factory=set)
    folder_notes: list[str] = field(default_factory=list)  # folders not read: link loops, duplicates, unreadable
    probed: int = 0        # headers read in this run (the rest came from the index cache)
    seconds: float = 0.0

    @property
    def files(self) -> int:
        """Files found: each is in exactly one of images, left_out and ignored."""
        return len(self.images) + len(self.left_out) + len(self.ignored)

    def describe(self) -> str:
        cached = len(self.images) + len(self.left_out) - self.probed
        return (f"indexed {self.files:,} files under {shown(self.root)} in {self.seconds:.1f}s "
                f"({self.probed:,} headers read, {cached:,} from the index cache)")


def ignore_rule(name: str, is_dir: bool) -> str | None:
    if is_dir:
        if name in IGNORED_FOLDERS:
            return IGNORED_FOLDERS[name]
        return "hidden folder" if name.startswith(".") else None
    if name.lower() in IGNORED_NAMES:
        return IGNORED_NAMES[name.lower()]
    if name.startswith("._"):
        return "AppleDouble metadata (._*)"
    return "hidden file" if name.startswith(".") else None


def _walk(root: Path, index: Index) -> list[tuple[Path, int, int]]:
    """Every file under root as (path, size, mtime_ns), in a fixed order whatever the file system lists.

    Links to folders are followed, as torchvision's ImageFolder does. A link back to a folder on the
    current path (a loop) is not followed; a second link to a folder already read is not read twice
    (its images would count twice); both are noted.
    """
    found, seen = [], {}
    stack = [(root, (), frozenset())]
    while stack:
        folder, parts, ancestors = stack.pop()
        try:
            st = os.stat(folder)
            key = (st.st_dev, st.st_ino)
            if key in ancestors:
                index.folder_notes.append(f"{shown(folder)}: a folder link that leads back to a folder above it; "
                                          f"not followed")
                continue
            if key in seen:
                index.folder_notes.append(f"{shown(folder)}: the same folder as {shown(seen[key])}; read once, "
                                          f"as {shown(seen[key])}")
                continue
            seen[key] = folder
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            index.folder_notes.append(f"{shown(folder)}: folder cannot be read ({exc.strerror}); its files are "
                                      f"not used")
            continue
        index.folders.add(parts)
        below = []
        for entry in entries:
            path = Path(entry.path)
            try:
                st = entry.stat()  # follows links
            except OSError:
                index.left_out.append((path, "unreadable", "unreadable (a broken link, or no permission)"))
                continue
            is_dir = stat.S_ISDIR(st.st_mode)
            rule = ignore_rule(entry.name, is_dir)
            if rule is not None:
                if is_dir:
                    index.ignored += [(p, rule) for p in _all_files(path)]
                else:
                    index.ignored.append((path, rule))
            elif is_dir:
                below.append((path, parts + (entry.name,), ancestors | {key}))
            elif stat.S_ISREG(st.st_mode):
                found.append((path, st.st_size, st.st_mtime_ns))
            else:
                index.left_out.append((path, "not a file", "not a file (a device, socket or pipe)"))
        stack += reversed(below)  # depth first, in name order
    return found


def _all_files(folder: Path) -> list[Path]:
    """Files under an ignored folder, so that they are counted (never followed through links)."""
    out = []
    for base, _, names in os.walk(folder):
        out += [Path(base) / n for n in names]
    return out


def _cache_file(root: Path) -> Path:
    key = hashlib.sha1(os.fsencode(os.path.realpath(root))).hexdigest()[:20]
    return cache_dir() / "index" / f"{key}.pkl"


def _cache_version() -> tuple:
    """What remembered headers and verdicts depend on: this module, the decode policy and Pillow."""
    from PIL import __version__ as pillow

    return INDEX_VERSION, POLICY_VERSION, pillow


def _load_cache(root: Path) -> dict:
    try:
        with open(_cache_file(root), "rb") as f:
            cached = pickle.load(f)
        if cached.get("version") == _cache_version():
            return cached
    except Exception:  # absent, from another version, or damaged: rebuilt
        pass
    return {"version": _cache_version(), "probes": {}, "decoded": {}}


def _save_cache(root: Path, cached: dict) -> None:
    """Best effort: a read-only home or a full disk costs the next run time, never this one."""
    import tempfile

    path = _cache_file(root)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            pickle.dump(cached, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, path)
    except OSError:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


class _Bar:
    """A rich progress bar that appears only once work has lasted PROGRESS_AFTER_S, on a terminal."""

    def __init__(self, what: str, total: int):
        self.what, self.total, self.started, self.progress, self.done = what, total, time.perf_counter(), None, 0

    def advance(self, n: int) -> None:
        self.done += n
        if self.progress is None and time.perf_counter() - self.started > PROGRESS_AFTER_S and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn(self.what), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                     console=Console(stderr=True), transient=True)
            self.progress.start()
            self.task = self.progress.add_task(self.what, total=self.total)
        if self.progress is not None:
            self.progress.update(self.task, completed=self.done)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def _quiet_worker() -> None:
    """Pool processes leave Ctrl-C to the main process, which stops the pool."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _parallel(function, items: list, chunk: int, what: str, workers: int | None, processes: bool) -> list:
    """function(list_of_items) -> list of results, over chunks, in order, with a progress bar.

    processes=True: a forkserver process pool (header parsing is Python code, which threads would
    serialise); False: threads (Pillow releases the GIL while it decodes). Below POOL_THRESHOLD
    items, or when a pool cannot start or breaks, the work runs in this process instead. Ctrl-C
    cancels what has not started.
    """
    bar = _Bar(what, len(items))
    chunks = [items[i:i + chunk] for i in range(0, len(items), chunk)]
    results: list = []
    if not workers:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        if len(items) >= POOL_THRESHOLD and workers > 1:
            try:
                return _in_pool(function, chunks, workers, processes, bar)
            except BrokenProcessPool:  # a worker died, or could not start: do it here instead
                bar.done = 0
        for part in chunks:
            results += function(part)
            bar.advance(len(part))
        return results
    finally:
        bar.close()


def _in_pool(function, chunks: list, workers: int, processes: bool, bar: _Bar) -> list:
    if processes:
        import multiprocessing

        # forkserver: safe once CUDA or other threads exist in this process; the server imports
        # only this module (no torch), and each worker forks from it
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])
        pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_quiet_worker)
    else:
        pool = ThreadPoolExecutor(2 * workers)
    results = []
    try:
        futures = [pool.submit(function, part) for part in chunks]
        for future in futures:
            part = future.result()
            results += part
            bar.advance(len(part))
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    return results


def build_index(root: Path, max_pixels: int | None = DEFAULT_MAX_PIXELS, workers: int | None = None) -> Index:
    """Walk `root` once and classify every file (see the module docstring).

    max_pixels: images with more pixels are left out as "too large" (Pillow's decompression-bomb
    guard, which fasttrain's --max-image-pixels moves); None allows any size.
    Raises nothing for bad files; they are in `left_out`.
    """
    started = time.perf_counter()
    index = Index(root)
    found = _walk(root, index)
    cached = _load_cache(root)
    probes: dict = cached["probes"]
    todo = [str(p) for p, size, mtime in found if probes.get(str(p), (None, None))[:2] != (size, mtime)]
    if todo:
        results = _parallel(_probe_many, todo, 256, "reading image headers", workers, processes=True)
        stamp = {str(p): (size, mtime) for p, size, mtime in found}
        for path, result in zip(todo, results):
            probes[path] = (*stamp[path], result)
        index.probed = len(todo)
        transient = {path for path, result in zip(todo, results) if result.transient}
    for path, size, mtime in sorted(found, key=lambda item: str(item[0])):  # str order: 3x faster than Path's
        result: Probe = probes[str(path)][2]
        if result.problem is not None:
            index.left_out.append((path, result.problem.split(" (")[0], result.problem))
        elif max_pixels is not None and result.width * result.height > max_pixels:
            index.left_out.append((path, "too large", (
                f"a {result.width} x {result.height} {result.format} image of {result.width * result.height / 1e6:.1f} "
                f"megapixels, above --max-image-pixels {max_pixels} (a guard against decompression bombs); "
                f"raise --max-image-pixels to use it")))
        else:
            index.images[path] = result
    if todo:
        live = {str(p) for p, _, _ in found} - transient
        cached["probes"] = {k: v for k, v in probes.items() if k in live}
        _save_cache(root, cached)
    index.seconds = time.perf_counter() - started
    return index


def _decodes_many(paths: list[str]) -> list[str | None]:
    from fasttrain.data.decode import problem

    return [problem(path) for path in paths]


def verify(paths: list[Path], root: Path | None = None, workers: int | None = None) -> list[tuple[Path, str]]:
    """Decode each file fully with the decode policy; return the damaged ones with why.

    Verdicts are remembered in root's index cache (keyed by path, size and modification time), so
    a second --strict run over unchanged files decodes nothing. Pillow releases the GIL while it
    decodes, so threads use every core.
    """
    cached = _load_cache(root) if root is not None else {"decoded": {}}
    known: dict = cached.setdefault("decoded", {})
    stamps = {}
    for p in paths:
        try:
            st = os.stat(p)
            stamps[str(p)] = (st.st_size, st.st_mtime_ns)
        except OSError:
            stamps[str(p)] = None
    todo = [str(p) for p in paths if stamps[str(p)] is None or known.get(str(p), (None,))[0] != stamps[str(p)]]
    verdicts = _parallel(_decodes_many, todo, 16, "decoding every image (--strict)", workers, processes=False)
    for path, verdict in zip(todo, verdicts):
        if stamps[path] is not None:
            known[path] = (stamps[path], verdict)
    if todo and root is not None:
        _save_cache(root, cached)
    return [(p, known[str(p)][1]) for p in paths if stamps[str(p)] is not None and known[str(p)][1] is not None] + \
           [(p, "cannot be read (it disappeared or is not readable)") for p in paths if stamps[str(p)] is None]
