"""ResNet-18 with a new head: a frozen feature extractor or fine-tuned end to end.

Weights come from torchvision's weights API (its cache under $TORCH_HOME), a local state dict,
or nowhere (random initialisation).
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch
from torch import nn
from torchvision.models import ResNet18_Weights, resnet18

from fasttrain.errors import UserError

WEIGHTS_HELP = "pass --weights PATH (a local ResNet-18 state dict) or --weights none (random initialisation)"


class ResNetClassifier(nn.Module):
    """torchvision's ResNet-18 whose `fc` is sized to the data set.

    With `finetune=False` only `fc` trains, and the backbone stays in eval mode even under
    `model.train()`, so its BatchNorm running statistics keep their ImageNet values.
    """

    def __init__(self, net: nn.Module, finetune: bool):
        super().__init__()
        self.net = net
        self.finetune = finetune
        if not finetune:
            for name, p in net.named_parameters():
                p.requires_grad_(name.startswith("fc."))

    def train(self, mode: bool = True) -> "ResNetClassifier":
        super().train(mode)
        if not self.finetune:
            for name, child in self.net.named_children():
                if name != "fc":
                    child.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _imagenet_state_dict() -> dict:
    weights = ResNet18_Weights.IMAGENET1K_V1
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    try:
        # torch.hub announces a download on stderr; the error below is the one line a user sees
        with contextlib.redirect_stderr(io.StringIO()):
            return weights.get_state_dict(progress=False)
    except Exception as exc:  # URLError, socket errors, HTTP errors: all mean "not to be had"
        raise UserError(
            f"ImageNet weights for ResNet-18 are not cached at {cached} and could not be downloaded "
            f"({type(exc).__name__}); {WEIGHTS_HELP}") from None


def _local_state_dict(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"--weights {path}: no such file; use 'imagenet', 'none' or a path to a state dict")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"--weights {path}: not a PyTorch state dict ({type(exc).__name__})") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # a fasttrain checkpoint
        state = {k.removeprefix("net."): v for k, v in state.items()}
    return state


def build_resnet(num_classes: int, weights: str = "imagenet", finetune: bool = False) -> ResNetClassifier:
    net = resnet18(weights=None)
    if weights == "imagenet":
        state = _imagenet_state_dict()
    elif weights == "none":
        state = None
    else:
        state = _local_state_dict(Path(weights))
    if state is not None:
        # the head is replaced below, so its weights (1000 ImageNet classes) are not needed
        backbone = {k: v for k, v in state.items() if not k.startswith("fc.")}
        missing, unexpected = net.load_state_dict(backbone, strict=False)
        missing = [k for k in missing if not k.startswith("fc.")]
        if missing or unexpected:
            raise UserError(f"--weights {weights}: not a ResNet-18 state dict "
                            f"({len(missing)} missing keys, {len(unexpected)} unexpected, e.g. "
                            f"{(missing + unexpected)[0]})")
    net.fc = nn.Linear(net.fc.in_features, num_classes)
    return ResNetClassifier(net, finetune)
