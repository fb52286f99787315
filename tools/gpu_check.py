"""The first thing to run on a new GPU box: one rank's share of the 8xH100 run, checked.

A user's first `torchrun --standalone --nproc_per_node=8 train_gpt.py` costs an 8xH100 hour.
On one GPU, in about 8 minutes, this runs what each of the eight ranks would run: the
competition profile with one rank's batch (TRAIN_BATCH_TOKENS / 8, DISTILL_BATCH_TOKENS / 8, one
micro-step), launched by torchrun so DDP and NCCL run in a world of one, with a shortened budget
and a slice of the validation split. It then reads the run's log and prints a PASS/FAIL table:
every compiled phase compiled (no recompiles after its first step, no graph breaks in the
teacher), each stage's step time and what it projects for the 8xH100 run (training within 600 s,
the evaluation of the whole split within 600 s), the fit's and packing's times against their
reserve, the artifact's size, peak GPU memory and the attention backend.

    python -m tools.gpu_check                # on one GPU (DATA_PATH, TOKENIZER_PATH as usual)
    python -m tools.gpu_check --cpu          # the same checks at tiny shapes on CPU (gloo)
    python -m tools.gpu_check --decide       # the memory model beside the baseline, shortened

--decide runs the shortened competition profile three times, the memory model with the full
student (ENC_LAYERS = NUM_LAYERS) and with 5 of the teacher's layers, and the baseline, and
prints the table that settles at scale what two CPU cores cannot (~10 minutes on one GPU).
Exit status: 0 when every check passes, 1 otherwise, 2 when the run could not be made.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import train_gpt
from tools import _runs

COMPETITION = train_gpt.Hyperparameters.from_env({})
RANKS = 8  # the run being checked: 8 GPUs, each with this share of every batch
# The competition profile with one rank's share of its batches and a budget one GPU affords.
GPU_RUN = dict(TRAIN_BATCH_TOKENS=str(COMPETITION.train_batch_tokens // RANKS),
               DISTILL_BATCH_TOKENS=str(COMPETITION.distill_batch_tokens // RANKS),
               GRAD_ACCUM_WORLD="1", MAX_WALLCLOCK_SECONDS="300", VAL_TOKENS="2097152",
               TEACHER_REFERENCE="0", TRAIN_LOG_EVERY="25")
# The same run at tiny shapes on CPU: what CI runs so that this tool cannot rot.
CPU_RUN = dict(PROFILE="cpu_smoke", MAX_WALLCLOCK_SECONDS="20", VAL_TOKENS="8192",
               EAM_CONTEXT_TOKENS="65536", TEACHER_REFERENCE="0", TRAIN_LOG_EVERY="5",
               GRAD_ACCUM_WORLD="1")
DECIDE = {"memory_full_student": {"ENC_LAYERS": str(COMPETITION.num_layers)},
          "memory_5_layers": {"ENC_LAYERS": "5"},
          "baseline": {"MODEL": "transformer"}}


@dataclass
class Row:
    check: str
    value: str
    target: str
    ok: bool | None  # None: information, not a check

    @property
    def result(self) -> str:
        return {True: "PASS", False: "FAIL", None: "-"}[self.ok]


def steady_step_s(text: str, phase: str) -> tuple[float | None, float | None]:
    """(seconds a step takes once the graph is built, seconds until the first step ended) from
    a phase's step lines (step:N elapsed_ms:T): the slope between the first and last logged."""
    points = [(int(r["step"]), float(r["elapsed_ms"]) / 1000)
              for r in _runs.line_records(text, phase)]
    if not points:
        return None, None
    first = points[0][1]
    if len(points) < 3:
        return None, first
    (step_a, time_a), (step_b, time_b) = points[1], points[-1]
    return (time_b - time_a) / max(step_b - step_a, 1), first


