"""Runs that cannot silently change what they train (issue 11): a resumed run continues on exactly
what it started on, set-up refuses what cannot be right, and every message says what happened."""

import json

import pytest
import torch

from fasttrain.cli import main
from fasttrain.outputs import load_checkpoint

from conftest import class_image, fail_in_evaluation

SEED_CNN = ["--recipe", "seed", "--device", "cpu", "--batch-size", "8", "--workers", "0", "--loader", "torch"]


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def summary(out):
    return json.loads((out / "summary.json").read_text())


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.fixture
def no_download(monkeypatch, tmp_path):
    """The default data root points at an empty folder and any download fails the test."""
    monkeypatch.setenv("FASTTRAIN_DATA", str(tmp_path / "default-root"))

    def refuse(*args, **kwargs):
        raise AssertionError("a resumed run tried to download a data set")

    monkeypatch.setattr("fasttrain.data.download.fetch", refuse)


@pytest.fixture
def one_epoch(cifar_root, tmp_path):
    """A finished 1-epoch seed CNN run on 24 of the 48 training images (3 steps of 8)."""
    out = tmp_path / "run"
    assert main(["cnn", "--data", str(cifar_root), "--out", str(out), "--epochs", "1", "--train-limit", "24",
                 *SEED_CNN]) == 0
    return out


def test_resume_continues_on_the_data_and_limits_it_started_with(one_epoch, no_download, capsys):
    # the README's own example: no --data, no --train-limit
    assert main(["cnn", "--out", str(one_epoch), "--resume", "--epochs", "2"]) == 0
    rows = metrics(one_epoch)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[1]["train_images"] == 24                  # not the 48 images of the whole pickle
    assert summary(one_epoch)["recipe"]["batch_size"] == 8 and summary(one_epoch)["data"]["train_images"] == 24
    assert load_checkpoint(one_epoch / "last.pt")["run"]["train_limit"] == 24


@pytest.mark.parametrize("flag", [["--train-limit", "16"], ["--val-fraction", "0.3"], ["--seed", "3"],
                                  ["--lr", "0.1"], ["--loader", "dali"]])
def test_a_flag_that_changes_the_run_is_refused_on_resume(one_epoch, flag, capsys):
    before = (one_epoch / "last.pt").read_bytes()
    capsys.readouterr()
    assert main(["cnn", "--out", str(one_epoch), "--resume", "--epochs", "2", *flag]) == 2
    line = one_error_line(capsys)
    assert f"{flag[0]} " in line and "(was " in line and "--allow-changes" in line
    assert (one_epoch / "last.pt").read_bytes() == before and len(metrics(one_epoch)) == 1


def test_flags_given_again_that_agree_are_accepted_and_epochs_may_grow(cifar_root, one_epoch):
    assert main(["cnn", "--data", str(cifar_root), "--out", str(one_epoch), "--epochs", "2", "--train-limit", "24",
                 "--resume", *SEED_CNN]) == 0
    assert [r["epoch"] for r in metrics(one_epoch)] == [1, 2]


def test_allow_changes_takes_a_new_batch_at_an_epoch_boundary_and_scales_lr(cifar_root, tmp_path, capsys):
    out = tmp_path / "run"
    fast = ["--recipe", "fast", "--device", "cpu", "--workers", "0", "--loader", "torch", "--no-compile"]
    assert main(["cnn", "--data", str(cifar_root), "--out", str(out), "--epochs", "1", "--train-limit", "24",
                 "--batch-size", "8", *fast]) == 0
    assert summary(out)["recipe"]["lr"] == pytest.approx(0.00125)  # 0.08 x 8/512
    capsys.readouterr()
    assert main(["cnn", "--out", str(out), "--resume", "--epochs", "2", "--batch-size", "4", "--allow-changes"]) == 0
    said = capsys.readouterr().out
    assert "resumed with changes: --batch-size 4 (was 8)" in said
    assert "lr scaled to 0.000625" in said                # 0.00125 x 4/8, the fast recipe's linear rule
    assert metrics(out)[1]["train_images"] == 24 and summary(out)["recipe"]["lr"] == pytest.approx(0.000625)
    ck = load_checkpoint(out / "last.pt")
    assert ck["optimizer"]["param_groups"][0]["initial_lr"] == pytest.approx(0.000625)
    # the schedule went on from epoch 1's end counted in steps of the new batch: 6 + 6 steps
    assert ck["scheduler"]["last_epoch"] == 12
    # epoch 2's first step: still warming up (2 epochs = 12 steps of 4), 0.1 + 0.9 x 6/12 of the new peak
    assert metrics(out)[1]["lr"] == pytest.approx(0.000625 * (0.1 + 0.9 * 6 / 12))


