"""What tools/seed_sweep.py and tools/ablate.py share: launching runs and reading their logs.

Both tools start `train_gpt.py` with some environment variables (one process or torchrun), keep
its output, and read its log back through `parse_log` (the one log parser); the record
tools (_submission, check_record, make_record, plots) read logs through here too. Keeping it in
one place means no two tools differ in how a run is started or checked before it starts, where
its log is looked for, when a run counts as finished, or how a time is read from a log. Nothing
runs at import.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import train_gpt

TRAIN_SCRIPT = Path(train_gpt.__file__).resolve()
REPO_ROOT = TRAIN_SCRIPT.parent  # its README.md and requirements.txt go into a record folder
# Directory (relative to the working directory of the run) where train_gpt.py writes RUN_ID.txt.
TRAIN_LOG_DIR = Path("logs")
# The log's line names are train_gpt's, which writes them.
STAGES, TRAIN_STAGES = train_gpt.STAGES, train_gpt.TRAIN_STAGES
SCORE_RECORD, MEMORY_RECORD = train_gpt.SCORE_RECORD, train_gpt.MEMORY_RECORD
TEACHER_RECORD, PREPACK_RECORD = train_gpt.TEACHER_RECORD, train_gpt.PREPACK_RECORD
HEADER_RECORD, SETTINGS_RECORD = "header", "settings"  # what parse_log names the header lines
ARTIFACT_RECORD, COMPONENT_RECORD = train_gpt.ARTIFACT_RECORD, train_gpt.COMPONENT_RECORD
FIT_RECORD, STEP_RECORDS = train_gpt.FIT_RECORD, train_gpt.STEP_RECORDS
TRAIN_TIME_RECORD, EVAL_TIME_RECORD = train_gpt.TRAIN_TIME_RECORD, train_gpt.EVAL_TIME_RECORD
DATA_RECORD, TTT_RECORD = train_gpt.DATA_RECORD, train_gpt.TTT_RECORD
SHED_RECORD = train_gpt.SHED_RECORD
# Settings that set the budget: an ablation variant changing them is not a like-for-like run.
BUDGET_SETTINGS = ("MAX_WALLCLOCK_SECONDS", "TRAIN_RESERVE_FRAC", "TEACHER_TIME_FRAC",
                   "DISTILL_TIME_FRAC", "ITERATIONS", "DISTILL_ITERATIONS", "VAL_TOKENS")


def parse_log(text: str) -> dict[str, dict[str, str]]:
    """The log contract read back: {line kind: {key: value}}, the header lines as 'header', the
    settings as 'settings'; a later line of a kind updates the earlier."""
    records: dict[str, dict[str, str]] = {}
    for line in text.splitlines():
        words = line.split()
        if not words:
            continue
        if words[0] == "setting" and len(words) == 2 and "=" in words[1]:
            name, _, value = words[1].partition("=")
            records.setdefault(SETTINGS_RECORD, {})[name] = value
            continue
        kind, fields = words[0], words[1:]
        if kind.startswith(("run_id:", "python:")):
            kind, fields = HEADER_RECORD, words
        record = records.setdefault(kind, {})
        for word in fields:
            key, separator, value = word.partition(":")
            if separator:
                record[key] = value
    return records


@dataclass
class Run:
    """One training run, launched here or read back from its log."""

    label: str
    log_path: Path | None
    returncode: int | None = None  # None when the log was only collected, not run here
    records: dict[str, dict[str, str]] = field(default_factory=dict)
    status: str = "ok"  # ok | failed | incomplete | missing
    detail: str = ""
    text: str = ""  # the whole log, for lines that repeat (parse_log keeps the last of a kind)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


# ------------------------------------------------------------------------------------------------
# Command line pieces
# ------------------------------------------------------------------------------------------------


def parse_env_pairs(pairs: Iterable[str] | None, option: str = "--env") -> dict[str, str]:
    """['KEY=VALUE', ...] -> {KEY: VALUE}; a malformed pair raises ValueError naming it."""
    env: dict[str, str] = {}
    for pair in pairs or ():
        key, separator, value = pair.partition("=")
        key = key.strip()
        if not separator or not key.isidentifier():
            raise ValueError(f"{option} {pair!r}: expected KEY=VALUE")
        env[key] = value
    return env


def training_command(nproc: int, override: str | None = None,
                     script: Path = TRAIN_SCRIPT) -> list[str]:
    """`python train_gpt.py` for one process, `torchrun --standalone ...` for several.

    `override` (a shell-quoted string) replaces the whole command; the tests use it to run a fake
    trainer, and it can point at another interpreter or wrapper.
    """
    if override:
        return shlex.split(override)
    if nproc < 1:
        raise ValueError(f"--nproc {nproc}: must be at least 1")
    if nproc == 1:
        return [sys.executable, str(script)]
    launcher = shutil.which("torchrun")
    prefix = [launcher] if launcher else [sys.executable, "-m", "torch.distributed.run"]
    return [*prefix, "--standalone", f"--nproc_per_node={nproc}", str(script)]


def setting_names() -> set[str]:
    return {f.name.upper() for f in dataclasses.fields(train_gpt.Hyperparameters)}


def check_settings(overrides: Mapping[str, str], base: Mapping[str, str] | None = None) -> None:
    """Fail before a long run, not after: build the Hyperparameters the run itself will build.

    Raises ValueError (train_gpt's own message, naming the variable) for a bad value.
    """
    environ = dict(os.environ if base is None else base)
    environ.update(overrides)
    train_gpt.Hyperparameters.from_env(environ)


def unknown_settings(overrides: Mapping[str, str]) -> list[str]:
    """Keys that are not train_gpt settings (passed through as plain environment variables)."""
    known = setting_names() | {"PROFILE"}
    return sorted(key for key in overrides if key not in known)


# ------------------------------------------------------------------------------------------------
# Running
# ------------------------------------------------------------------------------------------------


def launch(command: Sequence[str], env: Mapping[str, str], output_path: Path,
           echo: bool = True, cwd: Path | None = None) -> int:
    """Run `command` with `env` added to this environment; stdout and stderr go to `output_path`
    (and to this terminal when `echo`). Returns the exit status (127 if it could not start)."""
    output_path.parent.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, **env}
    with output_path.open("w", encoding="utf-8") as sink:
        sink.write(f"# command: {shlex.join(command)}\n")
        sink.write("# env: " + " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + "\n")
        sink.flush()
        try:
            process = subprocess.Popen(list(command), env=full_env, cwd=cwd,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True, errors="replace", bufsize=1)
        except OSError as error:
            message = f"could not start {command[0]!r}: {error}"
            sink.write(message + "\n")
            print(message, file=sys.stderr)
            return 127
        try:
            assert process.stdout is not None
            for line in process.stdout:
                sink.write(line)
                if echo:
                    sys.stdout.write(line)
                    sys.stdout.flush()
            return process.wait()
        except KeyboardInterrupt:
            process.terminate()
            process.wait()
            raise


def scores_only(env: dict[str, str]) -> bool:
    """Whether a run's environment makes it score an existing ARTIFACT_PATH (EVAL_ONLY)."""
    return bool(train_gpt._parse_setting("EVAL_ONLY", env.get("EVAL_ONLY", "0"), bool))


REPLACED_DIR = "replaced"  # beside a file, where set_aside keeps what a new run would replace


def set_aside(path: Path) -> Path | None:
    """Keep an earlier run's file out of a new run's way, never deleting it: DIR/NAME.EXT moves
    to DIR/replaced/NAME.<its modification time>.EXT (with _2, _3, ... on a clash). Returns where
    it went, or None when there was no such file."""
    if not path.exists():
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(path.stat().st_mtime))
    folder = path.parent / REPLACED_DIR
    folder.mkdir(exist_ok=True)
    for attempt in itertools.count(1):
        kept = folder / f"{path.stem}.{stamp}{'' if attempt == 1 else f'_{attempt}'}{path.suffix}"
        if not kept.exists():
            return path.rename(kept)


