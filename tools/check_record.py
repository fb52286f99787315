"""The pre-submission check: what a reviewer of openai/parameter-golf verifies, as a program.

Entries are turned away for a logged size over 16,000,000 bytes (even when the shipped files
were smaller), for code that is not the code that ran, for training or evaluation over 600 s,
for too few seeds, for missing fields and for folders in the wrong place. This reads a record
folder (or, before one exists, the logs themselves) and checks each of those facts against the
files, recomputing every number of submission.json from the logs:

    python -m tools.check_record records/track_non_record_16mb/2026-05-01_context_memory
    python -m tools.check_record records/track_10min_16mb/... --reference-bpb 1.1147
    python -m tools.check_record --logs logs/a.txt logs/b.txt logs/c.txt

Each log must be complete and unambiguous: exactly one score line (and one of every line the
numbers come from), the `train_time` and `eval_time` lines (a sum of stage times is no stand-in),
the evaluation's flags as the settings imply, the score equal to the model-alone line when no kNN
store ran, the tokens scored those the data line names. It must be trained from scratch
(INIT_CHECKPOINT empty) and count the real code's bytes (SIZE_CODE_BYTES 0). The seeds must be
one configuration (settings, code, data, hardware) and distinct runs (no artifact or run_id
twice, each log's SEED the seed it is filed as). On the record track the whole validation split
must be scored, on FineWeb with the competition profile on 8xH100, and the improvement over the
current record, given on the command line (--reference-bpb, never read from the folder), must be
significant; elsewhere those shortfalls make the folder a demonstration, which it must say.
Home-folder paths and secret-like strings in the folder's files are reported as notes.

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
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import train_gpt
from tools import _runs, _submission
from tools._submission import SeedResult

FOLDER_FILES = ("README.md", "submission.json", "train_gpt.py", "requirements.txt")
# Fields that come from the author, not the logs: taken as they are when recomputing the rest.
AUTHOR_FIELDS = ("author", "github_id", "name", "blurb", "date", "track", "technique_summary",
                 "demonstration")
# Lines a complete log holds exactly once: the numbers of submission.json come from them, and
# parse_log would silently read the last of two.
ONCE = (_runs.DATA_RECORD, *map(train_gpt.stage_record, _runs.STAGES), _runs.ARTIFACT_RECORD,
        _runs.TRAIN_TIME_RECORD, _runs.MEMORY_RECORD, _runs.SCORE_RECORD, _runs.EVAL_TIME_RECORD)
ERROR_LINE = "error"  # train_gpt's failures_logged: 'error rank:N type:NAME' and a traceback
# A log's run_id written by default (or by the reproduction command) names its seed.
RUN_ID_SEED = re.compile(r"seed(\d+)(?:_\d+)?$")
# What a reviewer should not find in a public folder (reported as notes, not failures).
HOME_PATH = re.compile(r"(?<![\w.~-])(?:/home/|/root/|/Users/)[^\s'\"`)\]]*"
                       r"|(?<![\w/.~-])~/[^\s'\"`)\]]*")
SECRETS = {
    "a Hugging Face token": re.compile(r"\bhf_[A-Za-z0-9]{30,}"),
    "a GitHub token": re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{20,})"),
    "an API key (sk-...)": re.compile(r"\bsk-[A-Za-z0-9_-]{20,}"),
    "an AWS access key id": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "a Slack token": re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}"),
    "a private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
}


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
        return  # another file, whatever its sha256
    logged_sha = result.run.records.get(_runs.ARTIFACT_RECORD, {}).get("sha256")
    if logged_sha and sha256_file(artifact) != logged_sha:
        report.failures.append(f"{name}: the artifact {artifact} is not the one logged "
                               f"(sha256 {sha256_file(artifact)[:16]}..., logged "
                               f"{logged_sha[:16]}...)")


def check_log(result: SeedResult, report: Report) -> None:
    """One complete, unambiguous log of a run that trained from scratch, counted the real code
    and logged the evaluation the settings asked for."""
    name, text, records = result.name, result.run.text, result.run.records
    fail = report.failures.append
    headers = [line.split()[0].split(":")[0] for line in text.splitlines()
               if line.split()[:1] and line.split()[0].startswith(("run_id:", "python:"))]
    for kind in ("run_id", "python"):
        if headers.count(kind) != 1:
            fail(f"{name}: {headers.count(kind)} header lines beginning `{kind}:` (one expected)")
    for kind in ONCE:
        count = _runs.line_count(text, kind)
        if count == 0:
            fail(f"{name}: no `{kind}` line: the log is incomplete")
        elif count > 1:
            fail(f"{name}: {count} `{kind}` lines: ambiguous (one expected; the numbers would "
                 "come from the last)")
    settings = [line.split()[1].partition("=")[0] for line in text.splitlines()
                if line.split()[:1] == ["setting"] and len(line.split()) == 2]
    twice = sorted({setting for setting in settings if settings.count(setting) > 1})
    if twice:
        fail(f"{name}: setting(s) {twice} logged more than once: ambiguous")
    if _runs.line_count(text, ERROR_LINE):
        fail(f"{name}: the run logged an error (an `{ERROR_LINE} rank:` line)")
    args = result.args
    if args is None:
        fail(f"{name}: its settings are not those of this train_gpt.py (missing, unknown or "
             "invalid values)")
        return
    if args.eval_only:
        fail(f"{name}: EVAL_ONLY=1 scores an artifact trained elsewhere: a record's log covers "
             "its training")
    if args.init_checkpoint:
        fail(f"{name}: INIT_CHECKPOINT={args.init_checkpoint} started from a pretrained "
             "teacher: the challenge trains from scratch inside its 600 s")
    if args.size_code_bytes or "size_code_bytes" in records.get(_runs.ARTIFACT_RECORD, {}):
        fail(f"{name}: SIZE_CODE_BYTES={args.size_code_bytes} counted a stand-in for the code's "
             "bytes: the challenge counts train_gpt.py as it is on disk")
    check_evaluation(result, args, report)
    shed = records.get(_runs.SHED_RECORD)
    if shed:
        report.notes.append(f"{name}: the evaluation stopped its learners after chunk "
                            f"{shed.get('after_chunk')} of {shed.get('chunks')} to keep its "
                            f"time limit (projected {shed.get('projected_ms')} ms)")


def check_evaluation(result: SeedResult, args, report: Report) -> None:
    """The evaluation's stage line says what ran, as the settings ask; with no kNN store the
    score is the model-alone line; every validation target was scored once."""
    name, fail = result.name, report.failures.append
    eval_stage = _submission.EVAL_STAGE
    flags = result.run.records.get(eval_stage, {})
    if not flags:
        return  # reported as an incomplete log
    expected = dict(knn=int(args.knn_lambda > 0), ttt_steps=args.ttt_steps,
                    memory_writes=int(train_gpt.memory_writes_on(args, args.model)))
    for key, want in expected.items():
        logged = result.value(eval_stage, key)
        if logged != want:
            fail(f"{name}: `{eval_stage}` has {key}:{flags.get(key, '(absent)')}, but its "
                 f"settings give {want} (KNN_LAMBDA={args.knn_lambda}, TTT_STEPS="
                 f"{args.ttt_steps}, EVAL_MEMORY_WRITES={args.eval_memory_writes}, "
                 f"MODEL={args.model})")
    if result.value(eval_stage, "knn") == 0:
        for key in ("val_loss", "val_bpb"):
            score, alone = (result.value(record, key)
                            for record in (_runs.SCORE_RECORD, _runs.MEMORY_RECORD))
            if score != alone:
                fail(f"{name}: without a kNN store the score is the model alone, but "
                     f"`{_runs.SCORE_RECORD}` has {key} {score} and `{_runs.MEMORY_RECORD}` "
                     f"{alone}")
    scored = result.data("val_tokens")
    targets = {record: result.value(record, "tokens") for record in (_runs.MEMORY_RECORD,
                                                                     eval_stage)}
    if scored is not None and any(t is not None and t != int(scored) - 1
                                  for t in targets.values()):
        fail(f"{name}: {int(scored):,} validation tokens have {int(scored) - 1:,} targets, but "
             + ", ".join(f"`{record}` scored {t}" for record, t in targets.items()))


def check_distinct_runs(results: Sequence[SeedResult], report: Report,
                        claimed: Sequence[str | None] | None) -> None:
    """Each log is its own run of its own seed: no run_id or artifact in two logs, a log's SEED
    is the seed its run_id names and (in a folder) the one its file name claims."""
    fail = report.failures.append
    for key, record, what in (("run_id", _runs.HEADER_RECORD, "run_id"),
                              ("sha256", _runs.ARTIFACT_RECORD, "artifact sha256")):
        seen: dict[str, str] = {}
        for result in results:
            value = result.run.records.get(record, {}).get(key)
            if value and value in seen:
                shown = value[:16] + "..." if key == "sha256" else value
                fail(f"{seen[value]} and {result.name} log the same {what} {shown}: one run "
                     "filed twice")
            elif value:
                seen[value] = result.name
    for i, result in enumerate(results):
        seed = result.setting("SEED")
        run_id = result.header("run_id") or ""
        named = RUN_ID_SEED.search(run_id)
        if named and seed is not None and named.group(1) != seed:
            fail(f"{result.name}: run_id {run_id} names seed {named.group(1)}, but its SEED "
                 f"setting is {seed}")
        if claimed and claimed[i] is not None and claimed[i] != seed:
            fail(f"{result.name}: filed as seed {claimed[i]}, but its SEED setting is {seed}")


def check_runs(results: Sequence[SeedResult], code_path: Path, run_dir: Path,
               report: Report, claimed: Sequence[str | None] | None = None) -> None:
    """Per seed: complete and unambiguous, the same code as `code_path`, sizes, times; then the
    seeds: distinct runs of one configuration, enough of them."""
    if not code_path.exists():
        report.failures.append(f"{code_path} is missing")
    code_sha = sha256_file(code_path) if code_path.exists() else None
    for result in results:
        name = result.name
        if not result.run.ok:
            report.failures.append(f"{name}: {result.run.status} ({result.run.detail})")
            continue
        logged_sha = result.header("code_sha256")
        if code_sha is not None and logged_sha != code_sha:
            report.failures.append(f"{name}: logged code_sha256 {logged_sha} but "
                                   f"{code_path.name} has sha256 {code_sha}: not the code that "
                                   "ran")
        check_sizes(result, code_path, run_dir, report)
        check_log(result, report)
        for what, seconds in (("train", result.train_time_s), ("eval", result.eval_time_s)):
            if seconds is not None and seconds > _submission.TIME_LIMIT_S:
                report.failures.append(f"{name}: {what} time {seconds:.1f} s is over the "
                                       f"{_submission.TIME_LIMIT_S:.0f} s limit")
    valid = [r for r in results if r.run.ok]
    check_distinct_runs(valid, report, claimed and [c for r, c in zip(results, claimed,
                                                                      strict=True) if r.run.ok])
    report.failures += _submission.configuration_differences(valid)
    seeds = [r.seed for r in valid]
    distinct = sorted(set(seeds), key=lambda seed: (seed is None, seed or 0))
    repeated = [seed for seed in distinct if seeds.count(seed) > 1]
    if repeated:
        report.failures.append(f"seed(s) {repeated} appear in more than one log")
    if len(distinct) < _submission.MIN_SEEDS:
        report.failures.append(f"{_submission.MIN_SEEDS} seeds are needed, the logs have "
                               f"{len(distinct)} complete: {distinct}")


def check_private(paths: Sequence[Path], report: Report) -> None:
    """Notes for home-folder paths and secret-like strings in the files (binary files skipped):
    a public folder should hold neither."""
    for path in paths:
        data = path.read_bytes()
        if b"\0" in data[:8192]:
            continue
        for number, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
            for match in HOME_PATH.finditer(line):
                report.notes.append(f"{path.name}:{number}: a home-folder path "
                                    f"({match.group(0)[:60]}): use a relative path")
            for what, pattern in SECRETS.items():
                for match in pattern.finditer(line):
                    report.notes.append(f"{path.name}:{number}: what looks like {what} "
                                        f"({match.group(0)[:6]}...): remove it, and revoke it "
                                        "if it is real")


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


def check_track_rules(results: Sequence[SeedResult], document: dict, report: Report,
                      run_dir: Path, reference_bpb: float | None) -> None:
    """The record track asks for the competition profile on 8xH100, the whole validation split
    of FineWeb, and a significant gain over the current record, whose val_bpb the reviewer gives
    (--reference-bpb): never the folder's own. Elsewhere the shortfalls make a demonstration,
    which the folder must say it is."""
    valid = [r for r in results if r.run.ok]
    reasons = _submission.demonstration_reasons(valid, (_runs.REPO_ROOT, run_dir))
    if document.get("track") != _submission.RECORD_TRACK:
        if reasons:
            report.notes.append("a demonstration, not a leaderboard entry: " + "; ".join(reasons))
            unsaid = [reason for reason in reasons
                      if reason not in (document.get("demonstration") or "")]
            if unsaid:
                report.failures.append("submission.json's `demonstration` does not say what "
                                       "makes the runs a demonstration: " + "; ".join(unsaid))
        if reference_bpb is not None:
            check_significance(valid, document, reference_bpb, report, record_track=False)
        return
    if document.get("demonstration"):
        report.failures.append("track 10min_16mb takes entries, but submission.json says: "
                               f"{document['demonstration']}")
    profiles = {r.header("profile") for r in valid}
    if profiles != {_submission.COMPETITION_PROFILE} or not all(r.on_8xh100 for r in valid):
        report.failures.append(f"track 10min_16mb needs the competition profile on 8xH100; the "
                               f"logs ran {sorted(profiles, key=str)} on "
                               f"{_submission.joined([r.hardware for r in valid])}")
    fingerprints = _submission.demo_corpus_fingerprints((_runs.REPO_ROOT, run_dir))
    for result in valid:
        short = result.split_scored()
        if short:
            report.failures.append(f"{result.name}: track 10min_16mb scores the whole "
                                   f"validation split: {short}")
        demo = _submission.demo_corpus(result, fingerprints)
        if demo:
            report.failures.append(f"{result.name}: track 10min_16mb is scored on FineWeb: "
                                   f"{demo}")
    if reference_bpb is None:
        report.failures.append("track 10min_16mb: give the current record's val_bpb with "
                               "--reference-bpb (the significance test never takes its "
                               "reference from the folder's submission.json)")
        return
    check_significance(valid, document, reference_bpb, report, record_track=True)


def check_significance(valid: Sequence[SeedResult], document: dict, reference_bpb: float,
                       report: Report, record_track: bool) -> None:
    """The one-sided test of an improvement of MARGIN_NATS over `reference_bpb` at p < ALPHA,
    recomputed from the logs; on the record track it must hold and submission.json must have
    tested against the same reference."""
    test = _submission.statistics(valid, reference_bpb)["test"]
    p_value = ("unavailable (fewer than 2 seeds)" if test["p_value"] is None
               else f"{test['p_value']:.3g}")
    verdict = (f"improvement over --reference-bpb {reference_bpb}: mean "
               f"{test['mean_improvement_nats'] or 0:.5f} nats, p = {p_value}")
    if not record_track:
        report.notes.append(verdict)
        return
    if not test.get("significant"):
        report.failures.append(f"track 10min_16mb needs an improvement of "
                               f"{_submission.MARGIN_NATS} nats at p < {_submission.ALPHA}: "
                               f"{verdict}")
    claimed = (document.get("statistics") or {}).get("reference_bpb")
    if claimed != reference_bpb:
        report.failures.append(f"submission.json tests against reference_bpb {claimed}, not "
                               f"the current record's {reference_bpb} (--reference-bpb)")


def check_folder(folder: Path, run_dir: Path, reference_bpb: float | None = None) -> Report:
    report = Report()
    absent = [name for name in FOLDER_FILES if not (folder / name).is_file()]
    logs = _submission.folder_logs(folder)
    if absent:
        report.failures.append(f"{folder}: missing {absent}")
    if not logs:
        report.failures.append(f"{folder}: no {_submission.seed_log_name('<seed>')} log")
    check_private(sorted(path for path in folder.rglob("*") if path.is_file()), report)
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
    check_runs(results, folder / "train_gpt.py", run_dir, report,
               [_submission.claimed_seed(log) for log in logs])
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
    check_track_rules(results, document, report, run_dir, reference_bpb)
    readme = (folder / "README.md").read_text(encoding="utf-8") if (
        folder / "README.md").is_file() else ""
    for line_name in (_runs.SCORE_RECORD, "total_bytes"):
        if readme and line_name not in readme:
            report.failures.append(f"README.md does not point at the `{line_name}` log line")
    if readme and document.get("demonstration") and document["demonstration"] not in readme:
        report.failures.append("README.md does not say what submission.json's `demonstration` "
                               "says")
    return report


def check_logs(logs: Sequence[Path], code_path: Path, run_dir: Path,
               reference_bpb: float | None = None) -> Report:
    report = Report()
    results = _submission.read_results(logs)
    check_runs(results, code_path, run_dir, report)
    check_private(list(logs), report)
    valid = [r for r in results if r.run.ok]
    reasons = _submission.demonstration_reasons(valid, (_runs.REPO_ROOT, run_dir))
    if reasons:
        report.notes.append("a demonstration, not a leaderboard entry: " + "; ".join(reasons))
    if reference_bpb is not None and valid:
        check_significance(valid, {}, reference_bpb, report, record_track=False)
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
    parser.add_argument("--reference-bpb", type=float, default=None,
                        help="the current record's val_bpb: the record track's significance "
                             "test is against it (required there), elsewhere a note")
    args = parser.parse_args(argv)
    if (args.folder is None) == (args.logs is None):
        parser.error("give either a record folder or --logs")
    if args.folder is not None:
        if not args.folder.is_dir():
            print(f"error: {args.folder} is not a folder", file=sys.stderr)
            return 2
        report = check_folder(args.folder, args.run_dir, args.reference_bpb)
        subject = str(args.folder)
    else:
        report = check_logs(args.logs, args.code, args.run_dir, args.reference_bpb)
        subject = "the logs"
    print(report.text(subject))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
