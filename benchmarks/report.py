"""Turn pytest-benchmark JSON into a markdown table and a PNG chart.

    pytest --benchmark-only --benchmark-json=bench.json
    python -m benchmarks.report bench.json [--out DIR] [--readme README.md]

DIR (default: beside the JSON) gets report.md and report.png. With --readme, the block between
`<!-- benchmark-results:begin -->` and `<!-- benchmark-results:end -->` in that file is replaced
by the pipeline tables, so the README's numbers always come from a committed results file.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

BASELINES = {"cifar": "torch", "jpeg": "torch", "e2e-cnn": "torch", "e2e-resnet": "torch",
             "train-cnn": "seed", "train-resnet-frozen": "seed", "train-resnet-finetune": "seed",
             "kernel-augment": "torch"}
PIPELINES = ["cifar", "jpeg", "train-cnn", "train-resnet-frozen", "train-resnet-finetune", "e2e-cnn", "e2e-resnet"]
BEGIN, END = "<!-- benchmark-results:begin -->", "<!-- benchmark-results:end -->"


def load(path: Path) -> tuple[dict, dict[str, list[dict]]]:
    record = json.loads(path.read_text())
    groups = defaultdict(list)
    for bench in record["benchmarks"]:
        info = dict(bench["extra_info"])
        info["mean_s"] = bench["stats"]["mean"]
        info["rounds"] = bench["stats"]["rounds"]
        groups[info["pipeline"]].append(info)
    return record, groups


def baseline_of(group: str, rows: list[dict]) -> dict | None:
    name = BASELINES.get(group, "nchw-fp32-eager")
    return next((r for r in rows if r["variant"] == name), None)


def _fmt(value, spec: str, suffix: str = "") -> str:
    return "" if value is None or value is False else f"{value:{spec}}{suffix}"


def _rate(value: float | None) -> str:
    """Images per second: whole numbers, but three digits for the CPU's small rates."""
    return "" if value is None else (f"{value:,.0f}" if value >= 100 else f"{value:.3g}")


def group_table(group: str, rows: list[dict]) -> str:
    base = baseline_of(group, rows)
    compute = any("tflops" in r for r in rows)
    bandwidth = any("gb_per_sec" in r for r in rows)
    waits = any("data_wait_fraction" in r for r in rows)
    head = ["variant", "batch", "images/s", f"vs {base['variant']}" if base else "vs baseline"]
    head += ["TFLOP/s", "of peak"] if compute else []
    head += ["GB/s", "of copy bandwidth"] if bandwidth else []
    head += ["data wait"] if waits else []
    lines = [f"**{group}** ({rows[0]['device']})", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in rows:
        speedup = r["images_per_sec"] / base["images_per_sec"] if base and r.get("images_per_sec") else None
        cells = [r["variant"], str(r["batch_size"]), _rate(r.get("images_per_sec")), _fmt(speedup, ".2f", "x")]
        if compute:
            cells += [_fmt(r.get("tflops"), ".3g"), _fmt(r.get("fraction_of_peak") and 100 * r["fraction_of_peak"], ".1f", "%")]
        if bandwidth:
            cells += [_fmt(r.get("gb_per_sec"), ".3g"),
                      _fmt(r.get("fraction_of_peak_bandwidth") and 100 * r["fraction_of_peak_bandwidth"], ".1f", "%")]
        if waits:
            cells += [_fmt(r.get("data_wait_fraction") is not None and 100 * r["data_wait_fraction"], ".1f", "%")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def header(record: dict, source: Path) -> str:
    info = record["machine_info"].get("fasttrain", {})
    versions = ", ".join(f"{k} {info[k]}" for k in ("torch", "torchvision", "dali", "cuda") if info.get(k))
    timed = all(b["extra_info"].get("timed", True) for b in record["benchmarks"])
    return (f"Device: {info.get('device', '?')} ({record['machine_info'].get('cpu', {}).get('brand_raw', 'CPU')}, "
            f"{info.get('cpu_threads', '?')} threads); {versions}; Python {record['machine_info'].get('python_version')}.  \n"
            f"Measured {record['datetime'][:19].replace('T', ' ')} UTC with `{info.get('command', 'pytest --benchmark-only')}`; "
            f"source `{source.as_posix()}`{'' if timed else ' (NOT timed: --benchmark-disable)'}.\n")


def markdown(record: dict, groups: dict, source: Path, only_pipelines: bool = False) -> str:
    names = [g for g in PIPELINES if g in groups]
    if not only_pipelines:
        names += sorted(g for g in groups if g not in PIPELINES)
    return header(record, source) + "\n" + "\n".join(group_table(g, groups[g]) for g in names)


def chart(groups: dict, out: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [g for g in PIPELINES if g in groups]
    fig, axes = plt.subplots(len(names), 1, figsize=(8, 1.1 + 0.45 * sum(len(groups[g]) for g in names)),
                             squeeze=False, constrained_layout=True)
    for ax, name in zip(axes[:, 0], names):
        rows = groups[name]
        base = baseline_of(name, rows)
        rates = [r["images_per_sec"] for r in rows]
        bars = ax.barh([r["variant"] for r in rows], rates,
                       color=["tab:gray" if r is base else "tab:green" for r in rows])
        for bar, r in zip(bars, rows):
            label = f" {_rate(r['images_per_sec'])}"
            if base:
                label += f"  ({r['images_per_sec'] / base['images_per_sec']:.2f}x)"
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, label, va="center", fontsize=8)
        ax.set_title(name, fontsize=9, loc="left")
        ax.set_xlim(0, max(rates) * 1.45)
        ax.invert_yaxis()
        ax.tick_params(labelsize=8)
    axes[-1, 0].set_xlabel("images per second")
    fig.suptitle(title, fontsize=10)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def update_readme(readme: Path, text: str) -> None:
    content = readme.read_text()
    if BEGIN not in content or END not in content:
        raise SystemExit(f"error: {readme} has no {BEGIN} ... {END} block")
    block = f"{BEGIN}\n{text}\n{END}"
    readme.write_text(re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, content, flags=re.S))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="pytest-benchmark JSON (--benchmark-json)")
    parser.add_argument("--out", type=Path, help="folder for report.md and report.png (default: the JSON's)")
    parser.add_argument("--readme", type=Path, help="replace this file's benchmark-results block")
    args = parser.parse_args(argv)
    try:
        record, groups = load(args.results)
    except (OSError, ValueError, KeyError) as exc:
        raise SystemExit(f"error: {args.results}: not a pytest-benchmark JSON file ({type(exc).__name__}: {exc})")
    if not groups:
        raise SystemExit(f"error: {args.results} holds no benchmarks")
    out = args.out or args.results.parent
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(markdown(record, groups, args.results))
    device = record["machine_info"].get("fasttrain", {}).get("device", "")
    if any(g in groups for g in PIPELINES):
        chart(groups, out / "report.png", f"fasttrain benchmarks, {device}, {record['datetime'][:10]}")
    if args.readme:
        update_readme(args.readme, markdown(record, groups, args.results, only_pipelines=True))
    print(f"wrote {out / 'report.md'}" + (f" and {out / 'report.png'}" if (out / 'report.png').exists() else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