def run_training(label: str, command: Sequence[str], env: Mapping[str, str], logs_dir: Path,
                 required: Sequence[str] = (SCORE_RECORD,), echo: bool = True) -> Run:
    """Launch one run with RUN_ID=env['RUN_ID'] and read its log back.

    train_gpt.py writes logs/RUN_ID.txt under the working directory; an earlier run's file of
    that name, its ARTIFACT_PATH and its output are set aside first (train_gpt.py refuses to
    overwrite the first two), so a run that dies before logging is never mistaken for an old
    complete one, and the old run is kept. The raw stdout/stderr is kept in
    LOGS_DIR/RUN_ID.stdout.txt, and the log is copied into LOGS_DIR when that is elsewhere.
    """
    run_id = env["RUN_ID"]
    train_log = TRAIN_LOG_DIR / f"{run_id}.txt"
    target = logs_dir / f"{run_id}.txt"
    output_path = logs_dir / f"{run_id}.stdout.txt"
    earlier_outputs = {train_log.resolve(), target.resolve(), output_path.resolve()}
    if env.get("ARTIFACT_PATH") and not scores_only(env):  # EVAL_ONLY reads it: left in place
        earlier_outputs.add(Path(env["ARTIFACT_PATH"]).resolve())
    for earlier in earlier_outputs:
        set_aside(earlier)
    print(f"[{label}] {shlex.join(command)}  ({' '.join(f'{k}={v}' for k, v in env.items())})",
          flush=True)
    returncode = launch(command, env, output_path, echo=echo)
    if train_log.exists() and train_log.resolve() != target.resolve():
        logs_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(train_log, target)
    run = read_run(label, target if target.exists() else None, required, returncode)
    if run.log_path is None:
        run.detail += f"; output in {output_path}"
    return run


