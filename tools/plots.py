"""Plots of a sweep's logs: training curves, per-seed scores, where the bytes and the time went.

A reviewer (or the author, a week later) would rather look than read four logs side by side.
Every number plotted here comes from train_gpt.py's logs through _runs.parse_log, the same
reading that submission.json is built from. tools.make_record puts these PNGs in a pull request's
folder; the project README shows them for the committed CPU evidence:

    python -m tools.plots --logs logs/cpu_smoke_seed1337.txt logs/cpu_smoke_seed42.txt \\
        logs/cpu_smoke_seed2024.txt --out docs/cpu_smoke

matplotlib is a tools-only dependency (requirements-cpu.txt; `pip install matplotlib` on a GPU
box); train_gpt.py never imports it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import train_gpt
from tools import _runs, _submission
from tools._submission import SeedResult

# File name and a one-line caption of each plot (the generated README uses both).
PLOTS = {
    "scores": ("seed_scores.png", "val_bpb per seed: the score (with the kNN store if it is on), "
                                  "the model alone and the teacher on the same windows"),
    "curves": ("training_curves.png", "training loss of every stage that logs steps, per seed"),
    "size": ("size_breakdown.png", "code + artifact bytes against the 16,000,000-byte limit, "
                                   "and the artifact's components"),
    "time": ("time_budget.png", "where the time went, against the 600 s limits"),
}
# The final point of each phase's curve is on its stage line: (record, steps key, loss key).
FINAL_POINTS = {train_gpt.TEACHER_PHASE: (train_gpt.stage_record("teacher"), "steps", "train_loss"),
                train_gpt.DISTILL_PHASE: (train_gpt.stage_record("distill"), "steps", "loss")}
PHASE_TITLES = {train_gpt.TEACHER_PHASE: "teacher (cross-entropy)",
                train_gpt.DISTILL_PHASE: "distillation (CE + KL)"}


def pyplot() -> ModuleType:
    """matplotlib.pyplot on the file-only backend, or a clear error naming the fix."""
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("matplotlib is not installed (pip install matplotlib, or pip install "
                           "-r requirements-cpu.txt): the plots need it") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def label(result: SeedResult) -> str:
    return f"seed {result.seed}"


def curve(result: SeedResult, phase: str) -> tuple[list[float], list[float]]:
    """(steps, losses) of one phase: its step lines, then the stage line's final point."""
    points = {int(r["step"]): float(r["loss"])
              for r in _runs.line_records(result.run.text, phase) if "step" in r and "loss" in r}
    record, steps_key, loss_key = FINAL_POINTS[phase]
    steps, loss = result.value(record, steps_key), result.value(record, loss_key)
    if steps is not None and loss is not None and steps > 0:
        points[int(steps)] = loss
    ordered = sorted(points.items())
    return [s for s, _ in ordered], [v for _, v in ordered]


