"""Refused before any work (issue 11): a --data that is not there is no request to download, and an
--out that cannot be written, or holds earlier results, stops predict/evaluate/preview at once.

Every refusal is one `error:` line on stderr and exit code 2, and leaves nothing behind: no download
(fasttrain.data.download.fetch is replaced by a recorder), no file, no folder.
"""

import os
import time

import pytest

from fasttrain import inference
from fasttrain.cli import main
from fasttrain.data import download, open_dataset
from fasttrain.errors import UserError

from conftest import write_cifar


@pytest.fixture(scope="module")
def checkpoint(jpeg_root, tmp_path_factory):
    """best.pt of the tiniest run there is: ResNet-18 from no weights, one epoch on the JPEG folders."""
    out = tmp_path_factory.mktemp("refusals") / "run"
    assert main(["resnet", "--weights", "none", "--recipe", "seed", "--device", "cpu", "--batch-size", "8",
                 "--workers", "0", "--epochs", "1", "--data", str(jpeg_root), "--out", str(out)]) == 0
    return out / "best.pt"


@pytest.fixture()
def fetched(monkeypatch):
    """The (archive name, folder) of every download asked for; none goes to the network. A fetch of
    CIFAR-100 writes a tiny CIFAR-100 there, as the real one unpacks; any other fails offline."""
    calls = []

    def fetch(archive, root, timeout_s=30.0):
        calls.append((archive.name, root))
        if archive is not download.CIFAR100:
            raise UserError(f"no {archive.name} at {root} (offline in the tests)")
        return write_cifar(root)

    monkeypatch.setattr(download, "fetch", fetch)
    return calls


@pytest.fixture()
def loaded(monkeypatch):
    """The checkpoints predict/evaluate loaded: a refusal made before the work leaves this empty."""
    calls = []
    real = inference.load_checkpoint
    monkeypatch.setattr(inference, "load_checkpoint", lambda path: calls.append(path) or real(path))
    return calls


def refused(capsys, *argv, within: float | None = None) -> str:
    """Run the CLI in this process; assert exit code 2 and one `error:` line; return that line."""
    started = time.perf_counter()
    code = main([str(a) for a in argv])
    took = time.perf_counter() - started
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    if within is not None:
        assert took < within, f"refused after {took:.1f} s: {lines[0]}"
    return lines[0]


