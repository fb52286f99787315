"""Run train_gpt.py for several seeds (or read their logs) and write the submission's evidence.

A Parameter Golf record needs more than one good number: three seeds, their mean val_bpb, and a
one-sided t-test that the improvement over the current record is at least 0.005 nats at
p < 0.01, plus a `submission.json` and the training logs. This tool produces all of it from the
logs that train_gpt.py writes, read with _runs.parse_log, so the numbers in the submission are
exactly the numbers in the logs. A run that failed or never reached its final score line is shown
as such and left out of the statistics, never silently dropped. `submission.json` has the
challenge's fields (tools/_submission.py); `python -m tools.make_record` turns the same logs into
the folder of a pull request. Runs are launched and read back by tools/_runs.py, as tools.ablate's
are; author and title fields left out here stay empty (make_record asks for them).

    python -m tools.seed_sweep --nproc 8                         # seeds 1337 42 2024, competition
    python -m tools.seed_sweep --profile cpu_smoke --seeds 1 2 3
    python -m tools.seed_sweep --logs logs/a.txt logs/b.txt logs/c.txt --reference-bpb 1.1147
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from tools import _runs, _submission
from tools._submission import SeedResult

DEFAULT_SEEDS = (1337, 42, 2024)


# ------------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------------


def seed_table(results: list[SeedResult]) -> str:
    rows = []
    for r in results:
        status = r.run.status + (f" ({r.run.detail})" if r.run.detail else "")
        rows.append([r.seed, status, _runs.fmt(r.val_bpb, 8), _runs.fmt(r.val_loss, 8),
                     r.bytes("total_bytes"), _runs.fmt(r.train_time_s, 1),
                     _runs.fmt(r.eval_time_s, 1), r.run.log_path])
    return _runs.markdown_table(["seed", "status", "val_bpb", "val_loss", "bytes_total",
                                 "train_s", "eval_s", "log"], rows)


def write_train_log(results: list[SeedResult], path: Path) -> None:
    parts = []
    for r in results:
        log = r.run.log_path
        if log is None or not log.exists():
            parts.append(f"===== seed {r.seed}: no log ({r.run.status}: {r.run.detail}) =====\n")
            continue
        text = log.read_text(encoding="utf-8", errors="replace")
        parts.append(f"===== {log} (seed {r.seed}, {r.run.status}) =====\n{text}")
        if not text.endswith("\n"):
            parts.append("\n")
    path.write_text("".join(parts), encoding="utf-8")


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Run train_gpt.py for several seeds (or aggregate existing logs), report "
                    "mean/std/95% interval of val_bpb and the record t-test, and write "
                    "submission.json and train_log.txt.")
    parser.add_argument("--logs", nargs="+", type=Path, metavar="LOG",
                        help="aggregate these existing logs instead of running anything")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(DEFAULT_SEEDS),
                        help="seeds to run (default: %(default)s)")
    parser.add_argument("--profile", default=None,
                        help="PROFILE for the runs (default: $PROFILE or competition)")
    parser.add_argument("--prefix", default=None,
                        help="RUN_ID / artifact prefix: RUN_ID={prefix}_seed{seed}, "
                             "ARTIFACT_PATH={prefix}_seed{seed}.eam (default: the profile)")
    _runs.add_run_arguments(parser)
    _submission.add_test_arguments(parser)
    _submission.add_metadata_arguments(parser, required=False)
    parser.add_argument("--out-json", type=Path, default=Path("submission.json"),
                        help="submission file to write (default: %(default)s)")
    parser.add_argument("--out-log", type=Path, default=Path("train_log.txt"),
                        help="concatenated logs to write (default: %(default)s)")
    return parser


def run_seeds(args: argparse.Namespace) -> list[SeedResult] | None:
    """One run per seed through _runs.start_runs (None when a setting is refused first)."""
    prefix = args.prefix or args.profile
    planned = {seed: {"PROFILE": args.profile, "SEED": str(seed),
                      "RUN_ID": f"{prefix}_seed{seed}", "ARTIFACT_PATH": f"{prefix}_seed{seed}.eam"}
               for seed in args.seeds}
    runs = _runs.start_runs({f"seed {seed}": env for seed, env in planned.items()}, args)
    if runs is None:
        return None
    results = []
    for seed, run in zip(planned, runs.values(), strict=True):
        result = SeedResult(run, _submission.seed_of(run, seed))
        _submission.mark_unreadable(result)
        results.append(result)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.profile = args.profile or os.environ.get("PROFILE", "competition")
    results = _submission.read_results(args.logs) if args.logs else run_seeds(args)
    if results is None:
        return 2
    valid = [r for r in results if r.run.ok]
    stats = _submission.statistics(valid, args.reference_bpb, args.margin_nats, args.alpha)
    try:
        reasons = _submission.demonstration_reasons(valid, (_runs.REPO_ROOT, Path.cwd()))
        meta = _submission.metadata(args, valid, stats, _submission.demonstration_text(reasons))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print()
    print(seed_table(results))
    print()
    print(_submission.stats_text(stats))
    failed = [r for r in results if not r.run.ok]
    if failed:
        print(f"\n{len(failed)} run(s) failed or incomplete, excluded from the statistics: "
              + ", ".join(f"seed {r.seed} ({r.run.status})" for r in failed))
    _submission.write_json(_submission.build_submission(results, stats, meta), args.out_json)
    write_train_log(results, args.out_log)
    print(f"\nwrote {args.out_json} and {args.out_log}")
    if valid:
        print("a pull request's folder from these logs: python -m tools.make_record --logs "
              + " ".join(str(r.run.log_path) for r in valid)
              + " --author ... --github-id ... --reference-bpb <the current record's val_bpb>")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