def training_curves(results: Sequence[SeedResult], path: Path) -> None:
    plt = pyplot()
    figure, axes = plt.subplots(1, len(FINAL_POINTS), figsize=(4.2 * len(FINAL_POINTS), 3.6))
    for axis, phase in zip(axes, FINAL_POINTS, strict=True):
        for result in results:
            steps, losses = curve(result, phase)
            if steps:
                axis.plot(steps, losses, marker="o", markersize=3, label=label(result))
        axis.set_title(PHASE_TITLES[phase], fontsize=10)
        axis.set_xlabel("step")
        axis.set_ylabel("loss")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle("Training curves (step lines every TRAIN_LOG_EVERY steps + each stage's "
                    "final step)", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def seed_scores(results: Sequence[SeedResult], stats: dict, path: Path) -> None:
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(6.4, 4.0))
    xs = list(range(len(results)))
    series = [("teacher (diagnostic)", _runs.TEACHER_RECORD, "s"),
              ("the model alone", _runs.MEMORY_RECORD, "^"),
              ("the score (+ kNN if on)", _runs.SCORE_RECORD, "o")]
    for name, record, marker in series:
        values = [r.value(record, "val_bpb") for r in results]
        if any(v is not None for v in values):
            axis.plot([x for x, v in zip(xs, values, strict=True) if v is not None],
                      [v for v in values if v is not None], marker=marker, linestyle="none",
                      markersize=8, label=name)
    mean = stats.get("val_bpb_mean")
    if mean is not None:
        axis.axhline(mean, color="C2", linewidth=1, label=f"mean score {mean:.5f}")
    if stats.get("val_bpb_ci95"):
        low, high = stats["val_bpb_ci95"]
        axis.axhspan(low, high, color="C2", alpha=0.12, label="95% t-interval of the mean")
    test = stats.get("test")
    if test:
        axis.axhline(test["reference_bpb"], color="black", linestyle="--", linewidth=1,
                     label=f"reference {test['reference_bpb']}")
    axis.set_xticks(xs, [label(r) for r in results])
    axis.set_xlim(-0.6, len(results) - 0.4)
    axis.set_ylabel("val_bpb (lower is better)")
    axis.set_title("Per-seed scores, from the artifact round trip", fontsize=10)
    axis.grid(axis="y", alpha=0.3)
    axis.legend(fontsize=8, loc="best")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def size_breakdown(results: Sequence[SeedResult], path: Path) -> None:
    plt = pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8),
                                         gridspec_kw=dict(width_ratios=[1.1, 1]))
    ys = list(range(len(results)))
    code = [r.bytes("code_bytes") or 0 for r in results]
    model = [r.bytes("model_bytes") or 0 for r in results]
    left.barh(ys, code, label="train_gpt.py (code bytes)")
    left.barh(ys, model, left=code, label="artifact (model bytes)")
    left.axvline(_submission.SIZE_LIMIT, color="red", linewidth=1.5,
                 label=f"limit {_submission.SIZE_LIMIT:,}")
    for y, result in zip(ys, results, strict=True):
        total = result.bytes("total_bytes")
        if total is not None:
            left.text(total, y, f"  {total:,} ({100 * total / _submission.SIZE_LIMIT:.1f}%)",
                      va="center", fontsize=8)
    left.set_yticks(ys, [label(r) for r in results])
    left.invert_yaxis()
    left.set_xlim(0, _submission.SIZE_LIMIT * 1.05)
    left.xaxis.set_major_formatter(lambda value, _: f"{value / 1e6:g}M")
    left.set_xlabel("bytes (the logged total: code + artifact)")
    left.legend(fontsize=8, loc="lower right")
    largest = max(results, key=lambda r: r.bytes("total_bytes") or 0)
    components = {r["name"]: int(r["zstd_bytes"]) for r in
                  _runs.line_records(largest.run.text, _runs.COMPONENT_RECORD)
                  if "name" in r and "zstd_bytes" in r}
    parts = sorted(components.items(), key=lambda item: item[1])
    parts.append(("train_gpt.py", largest.bytes("code_bytes") or 0))
    right.barh([name for name, _ in parts], [size for _, size in parts],
               color=["C1"] * (len(parts) - 1) + ["C0"])
    for y, (_, size) in enumerate(parts):
        right.text(size, y, f" {size:,}", va="center", fontsize=8)
    right.set_xlim(0, max(size for _, size in parts) * 1.3)
    right.xaxis.set_major_formatter(lambda value, _: f"{value / 1e3:g}k")
    right.set_xlabel("bytes (each component compressed alone)")
    right.set_title(f"components, {label(largest)}", fontsize=10)
    figure.suptitle("Size: code + artifact against the limit", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def time_budget(results: Sequence[SeedResult], path: Path) -> None:
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(9, 1.2 + 0.9 * len(results)))
    rows, names = [], []
    for result in results:
        stages = _runs.stage_times_ms(result.run.records)
        train_parts = [(stage, (stages[stage] or 0) / 1000) for stage in _runs.TRAIN_STAGES]
        other = (result.train_time_s or 0) - sum(seconds for _, seconds in train_parts)
        if other > 0.0005:  # a train_time line that counts setup too
            train_parts.append(("other training", other))
        rows.append((f"{label(result)} train", train_parts))
        rows.append((f"{label(result)} eval", [("eval", result.eval_time_s or 0)]))
        names.append(label(result))
    colors = {name: f"C{i}" for i, name in enumerate(
        [*_runs.TRAIN_STAGES, "other training", "eval"])}
    seen = set()
    for y, (_, parts) in enumerate(rows):
        start = 0.0
        for name, seconds in parts:
            axis.barh(y, seconds, left=start, color=colors[name],
                      label=None if name in seen else name)
            seen.add(name)
            start += seconds
        axis.text(start, y, f" {start:.1f} s", va="center", fontsize=8)
    axis.axvline(_submission.TIME_LIMIT_S, color="red", linewidth=1.5,
                 label=f"limit {_submission.TIME_LIMIT_S:.0f} s (each)")
    budgets = {r.setting("MAX_WALLCLOCK_SECONDS") for r in results} - {None}
    for budget in budgets:
        if float(budget) != _submission.TIME_LIMIT_S:
            axis.axvline(float(budget), color="gray", linestyle="--", linewidth=1,
                         label=f"the run's training budget {float(budget):g} s")
    axis.set_yticks(range(len(rows)), [name for name, _ in rows])
    axis.invert_yaxis()
    axis.set_xlim(0, _submission.TIME_LIMIT_S * 1.08)
    axis.set_xlabel("seconds (wall clock, from the logs)")
    axis.set_title("Time: training (everything that read training data) and evaluation",
                   fontsize=10)
    axis.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_plots(results: Sequence[SeedResult], stats: dict, folder: Path) -> dict[str, Path]:
    """All four plots into `folder`; returns {key: path} in PLOTS order."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {key: folder / name for key, (name, _) in PLOTS.items()}
    seed_scores(results, stats, paths["scores"])
    training_curves(results, paths["curves"])
    size_breakdown(results, paths["size"])
    time_budget(results, paths["time"])
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Plot a sweep's logs (scores, training curves, "
                                                 "size and time) as PNG files.")
    parser.add_argument("--logs", nargs="+", type=Path, required=True, metavar="LOG")
    parser.add_argument("--out", type=Path, required=True, help="folder for the PNG files")
    parser.add_argument("--reference-bpb", type=float, default=None,
                        help="draw the record to beat on the score plot")
    args = parser.parse_args(argv)
    results = _submission.read_results(args.logs)
    valid = [r for r in results if r.run.ok]
    for r in results:
        if not r.run.ok:
            print(f"skipped {r.run.log_path}: {r.run.status} ({r.run.detail})", file=sys.stderr)
    if not valid:
        print("error: no complete log to plot", file=sys.stderr)
        return 2
    try:
        paths = write_plots(valid, _submission.statistics(valid, args.reference_bpb), args.out)
    except RuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for path in paths.values():
        print(f"wrote {path}")
    return 0 if len(valid) == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
