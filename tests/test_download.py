"""The real download code against a local HTTP server: checksum verified, bad archives refused."""

import dataclasses
import functools
import hashlib
import http.server
import tarfile
import threading

import pytest

from fasttrain.data import download, open_dataset
from fasttrain.errors import UserError

from conftest import write_cifar


@pytest.fixture()
def served_archive(tmp_path):
    """cifar-100-python.tar.gz of tiny pickles, served on 127.0.0.1; yields (url, md5)."""
    src = tmp_path / "src"
    write_cifar(src)
    www = tmp_path / "www"
    www.mkdir()
    with tarfile.open(www / "cifar-100-python.tar.gz", "w:gz") as tar:
        tar.add(src / "cifar-100-python", arcname="cifar-100-python")
    md5 = hashlib.md5((www / "cifar-100-python.tar.gz").read_bytes()).hexdigest()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/cifar-100-python.tar.gz", md5
    server.shutdown()
    server.server_close()


def test_download_verifies_and_unpacks(served_archive, tmp_path, monkeypatch):
    url, md5 = served_archive
    monkeypatch.setenv("FASTTRAIN_CIFAR100_URL", url)
    monkeypatch.setattr(download, "CIFAR100", dataclasses.replace(download.CIFAR100, md5=md5))
    target = tmp_path / "data"
    data = open_dataset("cnn", target, download=True)  # absent folder, --download: downloaded
    assert data.kind == "cifar" and len(data.train) == 48
    assert (target / "cifar-100-python" / "meta").is_file()
    assert not (target / "cifar-100-python.tar.gz").exists()  # archive removed after unpacking


def test_a_checksum_mismatch_is_refused_and_the_file_removed(served_archive, tmp_path, monkeypatch):
    url, _ = served_archive
    monkeypatch.setenv("FASTTRAIN_CIFAR100_URL", url)  # the official MD5 cannot match this archive
    target = tmp_path / "data"
    with pytest.raises(UserError, match="MD5") as err:
        open_dataset("cnn", target, download=True)
    assert "\n" not in str(err.value)
    assert not (target / "cifar-100-python.tar.gz").exists()
    assert not (target / "cifar-100-python").exists()


def test_offline_is_a_one_line_error_saying_where_to_put_the_data(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTTRAIN_CUB200_URL", "http://127.0.0.1:9/CUB_200_2011.tgz")  # discard port: refused
    with pytest.raises(UserError) as err:
        open_dataset("resnet", tmp_path / "birds", download=True)
    message = str(err.value)
    assert "\n" not in message and "CUB_200_2011/" in message and str(tmp_path / "birds") in message


def test_official_archives_are_pinned():
    assert download.CIFAR100.md5 == "eb9058c3a382ffc7106e4002c42a8d85"
    assert download.CUB200.md5 == "97eceeb196236b17998738112f37df78"
    assert download.CIFAR100.url.startswith("https://") and download.CUB200.url.startswith("https://")
