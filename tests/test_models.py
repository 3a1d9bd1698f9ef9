import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet18

import pytest

from fasttrain.errors import UserError
from fasttrain.models import SeedCNN, build_resnet, trainable_parameters
from fasttrain.models import resnet as resnet_module


def test_cnn_has_the_reports_71345252_parameters():
    assert sum(p.numel() for p in SeedCNN(100).parameters()) == 71_345_252


def test_cnn_layer_table_matches_report():
    """The report's torchsummary rows: conv/BN pairs, two max-pools, dropout, 4 linear layers."""
    model = SeedCNN(100)
    convs = [(m.in_channels, m.out_channels) for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)]
    assert convs == [(3, 64), (64, 128), (128, 256), (256, 512)]
    assert linears == [(32768, 2048), (2048, 1024), (1024, 512), (512, 100)]
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 2
    assert sum(isinstance(m, nn.BatchNorm1d) for m in model.modules()) == 3
    assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 100)


@pytest.mark.parametrize("channels_last", [False, True])
def test_every_cnn_parameter_gets_a_finite_gradient(channels_last):
    model = SeedCNN(10)
    x = torch.randn(4, 3, 32, 32)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    F.cross_entropy(model(x), torch.tensor([0, 1, 2, 3])).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert torch.isfinite(p.grad).all(), name


def test_cnn_overfits_one_batch():
    torch.manual_seed(0)
    model = SeedCNN(4).train()
    x, y = torch.randn(8, 3, 32, 32), torch.tensor([0, 1, 2, 3] * 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    first = None
    for _ in range(30):
        loss = F.cross_entropy(model(x), y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1 * first
    assert (model.eval()(x).argmax(1) == y).all()


def test_finetuned_resnet_trains_every_parameter():
    model = build_resnet(5, weights="none", finetune=True).train()
    F.cross_entropy(model(torch.randn(2, 3, 64, 64)), torch.tensor([0, 4])).backward()
    assert len(trainable_parameters(model)) == len(list(model.parameters()))
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_frozen_resnet_trains_only_the_head_and_keeps_bn_statistics():
    model = build_resnet(5, weights="none", finetune=False)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["net.fc.weight", "net.fc.bias"]
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    model.train()
    assert model.training and not model.net.layer1.training and model.net.fc.training
    opt = torch.optim.SGD(trainable_parameters(model), lr=0.1)
    F.cross_entropy(model(torch.randn(4, 3, 64, 64) * 3 + 1), torch.tensor([0, 1, 2, 3])).backward()
    opt.step()
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    assert model.net.fc.weight.grad is not None and model.net.conv1.weight.grad is None


def test_resnet_loads_a_local_state_dict(tmp_path):
    source = resnet18(weights=None)
    torch.save(source.state_dict(), tmp_path / "r18.pth")
    model = build_resnet(7, weights=str(tmp_path / "r18.pth"))
    assert torch.equal(model.net.conv1.weight, source.conv1.weight)
    assert model.net.fc.out_features == 7


def test_resnet_rejects_a_state_dict_of_another_model(tmp_path):
    torch.save(SeedCNN(10).state_dict(), tmp_path / "cnn.pth")
    with pytest.raises(UserError, match="not a ResNet-18 state dict"):
        build_resnet(7, weights=str(tmp_path / "cnn.pth"))
    with pytest.raises(UserError, match="no such file"):
        build_resnet(7, weights=str(tmp_path / "missing.pth"))


def test_imagenet_weights_come_from_torchvisions_cache(tmp_path, monkeypatch):
    """A state dict in $TORCH_HOME's cache is used without any network access."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    source = resnet18(weights=None)
    torch.save(source.state_dict(), cache / "resnet18-f37072fd.pth")
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("downloaded"))
    model = build_resnet(3, weights="imagenet")
    assert torch.equal(model.net.layer4[1].conv2.weight, source.layer4[1].conv2.weight)


def test_imagenet_weights_offline_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(UserError) as err:
        resnet_module.build_resnet(3, weights="imagenet")
    message = str(err.value)
    assert "\n" not in message and "--weights PATH" in message and "--weights none" in message
