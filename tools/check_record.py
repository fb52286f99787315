"""The pre-submission check: what a reviewer of openai/parameter-golf verifies, as a program.

Entries are turned away for a logged size over 16,000,000 bytes (even when the shipped files
were smaller), for code that is not the code that ran, for training or evaluation over 600 s,
for too few seeds, for missing fields and for folders in the wrong place. This reads a record
folder (or, before one exists, the logs themselves) and checks each of those facts against the
files, recomputing every number of submission.json from the logs:

    python -m tools.check_record records/track_non_record_16mb/2026-05-01_EAM_context
    python -m tools.check_record --logs logs/a.txt logs/b.txt logs/c.txt

The artifacts themselves are not part of a folder; where they can be found (the path a log
names, taken from --run-dir, the folder the runs started in) their real size and sha256 are
compared with the logs too. Exit status: 0 all holds, 1 a numbered list of what fails,
2 unusable input.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tools import _runs, _submission
from tools._submission import SeedResult

FOLDER_FILES = ("README.md", "submission.json", "train_gpt.py", "requirements.txt")
# Fields that come from the author, not the logs: taken as they are when recomputing the rest.
AUTHOR_FIELDS = ("author", "github_id", "name", "blurb", "date", "track", "technique_summary")


@dataclass
class Report:
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def text(self, subject: str) -> str:
        lines = [f"note: {note}" for note in self.notes]
        if self.ok:
            lines.append(f"PASS: {subject}: every check holds")
        else:
            lines.append(f"FAIL: {subject}: {len(self.failures)} problem(s)")
            lines += [f"  {i}. {failure}" for i, failure in enumerate(self.failures, 1)]
        return "\n".join(lines)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------
# The runs: sizes, code, times, seeds
# ------------------------------------------------------------------------------------------------


def check_sizes(result: SeedResult, code_path: Path, run_dir: Path, report: Report) -> None:
    name = result.run.log_path.name if result.run.log_path else f"seed {result.seed}"
    code, model, total = (result.bytes(k) for k in ("code_bytes", "model_bytes", "total_bytes"))
    if None in (code, model, total):
        report.failures.append(f"{name}: no complete `{_runs.ARTIFACT_RECORD} code_bytes:N "
                               "model_bytes:N total_bytes:N` line")
        return
    if total > _submission.SIZE_LIMIT:
        report.failures.append(f"{name}: logged total_bytes {total:,} is over the limit "
                               f"{_submission.SIZE_LIMIT:,} by {total - _submission.SIZE_LIMIT:,}"
                               " byte(s)")
    if code + model != total:
        report.failures.append(f"{name}: logged code_bytes {code:,} + model_bytes {model:,} != "
                               f"total_bytes {total:,}")
    if code_path.exists() and code != code_path.stat().st_size:
        report.failures.append(f"{name}: logged code_bytes {code:,} but {code_path.name} has "
                               f"{code_path.stat().st_size:,} bytes")
    artifact = _runs.artifact_path(result.run.records, run_dir)
    if artifact is None or not artifact.exists():
        report.notes.append(f"{name}: artifact {artifact or '(not named in the log)'} not found: "
                            "its size is the logged one (pass --run-dir to compare the file)")
        return
    if artifact.stat().st_size != model:
        report.failures.append(f"{name}: logged model_bytes {model:,} but the artifact {artifact} "
                               f"has {artifact.stat().st_size:,} bytes")
    logged_sha = result.run.records.get(_runs.ARTIFACT_RECORD, {}).get("sha256")
    if logged_sha and sha256_file(artifact) != logged_sha:
        report.failures.append(f"{name}: the artifact {artifact} is not the one logged "
                               f"(sha256 {sha256_file(artifact)[:16]}..., logged "
                               f"{logged_sha[:16]}...)")


def check_runs(results: Sequence[SeedResult], code_path: Path, run_dir: Path,
               report: Report) -> None:
    """Per seed: complete, the same code as `code_path`, sizes, times; then the seed count."""
    if not code_path.exists():
        report.failures.append(f"{code_path} is missing")
    code_sha = sha256_file(code_path) if code_path.exists() else None
    for result in results:
        name = result.run.log_path.name if result.run.log_path else f"seed {result.seed}"
        if not result.run.ok:
            report.failures.append(f"{name}: {result.run.status} ({result.run.detail})")
            continue
        logged_sha = result.header("code_sha256")
        if code_sha is not None and logged_sha != code_sha:
            report.failures.append(f"{name}: logged code_sha256 {logged_sha} but "
                                   f"{code_path.name} has sha256 {code_sha}: not the code that "
                                   "ran")
        check_sizes(result, code_path, run_dir, report)
        for what, seconds in (("train", result.train_time_s), ("eval", result.eval_time_s)):
            if seconds is None:
                report.failures.append(f"{name}: no {what} time in the log")
            elif seconds > _submission.TIME_LIMIT_S:
                report.failures.append(f"{name}: {what} time {seconds:.1f} s is over the "
                                       f"{_submission.TIME_LIMIT_S:.0f} s limit")
    seeds = [r.seed for r in results if r.run.ok]
    distinct = sorted(set(seeds), key=lambda seed: (seed is None, seed or 0))
    repeated = [seed for seed in distinct if seeds.count(seed) > 1]
    if repeated:
        report.failures.append(f"seed(s) {repeated} appear in more than one log")
    if len(distinct) < _submission.MIN_SEEDS:
        report.failures.append(f"{_submission.MIN_SEEDS} seeds are needed, the logs have "
                               f"{len(distinct)} complete: {distinct}")


# ------------------------------------------------------------------------------------------------
# The folder: place, files, fields, numbers
# ------------------------------------------------------------------------------------------------


def blank(value: object) -> bool:
    return value is None or value == "" or value == [] or value == {}


def differences(expected: object, actual: object, where: str) -> list[str]:
    """Where `actual` (submission.json) differs from `expected` (recomputed from the logs);
    keys only in `actual` are the author's extras and are left alone."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        out = []
        for key, value in expected.items():
            if key in actual:
                out += differences(value, actual[key], f"{where}.{key}" if where else key)
        return out
    if isinstance(expected, list) and isinstance(actual, list) and len(expected) == len(actual):
        return [d for i, (e, a) in enumerate(zip(expected, actual, strict=True))
                for d in differences(e, a, f"{where}[{i}]")]
    if (isinstance(expected, float) and isinstance(actual, int | float)
            and not isinstance(actual, bool)
            and math.isclose(expected, actual, rel_tol=1e-9, abs_tol=1e-12)):
        return []
    if expected == actual:
        return []
    return [f"submission.json {where} is {json.dumps(actual)} but the logs give "
            f"{json.dumps(expected)}"]