def read_run(label: str, log_path: Path | None, required: Sequence[str] = (SCORE_RECORD,),
             returncode: int | None = None) -> Run:
    """Parse a log (parse_log) and decide: failed (non-zero exit), missing (no log),
    incomplete (a required final record is absent) or ok."""
    run = Run(label=label, log_path=log_path, returncode=returncode)
    if log_path is not None and log_path.exists():
        run.text = log_path.read_text(encoding="utf-8", errors="replace")
        run.records = parse_log(run.text)
    absent = [name for name in required if name not in run.records]
    if returncode not in (None, 0):
        run.status, run.detail = "failed", f"exit status {returncode}"
    elif log_path is None or not log_path.exists():
        run.status, run.detail = "missing", f"no log {log_path}" if log_path else "no log"
    elif absent:
        run.status, run.detail = "incomplete", "no " + ", ".join(absent) + " line"
    return run


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of every tool that launches runs: extra environment, processes per run, where
    logs go, a replacement command and quiet output."""
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment variable for every run (repeatable)")
    parser.add_argument("--nproc", type=int, default=1,
                        help="processes per run: 1 -> python train_gpt.py, N > 1 -> torchrun "
                             "--standalone --nproc_per_node=N train_gpt.py")
    parser.add_argument("--logs-dir", type=Path, default=TRAIN_LOG_DIR,
                        help="where run logs and captured output are kept and read back "
                             "(default: %(default)s)")
    parser.add_argument("--command", default=None,
                        help="replace the training command (a shell-quoted string; for tests "
                             "and wrappers)")
    parser.add_argument("--quiet", action="store_true", help="do not echo the runs' output")


def score_lines(env: Mapping[str, str]) -> tuple[str, ...]:
    """The line a run with this environment must end with to count as complete: its model's
    model-alone score line (the memory model's unless MODEL says otherwise); none for an
    EVAL_ONLY run, whose kind only its artifact knows."""
    if scores_only(dict(env)):
        return ()
    return (train_gpt.SCORE_RECORDS[env.get("MODEL", train_gpt.SHIPPED_MODELS[0])][0],)


def start_runs(planned: Mapping[str, Mapping[str, str]], args: argparse.Namespace,
               required: Callable[[Mapping[str, str]], Sequence[str]] = lambda env: (
                   SCORE_RECORD,)) -> dict[str, Run] | None:
    """Run each planned {label: environment} in turn (RUN_ID from the environment), with the
    flags of add_run_arguments (`args.env` is added under each run's own variables).

    Every run's settings are built as the run itself will build them before the first one
    starts, so a bad value costs nothing; returns None after printing the error. Variables that
    are not train_gpt settings are passed through, with a note. `required`: the lines a run's
    log must hold to count as complete, given its environment.
    """
    try:
        common = parse_env_pairs(args.env)
        command = training_command(args.nproc, args.command)
        for env in planned.values():
            check_settings({**common, **env})
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return None
    unknown = unknown_settings({k: v for env in planned.values() for k, v in
                                {**common, **env}.items()})
    if unknown:
        print(f"note: not train_gpt settings, passed as plain environment: {unknown}")
    runs = {}
    for label, env in planned.items():
        full_env = {**common, **env}
        runs[label] = run_training(label, command, full_env, args.logs_dir,
                                   required=required(full_env), echo=not args.quiet)
    return runs


# ------------------------------------------------------------------------------------------------
# Reading records
# ------------------------------------------------------------------------------------------------


def number(records: Mapping[str, Mapping[str, str]], record: str, key: str) -> float | None:
    """records[record][key] as a float, None when absent or not a number."""
    try:
        return float(records[record][key])
    except (KeyError, ValueError):
        return None


def line_records(text: str, kind: str) -> list[dict[str, str]]:
    """Every line of one kind in log order, each read by parse_log."""
    return [parse_log(line)[kind] for line in text.splitlines()
            if line.split()[:1] == [kind]]


def line_count(text: str, kind: str) -> int:
    """How many lines of one kind the log holds (parse_log keeps only the last)."""
    return sum(line.split()[:1] == [kind] for line in text.splitlines())


def stage_times_ms(records: Mapping[str, Mapping[str, str]]) -> dict[str, float | None]:
    return {stage: number(records, train_gpt.stage_record(stage), "time_ms") for stage in STAGES}


def train_time_s(records: Mapping[str, Mapping[str, str]]) -> float | None:
    """Everything that read training data, in seconds: the `train_time` line's train_time_ms
    (None without one: a sum of stage times leaves out setup and packing, so it is no
    stand-in)."""
    ms = number(records, TRAIN_TIME_RECORD, "train_time_ms")
    return None if ms is None else ms / 1000


def eval_time_s(records: Mapping[str, Mapping[str, str]]) -> float | None:
    """The evaluation's time in seconds: the `eval_time` line's eval_time_ms (None without one)."""
    ms = number(records, EVAL_TIME_RECORD, "eval_time_ms")
    return None if ms is None else ms / 1000


def artifact_path(records: Mapping[str, Mapping[str, str]], run_dir: Path) -> Path | None:
    """Where the run wrote its artifact: the `artifact` line's path (newer logs), else the
    ARTIFACT_PATH setting; a relative path is taken from `run_dir` (the run's working folder)."""
    raw = records.get(ARTIFACT_RECORD, {}).get("path") or records.get(
        SETTINGS_RECORD, {}).get("ARTIFACT_PATH")
    if not raw:
        return None
    path = Path(raw)
    return path if path.is_absolute() else run_dir / path


def changed_settings(records: Mapping[str, Mapping[str, str]]) -> dict[str, str]:
    """Settings in a log that differ from its profile's defaults (RUN_ID, ARTIFACT_PATH aside)."""
    logged = records.get(SETTINGS_RECORD, {})
    try:
        profile = logged.get("PROFILE", "competition")
        defaults = train_gpt.Hyperparameters.from_env({"PROFILE": profile})
    except ValueError:
        return {}
    changed = {}
    for f in dataclasses.fields(defaults):
        name = f.name.upper()
        if name in logged and name not in ("PROFILE", "RUN_ID", "ARTIFACT_PATH"):
            if logged[name] != str(getattr(defaults, f.name)):
                changed[name] = logged[name]
    return changed


def fmt(value: object, digits: int = 4) -> str:
    """A table cell: '-' for missing values, fixed decimals for floats."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
