"""Where a whole run's time goes on this machine, from the shipped command line (issue 10).

Two checks, each a fresh `python -m fasttrain` process whose summary.json `time` is recorded:

- outputs: the seed CNN (71 M parameters: 570 MB of weights and momentum per checkpoint), 3 epochs
  of 48 synthetic images, a checkpoint every epoch. Issue 10's CPU target: the training thread
  blocked for outputs at most 0.5 s an epoch (outputs_s less final_write_s, the wait after the
  last epoch for the last checkpoint to reach the disk, which the disk bounds), and the parts
  adding up to the process's wall clock.
- compile: the fast CNN recipe compiled (torch.compile, Inductor), 2 epochs, twice with one fresh
  TORCHINDUCTOR_CACHE_DIR: the first run compiles cold, the second finds the first's kernels.

    python -m benchmarks.run_time_check --out benchmarks/results/DATE-cpu-run-time [--device cpu]

A third check times the interpreter's exit with torch loaded, with and without gc.freeze() (what
fasttrain/program.py does after a run). Writes run_time.json (commit, versions, device, each
command and its summary's time parts) in OUT.
On a shared CPU machine quote ratios from one run, not absolute times.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _run(argv: list[str], env: dict) -> dict:
    """One fasttrain process; its summary's time parts, compile time and the process's own wall time."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        command = [sys.executable, "-m", "fasttrain", *argv, "--out", str(out)]
        started = time.time()
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        elapsed = time.time() - started
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr[-2000:]}")
        summary = json.loads((out / "summary.json").read_text())
    epochs = summary["epochs_completed"]
    return {"command": "python -m fasttrain " + " ".join(argv), "process_s": round(elapsed, 3),
            "time": summary["time"], "epochs": epochs,
            "outputs_s_per_epoch": round(summary["time"]["outputs_s"] / epochs, 3),
            # the training thread blocked between epochs, without the wait at the end for the last write
            "blocked_between_epochs_s_per_epoch": round((summary["time"]["outputs_s"] -
                                                         summary["time"]["final_write_s"]) / epochs, 3),
            "compile_time_s": round(summary["compile_time_s"], 3), "recompiles": summary["recompiles"],
            "device": summary["device"], "versions": summary["versions"]}


_EXIT_PROBE = """
import atexit, gc, sys, time
import torch, torchvision
if sys.argv[1] == "freeze":
    gc.freeze()
atexit.register(lambda: print(time.time(), flush=True))
"""


def _exit_tail(how: str, repeats: int = 3) -> float:
    """Median seconds from a process's last atexit handler to its end, with torch and torchvision
    loaded: the interpreter's finalisation, with its final garbage collection ("plain") or with
    the objects alive frozen out of it ("freeze", as fasttrain/program.py does)."""
    tails = []
    for _ in range(repeats):
        done = subprocess.run([sys.executable, "-c", _EXIT_PROBE, how], capture_output=True, text=True)
        ended = time.time()
        tails.append(ended - float(done.stdout.strip().splitlines()[-1]))
    return round(sorted(tails)[len(tails) // 2], 3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    common = ["--synthetic", "--device", args.device, "--loader", "torch", "--workers", "0"]
    rows = {"outputs": _run(["cnn", "--recipe", "seed", *common, "--train-limit", "48", "--val-limit", "20",
                             "--epochs", "3", "--save-every", "1"], dict(os.environ))}
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        compiled = ["cnn", "--recipe", "fast", *common, "--compile", "--train-limit", "64", "--val-limit", "32",
                    "--batch-size", "32", "--epochs", "2"]
        rows["compile_cold"] = _run(compiled, env)
        rows["compile_warm"] = _run(compiled, env)
    rows["exit_tail_s"] = {"plain": _exit_tail("plain"), "gc_freeze": _exit_tail("freeze")}
    rows["warm_over_cold"] = round(rows["compile_warm"]["compile_time_s"] / rows["compile_cold"]["compile_time_s"], 3)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "fasttrain"], capture_output=True, text=True).stdout
    result = {"commit": commit + ("+uncommitted fasttrain/ changes" if dirty.strip() else ""), "cores": os.cpu_count(),
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), **rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "run_time.json").write_text(json.dumps(result, indent=2) + "\n")
    for name in ("outputs", "compile_cold", "compile_warm"):
        r = rows[name]
        print(f"{name}: wall {r['time']['wall_s']:.1f}s (process {r['process_s']:.1f}s), outputs "
              f"{r['outputs_s_per_epoch']:.2f}s/epoch ({r['blocked_between_epochs_s_per_epoch']:.2f}s/epoch between "
              f"epochs, {r['time']['final_write_s']:.2f}s waiting for the last write), compile {r['compile_time_s']:.1f}s, recompiles {r['recompiles']}")
    print(f"warm compile / cold compile: {rows['warm_over_cold']:.3f}")
    tail = rows["exit_tail_s"]
    print(f"exit after the last atexit handler, torch loaded: {tail['plain']:.2f}s, {tail['gc_freeze']:.2f}s with "
          f"gc.freeze(); wrote {args.out / 'run_time.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