def check_fields(document: dict, report: Report) -> None:
    missing = [key for key in _submission.REQUIRED_FIELDS if blank(document.get(key))]
    if missing:
        report.failures.append(f"submission.json: missing or empty field(s) {missing}")
    seed_results = document.get("seed_results")
    if isinstance(seed_results, dict):
        for seed, entry in seed_results.items():
            absent = [key for key in _submission.SEED_FIELDS
                      if not isinstance(entry, dict) or blank(entry.get(key))]
            if absent:
                report.failures.append(f"submission.json seed_results[{seed!r}]: missing {absent}")
    if document.get("track") not in _submission.TRACKS:
        report.failures.append(f"submission.json track {document.get('track')!r}: expected one "
                               f"of {list(_submission.TRACKS)}")


def check_place(folder: Path, document: dict, report: Report) -> None:
    if not _submission.RECORD_FOLDER_PATTERN.match(folder.name):
        report.failures.append(f"folder name {folder.name!r}: expected YYYY-MM-DD_Description")
    elif document.get("date") and not folder.name.startswith(f"{document['date']}_"):
        report.failures.append(f"folder name {folder.name!r} does not start with the "
                               f"submission's date {document['date']}")
    expected_parent = _submission.track_folder(str(document.get("track")))
    if folder.parent.name != expected_parent:
        report.failures.append(f"folder {folder.name!r} sits in {folder.parent.name!r}; a pull "
                               f"request adds it under records/{expected_parent}/")