def check_table(run: _runs.Run, gpu: bool, device_memory: int | None) -> list[Row]:
    """The PASS/FAIL rows of one run's log: compile, steps and their projection to 8 ranks and
    600 s, the fit and packing against their reserve, size, evaluation, memory, attention."""
    records, text = run.records, run.text
    settings = records.get(_runs.SETTINGS_RECORD, {})
    limit_s = 600.0  # the run being projected: the challenge's, whatever this check's budget
    rows = [Row("run completed", run.status, "ok", run.ok)]
    compile_lines = {r["phase"]: r for r in _runs.line_records(text, train_gpt.COMPILE_RECORD)}
    graphs = {r["phase"]: r for r in _runs.line_records(text, train_gpt.COMPILE_GRAPHS_RECORD)}
    for phase in train_gpt.STEP_RECORDS:
        if not gpu:
            rows.append(Row(f"compile {phase}", "CPU runs eager", "compiled on GPU", None))
            continue
        line, counts = compile_lines.get(phase, {}), graphs.get(phase, {})
        compiled = line.get("mode") == "compiled"
        steady = counts.get("graphs") == counts.get("after_first_step")
        clean = phase != train_gpt.TEACHER_PHASE or counts.get("graph_breaks") == "0"
        rows.append(Row(f"compile {phase}", f"{line.get('mode', '?')} "
                        f"{line.get('reason', '')} graphs {counts.get('graphs', '?')} "
                        f"breaks {counts.get('graph_breaks', '?')}".replace("  ", " "),
                        "compiled, no recompiles" + (", no breaks" if phase == "teacher"
                                                      else ""), compiled and steady and clean))
    shares = {train_gpt.TEACHER_PHASE: float(settings.get("TEACHER_TIME_FRAC", "0")),
              train_gpt.DISTILL_PHASE: float(settings.get("DISTILL_TIME_FRAC", "0"))}
    reserve = 1 - float(settings.get("TRAIN_RESERVE_FRAC", "0.05"))
    batches = {train_gpt.TEACHER_PHASE: COMPETITION.train_batch_tokens,
               train_gpt.DISTILL_PHASE: COMPETITION.distill_batch_tokens}
    teacher_params = _runs.number(records, train_gpt.stage_record("teacher"), "params")
    for phase, share in shares.items():
        step_s, first_s = steady_step_s(text, phase)
        if step_s is None:
            rows.append(Row(f"{phase} step", "too few steps logged", "", None))
            continue
        steps = max(0.0, limit_s * share * reserve - (first_s or 0)) / step_s
        per_parameter = (f", {steps * batches[phase] / teacher_params:.0f} tokens a teacher "
                         "parameter" if phase == train_gpt.TEACHER_PHASE and teacher_params
                         else "")
        projection = (f"; at 8 x this in 600 s: ~{steps:,.0f} steps{per_parameter}" if gpu
                      else "")
        rows.append(Row(f"{phase} step (one rank's share)",
                        f"{1000 * step_s:.0f} ms, first {first_s:.0f} s{projection}", "", None))
    fits = {r["at"]: r for r in _runs.line_records(text, train_gpt.FIT_RECORD)}
    pack_ms = _runs.number(records, train_gpt.stage_record("pack"), "time_ms")
    if "distill" in fits and pack_ms is not None:
        allowed = 4 * float(fits["distill"]["build_ms"])
        fit_s = float(fits["distill"]["fit_ms"]) / 1000
        rows.append(Row("fit before distillation", f"{fit_s:.1f} s", "", None))
        rows.append(Row("packing", f"{pack_ms / 1000:.1f} s", f"<= {allowed / 1000:.1f} s "
                        "(its reserve: two packings at twice the fit's)", pack_ms <= allowed))
    train_ms = _runs.number(records, train_gpt.TRAIN_TIME_RECORD, "train_time_ms")
    within = records.get(train_gpt.TRAIN_TIME_RECORD, {}).get("within_limit") == "1"
    rows.append(Row("training within its limit", "-" if train_ms is None else
                    f"{train_ms / 1000:.0f} s of {settings.get('MAX_WALLCLOCK_SECONDS')}",
                    "within_limit:1", within))
    total = _runs.number(records, train_gpt.ARTIFACT_RECORD, "total_bytes")
    rows.append(Row("artifact + code", "-" if total is None else f"{total:,.0f} bytes",
                    f"<= {COMPETITION.size_limit:,}", total is not None
                    and total <= COMPETITION.size_limit))
    tokens_per_s = _runs.number(records, train_gpt.stage_record("eval"), "tokens_per_s")
    split = _runs.number(records, train_gpt.DATA_RECORD, "val_split_tokens")
    if tokens_per_s and split:
        projected = split / RANKS / tokens_per_s
        rows.append(Row("evaluation of the whole split", f"{tokens_per_s:,.0f} tokens/s -> "
                        f"~{projected:.0f} s on 8 ranks", f"<= {0.8 * limit_s:.0f} s (a fifth "
                        "spare: the memory's tables grow)", projected <= 0.8 * limit_s))
    peaks = [_runs.number(records, record, "peak_memory_bytes")
             for record in (train_gpt.TRAIN_TIME_RECORD, train_gpt.EVAL_TIME_RECORD)]
    if gpu and device_memory:
        peak = max((p for p in peaks if p is not None), default=None)
        rows.append(Row("peak GPU memory", "-" if peak is None else f"{peak / 2**30:.1f} GiB",
                        f"<= {0.9 * device_memory / 2**30:.0f} GiB", peak is not None
                        and peak <= 0.9 * device_memory))
    header = records.get(_runs.HEADER_RECORD, {})
    rows.append(Row("attention", header.get("attention", "?"), "fa3 on H100 where installed",
                    None))
    return rows


