"""`--tensorboard` (issue 12): RUN/tensorboard read back with TensorBoard's own event reader.

End to end on the seed CNN (3 steps of 8 images per epoch: below the loop's log interval of 20, so
the loop logs each epoch's last step only); the log-interval points over a long epoch and the
first-batch grid's pixels on a tiny model and hand-made batches.
"""

import importlib.util
import io
import json
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fasttrain.cli import main
from fasttrain.device import Precision
from fasttrain.progress import Both, PlainReporter
from fasttrain.tensorboard import PREVIEW_IMAGES, TensorBoardLog
from fasttrain.train import ForwardLoss, TrainStep, fit

needs_tensorboard = pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                                       reason="the tensorboard package is not installed (pip install -e '.[dev]')")

SEED_CNN = ["--recipe", "seed", "--device", "cpu", "--batch-size", "8", "--workers", "0", "--loader", "torch",
            "--train-limit", "24"]
STEPS = 3  # 24 training images in batches of 8
EPOCH_TAGS = {"train_loss": "train/loss", "train_acc": "train/top1", "val_loss": "val/loss", "val_acc": "val/top1",
              "val_top5": "val/top5", "images_per_sec": "throughput/images_per_sec",
              "data_wait_fraction": "throughput/data_wait_fraction"}  # metrics.jsonl's field -> tag