def test_more_epochs_restart_the_finished_schedule_where_it_stands(cifar_root, tmp_path, capsys):
    out = tmp_path / "run"
    fast = ["--recipe", "fast", "--device", "cpu", "--workers", "0", "--loader", "torch", "--no-compile",
            "--batch-size", "8", "--warmup-epochs", "0"]
    assert main(["cnn", "--data", str(cifar_root), "--out", str(out), "--epochs", "1", "--train-limit", "24",
                 *fast]) == 0
    capsys.readouterr()
    assert main(["cnn", "--out", str(out), "--resume", "--epochs", "2"]) == 0
    assert "the lr schedule now ends at epoch 2" in capsys.readouterr().out
    # the finished 1-epoch cosine had decayed to 0; the 2-epoch one is at its middle: half the peak
    assert metrics(out)[1]["lr"] == pytest.approx(0.00125 * 0.5)


@pytest.mark.parametrize("change", [["--batch-size", "4"], ["--lr", "0.1"], ["--train-limit", "16"]])
def test_a_change_in_the_middle_of_an_epoch_is_refused(one_epoch, change, capsys):
    ck = load_checkpoint(one_epoch / "last.pt")
    ck["epoch"], ck["step"] = 0, 1  # as a Ctrl-C after the first step would have saved it
    torch.save(ck, one_epoch / "last.pt")
    capsys.readouterr()
    assert main(["cnn", "--out", str(one_epoch), "--resume", *change, "--allow-changes"]) == 2
    line = one_error_line(capsys)
    assert "middle of epoch 1" in line and "step 1 of batch 8" in line and change[0] in line


def test_resuming_the_other_model_says_which_model_the_checkpoint_holds(one_epoch, capsys):
    capsys.readouterr()
    assert main(["resnet", "--out", str(one_epoch), "--resume", "--weights", "none"]) == 2
    line = one_error_line(capsys)
    assert "holds a cnn run, not resnet" in line and f"python -m fasttrain cnn --out {one_epoch} --resume" in line


def test_a_finished_run_is_not_resumed_and_fewer_epochs_are_refused(one_epoch, capsys):
    assert main(["cnn", "--out", str(one_epoch), "--resume", "--epochs", "2"]) == 0
    before = summary(one_epoch)
    capsys.readouterr()
    assert main(["cnn", "--out", str(one_epoch), "--resume"]) == 2
    assert "finished all 2 epochs; pass --epochs N (more than 2)" in one_error_line(capsys)
    assert main(["cnn", "--out", str(one_epoch), "--resume", "--epochs", "1"]) == 2
    assert "--epochs 1: the run in" in one_error_line(capsys)
    after = summary(one_epoch)
    assert (after["epochs_completed"], after["recipe"]["epochs"], after["status"]) == (2, 2, "finished")
    assert after == before


def test_resume_of_a_folder_that_does_not_exist_leaves_nothing(tmp_path, capsys):
    out = tmp_path / "typo" / "run"
    assert main(["cnn", "--out", str(out), "--resume", *SEED_CNN]) == 2
    assert "no checkpoint" in one_error_line(capsys)
    assert not (tmp_path / "typo").exists()


def test_one_class_is_refused_before_training(tmp_path, capsys):
    data = tmp_path / "data"
    (data / "cat").mkdir(parents=True)
    for i in range(12):
        class_image(0, i).save(data / "cat" / f"{i}.jpg")
    out = tmp_path / "run"
    assert main(["cnn", "--data", str(data), "--out", str(out), "--epochs", "1", *SEED_CNN]) == 2
    line = one_error_line(capsys)
    assert "1 class (cat)" in line and "at least 2" in line
    assert not out.exists()