def markdown(rows: Sequence[Row]) -> str:
    return _runs.markdown_table(["check", "value", "target", "result"],
                                [(r.check, r.value, r.target, r.result) for r in rows])


def decide_table(runs: dict[str, _runs.Run]) -> str:
    """The memory model's students beside the baseline: the score, bytes and steps of each."""
    rows = []
    for name, run in runs.items():
        model = run.records.get(_runs.SETTINGS_RECORD, {}).get("MODEL", "eam")
        score_line = train_gpt.SCORE_RECORDS[model][1]
        rows.append((name, run.status, _runs.number(run.records, score_line, "val_bpb"),
                     _runs.number(run.records, train_gpt.ARTIFACT_RECORD, "total_bytes"),
                     _runs.number(run.records, train_gpt.stage_record("teacher"), "steps"),
                     _runs.number(run.records, train_gpt.stage_record("distill"), "steps")))
    return _runs.markdown_table(["run", "status", "val_bpb", "total bytes", "teacher steps",
                                 "distillation steps"], rows)


def run_once(label: str, env: dict[str, str], logs_dir: Path, echo: bool) -> _runs.Run:
    """train_gpt.py under torchrun with one process (DDP and NCCL, or gloo, in a world of one)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=1", str(_runs.TRAIN_SCRIPT)]
    return _runs.run_training(label, command, env, logs_dir, echo=echo)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="tiny shapes on CPU (what CI runs)")
    parser.add_argument("--decide", action="store_true",
                        help="the memory model's students and the baseline, shortened")
    parser.add_argument("--logs-dir", type=Path, default=_runs.TRAIN_LOG_DIR)
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting for the run(s), e.g. DATA_PATH=... (repeatable)")
    parser.add_argument("--quiet", action="store_true", help="do not echo the run's output")
    options = parser.parse_args(argv)
    import torch

    gpu = torch.cuda.is_available() and not options.cpu
    if not gpu and not options.cpu:
        print("no GPU here: use --cpu for the same checks at tiny shapes", file=sys.stderr)
        return 2
    try:
        extra = _runs.parse_env_pairs(options.env)
        base = {**(GPU_RUN if gpu else CPU_RUN), **extra}
        _runs.check_settings(base)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    stamp = time.strftime("%Y%m%d_%H%M%S")
    if options.decide:
        budget = {"MAX_WALLCLOCK_SECONDS": extra.get("MAX_WALLCLOCK_SECONDS",
                                                     "150" if gpu else "20")}
        runs = {name: run_once(name, {**base, **budget, **change,
                                      "RUN_ID": f"decide_{name}_{stamp}",
                                      "ARTIFACT_PATH": f"decide_{name}_{stamp}.eam"},
                               options.logs_dir, not options.quiet)
                for name, change in DECIDE.items()}
        print(decide_table(runs))
        return 0 if all(run.ok for run in runs.values()) else 1
    run = run_once("gpu_check", {**base, "RUN_ID": f"gpu_check_{stamp}",
                                 "ARTIFACT_PATH": f"gpu_check_{stamp}.eam"},
                   options.logs_dir, not options.quiet)
    memory = torch.cuda.get_device_properties(0).total_memory if gpu else None
    rows = check_table(run, gpu, memory)
    print(markdown(rows))
    return 0 if all(row.ok is not False for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
