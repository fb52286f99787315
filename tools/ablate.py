"""Run named variants of train_gpt.py under one profile and compare them in one table.

Deciding whether a change helps needs like-for-like runs: the same profile (the same time
budget and data), one setting changed at a time, and every number that matters side by side:
the teacher's bpb, the model alone, the score (with the kNN store when it is on), the artifact
size and where the time went. This tool runs the variants one after another (RUN_ID=ablate_NAME,
each with its own artifact), reads their logs with _runs.parse_log, and prints a markdown
table sorted by the score; `--collect-only` rebuilds the table from existing logs. Runs are
launched and read back by tools/_runs.py, as tools.seed_sweep's are.

    python -m tools.ablate --profile cpu_proxy --variant base --variant xsa0:XSA_LAYERS=0 \\
        --variant "wide:MODEL_DIM=256,NUM_HEADS=8"
    python -m tools.ablate --variants-json variants.json --collect-only
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import train_gpt
from tools import _runs

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
RUN_PREFIX = "ablate_"


def parse_variant(spec: str) -> tuple[str, dict[str, str]]:
    """'NAME' or 'NAME:KEY=VAL,KEY=VAL' -> (NAME, {KEY: VAL})."""
    name, _, rest = spec.partition(":")
    name = name.strip()
    if not NAME_PATTERN.match(name):
        raise ValueError(f"--variant {spec!r}: the name must be letters, digits, '_', '.', '-'")
    pairs = [pair for pair in rest.split(",") if pair.strip()]
    return name, _runs.parse_env_pairs([p.strip() for p in pairs], f"--variant {name}:")


def load_variants(specs: Sequence[str], json_path: Path | None) -> dict[str, dict[str, str]]:
    variants: dict[str, dict[str, str]] = {}
    if json_path is not None:
        data = json.loads(json_path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError(f"{json_path}: expected an object {{name: {{KEY: VALUE}}}}")
        for name, env in data.items():
            if not NAME_PATTERN.match(name) or not isinstance(env, dict):
                raise ValueError(f"{json_path}: bad variant {name!r} (name or settings object)")
            variants[name] = _runs.parse_env_pairs([f"{k}={v}" for k, v in env.items()],
                                                   f"{json_path} {name}:")
    for spec in specs:
        name, env = parse_variant(spec)
        if name in variants:
            raise ValueError(f"variant {name!r} given twice")
        variants[name] = env
    return variants


def shipped_model(settings: dict[str, str]) -> str:
    """MODEL of a run (its settings or environment): the memory model unless it says otherwise."""
    return settings.get("MODEL", train_gpt.SHIPPED_MODELS[0])


def collect(name: str, env: dict[str, str], run: _runs.Run) -> dict:
    """One table row from a run's parsed log. The baseline (MODEL=transformer) fills the model
    and model + kNN columns from its own lines, so it stands beside the memory variants."""
    records = run.records
    # The kind whose lines the log has (EVAL_ONLY scores whatever the artifact is), else MODEL.
    logged = [kind for kind, (record, _) in train_gpt.SCORE_RECORDS.items() if record in records]
    model = logged[0] if logged else shipped_model(records.get(_runs.SETTINGS_RECORD, {}))
    model_record, score_record = train_gpt.SCORE_RECORDS[model]
    if run.ok and model_record not in records:
        run.status, run.detail = "incomplete", f"no {model_record} line"
    return dict(model=model,
        name=name, env=env, status=run.status, detail=run.detail, returncode=run.returncode,
        log=str(run.log_path) if run.log_path else None,
        teacher_bpb=_runs.number(records, _runs.TEACHER_RECORD, "val_bpb"),
        prepack_bpb=_runs.number(records, _runs.PREPACK_RECORD, "val_bpb"),
        memory_bpb=_runs.number(records, model_record, "val_bpb"),
        # The score line is the model alone when no kNN store ran: its column stays empty.
        knn_bpb=(_runs.number(records, score_record, "val_bpb")
                 if _runs.number(records, train_gpt.stage_record("eval"), "knn") == 1 else None),
        total_bytes=(None if _runs.number(records, _runs.ARTIFACT_RECORD, "total_bytes") is None
                     else int(_runs.number(records, _runs.ARTIFACT_RECORD, "total_bytes"))),
        stage_time_ms=_runs.stage_times_ms(records),
        ttt_time_ms=_runs.number(records, train_gpt.TTT_RECORD, "ttt_time_ms"),
        changed_settings=_runs.changed_settings(records),
        profile=records.get(_runs.HEADER_RECORD, {}).get("profile"))


def sort_key(row: dict) -> tuple:
    """By model + kNN bpb, then model-only bpb; missing values last."""
    knn, memory = row["knn_bpb"], row["memory_bpb"]
    return (knn is None, knn or 0.0, memory is None, memory or 0.0, row["name"])


def table(rows: list[dict]) -> str:
    headers = ["variant", "model", "status", "teacher bpb", "unpacked bpb", "model bpb",
               "model+kNN bpb",
               "total bytes", *(f"{stage} ms" for stage in _runs.STAGES), "of which ttt ms",
               "changed settings"]
    body = []
    for row in rows:
        status = row["status"] + (f" ({row['detail']})" if row["detail"] else "")
        times = [None if row["stage_time_ms"][s] is None else int(row["stage_time_ms"][s])
                 for s in _runs.STAGES]
        changed = row["changed_settings"] or row["env"]
        settings = ",".join(f"{k}={v}" for k, v in changed.items()) or None
        body.append([row["name"], row["model"], status, _runs.fmt(row["teacher_bpb"]),
                     _runs.fmt(row["prepack_bpb"]), _runs.fmt(row["memory_bpb"]),
                     _runs.fmt(row["knn_bpb"]),
                     row["total_bytes"], *times,
                     None if row["ttt_time_ms"] is None else int(row["ttt_time_ms"]), settings])
    return _runs.markdown_table(headers, body)


def plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"--plot {path}: matplotlib is not installed (pip install matplotlib); "
              "no plot written", file=sys.stderr)
        return False
    names = [row["name"] for row in rows]
    series = [("teacher", "teacher_bpb"), ("memory", "memory_bpb"), ("memory+kNN", "knn_bpb")]
    figure, axis = plt.subplots(figsize=(max(4.0, 1.2 * len(rows) + 2), 4))
    width = 0.8 / len(series)
    for index, (label, key) in enumerate(series):
        xs = [i + (index - 1) * width for i in range(len(rows))]
        axis.bar(xs, [row[key] if row[key] is not None else 0.0 for row in rows], width,
                 label=label)
    axis.set_xticks(range(len(rows)), names, rotation=30, ha="right")
    axis.set_ylabel("val_bpb (lower is better)")
    present = [row[k] for row in rows for _, k in series if row[k] is not None]
    if present:
        axis.set_ylim(min(present) * 0.98, max(present) * 1.02)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Run named variants of train_gpt.py under one profile (same budget) and "
                    "compare teacher, memory and memory+kNN bpb, artifact bytes and stage times.")
    parser.add_argument("--profile", default=None,
                        help="PROFILE for every variant (default: $PROFILE or cpu_proxy)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME[:K=V,K=V]",
                        help="a variant: a name and its settings, e.g. xsa0:XSA_LAYERS=0 "
                             "(repeatable; 'base' with no settings is the reference)")
    parser.add_argument("--variants-json", type=Path, default=None,
                        help="a JSON file {name: {KEY: VALUE}} of variants")
    _runs.add_run_arguments(parser)
    parser.add_argument("--collect-only", action="store_true",
                        help="do not run: rebuild the table from existing logs "
                             "(LOGS_DIR/ablate_NAME.txt; every such log if no variant is given)")
    parser.add_argument("--out", type=Path, default=Path("ablation.json"),
                        help="JSON results file (default: %(default)s)")
    parser.add_argument("--plot", type=Path, default=None,
                        help="also draw a bar chart to this PNG (needs matplotlib)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    profile = args.profile or os.environ.get("PROFILE", "cpu_proxy")
    try:
        variants = load_variants(args.variant, args.variants_json)
        common = _runs.parse_env_pairs(args.env)  # start_runs adds them to every variant
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    if args.collect_only:
        if not variants:
            variants = {path.stem[len(RUN_PREFIX):]: {}
                        for path in sorted(args.logs_dir.glob(f"{RUN_PREFIX}*.txt"))
                        if not path.name.endswith(".stdout.txt")}
        if not variants:
            print(f"error: no variants given and no {RUN_PREFIX}*.txt in {args.logs_dir}",
                  file=sys.stderr)
            return 2
        runs = {name: _runs.read_run(name, args.logs_dir / f"{RUN_PREFIX}{name}.txt",
                                     required=())
                for name in variants}
    else:
        if not variants:
            print("error: give at least one --variant or --variants-json", file=sys.stderr)
            return 2
        for name, env in variants.items():
            budget = sorted(set(env) & set(_runs.BUDGET_SETTINGS))
            if budget:
                print(f"warning: variant {name} changes the budget ({', '.join(budget)}): "
                      "not a like-for-like comparison", file=sys.stderr)
        planned = {}
        for name, env in variants.items():
            run_id = f"{RUN_PREFIX}{name}"
            planned[name] = {**env, "PROFILE": profile, "RUN_ID": run_id}
            # Each training run packs its own artifact; an EVAL_ONLY run scores the one given.
            if not _runs.scores_only({**common, **planned[name]}):
                planned[name]["ARTIFACT_PATH"] = f"{run_id}.eam"
        runs = _runs.start_runs(planned, args, required=_runs.score_lines)
        if runs is None:
            return 2

    rows = sorted((collect(name, variants[name], run) for name, run in runs.items()),
                  key=sort_key)
    profiles = sorted({row["profile"] for row in rows if row["profile"]})
    print()
    print(f"profile: {', '.join(profiles) or profile}")
    print(table(rows))
    if len(profiles) > 1:
        print(f"warning: the logs come from different profiles {profiles}", file=sys.stderr)
    args.out.write_text(json.dumps(dict(profile=profiles[0] if len(profiles) == 1 else profiles,
                                        variants=rows), indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {args.out}")
    if args.plot is not None and plot(rows, args.plot):
        print(f"wrote {args.plot}")
    failed = [row["name"] for row in rows if row["status"] != "ok"]
    if failed:
        print(f"{len(failed)} variant(s) failed or incomplete: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
