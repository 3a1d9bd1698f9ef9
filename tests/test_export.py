"""`export`: the ONNX model, run by onnxruntime on the CPU, agrees with `predict` on the same files."""

import csv
import json
import sys

import numpy as np
import pytest
import torch

from torchvision.transforms import v2

from fasttrain.cli import main
from fasttrain.data.decode import open_rgb
from fasttrain.export import export_onnx, reference_logits
from fasttrain.inference import load_trained

for _name in ("onnx", "onnxruntime", "onnxscript"):
    pytest.importorskip(_name, reason=f"{_name} is not installed: pip install 'fasttrain[onnx]'")

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

CLASSES = ["apple", "bee", "cloud"]


@pytest.fixture(scope="module")
def checkpoints(jpeg_root, tmp_path_factory):
    """A frozen-backbone ResNet-18 trained one epoch on JPEG files (ImageNet statistics), and a copy
    whose mean and std are a data set's own, as a CNN run has: an export that ignored the
    checkpoint's statistics would agree with predict on the first and not on the second."""
    run = tmp_path_factory.mktemp("run") / "resnet"
    assert main(["resnet", "--weights", "none", "--recipe", "seed", "--device", "cpu", "--batch-size", "8",
                 "--workers", "0", "--epochs", "1", "--data", str(jpeg_root), "--out", str(run)]) == 0
    state = torch.load(run / "best.pt", map_location="cpu", weights_only=True)
    state["mean"], state["std"] = [0.31, 0.52, 0.68], [0.21, 0.26, 0.33]
    torch.save(state, run / "own-stats.pt")
    return {"imagenet-stats": run / "best.pt", "own-stats": run / "own-stats.pt"}


@pytest.fixture(scope="module")
def exported(checkpoints, tmp_path_factory):
    """Each checkpoint exported once, as `export` does: {which: (model file, what export_onnx returned)}."""
    folder = tmp_path_factory.mktemp("onnx")
    return {which: (folder / f"{which}.onnx", export_onnx(checkpoint, folder / f"{which}.onnx"))
            for which, checkpoint in checkpoints.items()}


def export(capsys, checkpoint, out, *flags) -> tuple[int, str, str]:
    code = main(["export", "--checkpoint", str(checkpoint), "--out", str(out), *flags])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def refused(capsys, *argv) -> str:
    code, out, err = export(capsys, *argv)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and not out, (out, err)
    return lines[0]


def metadata(model: onnx.ModelProto) -> dict:
    return {p.key: p.value for p in model.metadata_props}


def pixels(files, size: int, resize: int) -> np.ndarray:
    """uint8 NCHW as the recipe's evaluation transform fits a file: shorter side to `resize`, centre crop."""
    fit = v2.Compose([v2.Resize(resize), v2.CenterCrop(size)])
    return np.stack([np.asarray(fit(open_rgb(f))).transpose(2, 0, 1) for f in files])


@pytest.mark.parametrize("which", ["imagenet-stats", "own-stats"])
def test_onnx_model_agrees_with_predict_on_the_same_files(checkpoints, exported, which, jpeg_root, tmp_path):
    checkpoint, predictions = checkpoints[which], tmp_path / "preds.csv"
    model_file, result = exported[which]
    assert result["checked_images"] == 3 and result["max_abs_diff"] <= result["tolerance"] <= 1e-2
    assert main(["predict", "--checkpoint", str(checkpoint), "--data", str(jpeg_root / "val"), "--out",
                 str(predictions), "--device", "cpu", "--loader", "torch", "--workers", "0", "--top-k", "3"]) == 0
    with open(predictions) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 9
    meta = metadata(onnx.load(model_file))
    images = pixels([jpeg_root / "val" / r["id"] for r in rows], int(meta["input_size"]), int(meta["eval_resize"]))
    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    for batch in (1, len(rows)):  # neither is the batch traced (2) or checked (3) by the export
        probabilities = np.concatenate([session.run(["probabilities"], {"images": images[i:i + batch]})[0]
                                        for i in range(0, len(rows), batch)])
        for row, p in zip(rows, probabilities):
            order = np.argsort(-p)
            assert CLASSES[order[0]] == row["label"], row["id"]
            assert [CLASSES[i] for i in order] == [row[f"label_{j}"] for j in (1, 2, 3)], row["id"]
            assert p[order] == pytest.approx([float(row[f"prob_{j}"]) for j in (1, 2, 3)], abs=1e-4), row["id"]