def test_a_frozen_random_backbone_is_warned_about(jpeg_root, tmp_path, capsys):
    assert main(["resnet", "--weights", "none", "--recipe", "seed", "--device", "cpu", "--batch-size", "8",
                 "--workers", "0", "--epochs", "1", "--train-limit", "8", "--val-limit", "3", "--data",
                 str(jpeg_root), "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "random, frozen backbone" in out and "--finetune" in out
    assert main(["resnet", "--weights", "none", "--finetune", "--recipe", "seed", "--device", "cpu", "--batch-size",
                 "8", "--workers", "0", "--epochs", "1", "--train-limit", "8", "--val-limit", "3", "--data",
                 str(jpeg_root), "--out", str(tmp_path / "run2")]) == 0
    assert "frozen backbone" not in capsys.readouterr().out


def test_an_explicit_batch_scales_the_recipe_lr_unless_lr_is_given(cifar_root, tmp_path, capsys):
    fast = ["cnn", "--recipe", "fast", "--device", "cpu", "--workers", "0", "--loader", "torch", "--no-compile",
            "--epochs", "1", "--data", str(cifar_root)]
    assert main([*fast, "--batch-size", "16", "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "lr scaled to 0.0025 (0.08 x 16/512" in out   # the fast recipe: 0.08 at batch 512
    assert summary(tmp_path / "a")["recipe"]["lr"] == pytest.approx(0.0025)
    assert main([*fast, "--batch-size", "16", "--lr", "0.03", "--out", str(tmp_path / "b")]) == 0
    assert "lr scaled" not in capsys.readouterr().out
    assert summary(tmp_path / "b")["recipe"]["lr"] == pytest.approx(0.03)


def test_a_ctrl_c_while_setting_up_says_nothing_was_saved(cifar_root, tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("fasttrain.setup.build_loaders", interrupted)
    out = tmp_path / "run"
    assert main(["cnn", "--data", str(cifar_root), "--out", str(out), "--epochs", "1", *SEED_CNN]) == 130
    err = capsys.readouterr().err
    assert "stopped while setting up; nothing was trained or saved" in err and "last.pt" not in err
    assert not out.exists()


def test_a_second_ctrl_c_before_any_checkpoint_says_nothing_was_saved(cifar_root, tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # what the signal handler raises on a second Ctrl-C

    monkeypatch.setattr("fasttrain.session.fit", interrupted)
    out = tmp_path / "run"
    assert main(["cnn", "--data", str(cifar_root), "--out", str(out), "--epochs", "1", *SEED_CNN]) == 130
    err = capsys.readouterr().err
    assert "before any checkpoint was written: nothing was saved" in err and "Traceback" not in err
    assert summary(out)["status"] == "stopped"


def test_a_second_ctrl_c_after_a_checkpoint_names_the_epoch_it_holds(cifar_root, tmp_path, monkeypatch, capsys):
    import fasttrain.session as session

    real = session.TrainingSession._epoch_end

    def second_ctrl_c_after_epoch_1(self, record):
        real(self, record)
        self.writer.flush()  # epoch 1's checkpoint is on disk, no write in progress
        raise KeyboardInterrupt

    monkeypatch.setattr(session.TrainingSession, "_epoch_end", second_ctrl_c_after_epoch_1)
    out = tmp_path / "run"
    assert main(["cnn", "--data", str(cifar_root), "--out", str(out), "--epochs", "2", *SEED_CNN]) == 130
    err = capsys.readouterr().err
    assert f"stopped at once; {out / 'last.pt'} holds the state at the end of epoch 1" in err
    assert "abandoned" not in err  # nothing was being written
    assert load_checkpoint(out / "last.pt")["epoch"] == 1 and summary(out)["status"] == "stopped"


def test_a_run_that_dies_does_not_stay_running_in_its_summary(cifar_root, tmp_path, monkeypatch):
    fail_in_evaluation(monkeypatch, epoch=2)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError):
        main(["cnn", "--data", str(cifar_root), "--out", str(out), "--epochs", "2", *SEED_CNN])
    s = summary(out)
    assert s["status"] == "failed" and "illegal memory access" in s["error"] and s["epochs_completed"] == 1


def test_a_stop_asked_for_after_the_last_epoch_finishes_the_run(cifar_root, tmp_path, monkeypatch, capsys):
    import signal

    import fasttrain.session as session

    real = session.TrainingSession._epoch_end

    def ctrl_c_at_the_end(self, record):
        real(self, record)
        self.stop_signal = signal.SIGINT  # Ctrl-C while the last epoch's outputs are written

    monkeypatch.setattr(session.TrainingSession, "_epoch_end", ctrl_c_at_the_end)
    out = tmp_path / "run"
    assert main(["cnn", "--data", str(cifar_root), "--out", str(out), "--epochs", "1", *SEED_CNN]) == 0
    err = capsys.readouterr().err
    assert "the run is complete" in err and "Resume with" not in err
    assert summary(out)["status"] == "finished" and load_checkpoint(out / "last.pt")["epoch"] == 1


def test_a_stop_asked_for_during_evaluation_stops_at_the_epochs_end_not_a_step_later(cifar_root, tmp_path,
                                                                                      monkeypatch, capsys):
    import signal

    import fasttrain.train as train

    real, calls = train.evaluate, []

    def ctrl_c_while_evaluating_epoch_1(*args, **kwargs):
        calls.append(1)
        stats = real(*args, **kwargs)
        if len(calls) == 1:
            signal.raise_signal(signal.SIGINT)  # the session's handler: stop after this step
        return stats

    monkeypatch.setattr(train, "evaluate", ctrl_c_while_evaluating_epoch_1)
    out = tmp_path / "run"
    assert main(["cnn", "--data", str(cifar_root), "--out", str(out), "--epochs", "3", *SEED_CNN]) == 130
    held = load_checkpoint(out / "last.pt")
    assert (held["epoch"], held["step"]) == (1, 0) and len(metrics(out)) == 1
    assert "stopped at the end of epoch 1" in capsys.readouterr().err
    # at a boundary, so the batch may change on resume
    assert main(["cnn", "--out", str(out), "--resume", "--batch-size", "4", "--allow-changes"]) == 0
    assert [r["epoch"] for r in metrics(out)] == [1, 2, 3]


def test_a_run_ended_at_once_during_evaluation_counts_its_training_and_evaluation(cifar_root, tmp_path,
                                                                                monkeypatch):
    import fasttrain.train as train

    real = train.evaluate

    def second_ctrl_c_at_the_end_of_evaluation(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "evaluate", second_ctrl_c_at_the_end_of_evaluation)
    out = tmp_path / "run"
    assert main(["cnn", "--data", str(cifar_root), "--out", str(out), "--epochs", "2", *SEED_CNN]) == 130
    s = summary(out)
    t = s["time"]
    assert s["status"] == "stopped" and not (out / "last.pt").exists()
    assert t["train_s"] > 0.1 and t["eval_s"] > 0.01  # 6 steps of the seed CNN, then 20 images scored
    assert t["other_s"] < t["train_s"]
    parts = ("startup_s", "compile_s", "train_s", "eval_s", "outputs_s", "other_s")
    assert sum(t[k] for k in parts) == pytest.approx(t["wall_s"], abs=0.01)


def test_a_run_that_fails_while_writing_an_epochs_outputs_counts_that_time_as_outputs(cifar_root, tmp_path,
                                                                                      monkeypatch):
    import time

    import fasttrain.outputs as outputs

    def slow_then_broken(self, *args, **kwargs):
        time.sleep(0.5)
        raise RuntimeError("the disk went away")

    monkeypatch.setattr(outputs.RunWriter, "end_epoch", slow_then_broken)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="the disk went away"):
        main(["cnn", "--data", str(cifar_root), "--out", str(out), "--epochs", "2", *SEED_CNN])
    s = summary(out)
    t = s["time"]
    assert s["status"] == "failed" and t["outputs_s"] >= 0.5 and t["train_s"] > 0 and t["eval_s"] > 0
    parts = ("startup_s", "compile_s", "train_s", "eval_s", "outputs_s", "other_s")
    assert sum(t[k] for k in parts) == pytest.approx(t["wall_s"], abs=0.01)


def test_a_stopped_run_accounts_for_its_unfinished_epoch_and_last_write(cifar_root, tmp_path, monkeypatch):
    import signal

    import fasttrain.session as session

    def stop_at_step_2(self, step):
        if step >= 2:
            self.stop_signal = signal.SIGINT
        return self.stop_signal is not None

    monkeypatch.setattr(session.TrainingSession, "_should_stop", stop_at_step_2)
    out = tmp_path / "run"
    assert main(["cnn", "--data", str(cifar_root), "--out", str(out), "--epochs", "1", *SEED_CNN]) == 130
    s = summary(out)
    t = s["time"]
    assert s["status"] == "interrupted" and load_checkpoint(out / "last.pt")["step"] == 2
    assert t["train_s"] > 0                     # the two steps of the unfinished epoch
    assert 0 < t["final_write_s"] <= t["outputs_s"]  # the stop's checkpoint, on disk before the clock stops
    parts = ("startup_s", "compile_s", "train_s", "eval_s", "outputs_s", "other_s")
    assert sum(t[k] for k in parts) == pytest.approx(t["wall_s"], abs=0.01)


def test_a_run_that_saved_no_checkpoint_is_named_so(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text('{"status": "diverged"}')  # a run that diverged in its first epoch
    assert main(["cnn", "--out", str(out), "--synthetic", *SEED_CNN]) == 2
    assert "stopped before it saved a checkpoint; choose another --out" in one_error_line(capsys)
    assert main(["cnn", "--out", str(out), "--resume", "--synthetic", *SEED_CNN]) == 2
    assert "cannot be continued" in one_error_line(capsys)
    assert (out / "summary.json").read_text() == '{"status": "diverged"}'


def test_resume_names_a_data_folder_that_moved(cifar_root, tmp_path, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(cifar_root, data)
    out = tmp_path / "run"
    assert main(["cnn", "--data", str(data), "--out", str(out), "--epochs", "1", "--train-limit", "16",
                 *SEED_CNN]) == 0
    data.rename(tmp_path / "moved")
    capsys.readouterr()
    assert main(["cnn", "--out", str(out), "--resume", "--epochs", "2"]) == 2
    line = one_error_line(capsys)
    assert f"the run's data folder {data} (saved in" in line and "--data NEW --allow-changes" in line
    assert main(["cnn", "--out", str(out), "--resume", "--epochs", "2", "--data", str(tmp_path / "moved"),
                 "--allow-changes"]) == 0