def check_track_rules(results: Sequence[SeedResult], document: dict, report: Report) -> None:
    """The record track asks for the competition profile on 8xH100 and a significant gain."""
    valid = [r for r in results if r.run.ok]
    profiles = {r.header("profile") for r in valid}
    hardware = _submission.joined([r.hardware for r in valid])
    on_8xh100 = all(r.header("world_size") == "8" and "H100" in (r.header("device_name") or "")
                    for r in valid)
    if document.get("track") != "10min_16mb":
        if profiles != {"competition"} or not on_8xh100:
            report.notes.append(f"profile {sorted(profiles, key=str)} on {hardware}: a "
                                "demonstration, not a leaderboard entry")
        return
    if profiles != {"competition"} or not on_8xh100:
        report.failures.append(f"track 10min_16mb needs the competition profile on 8xH100; the "
                               f"logs ran {sorted(profiles, key=str)} on {hardware}")
    test = document.get("statistics") or {}
    if not test.get("significant"):
        report.failures.append("track 10min_16mb needs an improvement of "
                               f"{_submission.MARGIN_NATS} nats at p < {_submission.ALPHA} "
                               "(python -m tools.make_record --reference-bpb <record>); "
                               f"submission.json has p = {test.get('p_value')}")


def check_folder(folder: Path, run_dir: Path) -> Report:
    report = Report()
    absent = [name for name in FOLDER_FILES if not (folder / name).is_file()]
    logs = _submission.folder_logs(folder)
    if absent:
        report.failures.append(f"{folder}: missing {absent}")
    if not logs:
        report.failures.append(f"{folder}: no {_submission.seed_log_name('<seed>')} log")
    try:
        document = json.loads((folder / "submission.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        report.failures.append(f"submission.json unreadable: {error}")
        return report
    if not isinstance(document, dict):
        report.failures.append("submission.json is not a JSON object")
        return report
    check_place(folder, document, report)
    check_fields(document, report)
    results = _submission.read_results(logs)
    check_runs(results, folder / "train_gpt.py", run_dir, report)
    for seed in document.get("seeds") or []:
        if not (folder / _submission.seed_log_name(seed)).is_file():
            report.failures.append(f"seed {seed} is in submission.json but "
                                   f"{_submission.seed_log_name(seed)} is missing")
    test = document.get("statistics") or {}
    valid = [r for r in results if r.run.ok]
    stats = _submission.statistics(valid, test.get("reference_bpb"),
                                   test.get("margin_nats", _submission.MARGIN_NATS),
                                   test.get("alpha", _submission.ALPHA))
    expected = _submission.build_submission(results, stats, {
        key: document.get(key) for key in AUTHOR_FIELDS})
    expected = json.loads(json.dumps(_submission.json_safe(expected)))
    report.failures += differences(expected, document, "")
    check_track_rules(results, document, report)
    readme = (folder / "README.md").read_text(encoding="utf-8") if (
        folder / "README.md").is_file() else ""
    for line_name in (_runs.SCORE_RECORD, "total_bytes"):
        if readme and line_name not in readme:
            report.failures.append(f"README.md does not point at the `{line_name}` log line")
    return report


def check_logs(logs: Sequence[Path], code_path: Path, run_dir: Path) -> Report:
    report = Report()
    check_runs(_submission.read_results(logs), code_path, run_dir, report)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check a record folder (or a sweep's logs) the "
                                                 "way the challenge's reviewers do.")
    parser.add_argument("folder", nargs="?", type=Path,
                        help="records/track_<track>/YYYY-MM-DD_Description")
    parser.add_argument("--logs", nargs="+", type=Path, metavar="LOG",
                        help="check these logs instead of a folder (before assembling one)")
    parser.add_argument("--code", type=Path, default=_runs.TRAIN_SCRIPT,
                        help="with --logs: the train_gpt.py the logs must have run "
                             "(default: this repository's)")
    parser.add_argument("--run-dir", type=Path, default=Path("."),
                        help="the folder the runs started in: relative artifact paths in the "
                             "logs are found from there (default: the current folder)")
    args = parser.parse_args(argv)
    if (args.folder is None) == (args.logs is None):
        parser.error("give either a record folder or --logs")
    if args.folder is not None:
        if not args.folder.is_dir():
            print(f"error: {args.folder} is not a folder", file=sys.stderr)
            return 2
        report, subject = check_folder(args.folder, args.run_dir), str(args.folder)
    else:
        report, subject = check_logs(args.logs, args.code, args.run_dir), "the logs"
    print(report.text(subject))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