def test_metadata_and_signature(exported):
    model_file, _ = exported["own-stats"]
    model = onnx.load(model_file)
    meta = metadata(model)
    assert json.loads(meta["classes"]) == CLASSES  # in the order of the logits
    assert json.loads(meta["mean"]) == [0.31, 0.52, 0.68] and json.loads(meta["std"]) == [0.21, 0.26, 0.33]
    assert (meta["model"], meta["input_dtype"], meta["input_size"], meta["eval_resize"]) == \
        ("resnet", "uint8", "224", "256")
    assert [i.name for i in model.graph.input] == ["images"]
    assert [o.name for o in model.graph.output] == ["logits", "probabilities"]
    tensor = model.graph.input[0].type.tensor_type
    assert tensor.elem_type == onnx.TensorProto.UINT8
    batch, *rest = tensor.shape.dim
    assert batch.dim_param and not batch.HasField("dim_value") and [d.dim_value for d in rest] == [3, 224, 224]
    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    assert json.loads(session.get_modelmeta().custom_metadata_map["classes"]) == CLASSES


def test_float32_input_and_an_earlier_file_replaced_only_with_overwrite(checkpoints, tmp_path, capsys):
    model_file = tmp_path / "model.onnx"
    model_file.write_bytes(b"earlier")
    line = refused(capsys, checkpoints["imagenet-stats"], model_file, "--input-dtype", "float32")
    assert line == f"error: {model_file} exists; pass --overwrite to replace it"
    assert model_file.read_bytes() == b"earlier"
    code, out, err = export(capsys, checkpoints["imagenet-stats"], model_file, "--input-dtype", "float32",
                            "--overwrite")
    assert code == 0 and out.count("\n") == 1, err
    assert out.startswith(f"wrote {model_file}: ResNet-18, 3 classes, opset ")
    assert "input images float32 [batch,3,224,224], checked with onnxruntime on 3 images (max |diff| " in out
    model = onnx.load(model_file)
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    images = np.random.default_rng(0).integers(0, 256, (4, 3, 224, 224), dtype=np.uint8)
    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {"images": images.astype(np.float32)})[0]
    trained = load_trained(checkpoints["imagenet-stats"], torch.device("cpu"))
    expected = reference_logits(trained.model, torch.from_numpy(images), trained.mean, trained.std).numpy()
    assert np.abs(logits - expected).max() <= 1e-3 * np.abs(expected).max()


@pytest.mark.parametrize("content, why", [
    ("bytes", "not a readable fasttrain checkpoint (UnpicklingError)"),
    ("state dict", "not a fasttrain checkpoint (no recipe, classes or model inside)")])
def test_refuses_a_checkpoint_that_is_not_fasttrains(content, why, tmp_path, capsys):
    checkpoint = tmp_path / "model.pt"
    if content == "bytes":
        checkpoint.write_bytes(b"not a checkpoint at all")
    else:
        torch.save({"weights": torch.zeros(2)}, checkpoint)  # readable, but no recipe, classes or model
    line = refused(capsys, checkpoint, tmp_path / "model.onnx")
    assert line.startswith("error: ") and line.endswith(f"{checkpoint}: {why}")
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_missing_packages_are_named_with_the_install_command(checkpoints, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # importlib.util.find_spec now finds nothing
    line = refused(capsys, checkpoints["imagenet-stats"], tmp_path / "model.onnx")
    assert "onnxscript missing" in line and line.endswith("pip install 'fasttrain[onnx]'")


def test_disagreement_with_pytorch_writes_nothing_and_keeps_the_earlier_file(checkpoints, tmp_path, capsys,
                                                                             monkeypatch):
    import fasttrain.export

    real = fasttrain.export.reference_logits
    monkeypatch.setattr(fasttrain.export, "reference_logits", lambda *a: real(*a) + 1.0)
    model_file = tmp_path / "model.onnx"
    model_file.write_bytes(b"earlier")
    line = refused(capsys, checkpoints["imagenet-stats"], model_file, "--overwrite")
    assert "disagrees with PyTorch: max |diff| 1 > tolerance" in line and line.endswith("nothing was written")
    assert model_file.read_bytes() == b"earlier" and [p.name for p in tmp_path.iterdir()] == ["model.onnx"]