def events(out):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def points(acc, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def text(acc, tag: str) -> list[str]:
    return [e.tensor_proto.string_val[0].decode() for e in acc.Tensors(f"{tag}/text_summary")]


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def f32(x: float) -> float:
    return float(np.float32(x))  # what an event file holds


@pytest.fixture(scope="module")
def two_epochs(cifar_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("tb") / "run"
    assert main(["cnn", "--data", str(cifar_root), "--out", str(out), "--epochs", "2", *SEED_CNN, "--save-every", "0",
                 "--tensorboard"]) == 0
    return out


@needs_tensorboard
def test_epoch_scalars_are_the_metrics_of_each_epoch(two_epochs):
    acc, rows = events(two_epochs), metrics(two_epochs)
    for field, tag in EPOCH_TAGS.items():
        assert points(acc, tag) == [(r["epoch"] * STEPS, f32(r[field])) for r in rows], tag
    # the rate each epoch began with, at its first step
    assert points(acc, "lr") == [((r["epoch"] - 1) * STEPS, f32(r["lr"])) for r in rows]


@needs_tensorboard
def test_step_scalars_at_each_logged_step(two_epochs):
    acc, rows = events(two_epochs), metrics(two_epochs)
    # 3 steps < log_every: the loop logs the epoch's last step, where the running loss is the epoch's
    assert points(acc, "train_step/loss") == [(r["epoch"] * STEPS, f32(r["train_loss"])) for r in rows]
    assert [s for s, _ in points(acc, "train_step/images_per_sec")] == [3, 6]
    assert points(acc, "train_step/lr") == [(3, f32(0.005)), (6, f32(0.005))]  # seed: constant 0.005


@needs_tensorboard
def test_first_batch_grid_and_recipe_text(two_epochs):
    acc = events(two_epochs)
    [image] = acc.Images("train/first_batch")  # once per process, not once per epoch
    assert (image.step, image.width, image.height) == (0, 8 * 34 + 2, 34 + 2)  # 8 images of 32x32, 2px padding
    assert Image.open(io.BytesIO(image.encoded_image_string)).size == (image.width, image.height)
    [recipe] = text(acc, "recipe")
    summary = json.loads((two_epochs / "summary.json").read_text())
    for field, value in summary["recipe"].items():
        assert f"| {field} | {json.dumps(value)} |" in recipe
    [command] = text(acc, "command")
    assert command.strip() == summary["command"]


@pytest.fixture
def writers(monkeypatch) -> list:
    """Every SummaryWriter the run opens, each with `closed` set when it is closed."""
    import fasttrain.tensorboard as tb

    made, real = [], tb.summary_writer_class

    def recorded():
        class Recorded(real()):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self.closed = False
                made.append(self)

            def close(self):
                super().close()
                self.closed = True

        return Recorded

    monkeypatch.setattr(tb, "summary_writer_class", recorded)
    return made


@needs_tensorboard
def test_a_stopped_run_resumed_continues_the_steps_and_hides_what_was_logged_past_its_checkpoint(
        cifar_root, tmp_path, monkeypatch, writers):
    from torch.utils.tensorboard import SummaryWriter

    out = tmp_path / "run"
    with monkeypatch.context() as stop:  # as a Ctrl-C after step 2 of epoch 1 would
        stop.setattr("fasttrain.session.TrainingSession._should_stop", lambda self, step: step == 2)
        assert main(["cnn", "--data", str(cifar_root), "--out", str(out), "--epochs", "2", *SEED_CNN,
                     "--tensorboard"]) == 143
    # a process that went on from that checkpoint, logged, and died before saving again: read after it
    [first] = (out / "tensorboard").iterdir()
    stale = SummaryWriter(str(tmp_path / "stale"))
    for at in (STEPS, 2 * STEPS):
        stale.add_scalar("train/loss", 999.0, at)
        stale.add_scalar("train_step/loss", 999.0, at)
    stale.close()
    [written] = (tmp_path / "stale").iterdir()
    shutil.move(written, out / "tensorboard" / f"{first.name}.stale")
    assert main(["cnn", "--out", str(out), "--resume", "--tensorboard"]) == 0
    acc, rows = events(out), metrics(out)
    assert rows[0]["resumed_at_step"] == 2
    assert len(list((out / "tensorboard").iterdir())) == 3  # appended to the same folder
    assert points(acc, "train/loss") == [(STEPS, f32(rows[0]["train_loss"])), (2 * STEPS, f32(rows[1]["train_loss"]))]
    logged = points(acc, "train_step/loss")  # the stop's step, then the resumed epoch's last (its loss)
    assert [s for s, _ in logged] == [2, STEPS, 2 * STEPS] and 0 < logged[0][1] < 999
    assert logged[1:] == [(STEPS, f32(rows[0]["train_loss"])), (2 * STEPS, f32(rows[1]["train_loss"]))]
    assert points(acc, "val/top1") == [(r["epoch"] * STEPS, f32(r["val_acc"])) for r in rows]
    # each process's first batch, at the step it started from; the stopped one's written at the stop
    assert [i.step for i in acc.Images("train/first_batch")] == [0, 2]
    assert [len(t) > 0 for t in text(acc, "recipe")] == [True, True]
    assert [w.closed for w in writers] == [True, True]


@needs_tensorboard
def test_resume_keeps_writing_events_without_the_flag_and_stops_with_no_tensorboard(cifar_root, tmp_path):
    out = tmp_path / "run"
    assert main(["cnn", "--data", str(cifar_root), "--out", str(out), "--epochs", "1", *SEED_CNN,
                 "--tensorboard"]) == 0
    assert main(["cnn", "--out", str(out), "--resume", "--epochs", "2"]) == 0
    assert [step for step, _ in points(events(out), "val/top1")] == [STEPS, 2 * STEPS]
    with pytest.MonkeyPatch.context() as gone:  # remembered, but the package is gone: refused, not dropped
        gone.setitem(sys.modules, "tensorboard", None)
        gone.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
        gone.setattr("fasttrain.session.set_up", lambda *a, **k: pytest.fail("set-up began before the refusal"))
        assert main(["cnn", "--out", str(out), "--resume", "--epochs", "3"]) == 2
    assert main(["cnn", "--out", str(out), "--resume", "--epochs", "3", "--no-tensorboard"]) == 0
    assert [step for step, _ in points(events(out), "val/top1")] == [STEPS, 2 * STEPS]
    assert len(metrics(out)) == 3


@needs_tensorboard
def test_a_new_batch_on_resume_continues_the_curves_at_the_runs_global_step(cifar_root, tmp_path):
    out = tmp_path / "run"
    assert main(["cnn", "--data", str(cifar_root), "--out", str(out), "--epochs", "1", *SEED_CNN,
                 "--tensorboard"]) == 0                                           # 3 steps of 8
    assert main(["cnn", "--out", str(out), "--resume", "--epochs", "2", "--batch-size", "4",
                 "--allow-changes"]) == 0                                         # then 6 steps of 4
    assert main(["cnn", "--out", str(out), "--resume", "--epochs", "3"]) == 0   # 6 more, from the checkpoint
    acc, rows = events(out), metrics(out)
    ends = [STEPS, STEPS + 6, STEPS + 12]
    assert points(acc, "val/top1") == [(at, f32(r["val_acc"])) for at, r in zip(ends, rows)]
    assert [step for step, _ in points(acc, "lr")] == [0, *ends[:2]]
    assert [step for step, _ in points(acc, "train_step/loss")] == ends


def test_without_the_package_the_run_is_refused_in_one_line_before_anything(cifar_root, tmp_path, monkeypatch,
                                                                            capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` raises ImportError
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)

    def set_up(*args, **kwargs):
        raise AssertionError("set-up began: data read and a model built before the refusal")

    monkeypatch.setattr("fasttrain.session.set_up", set_up)
    out = tmp_path / "run"
    assert main(["cnn", "--data", str(cifar_root), "--out", str(out), "--epochs", "1", *SEED_CNN,
                 "--tensorboard"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --tensorboard") and "pip install tensorboard" in err[0], err
    assert not out.exists()  # nothing read, trained or created


class _Identity(torch.nn.Module):
    """The loss is the input's first column: a known loss per step."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))

    def forward(self, x):
        return x + 0 * self.w


@needs_tensorboard
def test_one_point_per_log_interval_on_the_global_step(tmp_path):
    steps, epochs = 45, 2  # log_every 20: steps 20, 40 and the epoch's last, 45
    losses = [float(i % 7) for i in range(steps)]
    batches = [(torch.tensor([[v, 0.0]]), torch.tensor([0])) for v in losses]
    model = _Identity()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** (s // 10))
    step_fn = TrainStep(ForwardLoss(model, lambda logits, y: logits[:, 0].mean()), opt, sched,
                        torch.amp.GradScaler("cpu", enabled=False), Precision("cpu", None))
    log = TensorBoardLog(tmp_path, steps, lr_of=lambda: opt.param_groups[0]["lr"])
    shown = PlainReporter(io.StringIO())
    fit(step_fn, model, model, batches, batches[:2], Precision("cpu", None), torch.device("cpu"), epochs,
        observer_for=lambda epoch: Both(shown.start_epoch(epoch, epochs, steps), log.start_epoch(epoch)))
    log.close()
    acc = events(tmp_path)
    logged = [(e - 1) * steps + k for e in (1, 2) for k in (20, 40, 45)]
    assert points(acc, "train_step/loss") == [(g, f32(np.mean(losses[:(g - 1) % steps + 1]))) for g in logged]
    assert points(acc, "train_step/lr") == [(g, f32(0.5 ** (g // 10))) for g in logged]  # the next step's rate
    assert shown.stream.getvalue().count("loss") == len(logged)  # the display still gets every call


class _Epochs:
    """A loader whose every pass yields new batches; only the first pass's first one may be kept."""

    prefetch_batches = 3

    def __init__(self, batches):
        self.batches, self.passes = batches, 0

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        self.passes += 1
        return iter([(images + self.passes - 1, labels) for images, labels in self.batches])


@needs_tensorboard
def test_first_batch_grid_is_the_first_batch_de_normalised(tmp_path):
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    raw = torch.randint(0, 256, (40, 3, 4, 5)).float() / 255
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    loader = _Epochs([((raw - m) / s, torch.zeros(40)), (torch.zeros(40, 3, 4, 5), torch.zeros(40))])
    log = TensorBoardLog(tmp_path, 2)
    tapped = log.tap(loader, mean, std)
    assert len(tapped) == 2 and tapped.prefetch_batches == 3  # what train_one_epoch asks a loader
    for _ in range(2):  # two epochs: the same batches come through, in order
        got = list(tapped)
        assert len(got) == 2 and torch.equal(got[1][0], torch.zeros(40, 3, 4, 5) + loader.passes - 1)
    log.end_epoch({"epoch": 1, "lr": 0.1})
    log.close()
    [image] = events(tmp_path).Images("train/first_batch")
    picture = np.asarray(Image.open(io.BytesIO(image.encoded_image_string)).convert("RGB")).astype(int)
    assert picture.shape == (4 * 6 + 2, 8 * 7 + 2, 3)  # PREVIEW_IMAGES: 4 rows of 8 images 4x5, 2px padding
    for i in range(PREVIEW_IMAGES):
        r, c = divmod(i, 8)
        tile = picture[2 + 6 * r:6 + 6 * r, 2 + 7 * c:7 + 7 * c]
        assert np.abs(tile - (raw[i].permute(1, 2, 0).numpy() * 255).round()).max() <= 1, i
