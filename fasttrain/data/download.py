"""Downloading the seed's data sets: the official archives, verified by MD5 before unpacking."""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from fasttrain.errors import UserError
from fasttrain.outputs import folders_to_make, remove_if_empty


@dataclass(frozen=True)
class Archive:
    name: str
    url: str
    md5: str
    folder: str      # what the archive unpacks to
    url_env: str     # environment variable naming a mirror of the same archive

    @property
    def source(self) -> str:
        return os.environ.get(self.url_env) or self.url


CIFAR100 = Archive("CIFAR-100", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                   "eb9058c3a382ffc7106e4002c42a8d85", "cifar-100-python", "FASTTRAIN_CIFAR100_URL")
CUB200 = Archive("CUB-200-2011", "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz",
                 "97eceeb196236b17998738112f37df78", "CUB_200_2011", "FASTTRAIN_CUB200_URL")


@contextlib.contextmanager
def _socket_timeout(seconds: float):
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def fetch(archive: Archive, root: Path, timeout_s: float = 30.0) -> Path:
    """Download `archive` into root, check its MD5, unpack it there; return the unpacked folder."""
    from torchvision.datasets.utils import check_integrity, download_and_extract_archive

    url = archive.source
    filename = Path(url.split("?")[0]).name
    where = (f"put the {archive.folder}/ folder from {archive.url} under {root} "
             f"(or set $FASTTRAIN_DATA / pass --data DIR)")
    made = folders_to_make(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"no {archive.name} at {root}, which cannot be created ({exc.strerror}); {where}") from None
    try:
        with _socket_timeout(timeout_s):
            download_and_extract_archive(url, download_root=str(root), filename=filename, md5=archive.md5,
                                         remove_finished=True)
    except Exception as exc:  # network errors, HTTP errors, bad archives: all leave us without data
        partial = root / filename
        corrupt = partial.exists() and not check_integrity(str(partial), archive.md5)
        if corrupt:
            partial.unlink()
            reason = f"MD5 of {filename} is not {archive.md5}"
        else:
            reason = str(getattr(exc, "reason", exc)) or type(exc).__name__
        remove_if_empty(made)
        raise UserError(f"no {archive.name} at {root} and downloading {url} failed ({reason}); {where}") from None
    return root / archive.folder
