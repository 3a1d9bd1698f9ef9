"""Train the recipes on real data and record accuracy, throughput and time in one folder.

    python -m benchmarks.recipe_check --data DIR --out RESULTS [--device cuda] [--quick]

DIR holds `cifar-100-python/` (CIFAR-100 or Fashion-MNIST as CIFAR pickles) and optionally
`fashion-jpeg/` (an image folder). Each run is `python -m fasttrain ...` in its own process with
its own time limit; RESULTS gets results.json (every run's command, summary and per-epoch
metrics, with device and versions), results.md (a table), log.txt and curves.png (every run's loss and accuracy).
`--quick` shrinks every run to a few hundred images and one epoch, to test the script on a CPU.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

# name, fasttrain arguments, data subfolder, time limit (s), quick-mode arguments
RUNS = [
    ("cnn-fast", ["cnn"], "cifar-100-python", 300, ["--epochs", "1", "--train-limit", "512", "--val-limit", "128"]),
    ("cnn-fast-torch-4ep", ["cnn", "--loader", "torch", "--epochs", "4"], "cifar-100-python", 120,
     ["--epochs", "1", "--train-limit", "512", "--val-limit", "128"]),
    ("cnn-seed-2ep", ["cnn", "--recipe", "seed", "--epochs", "2"], "cifar-100-python", 120,
     ["--epochs", "1", "--train-limit", "256", "--val-limit", "64"]),
    ("resnet-finetune-1ep", ["resnet", "--finetune", "--weights", "none", "--epochs", "1"], "fashion-jpeg", 150,
     ["--epochs", "1", "--train-limit", "64", "--val-limit", "32", "--batch-size", "16"]),
]


def run_one(name, args, data, limit, out, runs, device, log) -> dict:
    run_dir = runs / name
    shutil.rmtree(run_dir, ignore_errors=True)
    command = [sys.executable, "-m", "fasttrain", *args, "--data", str(data), "--device", device,
               "--out", str(run_dir)]
    log.write(f"\n$ {' '.join(command)}\n")
    log.flush()
    started = time.perf_counter()
    try:
        proc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=limit)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        code = "timeout"
    wall = time.perf_counter() - started
    result = {"name": name, "command": " ".join(["python", "-m", "fasttrain", *command[3:]]), "exit": code,
              "wall_s": wall}
    if (run_dir / "summary.json").is_file():
        result["summary"] = json.loads((run_dir / "summary.json").read_text())
        result["metrics"] = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return result


def curves(results: list[dict], out: Path) -> None:
    """Every run's training loss and validation accuracy in one picture: curves.png."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in results if r.get("metrics")]
    if not runs:
        return
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for r in runs:
        epochs = [m["epoch"] for m in r["metrics"]]
        ax_loss.plot(epochs, [m["train_loss"] for m in r["metrics"]], marker="o", label=r["name"])
        ax_acc.plot(epochs, [100 * m["val_acc"] for m in r["metrics"]], marker="o", label=r["name"])
    ax_loss.set(xlabel="epoch", ylabel="training loss (with the recipe's label smoothing)", title="Training loss")
    ax_acc.set(xlabel="epoch", ylabel="validation accuracy (%)", title="Validation accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"recipe check, {runs[0]['summary']['device']}")
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)


def table(results: list[dict]) -> str:
    lines = ["| run | device | precision | compiled | loader | epochs | best val acc | final val acc | "
             "mean img/s | data wait | compile s | train s | total s |",
             "|---" * 13 + "|"]
    for r in results:
        s = r.get("summary")
        if not s:
            lines.append(f"| {r['name']} | failed ({r['exit']}) |" + " |" * 11)
            continue
        lines.append(
            f"| {r['name']} | {s['device']} | {s['precision']} | {s['compiled']} | {s['loader']} | "
            f"{s['epochs_completed']} | {100 * s['best_val_acc']:.2f}% | {100 * s['final_val_acc']:.2f}% | "
            f"{s['mean_images_per_sec']:,.0f} | {100 * s['mean_data_wait_fraction']:.1f}% | "
            f"{s['compile_time_s']:.1f} | {s['train_time_s']:.1f} | {s['total_time_s']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--runs", type=Path, help="where the run folders (with checkpoints) go; default OUT/runs")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", nargs="*", help="run only these names")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    with open(args.out / "log.txt", "a") as log:
        for name, run_args, sub, limit, quick in RUNS:
            if args.only and name not in args.only:
                continue
            if not (args.data / sub).exists():
                log.write(f"\n# {name}: skipped, no {args.data / sub}\n")
                continue
            extra = quick if args.quick else []
            results.append(run_one(name, run_args + extra, args.data / sub, limit, args.out,
                                   args.runs or args.out / "runs", args.device, log))
            print(f"{name}: exit {results[-1]['exit']} in {results[-1]['wall_s']:.0f}s", flush=True)
    record = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "quick": args.quick, "runs": results}
    (args.out / "results.json").write_text(json.dumps(record, indent=2))
    (args.out / "results.md").write_text(table(results))
    curves(results, args.out)
    print(table(results))
    return 0 if all(r["exit"] == 0 for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