def unwritable(tmp_path):
    """A folder no one can write in: read-only; for root, who writes anyway, a path under a file."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o500)
    if os.access(folder, os.W_OK):  # root
        folder.chmod(0o700)
        folder = tmp_path / "a-file"
        folder.write_text("a file, not a folder")
    return folder


@pytest.fixture()
def restore_modes(tmp_path):
    yield
    for path in tmp_path.rglob("*"):
        if path.is_dir():
            path.chmod(0o700)


# ---- point 4: --data that is not there ------------------------------------------------------


@pytest.mark.parametrize("model, archive", [("cnn", "CIFAR-100"), ("resnet", "CUB-200-2011")])
def test_training_refuses_a_data_folder_that_does_not_exist(model, archive, tmp_path, fetched, capsys):
    typo = tmp_path / "dta"
    weights = ["--weights", "none"] if model == "resnet" else []
    line = refused(capsys, model, "--data", typo, "--out", tmp_path / "run", "--device", "cpu", *weights)
    assert line == f"error: --data {typo}: no such folder; pass --download to download {archive} into it"
    assert fetched == [] and sorted(tmp_path.iterdir()) == []  # no data folder, no run folder


def test_training_refuses_an_empty_data_folder(tmp_path, fetched, capsys):
    (tmp_path / "empty").mkdir()
    line = refused(capsys, "cnn", "--data", tmp_path / "empty", "--out", tmp_path / "run", "--device", "cpu")
    assert f"--data {tmp_path / 'empty'}: an empty folder; pass --download" in line
    assert fetched == [] and [p.name for p in tmp_path.iterdir()] == ["empty"]
    assert not any((tmp_path / "empty").iterdir())


def test_training_downloads_into_an_explicit_folder_when_asked(tmp_path, fetched):
    assert main(["cnn", "--data", str(tmp_path / "new"), "--download", "--out", str(tmp_path / "run"),
                 "--recipe", "seed", "--device", "cpu", "--epochs", "1", "--batch-size", "8", "--workers", "0",
                 "--train-limit", "8", "--val-limit", "4"]) == 0
    assert fetched == [("CIFAR-100", tmp_path / "new")]


def test_open_dataset_downloads_into_the_default_folder_and_an_explicit_one_only_when_asked(tmp_path, monkeypatch,
                                                                                              fetched):
    monkeypatch.setenv("FASTTRAIN_DATA", str(tmp_path / "default"))
    assert len(open_dataset("cnn", None).train) == 48  # no --data: the default folder, downloaded as ever
    assert len(open_dataset("cnn", tmp_path / "asked", download=True).train) == 48
    with pytest.raises(UserError, match="CUB-200-2011 at .*birds"):
        open_dataset("resnet", tmp_path / "birds", download=True)  # the ResNet's own data set, same rule
    assert fetched == [("CIFAR-100", tmp_path / "default"), ("CIFAR-100", tmp_path / "asked"),
                       ("CUB-200-2011", tmp_path / "birds")]


def test_evaluate_refuses_a_data_folder_that_does_not_exist_before_loading_the_checkpoint(
        checkpoint, tmp_path, fetched, loaded, capsys):
    typo = tmp_path / "dta"
    line = refused(capsys, "evaluate", "--checkpoint", checkpoint, "--data", typo, "--out", tmp_path / "eval",
                   "--device", "cpu", within=5)
    assert line.startswith(f"error: --data {typo}: no such folder")
    assert fetched == [] and loaded == [] and sorted(tmp_path.iterdir()) == []


def test_evaluate_refuses_an_empty_data_folder_and_downloads_into_it_when_asked(checkpoint, tmp_path, fetched,
                                                                                capsys):
    (tmp_path / "empty").mkdir()
    line = refused(capsys, "evaluate", "--checkpoint", checkpoint, "--data", tmp_path / "empty",
                   "--out", tmp_path / "eval", "--device", "cpu")
    assert f"--data {tmp_path / 'empty'}: an empty folder; pass --download to download CUB-200-2011" in line
    assert fetched == [] and [p.name for p in tmp_path.iterdir()] == ["empty"]
    line = refused(capsys, "evaluate", "--checkpoint", checkpoint, "--data", tmp_path / "new", "--download",
                   "--out", tmp_path / "eval", "--device", "cpu")
    assert fetched == [("CUB-200-2011", tmp_path / "new")] and "offline in the tests" in line
    assert not (tmp_path / "eval").exists()


def test_preview_refuses_a_data_folder_that_does_not_exist_and_downloads_into_it_when_asked(tmp_path, fetched,
                                                                                            capsys):
    typo, out = tmp_path / "dta", tmp_path / "grid.png"
    line = refused(capsys, "preview", "cnn", "--data", typo, "--out", out, "--loader", "torch", "--device", "cpu")
    assert line == f"error: --data {typo}: no such folder; pass --download to download CIFAR-100 into it"
    assert fetched == [] and sorted(tmp_path.iterdir()) == []
    assert main(["preview", "cnn", "--data", str(typo), "--download", "--out", str(out), "--loader", "torch",
                 "--device", "cpu", "--workers", "0", "--batch-size", "4"]) == 0
    assert fetched == [("CIFAR-100", typo)] and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- point 7: --out checked before the work ---------------------------------------------------


@pytest.mark.parametrize("command", ["predict", "evaluate", "preview"])
def test_an_unwritable_out_is_refused_at_once(command, checkpoint, jpeg_root, tmp_path, loaded, fetched,
                                              restore_modes, capsys, monkeypatch):
    opened = []
    monkeypatch.setattr("fasttrain.preview.open_dataset", lambda *a, **k: opened.append(a))
    folder = unwritable(tmp_path)
    out = folder / "sub" / ("evaluation" if command == "evaluate" else "out.csv")
    args = (["preview", "resnet", "--loader", "torch"] if command == "preview" else
            [command, "--checkpoint", checkpoint])
    line = refused(capsys, *args, "--data", jpeg_root, "--out", out, "--device", "cpu", within=5)
    assert line.startswith(f"error: --out {out}: cannot write there")
    assert loaded == [] and opened == [] and fetched == []
    assert not (folder / "sub").exists()


def test_predict_into_a_folder_is_refused_before_the_work(checkpoint, jpeg_root, tmp_path, loaded, capsys):
    (tmp_path / "preds").mkdir()
    line = refused(capsys, "predict", "--checkpoint", checkpoint, "--data", jpeg_root, "--out", tmp_path / "preds",
                   "--device", "cpu", within=5)
    assert line == f"error: --out {tmp_path / 'preds'}: a folder; name the file to write"
    assert loaded == [] and not any((tmp_path / "preds").iterdir())


def test_predict_keeps_an_existing_csv_unless_overwrite(checkpoint, jpeg_root, tmp_path, loaded, capsys):
    out = tmp_path / "preds.csv"
    out.write_text("earlier predictions\n")
    line = refused(capsys, "predict", "--checkpoint", checkpoint, "--data", jpeg_root, "--out", out,
                   "--device", "cpu", within=5)
    assert line == f"error: {out} exists; pass --overwrite to replace it"
    assert loaded == [] and out.read_text() == "earlier predictions\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preds.csv"]  # no probe file left
    assert main(["predict", "--checkpoint", str(checkpoint), "--data", str(jpeg_root), "--out", str(out),
                 "--device", "cpu", "--workers", "0", "--overwrite"]) == 0
    assert out.read_text().startswith("id,label\n") and len(out.read_text().splitlines()) == 34


def test_evaluate_keeps_an_earlier_evaluation_unless_overwrite(checkpoint, jpeg_root, tmp_path, loaded, capsys):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    line = refused(capsys, "evaluate", "--checkpoint", checkpoint, "--data", jpeg_root, "--out", out,
                   "--device", "cpu", within=5)
    assert line == f"error: --out {out} holds an earlier evaluation (metrics.json); pass --overwrite to replace it"
    assert loaded == [] and (out / "metrics.json").read_text() == "{}"
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(jpeg_root), "--out", str(out),
                 "--device", "cpu", "--workers", "0", "--overwrite"]) == 0
    assert '"top1"' in (out / "metrics.json").read_text() and (out / "confusion.png").is_file()


def test_preview_keeps_an_existing_picture_unless_overwrite(jpeg_root, tmp_path, capsys, monkeypatch):
    opened = []
    monkeypatch.setattr("fasttrain.preview.open_dataset", lambda *a, **k: opened.append(a))
    out = tmp_path / "grid.png"
    out.write_bytes(b"earlier")
    line = refused(capsys, "preview", "resnet", "--data", jpeg_root, "--out", out, "--loader", "torch", within=5)
    assert line == f"error: {out} exists; pass --overwrite to replace it"
    assert opened == [] and out.read_bytes() == b"earlier"


def test_folders_made_for_out_are_removed_when_the_command_fails(jpeg_root, tmp_path, capsys):
    (tmp_path / "x.pt").write_bytes(b"not a checkpoint")
    for command, out in (("predict", tmp_path / "new" / "preds.csv"), ("evaluate", tmp_path / "new" / "eval")):
        line = refused(capsys, command, "--checkpoint", tmp_path / "x.pt", "--data", jpeg_root, "--out", out,
                       "--device", "cpu")
        assert "not a readable fasttrain checkpoint" in line
        assert sorted(p.name for p in tmp_path.iterdir()) == ["x.pt"]


@pytest.mark.parametrize("command, default", [(["predict"], "predictions.csv"), (["evaluate"], "evaluation"),
                                               (["preview", "cnn"], "preview.png")])
def test_help_shows_where_out_goes_by_default(command, default, capsys):
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    assert f"(default: {default})" in " ".join(capsys.readouterr().out.split())
