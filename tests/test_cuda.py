"""The CUDA path: compiled, bf16, channels_last training. Skipped, with the reason, where there is no GPU."""

import json

import pytest
import torch

from fasttrain.cli import main

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")


@needs_cuda
@pytest.mark.parametrize("model, extra", [("cnn", []), ("resnet", ["--finetune", "--weights", "none"])])
def test_compiled_amp_training_on_cuda(model, extra, tmp_path):
    out = tmp_path / model
    assert main([model, *extra, "--synthetic", "--device", "cuda", "--epochs", "2", "--batch-size", "64",
                 "--train-limit", "640", "--val-limit", "100", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["compiled"] and summary["precision"] in ("bf16", "fp16")
    assert summary["compile_time_s"] > 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # Dynamo's own count: the first epoch compiled the train and eval graphs, the second reused them
    # (compile_time_s of epoch 2 is 0 by construction, whatever happens, so it proves nothing)
    assert rows[0]["graphs_compiled"] >= 1
    assert summary["recompiles"] == 0, (summary["recompiles"], [r["graphs_compiled"] for r in rows])
    assert rows[1]["images_per_sec"] > 0


@needs_cuda
def test_cuda_loader_batches_arrive_on_the_device(tmp_path):
    from fasttrain.data import build_loaders, synthetic_dataset
    from fasttrain.recipes import CNN_FAST

    loaders = build_loaders(synthetic_dataset(10, 32, 256, 64), CNN_FAST.replace(batch_size=64),
                            torch.device("cuda"), 0, 0)
    images, labels = next(iter(loaders.train))
    assert images.is_cuda and labels.is_cuda and images.is_contiguous(memory_format=torch.channels_last)


needs_dali = pytest.mark.skipif(not __import__("fasttrain.data.dali_loader", fromlist=["x"]).dali_available(),
                                reason="needs NVIDIA DALI (pip install nvidia-dali-cuda130)")


@needs_cuda
@needs_dali
@pytest.mark.parametrize("augment", ["device", "dali"])
@pytest.mark.parametrize("layout, model, cache", [("cifar", "cnn", "none"), ("cifar", "cnn", "gpu"),
                                                  ("jpeg", "resnet", "none"), ("jpeg", "resnet", "gpu")])
def test_dali_gpu_loader_contract(layout, model, cache, augment, cifar_root, jpeg_root):
    from fasttrain.data import build_loaders, open_dataset
    from fasttrain.recipes import CNN_FAST, RESNET_FAST

    data = open_dataset(model, cifar_root if layout == "cifar" else jpeg_root)
    recipe = (CNN_FAST if model == "cnn" else RESNET_FAST).replace(batch_size=8, cache=cache, cache_augment=augment)
    loaders = build_loaders(data, recipe, torch.device("cuda"), 4, 0)
    assert loaders.backend == (f"{augment}-cache" if cache == "gpu" else "dali")
    for _ in range(2):
        for images, labels in loaders.train:
            assert images.is_cuda and labels.is_cuda and labels.dtype == torch.int64
            assert images.shape == (8, 3, recipe.image_size, recipe.image_size)
            assert images.is_contiguous(memory_format=torch.channels_last)
    labels = torch.cat([y for _, y in loaders.val]).cpu()
    assert labels.tolist() == data.val.labels.tolist()
