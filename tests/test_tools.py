"""Tests for tools/: size_audit, seed_sweep, ablate, make_record, check_record, plots, _runs.

Everything runs on synthetic logs in the exact format train_gpt.py writes (a test compares them
with a real run's log, line kind by line kind and key by key), a tiny artifact and a fake trainer
script, so the tools' logic is tested in seconds; train_gpt.py's training is tested elsewhere
(the one real run a record folder is built from is the pipeline tests' tiny run, a conftest
fixture). The checks of a record folder start from an honest folder and break it the way an
author might: edit a log, then regenerate submission.json from the logs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import train_gpt
from tests.helpers import PIPELINE_RUN_ID, tiny_student, write_artifact
from tests.helpers import REPO as REPO_ROOT
from tools import _runs as runs
from tools import _submission as submission
from tools import ablate, check_record, gpu_check, make_record, plots, seed_sweep, size_audit

# ------------------------------------------------------------------------------------------------
# Synthetic logs in the exact formats train_gpt.py writes
# ------------------------------------------------------------------------------------------------

# (device, device_name, world_size, cuda, flash_attn) of the machines the logs ran on.
MACHINES = {"cpu": ("cpu", "x86_64", 1, "none", "none"),
            "h100": ("cuda", "NVIDIA_H100_80GB_HBM3", 8, "12.8", "3.0.0")}
CHALLENGE_DATA = "./data/datasets/fineweb10B_sp1024"
VAL_SPLIT = 200_000  # a few of the competition's evaluation chunks
TRAIN_FINGERPRINT = "5eb0c3d2a7f19e40"  # not the demo corpus's


def logged_settings(profile: str, settings: dict | None) -> dict[str, str]:
    """Every setting of `profile` as log_header writes it (on the challenge's data, the whole
    validation split), then `settings` written as given (they need not be valid values)."""
    base = profile if profile in train_gpt.PROFILES else "cpu_smoke"
    args = train_gpt.Hyperparameters.from_env({
        "PROFILE": base, "DATA_PATH": CHALLENGE_DATA, "VAL_TOKENS": "0",
        "TOKENIZER_PATH": "./data/tokenizers/fineweb_1024_bpe.model"})
    logged = {f.name.upper(): str(getattr(args, f.name)) for f in dataclasses.fields(args)}
    logged["PROFILE"] = profile
    logged.update({key: str(value) for key, value in (settings or {}).items()})
    return logged


def log_text(run_id: str = "cpu_smoke_seed1337", seed: int = 1337, bpb: float = 1.14,
             loss: float = 1.90, memory_bpb: float | None = 1.20, teacher_bpb: float = 1.10,
             profile: str = "cpu_smoke", complete: bool = True, knn: bool = True,
             total_bytes: int = 300, settings: dict | None = None, code_sha: str = "ab",
             code_bytes: int = 100, teacher_ms: int = 1234, eval_ms: int = 50,
             train_ms: int | None = None, machine: str = "cpu", val_tokens: int = VAL_SPLIT,
             train_fingerprint: str = TRAIN_FINGERPRINT, artifact_sha: str | None = None,
             extra_lines: tuple[str, ...] = ()) -> str:
    """A log of the memory model as train_gpt.py writes it. With `knn` the score mixes in a kNN
    store (KNN_LAMBDA > 0) and the model alone scores `memory_bpb`; without, the score line is
    the model-alone line. `complete=False` ends the log before the score (and `memory_bpb=None`
    before the model-alone line)."""
    logged = logged_settings(profile, {"SEED": seed, "RUN_ID": run_id,
                                       "ARTIFACT_PATH": f"{run_id}.eam",
                                       "KNN_LAMBDA": 0.25 if knn else 0.0, **(settings or {})})
    device, name, world, cuda, flash = MACHINES[machine]
    ttt, writes = logged["TTT_STEPS"], int(logged["EVAL_MEMORY_WRITES"] == "True")
    artifact = logged["ARTIFACT_PATH"]
    sha = artifact_sha or hashlib.sha256(run_id.encode()).hexdigest()
    train_ms = teacher_ms + 200 + 566 if train_ms is None else train_ms
    limit_ms = round(1000 * float(logged["MAX_WALLCLOCK_SECONDS"]))
    targets = val_tokens - 1
    stage = train_gpt.stage_record
    lines = [f"run_id:{run_id} profile:{profile} code_sha256:{code_sha} code_bytes:{code_bytes}",
             f"python:3.11.7 torch:2.13.0 device:{device} device_name:{name} world_size:{world} "
             f"threads:2 attention:sdpa cuda:{cuda} flash_attn:{flash}",
             *(f"setting {key}={value}" for key, value in logged.items()),
             f"{train_gpt.DATA_RECORD} val_tokens:{val_tokens} val_split_tokens:{VAL_SPLIT} "
             f"val_sha256:8864d1ee2043f19f train_shards:1 train_tokens:1105120 "
             f"train_fingerprint:{train_fingerprint}",
             f"{train_gpt.TEACHER_PHASE} step:1 loss:6.9310 lr_mult:0.100 elapsed_ms:12",
             "replicas teacher:identical ranks:1 digest:0123",
             f"{stage('teacher')} time_ms:{teacher_ms} params:1 steps:2 step_ms:617.0 "
             "tokens:8192 train_loss:4.5000",
             "replicas memory:identical ranks:1 digest:4567",
             f"{stage('eam_write')} time_ms:200 context_tokens:262144 context_contexts:45105 "
             "context_pairs:76024 memory_nll:4.3505 unigram_nll:6.0038",
             f"{train_gpt.FIT_RECORD} at:distill context_pairs:76024 dropped_context_pairs:0 "
             "reserve_bytes:25098 fit_ms:273 build_ms:180",
             f"{train_gpt.DISTILL_PHASE} step:1 loss:6.0000 lr_mult:0.200 elapsed_ms:20",
             "replicas student:identical ranks:1 digest:89ab",
             f"{stage('distill')} time_ms:566 params:1 steps:4 loss:5.0000 left_out_share:0.0000",
             f"{train_gpt.FIT_RECORD} at:pack context_pairs:76000 dropped_context_pairs:24 "
             "reserve_bytes:0 fit_ms:289 build_ms:190",
             f"{train_gpt.ARTIFACT_RECORD} code_bytes:{code_bytes} "
             f"model_bytes:{total_bytes - code_bytes} total_bytes:{total_bytes} limit:16000000 "
             f"quant_bits:6 path:{artifact} sha256:{sha}",
             f"{stage('pack')} time_ms:30",
             f"{train_gpt.TRAIN_TIME_RECORD} train_time_ms:{train_ms} limit_ms:{limit_ms} "
             f"within_limit:{int(train_ms <= limit_ms)}",
             f"{train_gpt.COMPONENT_RECORD} name:memory.context_codes raw_bytes:150 "
             "zstd_bytes:120",
             f"{train_gpt.COMPONENT_RECORD} name:encoder raw_bytes:90 zstd_bytes:80",
             "memory_writes pairs:76100 runs:2",
             f"{train_gpt.TTT_RECORD} ttt_time_ms:5 steps:3 params:1 adapts:all lr_scale:0.01"]
    alone = (2.0, memory_bpb) if knn else (loss, bpb)
    if memory_bpb is not None:
        lines.append(f"{train_gpt.MEMORY_RECORD} val_loss:{alone[0]:.8f} val_bpb:{alone[1]:.8f} "
                     f"tokens:{targets}")
    if complete:
        if knn:
            lines.append(f"knn_store entries:{targets} capacity:4000000 bytes:4096")
        lines += [f"{train_gpt.SCORE_RECORD} val_loss:{loss:.8f} val_bpb:{bpb:.8f} "
                  f"eval_time_ms:{eval_ms}",
                  f"{stage('eval')} time_ms:{eval_ms} tokens:{targets} tokens_per_s:2000 "
                  f"knn:{int(knn)} ttt_steps:{ttt} memory_writes:{writes}",
                  f"{train_gpt.EVAL_TIME_RECORD} eval_time_ms:{eval_ms} limit_ms:{limit_ms} "
                  f"within_limit:{int(eval_ms <= limit_ms)}",
                  "memory_writes pairs:76100 runs:2",
                  f"{train_gpt.TTT_RECORD} ttt_time_ms:5 steps:3 params:1 adapts:all "
                  "lr_scale:0.01",
                  f"{train_gpt.PREPACK_RECORD} val_loss:1.99000000 val_bpb:1.19000000 "
                  f"tokens:{targets} eval_time_ms:45",
                  f"{train_gpt.TEACHER_RECORD} val_loss:1.80000000 val_bpb:{teacher_bpb:.8f} "
                  f"tokens:{targets} eval_time_ms:40"]
    lines += extra_lines
    return "\n".join(lines) + "\n"


def write_log(path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(log_text(**kwargs), encoding="utf-8")
    return path


# Three seeds with different nats-per-byte ratios (val_loss / val_bpb), as real runs have.
SEEDS = [(1337, 1.10, 1.10 * 0.70), (42, 1.12, 1.12 * 0.71), (2024, 1.13, 1.13 * 0.69)]


def three_logs(directory: Path) -> list[Path]:
    return [write_log(directory / f"cpu_smoke_seed{seed}.txt", run_id=f"cpu_smoke_seed{seed}",
                      seed=seed, bpb=bpb, loss=loss, total_bytes=300 + i)
            for i, (seed, bpb, loss) in enumerate(SEEDS)]


def line_shapes(text: str) -> dict[str, set[str]]:
    """{line kind: its keys} (settings: their names) of a log, as parse_log reads it."""
    return {kind: set(fields) for kind, fields in runs.parse_log(text).items()}


def test_synthetic_logs_have_a_real_runs_lines_and_keys(pipeline_runs) -> None:
    """The logs every test here builds are the real contract: the tiny real run (no kNN store)
    has exactly the line kinds, keys and settings of log_text(knn=False)."""
    workdir, _ = pipeline_runs
    real = line_shapes((workdir / "logs" / f"{PIPELINE_RUN_ID}.txt").read_text())
    synthetic = line_shapes(log_text(knn=False))
    assert set(synthetic) == set(real)
    for kind in real:
        assert synthetic[kind] == real[kind], kind


# ------------------------------------------------------------------------------------------------
# Log reading (_runs.parse_log)
# ------------------------------------------------------------------------------------------------


def test_read_complete_log(tmp_path: Path) -> None:
    run = runs.read_run("x", write_log(tmp_path / "a.txt"))
    assert run.status == "ok" and run.ok
    assert run.records[train_gpt.stage_record("teacher")]["time_ms"] == "1234"
    assert run.records[train_gpt.ARTIFACT_RECORD]["total_bytes"] == "300"
    assert run.records[runs.HEADER_RECORD]["device_name"] == "x86_64"
    assert run.records[runs.SETTINGS_RECORD]["SEED"] == "1337"
    assert runs.number(run.records, runs.SCORE_RECORD, "val_bpb") == pytest.approx(1.14)
    assert runs.train_time_s(run.records) == pytest.approx((1234 + 200 + 566) / 1000)
    assert runs.eval_time_s(run.records) == pytest.approx(0.05)
    assert runs.stage_times_ms(run.records)["pack"] == 30


def test_times_come_only_from_their_own_lines(tmp_path: Path) -> None:
    """A log without the train_time or eval_time line has no time: a sum of stage times leaves
    out setup and packing, so it is no stand-in."""
    text = "".join(line for line in log_text().splitlines(keepends=True)
                   if not line.startswith((train_gpt.TRAIN_TIME_RECORD + " ",
                                           train_gpt.EVAL_TIME_RECORD + " ")))
    records = runs.parse_log(text)
    assert runs.train_time_s(records) is None and runs.eval_time_s(records) is None
    assert runs.stage_times_ms(records)["teacher"] == 1234


def test_truncated_log_is_incomplete(tmp_path: Path) -> None:
    run = runs.read_run("x", write_log(tmp_path / "a.txt", complete=False))
    assert run.status == "incomplete" and runs.SCORE_RECORD in run.detail
    assert runs.read_run("x", tmp_path / "absent.txt").status == "missing"
    failed = runs.read_run("x", write_log(tmp_path / "b.txt"), returncode=1)
    assert failed.status == "failed" and "1" in failed.detail


def test_env_pairs_and_command() -> None:
    assert runs.parse_env_pairs(["A=1", "B_C=x=y"]) == {"A": "1", "B_C": "x=y"}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        runs.parse_env_pairs(["nonsense"])
    assert runs.training_command(1) == [sys.executable, str(REPO_ROOT / "train_gpt.py")]
    multi = runs.training_command(4)
    assert "--standalone" in multi and "--nproc_per_node=4" in multi
    assert multi[-1].endswith("train_gpt.py")
    assert runs.training_command(8, "python fake.py --x 'a b'") == ["python", "fake.py", "--x",
                                                                    "a b"]


# ------------------------------------------------------------------------------------------------
# Statistics
# ------------------------------------------------------------------------------------------------


def test_statistics_hand_computed() -> None:
    values = [1.0, 1.1, 1.2]
    low, high = submission.t_interval(values)
    half = 4.302652729911275 * 0.1 / math.sqrt(3)  # t_{0.975, 2} times the standard error
    assert (low, high) == (pytest.approx(1.1 - half), pytest.approx(1.1 + half))

    improvements = [0.020, 0.012, 0.016]
    result = submission.one_sided_t_test(improvements, 0.005)
    t = (0.016 - 0.005) / (0.004 / math.sqrt(3))
    assert result["t"] == pytest.approx(t) and result["df"] == 2
    # Student t with 2 degrees of freedom in closed form: P(T > t) = (1 - t / sqrt(t^2 + 2)) / 2.
    assert result["p_value"] == pytest.approx((1 - t / math.sqrt(t * t + 2)) / 2, rel=1e-9)
    below = submission.one_sided_t_test([0.001, 0.004, 0.002], 0.005)
    assert below["t"] < 0 and below["p_value"] > 0.5  # an improvement below the margin
    with warnings.catch_warnings():  # scipy warns that identical values lose precision
        warnings.simplefilter("ignore", RuntimeWarning)
        flat = submission.one_sided_t_test([0.01, 0.01], 0.005)
    assert flat["p_value"] == 0.0 and flat["t"] == math.inf


# ------------------------------------------------------------------------------------------------
# seed_sweep: aggregation
# ------------------------------------------------------------------------------------------------


def aggregate(tmp_path: Path, logs: list[Path], *extra: str) -> tuple[int, dict, str]:
    out_json, out_log = tmp_path / "submission.json", tmp_path / "train_log.txt"
    code = seed_sweep.main(["--logs", *map(str, logs), "--out-json", str(out_json),
                            "--out-log", str(out_log), *extra])
    return code, json.loads(out_json.read_text()), out_log.read_text()


def test_submission_from_three_logs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from scipy import stats

    logs = three_logs(tmp_path / "logs")
    code, doc, train_log = aggregate(tmp_path, logs, "--reference-bpb", "1.2", "--name", "golf",
                                     "--github-id", "someone", "--author", "Some One",
                                     "--blurb", "short", "--date", "2026-05-01")
    assert code == 0
    bpbs = [bpb for _, bpb, _ in SEEDS]
    losses = [loss for _, _, loss in SEEDS]
    # The merged records' fields, in their order, then ours.
    assert list(doc)[:len(submission.REQUIRED_FIELDS)] == list(submission.REQUIRED_FIELDS)
    assert (doc["name"], doc["github_id"], doc["author"], doc["blurb"], doc["date"],
            doc["track"]) == ("golf", "someone", "Some One", "short", "2026-05-01",
                              "non_record_16mb")
    assert doc["val_bpb"] == pytest.approx(sum(bpbs) / 3)
    assert doc["val_bpb_std"] == pytest.approx(stats.tstd(bpbs))
    assert doc["val_loss"] == pytest.approx(sum(losses) / 3)
    assert doc["val_loss_std"] == pytest.approx(stats.tstd(losses))
    assert doc["seeds"] == [1337, 42, 2024]
    assert list(doc["seed_results"]) == ["1337", "42", "2024"]
    assert doc["seed_results"]["42"] == dict(
        doc["seed_results"]["42"], val_bpb=1.12, artifact_bytes=301, steps=2, step_avg_ms=617.0,
        eval_time_s=0.05, train_time_s=2.0, bytes_code=100, bytes_model=201,
        memory_val_bpb=1.2, teacher_val_bpb=1.1, log="cpu_smoke_seed42.txt")
    assert doc["bytes_total"] == 302 and doc["bytes_code"] == 100
    assert doc["hardware"] == "1x CPU x86_64 (2 threads)"
    assert (doc["pytorch_version"], doc["cuda_version"], doc["flash_attn_version"]) == (
        "2.13.0", "none", "none")
    assert doc["technique_summary"].startswith("Teacher GPT 2x128")  # the logged settings
    assert doc["profile"] == "cpu_smoke" and "not a leaderboard score" in doc["note"]
    assert doc["demonstration"] == ("A demonstration, not a leaderboard entry: profile "
                                    "cpu_smoke, not competition; run on 1x CPU x86_64 (2 "
                                    "threads), not 8xH100.")
    assert doc["compliance"] == dict(train_under_600s=True, eval_under_600s=True,
                                     artifact_under_16mb=True, three_seeds=True,
                                     train_time_max_s=2.0, eval_time_max_s=0.05,
                                     artifact_bytes_max=302, eval_knn_store=True,
                                     eval_score_first_ttt=True, eval_memory_writes=True,
                                     full_validation_split=True, trained_from_scratch=True,
                                     real_code_bytes=True, one_configuration=True)
    # improvement_nats = reference_bpb * (loss / bpb) - loss, per seed, each with its own ratio.
    improvements = [1.2 * (loss / bpb) - loss for _, bpb, loss in SEEDS]
    test = doc["statistics"]
    assert test["improvement_nats"] == pytest.approx(improvements)
    expected = stats.ttest_1samp(improvements, 0.005, alternative="greater")
    assert test["t"] == pytest.approx(expected.statistic)
    assert test["p_value"] == pytest.approx(expected.pvalue, rel=1e-9)
    assert test["df"] == 2 and test["significant"] == bool(expected.pvalue < 0.01)
    assert "excluded_runs" not in doc
    for log in logs:
        assert f"===== {log} " in train_log
    assert train_log.count(train_gpt.SCORE_RECORD) == 3
    printed = capsys.readouterr().out
    assert "95% t-interval" in printed and "one-sided t-test" in printed


def test_incomplete_log_is_reported_and_excluded(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    logs = three_logs(tmp_path / "logs")
    write_log(logs[2], seed=2024, complete=False)
    code, doc, train_log = aggregate(tmp_path, logs, "--reference-bpb", "1.2")
    assert code == 1
    printed = capsys.readouterr().out
    assert "incomplete" in printed and "seed 2024 (incomplete)" in printed
    assert doc["seeds"] == [1337, 42]
    assert doc["val_bpb"] == pytest.approx((1.10 + 1.12) / 2)
    assert doc["excluded_runs"][0]["seed"] == 2024
    assert doc["excluded_runs"][0]["status"] == "incomplete"
    assert doc["statistics"]["df"] == 1
    assert f"===== {logs[2]} (seed 2024, incomplete)" in train_log


def test_one_valid_seed_leaves_spread_unavailable(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    log = write_log(tmp_path / "a.txt", profile="competition")
    code, doc, _ = aggregate(tmp_path, [log], "--reference-bpb", "1.2")
    assert code == 0
    assert doc["val_bpb"] == pytest.approx(1.14) and doc["val_bpb_std"] is None
    assert doc["statistics"]["p_value"] is None and "unavailable" in doc["statistics"]
    assert "note" not in doc and doc["compliance"]["three_seeds"] is False
    assert "unavailable" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------
# seed_sweep and ablate: the run path, with a fake trainer
# ------------------------------------------------------------------------------------------------

FAKE_TRAINER = textwrap.dedent('''
    """Stands in for train_gpt.py: writes logs/RUN_ID.txt like the real one, from the env."""
    import os, pathlib, sys
    env = os.environ
    run_id, seed = env["RUN_ID"], int(env.get("SEED", "1337"))
    log = pathlib.Path("logs") / f"{run_id}.txt"
    log.parent.mkdir(exist_ok=True)
    lines = TEMPLATE.format(run_id=run_id, seed=seed, profile=env["PROFILE"],
                            bpb=1.1 + seed / 1e5, xsa=env.get("XSA_LAYERS", "2")).splitlines()
    if env.get("EVAL_ONLY") != "1":  # a training run packs; EVAL_ONLY only reads it
        pathlib.Path(env["ARTIFACT_PATH"]).write_bytes(b"artifact")
    elif not pathlib.Path(env["ARTIFACT_PATH"]).is_file():
        sys.exit(f"ARTIFACT_PATH={env['ARTIFACT_PATH']!r}: no such file")
    with log.open("w") as handle:
        for number, line in enumerate(lines):
            if seed == int(env.get("FAIL_SEED", "-1")) and number == 8:
                print("Traceback: simulated crash", file=sys.stderr)
                sys.exit(3)
            print(line)
            handle.write(line + "\\n")
''')


@pytest.fixture()
def fake_trainer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    template = log_text(run_id="{run_id}", seed=0, profile="{profile}",
                        settings={"XSA_LAYERS": "{xsa}"})
    template = template.replace("SEED=0", "SEED={seed}").replace(
        "val_bpb:1.14000000", "val_bpb:{bpb:.8f}")
    script = tmp_path / "fake_train.py"
    script.write_text(f"TEMPLATE = {template!r}\n" + FAKE_TRAINER, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    return f"{sys.executable} {script}"


def test_seed_sweep_runs_each_seed(tmp_path: Path, fake_trainer: str,
                                   capsys: pytest.CaptureFixture) -> None:
    # A stale complete log of the failing seed must not be mistaken for its result.
    write_log(tmp_path / "logs" / "sweep_seed3.txt", seed=3)
    code = seed_sweep.main(["--command", fake_trainer, "--profile", "cpu_smoke", "--seeds", "1",
                            "2", "3", "--prefix", "sweep", "--env", "FAIL_SEED=3", "--quiet"])
    assert code == 1
    printed = capsys.readouterr().out
    assert "failed (exit status 3" in printed
    doc = json.loads((tmp_path / "submission.json").read_text())
    assert doc["seeds"] == [1, 2]
    assert doc["seed_results"]["2"]["val_bpb"] == pytest.approx(1.1 + 2 / 1e5)
    assert doc["excluded_runs"][0]["seed"] == 3 and doc["excluded_runs"][0]["status"] == "failed"
    for seed in (1, 2, 3):
        assert (tmp_path / f"sweep_seed{seed}.eam").exists()
    assert "Traceback: simulated crash" in (tmp_path / "logs/sweep_seed3.stdout.txt").read_text()
    assert "===== logs/sweep_seed1.txt" in (tmp_path / "train_log.txt").read_text()
    # ... and it is kept, set aside, not deleted.
    kept = list((tmp_path / "logs" / runs.REPLACED_DIR).glob("sweep_seed3.*.txt"))
    assert len(kept) == 1 and "SEED=3" in kept[0].read_text()


def test_set_aside_keeps_every_earlier_file(tmp_path: Path) -> None:
    path = tmp_path / "run.eam"
    assert runs.set_aside(path) is None
    for content in ("first", "second"):
        path.write_text(content)
        os.utime(path, (0, 0))  # the same modification time: the second name must differ
        assert runs.set_aside(path).parent == tmp_path / runs.REPLACED_DIR
    assert not path.exists()
    kept = sorted((tmp_path / runs.REPLACED_DIR).iterdir())
    assert sorted(p.read_text() for p in kept) == ["first", "second"]
    assert all(p.suffix == ".eam" for p in kept)


def test_seed_sweep_rejects_bad_setting_before_running(tmp_path: Path, fake_trainer: str,
                                                       capsys: pytest.CaptureFixture) -> None:
    code = seed_sweep.main(["--command", fake_trainer, "--profile", "cpu_smoke",
                            "--env", "MODEL_DIM=wide", "--quiet"])
    assert code == 2
    assert "MODEL_DIM" in capsys.readouterr().err
    assert not (tmp_path / "logs").exists()


def test_ablate_runs_variants(tmp_path: Path, fake_trainer: str) -> None:
    code = ablate.main(["--command", fake_trainer, "--profile", "cpu_smoke", "--variant", "base",
                        "--variant", "xsa0:XSA_LAYERS=0", "--env", "SEED=7", "--quiet",
                        "--out", "ablation.json"])
    assert code == 0
    doc = json.loads((tmp_path / "ablation.json").read_text())
    assert {row["name"] for row in doc["variants"]} == {"base", "xsa0"}
    xsa0 = next(row for row in doc["variants"] if row["name"] == "xsa0")
    assert xsa0["env"] == {"XSA_LAYERS": "0"} and xsa0["changed_settings"]["XSA_LAYERS"] == "0"
    assert (tmp_path / "logs/ablate_xsa0.txt").exists() and (tmp_path / "ablate_xsa0.eam").exists()


def test_ablate_scores_a_given_artifact_with_eval_only_and_keeps_it(tmp_path: Path,
                                                                     fake_trainer: str) -> None:
    (tmp_path / "shared.eam").write_bytes(b"packed earlier")
    code = ablate.main(["--command", fake_trainer, "--profile", "cpu_smoke", "--env",
                        "EVAL_ONLY=1", "--env", "ARTIFACT_PATH=shared.eam", "--variant",
                        "off:TTT_STEPS=0", "--variant", "on:TTT_STEPS=1", "--quiet"])
    assert code == 0
    assert (tmp_path / "shared.eam").read_bytes() == b"packed earlier"  # neither run removed it
    assert not list(tmp_path.glob("ablate_*.eam"))


# ------------------------------------------------------------------------------------------------
# ablate: collecting
# ------------------------------------------------------------------------------------------------


def test_parse_variant() -> None:
    assert ablate.parse_variant("base") == ("base", {})
    assert ablate.parse_variant("wide:MODEL_DIM=256,NUM_HEADS=8") == (
        "wide", {"MODEL_DIM": "256", "NUM_HEADS": "8"})
    with pytest.raises(ValueError):
        ablate.parse_variant("bad name:X=1")
    with pytest.raises(ValueError):
        ablate.parse_variant("x:NOVALUE")


def test_ablate_collect_only(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    logs = tmp_path / "logs"
    write_log(logs / "ablate_base.txt", bpb=1.30, memory_bpb=1.35)
    write_log(logs / "ablate_xsa0.txt", bpb=1.25, memory_bpb=1.31, settings={"XSA_LAYERS": 0})
    write_log(logs / "ablate_noknn.txt", knn=False, bpb=1.28)
    write_log(logs / "ablate_broken.txt", memory_bpb=None, complete=False)
    # The built-in baseline logs its own lines; they fill the same columns.
    baseline = log_text(bpb=1.27, memory_bpb=1.29, settings={"MODEL": "transformer"})
    for eam, own in zip(train_gpt.SCORE_RECORDS["eam"], train_gpt.SCORE_RECORDS["transformer"],
                        strict=True):
        baseline = baseline.replace(f"{eam} ", f"{own} ")
    (logs / "ablate_transformer.txt").write_text(baseline, encoding="utf-8")
    variants = tmp_path / "variants.json"
    variants.write_text(json.dumps({"base": {}, "xsa0": {"XSA_LAYERS": 0}, "noknn":
                                    {"KNN_LAMBDA": 0}, "broken": {},
                                    "transformer": {"MODEL": "transformer"}}))
    out = tmp_path / "ablation.json"
    code = ablate.main(["--collect-only", "--variants-json", str(variants), "--logs-dir",
                        str(logs), "--out", str(out), "--plot", str(tmp_path / "a.png")])
    assert code == 1  # 'broken' never reached its memory score
    captured = capsys.readouterr()
    table = [line for line in captured.out.splitlines() if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in table[1:]] == [
        "xsa0", "transformer", "base", "noknn", "broken"]
    assert "| 1.2500 |" in table[1] and "XSA_LAYERS=0" in table[1]
    transformer = [cell.strip() for cell in table[2].split("|")]
    assert transformer[2:8] == ["transformer", "ok", "1.1000", "1.1900", "1.2900", "1.2700"]
    noknn = table[4].split("|")
    assert noknn[6].strip() == "1.2800" and noknn[7].strip() == "-"
    doc = json.loads(out.read_text())
    assert [row["name"] for row in doc["variants"]] == ["xsa0", "transformer", "base", "noknn",
                                                        "broken"]
    assert doc["variants"][0]["knn_bpb"] == pytest.approx(1.25)
    assert doc["variants"][0]["teacher_bpb"] == pytest.approx(1.10)
    assert doc["variants"][0]["stage_time_ms"]["teacher"] == 1234
    assert doc["variants"][3]["knn_bpb"] is None and doc["variants"][4]["status"] == "incomplete"
    if importlib.util.find_spec("matplotlib") is None:
        assert "matplotlib is not installed" in captured.err
    # Without variants, --collect-only finds every ablate_*.txt in the directory.
    assert ablate.main(["--collect-only", "--logs-dir", str(logs), "--out", str(out)]) == 1
    assert len(json.loads(out.read_text())["variants"]) == 5


# ------------------------------------------------------------------------------------------------
# size_audit
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    args, model = tiny_student()
    return write_artifact(tmp_path_factory.mktemp("artifact") / "tiny.eam", args, model)


CODE = str(REPO_ROOT / "train_gpt.py")


def test_size_audit_fits(tiny_artifact: Path, capsys: pytest.CaptureFixture) -> None:
    assert size_audit.main(["--code", CODE, "--artifact", str(tiny_artifact)]) == 0
    out = capsys.readouterr().out
    assert "memory.context_codes" in out and "margin" in out and "OK: fits" in out
    assert size_audit.main(["--code", CODE, "--artifact", str(tiny_artifact), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    code_bytes = Path(CODE).stat().st_size
    assert result["code_bytes"] == code_bytes
    assert result["model_bytes"] == tiny_artifact.stat().st_size
    assert result["total_bytes"] == code_bytes + result["model_bytes"]
    assert result["margin"] == 16_000_000 - result["total_bytes"] and result["fits"] is True
    groups = {c["group"] for c in result["components"]}
    assert {"memory.context_codes", "memory.context_counts", "encoder", "decoder"} <= groups


def test_size_audit_over_limit(tiny_artifact: Path, capsys: pytest.CaptureFixture) -> None:
    assert size_audit.main(["--code", CODE, "--artifact", str(tiny_artifact),
                            "--limit", "1000"]) == 1
    assert "OVER the limit" in capsys.readouterr().out


def test_size_audit_plans_the_settings_weights_before_training(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """--plan packs Gaussian weights of the shapes the environment's settings ship: a little
    under their widths (int6 codes of Gaussian rows hold ~5.5 bits), smaller at QUANT_BITS=5,
    and exit 1 where they would not fit beside the code."""
    for name, value in dict(PROFILE="cpu_smoke", MODEL="transformer").items():
        monkeypatch.setenv(name, value)
    assert size_audit.main(["--plan", "--code", CODE, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert 0.85 * result["width_bytes"] < result["gaussian_bytes"] < result["width_bytes"]
    assert result["margin"] == (result["limit"] - result["code_bytes"] - result["gaussian_bytes"])
    assert result["fewest_bits"] == train_gpt.LOWEST_QUANT_BITS  # the baseline's fall back
    monkeypatch.setenv("QUANT_BITS", "5")
    assert size_audit.main(["--plan", "--code", CODE, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["gaussian_bytes"] < result["gaussian_bytes"]
    monkeypatch.setenv("SIZE_LIMIT", str(result["code_bytes"] + result["smallest_bytes"]))
    assert size_audit.main(["--plan", "--code", CODE]) == 1
    assert "OVER by" in capsys.readouterr().out


def test_size_audit_fits_the_counted_memory_under_the_limit(
        capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, demo_data: Path) -> None:
    """--fit (once tools/bench_pack) on the demo data: it counts, fits under a binding limit
    and reports the times."""
    limit = (REPO_ROOT / "train_gpt.py").stat().st_size + 400_000
    for name, value in {"PROFILE": "cpu_smoke", "DATA_PATH": str(demo_data),
                        "TOKENIZER_PATH": str(demo_data / "tokenizer.model"),
                        "EAM_CONTEXT_TOKENS": "65536", "SIZE_LIMIT": str(limit)}.items():
        monkeypatch.setenv(name, value)
    assert size_audit.main(["--fit", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens_counted"] >= 65536 and result["limit"] == limit
    assert 0 < result["pairs_kept"] < result["pairs_counted"]  # the limit binds
    assert result["code_bytes"] + result["artifact_bytes"] <= limit and result["fits"]
    assert result["fit_s"] > 0 and result["pack_s"] > 0
    assert size_audit.fit_text(result).count("\n") == 2
    monkeypatch.setenv("MODEL", "transformer")
    assert size_audit.main(["--fit"]) == 2
    assert "no memory to fit" in capsys.readouterr().err


def test_size_audit_unreadable(tiny_artifact: Path, tmp_path: Path,
                               capsys: pytest.CaptureFixture) -> None:
    corrupted = tmp_path / "corrupted.eam"
    data = bytearray(tiny_artifact.read_bytes())
    data[-10] ^= 0xFF
    corrupted.write_bytes(bytes(data))
    assert size_audit.main(["--code", CODE, "--artifact", str(corrupted)]) == 2
    err = capsys.readouterr().err
    assert str(corrupted) in err and "checksum" in err

    foreign = tmp_path / "foreign.bin"
    foreign.write_bytes(b"PK\x03\x04" + bytes(100))
    assert size_audit.main(["--code", CODE, "--artifact", str(foreign), "--json"]) == 2
    captured = capsys.readouterr()
    assert str(foreign) in captured.err and "not an eam-golf artifact" in captured.err
    assert "error" in json.loads(captured.out)

    assert size_audit.main(["--code", CODE, "--artifact", str(tmp_path / "nope.eam")]) == 2
    assert "nope.eam" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# make_record and check_record: a pull request's folder, from consistent fake runs
# ------------------------------------------------------------------------------------------------

LIMIT = 16_000_000
STAND_IN_CODE = "print('a stand-in for train_gpt.py')\n" * 40


def fake_sweep(root: Path, model_bytes: dict[int, int] | None = None,
               seeds: list[tuple[int, float, float]] = SEEDS, **common) -> dict:
    """A code file, one artifact per seed and logs whose sha256s and sizes are the files' own.

    `model_bytes` gives a seed's artifact size (a sparse file, so 16 MB costs nothing); `common`
    goes to every log (log_text's arguments). Returns the paths and each seed's log arguments
    (`kwargs`), with which a test writes that seed's log again, changed."""
    code = root / "code" / "train_gpt.py"
    code.parent.mkdir(parents=True)
    code.write_text(STAND_IN_CODE, encoding="utf-8")
    code_bytes, sha = code.stat().st_size, hashlib.sha256(code.read_bytes()).hexdigest()
    run_dir = root / "run"
    logs, kwargs = [], {}
    prefix = common.get("profile", "cpu_smoke")
    for i, (seed, bpb, loss) in enumerate(seeds):
        size = (model_bytes or {}).get(seed, 1000 + i)
        artifact = run_dir / f"{prefix}_seed{seed}.eam"
        artifact.parent.mkdir(parents=True, exist_ok=True)
        with artifact.open("wb") as handle:
            handle.truncate(size)
        kwargs[seed] = dict(run_id=artifact.stem, seed=seed, bpb=bpb, loss=loss, code_sha=sha,
                            code_bytes=code_bytes, total_bytes=code_bytes + size,
                            artifact_sha=check_record.sha256_file(artifact), **common)
        logs.append(write_log(run_dir / "logs" / f"{artifact.stem}.txt", **kwargs[seed]))
    return dict(code=code, run_dir=run_dir, logs=logs, kwargs=kwargs)


def assemble(root: Path, sweep: dict, *extra: str, logs: list[Path] | None = None,
             code: Path | None = None) -> tuple[int, Path | None]:
    out = root / "records"
    status = make_record.main([
        "--logs", *map(str, logs or sweep["logs"]), "--code", str(code or sweep["code"]),
        "--run-dir", str(sweep["run_dir"]), "--out", str(out), "--author", "Some One",
        "--github-id", "someone", "--name", "Context memory test", "--date", "2026-05-01",
        *extra])
    folders = sorted(out.glob("track_*/*"))
    return status, folders[0] if folders else None


def check(folder: Path, run_dir: Path, capsys: pytest.CaptureFixture,
          *extra: str) -> tuple[int, str]:
    capsys.readouterr()
    status = check_record.main([str(folder), "--run-dir", str(run_dir), *extra])
    return status, capsys.readouterr().out


def failures(out: str) -> list[str]:
    return [line.strip() for line in out.splitlines() if line.startswith("  ")]


def notes(out: str) -> list[str]:
    return [line[len("note: "):] for line in out.splitlines() if line.startswith("note: ")]


@pytest.fixture(scope="module")
def good_record(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One folder assembled from three consistent runs (the failure tests copy and break it)."""
    root = tmp_path_factory.mktemp("record")
    sweep = fake_sweep(root)
    status, folder = assemble(root, sweep, "--reference-bpb", "1.2")
    return dict(sweep, status=status, folder=folder, root=root)


@pytest.fixture(scope="module")
def record_track(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A record-track folder from three consistent runs of the competition profile on 8xH100,
    the whole validation split of the challenge's data scored, 0.05 nats ahead of 1.2 bpb."""
    root = tmp_path_factory.mktemp("record_track")
    sweep = fake_sweep(root, profile="competition", machine="h100")
    status, folder = assemble(root, sweep, "--reference-bpb", "1.2", "--track", "10min_16mb")
    return dict(sweep, status=status, folder=folder, root=root)


def copy_of(record: dict, tmp_path: Path) -> Path:
    """The good folder, copied to the same place under tmp_path (track folder and name kept)."""
    folder = record["folder"]
    target = tmp_path / folder.parent.name / folder.name
    shutil.copytree(folder, target)
    return target


def regenerate(folder: Path) -> None:
    """What an author does after editing a log: submission.json computed again from the
    folder's logs, their own fields kept."""
    path = folder / "submission.json"
    document = json.loads(path.read_text())
    results = submission.read_results(submission.folder_logs(folder))
    test = document.get("statistics") or {}
    stats = submission.statistics([r for r in results if r.run.ok], test.get("reference_bpb"))
    submission.write_json(submission.build_submission(results, stats, {
        key: document.get(key) for key in check_record.AUTHOR_FIELDS}), path)


def rewrite(record: dict, folder: Path, seeds: list[int] | None = None, **changes) -> None:
    """The seeds' logs (all by default) as the runs would have written them with `changes`,
    then submission.json regenerated."""
    for seed in seeds or list(record["kwargs"]):
        write_log(folder / submission.seed_log_name(seed), **{**record["kwargs"][seed],
                                                              **changes})
    regenerate(folder)


def edit(folder: Path, seed: int, change) -> None:
    """One log edited by hand (change: its text -> the new text), then submission.json
    regenerated."""
    path = folder / submission.seed_log_name(seed)
    path.write_text(change(path.read_text()))
    regenerate(folder)


def without(kind: str):
    return lambda text: "".join(line for line in text.splitlines(keepends=True)
                                if line.split()[:1] != [kind])


def test_record_folder_in_the_challenges_conventions(good_record: dict,
                                                     capsys: pytest.CaptureFixture) -> None:
    folder, sweep = good_record["folder"], good_record
    assert good_record["status"] == 0
    assert folder.parent.name == "track_non_record_16mb"
    assert folder.name == "2026-05-01_context_memory_cpu_smoke"
    names = {path.name for path in folder.iterdir()}
    assert names == {"README.md", "submission.json", "train_gpt.py", "requirements.txt",
                     "train_seed42.log", "train_seed1337.log", "train_seed2024.log",
                     *(name for name, _ in plots.PLOTS.values())}
    assert (folder / "train_gpt.py").read_bytes() == sweep["code"].read_bytes()
    for log in sweep["logs"]:
        seed = int(log.stem.rsplit("seed", 1)[1])
        assert (folder / f"train_seed{seed}.log").read_text() == log.read_text()
    for name, _ in plots.PLOTS.values():
        assert (folder / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads((folder / "submission.json").read_text())
    assert all(doc[key] not in (None, "", [], {}) for key in submission.REQUIRED_FIELDS)
    assert doc["seeds"] == [42, 1337, 2024]  # the folder's order: by seed
    assert set(doc["seed_results"]) == {"42", "1337", "2024"}
    assert doc["val_bpb"] == pytest.approx(sum(bpb for _, bpb, _ in SEEDS) / 3)
    assert doc["statistics"]["reference_bpb"] == 1.2
    assert doc["seed_results"]["1337"]["log"] == "train_seed1337.log"
    readme = (folder / "README.md").read_text()
    for text in ("## Results", "## Method", "## Legality", "C1", "C4", "## Rule compliance",
                 "## Reproduction", "## Size", "## Credits/Lineage", train_gpt.SCORE_RECORD,
                 "total_bytes", "SEED=$SEED", "for SEED in 42 1337 2024",
                 hashlib.sha256(sweep["code"].read_bytes()).hexdigest(), doc["demonstration"],
                 "Against the reference val_bpb 1.2 given with `--reference-bpb`",
                 *(f"]({name})" for name, _ in plots.PLOTS.values())):
        assert text in readme, text
    assert "{{" not in readme and "Elastic" not in readme and "the record's" not in readme
    requirements = (folder / "requirements.txt").read_text()
    assert "torch" in requirements and "zstandard" in requirements
    assert "scipy" not in requirements and "none" in requirements  # tools-only; logged CUDA
    status, out = check(folder, sweep["run_dir"], capsys)
    assert status == 0 and "PASS" in out and "not found" not in out
    assert notes(out) == ["a demonstration, not a leaderboard entry: profile cpu_smoke, not "
                          "competition; run on 1x CPU x86_64 (2 threads), not 8xH100"]


def test_a_record_track_folder_from_three_honest_runs_passes(
        record_track: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = record_track["folder"]
    assert record_track["status"] == 0 and folder.parent.name == "track_10min_16mb"
    doc = json.loads((folder / "submission.json").read_text())
    assert doc["demonstration"] is None and "note" not in doc
    assert doc["hardware"] == "8xNVIDIA H100 80GB HBM3" and doc["statistics"]["significant"]
    assert all(value is True for key, value in doc["compliance"].items()
               if not key.endswith(("_s", "_max")))
    readme = (folder / "README.md").read_text()
    assert "demonstration" not in readme and "cached_challenge_fineweb.py --variant sp1024" in (
        readme)
    status, out = check(folder, record_track["run_dir"], capsys, "--reference-bpb", "1.2")
    assert status == 0 and notes(out) == [], out
    # A folder that calls itself a demonstration is no entry for the record track.
    copied = copy_of(record_track, tmp_path)
    path = copied / "submission.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "demonstration": "A demo."}))
    status, out = check(copied, record_track["run_dir"], capsys, "--reference-bpb", "1.2")
    assert status == 1 and failures(out) == [
        "1. track 10min_16mb takes entries, but submission.json says: A demo.",
        "2. README.md does not say what submission.json's `demonstration` says"]


def test_check_fails_one_byte_over(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code_bytes = len(STAND_IN_CODE)
    sweep = fake_sweep(tmp_path, model_bytes={1337: LIMIT - code_bytes,  # exactly the limit
                                              42: LIMIT + 1 - code_bytes})
    status, folder = assemble(tmp_path, sweep)
    assert status == 1 and folder is not None
    status, out = check(folder, sweep["run_dir"], capsys)
    assert status == 1
    assert failures(out) == ["1. train_seed42.log: logged total_bytes 16,000,001 is over the "
                             "limit 16,000,000 by 1 byte(s)"]
    doc = json.loads((folder / "submission.json").read_text())
    assert doc["compliance"]["artifact_under_16mb"] is False


def test_check_fails_when_the_code_differs_from_the_logged_sha(
        good_record: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # make_record refuses to ship another train_gpt.py than the one that ran: nothing is written.
    edited = tmp_path / "train_gpt.py"
    edited.write_bytes(good_record["code"].read_bytes() + b"\n")
    status, folder = assemble(tmp_path, good_record, code=edited)
    assert status == 2 and folder is None
    assert "the logs ran" in capsys.readouterr().err
    # A folder whose copy was edited afterwards fails the check, naming both facts.
    folder = copy_of(good_record, tmp_path)
    with (folder / "train_gpt.py").open("a") as handle:
        handle.write("# one more line\n")
    status, out = check(folder, good_record["run_dir"], capsys)
    assert status == 1
    problems = failures(out)
    assert sum("not the code that ran" in p for p in problems) == 3
    assert sum("logged code_bytes" in p and "train_gpt.py has" in p for p in problems) == 3


def test_make_record_refuses_broken_runs_and_existing_folders(
        good_record: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    status, _ = assemble(good_record["root"], good_record)
    assert status == 2 and "exists" in capsys.readouterr().err
    sweep = fake_sweep(tmp_path)
    write_log(sweep["logs"][1], seed=42, complete=False)
    status, folder = assemble(tmp_path, sweep)
    assert status == 2 and folder is None
    assert f"cpu_smoke_seed42.txt (incomplete: no {train_gpt.SCORE_RECORD} line)" in (
        capsys.readouterr().err)
    status, folder = assemble(tmp_path, sweep, logs=[sweep["logs"][0], sweep["logs"][0]])
    assert status == 2 and "[1337, 1337]" in capsys.readouterr().err


def test_make_record_needs_the_author_named(good_record: dict, tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    """--author and --github-id come from the command line, never from git config."""
    for missing in ("--author", "--github-id"):
        argv = ["--logs", *map(str, good_record["logs"]), "--out", str(tmp_path),
                "--author", "Some One", "--github-id", "someone"]
        at = argv.index(missing)
        with pytest.raises(SystemExit) as raised:
            make_record.main(argv[:at] + argv[at + 2:])
        assert raised.value.code == 2 and missing in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_check_fails_when_a_seed_is_missing(good_record: dict, tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    # Assembled from two seeds: the folder is written, and the check says what is missing.
    sweep = fake_sweep(tmp_path / "two", seeds=SEEDS[:2])
    status, folder = assemble(tmp_path / "two", sweep)
    assert status == 1 and folder is not None
    status, out = check(folder, sweep["run_dir"], capsys)
    assert status == 1
    assert failures(out) == ["1. 3 seeds are needed, the logs have 2 complete: [42, 1337]"]
    # A seed's log removed from a good folder: the count and every number built from it fail.
    folder = copy_of(good_record, tmp_path)
    (folder / "train_seed2024.log").unlink()
    status, out = check(folder, good_record["run_dir"], capsys)
    problems = failures(out)
    assert status == 1
    assert any("seed 2024 is in submission.json but train_seed2024.log is missing" in p
               for p in problems)
    assert any("3 seeds are needed" in p for p in problems)
    assert any(p.startswith(tuple(f"{i}. submission.json val_bpb is" for i in range(1, 20)))
               for p in problems)


def test_check_recomputes_fields_and_statistics(good_record: dict, tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    folder = copy_of(good_record, tmp_path)
    path = folder / "submission.json"
    doc = json.loads(path.read_text())
    doc["val_bpb"] -= 0.01
    doc["seed_results"]["42"]["artifact_bytes"] = 1
    doc["statistics"]["p_value"] = 0.001
    doc["compliance"]["three_seeds"] = "yes"
    doc["github_id"] = ""
    del doc["author"], doc["seed_results"]["1337"]["eval_time_s"]
    path.write_text(json.dumps(doc))
    status, out = check(folder, good_record["run_dir"], capsys)
    assert status == 1
    text = "\n".join(failures(out))
    assert "missing or empty field(s) ['author', 'github_id']" in text
    assert "seed_results['1337']: missing ['eval_time_s']" in text
    for where in ("val_bpb", "seed_results.42.artifact_bytes", "statistics.p_value",
                  "compliance.three_seeds"):
        assert f"submission.json {where} is" in text, where
    assert len(failures(out)) == 6


def test_check_fails_on_place_and_track(good_record: dict, tmp_path: Path,
                                        capsys: pytest.CaptureFixture) -> None:
    misplaced = tmp_path / "records" / "my_entry"
    shutil.copytree(good_record["folder"], misplaced)
    status, out = check(misplaced, good_record["run_dir"], capsys)
    assert status == 1
    assert any("expected YYYY-MM-DD_Description" in p for p in failures(out))
    assert any("records/track_non_record_16mb/" in p for p in failures(out))
    # The record track wants the competition profile on 8xH100 (and a significant test).
    folder = copy_of(good_record, tmp_path / "t")
    moved = tmp_path / "t" / "track_10min_16mb" / folder.name
    moved.parent.mkdir()
    shutil.move(folder, moved)
    doc = json.loads((moved / "submission.json").read_text())
    doc["track"], doc["demonstration"] = "10min_16mb", None  # no longer calling itself one
    (moved / "submission.json").write_text(json.dumps(doc))
    status, out = check(moved, good_record["run_dir"], capsys, "--reference-bpb", "1.2")
    assert status == 1
    assert failures(out) == ["1. track 10min_16mb needs the competition profile on 8xH100; the "
                             "logs ran ['cpu_smoke'] on 1x CPU x86_64 (2 threads)"]


def test_record_track_takes_its_reference_from_the_command_line(
        record_track: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The reference score of the significance test is the current record's val_bpb the
    reviewer gives, never the one the folder's submission.json tested against."""
    folder, run_dir = record_track["folder"], record_track["run_dir"]
    status, out = check(folder, run_dir, capsys)
    assert status == 1 and failures(out) == [
        "1. track 10min_16mb: give the current record's val_bpb with --reference-bpb (the "
        "significance test never takes its reference from the folder's submission.json)"]
    # A record of 1.14 bpb is not beaten by these runs (1.10-1.13 bpb, 0.07-0.02 nats ahead).
    status, out = check(folder, run_dir, capsys, "--reference-bpb", "1.14")
    problems = failures(out)
    assert status == 1 and len(problems) == 2
    assert problems[0].startswith("1. track 10min_16mb needs an improvement of 0.005 nats at "
                                  "p < 0.01: improvement over --reference-bpb 1.14:")
    assert problems[1] == ("2. submission.json tests against reference_bpb 1.2, not the "
                           "current record's 1.14 (--reference-bpb)")
    # An author who makes the folder test against an easier reference fails just the same.
    copied = copy_of(record_track, tmp_path)
    path = copied / "submission.json"
    doc = json.loads(path.read_text())
    del doc["statistics"]
    path.write_text(json.dumps(doc))
    status, out = check(copied, run_dir, capsys, "--reference-bpb", "1.2")
    assert status == 1 and failures(out) == [
        "1. submission.json tests against reference_bpb None, not the current record's 1.2 "
        "(--reference-bpb)"]


def test_check_validation_split_scored_whole(good_record: dict, record_track: dict,
                                             tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    """Runs with VAL_TOKENS scored a part of the validation split: a failure on the record
    track, a demonstration elsewhere; a log without the data line is incomplete."""
    part = dict(val_tokens=4096, settings={"VAL_TOKENS": 4096})
    folder = copy_of(record_track, tmp_path / "record")
    rewrite(record_track, folder, **part)
    status, out = check(folder, record_track["run_dir"], capsys, "--reference-bpb", "1.2")
    assert status == 1 and failures(out) == [
        f"{i}. train_seed{seed}.log: track 10min_16mb scores the whole validation split: "
        f"VAL_TOKENS=4096; 4,096 of the validation split's {VAL_SPLIT:,} tokens scored"
        for i, seed in enumerate((42, 1337, 2024), 1)]
    sweep = fake_sweep(tmp_path / "other", **part)
    status, folder = assemble(tmp_path / "other", sweep)
    assert status == 0 and folder is not None
    status, out = check(folder, sweep["run_dir"], capsys)
    assert status == 0 and "4,096 of the validation split's" in notes(out)[0]
    # A folder whose logs were swapped for such runs, its statement left as it was, fails.
    folder = copy_of(good_record, tmp_path / "stale")
    rewrite(good_record, folder, **part)
    status, out = check(folder, good_record["run_dir"], capsys)
    assert status == 1 and failures(out) == [
        "1. submission.json's `demonstration` does not say what makes the runs a "
        f"demonstration: VAL_TOKENS=4096; 4,096 of the validation split's {VAL_SPLIT:,} tokens "
        "scored"]
    folder = copy_of(good_record, tmp_path / "no_data")
    edit(folder, 42, without(train_gpt.DATA_RECORD))
    status, out = check(folder, good_record["run_dir"], capsys)
    assert status == 1
    assert "1. train_seed42.log: no `data` line: the log is incomplete" in failures(out)


def test_check_seeds_are_one_configuration(good_record: dict, tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    """A seed whose settings, code, data or hardware differ from the others' fails."""
    for name, changes, expected in (
            ("settings", dict(settings={"TTT_LR_SCALE": 0.02}),
             "settings differ between the seeds' runs: TTT_LR_SCALE (train_seed42.log: 0.01, "
             "train_seed1337.log: 0.02, train_seed2024.log: 0.01)"),
            ("data", dict(train_fingerprint="0123456789abcdef"),
             "the training data differs between the seeds' runs (train_fingerprint: "
             f"train_seed42.log: {TRAIN_FINGERPRINT}, train_seed1337.log: 0123456789abcdef, "
             f"train_seed2024.log: {TRAIN_FINGERPRINT})"),
            ("hardware", dict(machine="h100"), "the hardware differs between the seeds' runs "
             "(device_name: train_seed42.log: x86_64, train_seed1337.log: "
             "NVIDIA_H100_80GB_HBM3, train_seed2024.log: x86_64)"),
            ("code", dict(code_sha="c0de"), "the code differs between the seeds' runs")):
        folder = copy_of(good_record, tmp_path / name)
        rewrite(good_record, folder, [1337], **changes)
        status, out = check(folder, good_record["run_dir"], capsys)
        assert status == 1
        assert any(expected in problem for problem in failures(out)), (name, out)
        doc = json.loads((folder / "submission.json").read_text())
        assert doc["compliance"]["one_configuration"] is False


def test_check_refuses_one_run_filed_as_two_seeds(good_record: dict, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    # Seed 1337's log copied over seed 42's, its SEED setting edited: the same run and artifact.
    folder = copy_of(good_record, tmp_path / "relabelled")
    text = (folder / "train_seed1337.log").read_text()
    (folder / "train_seed42.log").write_text(text.replace("setting SEED=1337",
                                                          "setting SEED=42"))
    regenerate(folder)
    status, out = check(folder, good_record["run_dir"], capsys)
    problems = "\n".join(failures(out))
    assert status == 1
    assert ("train_seed42.log and train_seed1337.log log the same run_id cpu_smoke_seed1337: "
            "one run filed twice") in problems
    assert "log the same artifact sha256" in problems
    assert ("train_seed42.log: run_id cpu_smoke_seed1337 names seed 1337, but its SEED "
            "setting is 42") in problems
    # Copied unedited: the file name claims a seed its log does not have.
    folder = copy_of(good_record, tmp_path / "renamed")
    shutil.copyfile(folder / "train_seed1337.log", folder / "train_seed42.log")
    regenerate(folder)
    status, out = check(folder, good_record["run_dir"], capsys)
    problems = "\n".join(failures(out))
    assert status == 1
    assert "train_seed42.log: filed as seed 42, but its SEED setting is 1337" in problems
    assert "seed(s) [1337] appear in more than one log" in problems


def test_check_refuses_incomplete_or_ambiguous_logs(good_record: dict, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    score = train_gpt.SCORE_RECORD
    second = f"{score} val_loss:0.70000000 val_bpb:1.00000000 eval_time_ms:50\n"
    eval_stage = train_gpt.stage_record("eval")
    for name, change, expected in (
            ("appended score", lambda text: text + second,
             f"train_seed42.log: 2 `{score}` lines: ambiguous"),
            ("no train_time", without(train_gpt.TRAIN_TIME_RECORD),
             "train_seed42.log: no `train_time` line: the log is incomplete"),
            ("no eval_time", without(train_gpt.EVAL_TIME_RECORD),
             "train_seed42.log: no `eval_time` line: the log is incomplete"),
            ("knn flag", lambda text: text.replace(" knn:1 ", " knn:0 "),
             f"train_seed42.log: `{eval_stage}` has knn:0, but its settings give 1"),
            ("ttt flag", lambda text: text.replace(" ttt_steps:1 ", " ttt_steps:2 "),
             f"train_seed42.log: `{eval_stage}` has ttt_steps:2, but its settings give 1"),
            ("writes flag", lambda text: text.replace("setting EVAL_MEMORY_WRITES=True",
                                                      "setting EVAL_MEMORY_WRITES=False"),
             f"train_seed42.log: `{eval_stage}` has memory_writes:1, but its settings give 0"),
            ("setting twice", lambda text: text + "setting KNN_LAMBDA=0.5\n",
             "train_seed42.log: setting(s) ['KNN_LAMBDA'] logged more than once"),
            ("error", lambda text: text + "error rank:1 type:RuntimeError\n",
             "train_seed42.log: the run logged an error")):
        folder = copy_of(good_record, tmp_path / name.replace(" ", "_"))
        edit(folder, 42, change)
        status, out = check(folder, good_record["run_dir"], capsys)
        assert status == 1
        assert any(expected in problem for problem in failures(out)), (name, out)
    # Without a kNN store the score is the model alone: a score line that says otherwise fails.
    folder = copy_of(good_record, tmp_path / "no_knn")
    rewrite(good_record, folder, knn=False)
    assert check(folder, good_record["run_dir"], capsys)[0] == 0
    edit(folder, 42, lambda text: re.sub(rf"^{score} val_loss:\S+", f"{score} val_loss:0.50",
                                         text, flags=re.M))
    status, out = check(folder, good_record["run_dir"], capsys)
    assert status == 1 and any(
        f"without a kNN store the score is the model alone, but `{score}` has val_loss 0.5" in p
        for p in failures(out))


def test_check_refuses_a_pretrained_start_and_a_code_stand_in(
        good_record: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The challenge trains from scratch inside 600 s and counts the real code's bytes."""
    folder = copy_of(good_record, tmp_path / "checkpoint")
    rewrite(good_record, folder, settings={"INIT_CHECKPOINT": "checkpoints/teacher.pt"})
    status, out = check(folder, good_record["run_dir"], capsys)
    assert status == 1 and sum("INIT_CHECKPOINT=checkpoints/teacher.pt started from a "
                               "pretrained teacher" in p for p in failures(out)) == 3
    folder = copy_of(good_record, tmp_path / "stand_in")
    rewrite(good_record, folder, settings={"SIZE_CODE_BYTES": 90_000})
    status, out = check(folder, good_record["run_dir"], capsys)
    assert status == 1 and sum("SIZE_CODE_BYTES=90000 counted a stand-in" in p
                               for p in failures(out)) == 3
    doc = json.loads((folder / "submission.json").read_text())
    assert doc["compliance"]["real_code_bytes"] is False


def test_check_notes_home_paths_and_secrets(good_record: dict, tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    folder = copy_of(good_record, tmp_path)
    token = "hf_" + "aB3" * 12
    with (folder / "README.md").open("a") as handle:
        handle.write(f"\nRun from /home/alice/golf with HF_TOKEN={token}; see ~/notes.txt\n")
    edit(folder, 42, lambda text: text + "AKIAABCDEFGHIJKLMNOP\n")
    status, out = check(folder, good_record["run_dir"], capsys)
    found = [note for note in notes(out) if "demonstration" not in note]
    assert status == 0 and len(found) == 4, out  # notes, not failures
    assert any("a home-folder path (/home/alice/golf)" in n for n in found)
    assert any("a home-folder path (~/notes.txt)" in n for n in found)
    assert any("a Hugging Face token (hf_aB3...)" in n for n in found)
    assert any(n.startswith("train_seed42.log:") and "an AWS access key id" in n for n in found)
    assert token not in out


def test_make_record_refuses_the_demo_corpus_unless_a_demonstration(
        tmp_path: Path, demo_data: Path, capsys: pytest.CaptureFixture) -> None:
    """Runs on the demo corpus (named by DATA_PATH, or found by the data line's fingerprint)
    make a folder only with --demonstration, and then it says so."""
    sweep = fake_sweep(tmp_path / "named", settings={"DATA_PATH": "./data/demo_sp1024"})
    status, folder = assemble(tmp_path / "named", sweep)
    assert status == 2 and folder is None
    assert "DATA_PATH=./data/demo_sp1024 is the demo corpus" in capsys.readouterr().err
    status, folder = assemble(tmp_path / "named", sweep, "--demonstration")
    assert status == 0 and folder is not None
    doc = json.loads((folder / "submission.json").read_text())
    assert "DATA_PATH=./data/demo_sp1024 is the demo corpus" in doc["demonstration"]
    assert doc["demonstration"] in (folder / "README.md").read_text()
    fingerprint = train_gpt.data_fingerprint(train_gpt.shard_paths(str(demo_data), "train"))
    sweep = fake_sweep(tmp_path / "found", train_fingerprint=fingerprint)
    (sweep["run_dir"] / "data").mkdir()
    (sweep["run_dir"] / train_gpt.DEMO_DATA).symlink_to(demo_data)
    status, folder = assemble(tmp_path / "found", sweep)
    assert status == 2 and f"train_fingerprint {fingerprint}) is the demo corpus" in (
        capsys.readouterr().err)


def test_the_readme_template_fills_every_name(tmp_path: Path) -> None:
    render = make_record.render_template
    template = ("a {{x}}\n{{#on}}\nkept {{x}}\n{{/on}}\n{{^on}}\ndropped\n{{/on}}\n"
                "b{{#off}}, no{{/off}}\n")
    assert render(template, dict(x=1, on=True, off=False)) == "a 1\nkept 1\nb\n"
    assert render(template, dict(x=1, on=False, off="yes")) == "a 1\ndropped\nb, no\n"
    with pytest.raises(make_record.RecordError, match="no value for {{x}}"):
        render("{{x}}", {})
    # Every name the shipped template uses has a value from the logs.
    text = make_record.STANDALONE_TAG.sub(r"\1", make_record.TEMPLATE.read_text())
    names = set(make_record.PLACEHOLDER.findall(text))
    names |= {name for _, name, _ in make_record.SECTION.findall(text)}
    results = submission.read_results(three_logs(tmp_path))
    stats = submission.statistics(results, 1.2)
    document = submission.build_submission(results, stats, dict(
        author="a", github_id="b", name="n", blurb="c", date="2026-05-01",
        track=submission.DEFAULT_TRACK, technique_summary="t", demonstration=None))
    values = make_record.readme_values(document, results, stats, {
        key: Path(name) for key, (name, _) in plots.PLOTS.items()}, "0" * 64)
    assert {"learners", "compliance_table", "lineage", "test"} <= names <= set(values)


def test_check_of_logs_times_and_artifacts(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    sweep = fake_sweep(tmp_path)
    logs, code, run_dir, kwargs = sweep["logs"], sweep["code"], sweep["run_dir"], sweep["kwargs"]
    assert check_record.main(["--logs", *map(str, logs), "--code", str(code),
                              "--run-dir", str(run_dir)]) == 0
    capsys.readouterr()
    # Over the limits by a millisecond, on the train_time and eval_time lines.
    write_log(logs[0], **{**kwargs[1337], "train_ms": 600_001})
    write_log(logs[1], **{**kwargs[42], "eval_ms": 600_500})
    # The artifact beside the third log is not the one it logged (size, then sha256).
    (run_dir / "cpu_smoke_seed2024.eam").write_bytes(bytes(999))
    assert check_record.main(["--logs", *map(str, logs), "--code", str(code),
                              "--run-dir", str(run_dir)]) == 1
    problems = failures(capsys.readouterr().out)
    assert problems == [
        "1. cpu_smoke_seed1337.txt: train time 600.0 s is over the 600 s limit",
        "2. cpu_smoke_seed42.txt: eval time 600.5 s is over the 600 s limit",
        f"3. cpu_smoke_seed2024.txt: logged model_bytes 1,002 but the artifact "
        f"{run_dir / 'cpu_smoke_seed2024.eam'} has 999 bytes"]
    records = runs.read_run("x", logs[1]).records
    assert runs.train_time_s(records) == 2.0 and runs.eval_time_s(records) == 600.5
    write_log(logs[2], **{**kwargs[2024], "total_bytes": kwargs[2024]["code_bytes"] + 999})
    assert check_record.main(["--logs", str(logs[2]), "--code", str(code),
                              "--run-dir", str(run_dir)]) == 1
    assert "is not the one logged" in capsys.readouterr().out


def test_descriptions_follow_the_memory_the_run_built(tmp_path: Path) -> None:
    """The memory is described as the settings built it (its shipped and learned context
    lengths, or none), the learners as the evaluation ran them."""
    stats = {"val_bpb_mean": 1.0, "val_bpb_std": None}
    described = {}
    for name, settings, knn in (
            ("default", {}, True),
            ("learned", {"EAM_CONTEXT_ORDER": 3, "EAM_CONTEXT_MIN_LENGTH": 1,
                         "EAM_LEARNED_LENGTHS": "4,6", "TTT_STEPS": 0,
                         "EVAL_MEMORY_WRITES": False}, False),
            ("none", {"EAM_CONTEXT_ORDER": 0, "ENC_LAYERS": 1}, False),
            ("scored", {"EAM_CONTEXT_TOKENS": 0}, False)):
        result = submission.read_results([write_log(tmp_path / f"{name}.txt", knn=knn,
                                                    settings=settings)])
        described[name] = (submission.technique_summary(result),
                           submission.default_blurb(result, stats))
    summary, blurb = described["default"]
    assert ("a memory of next-token counts of exact contexts (the empty context and contexts "
            "of 2 to 3 tokens; contexts of 4, 6, 8, 12, 16 tokens counted only from text "
            "already read)") in summary
    assert ("score-first: the memory counts each scored chunk, test-time training (1 step(s) "
            "a chunk, all, lr x0.01), a kNN store of scored tokens (lambda 0.25, k 32)") in summary
    assert blurb.startswith("A transformer encoder (the whole teacher, trained from scratch")
    assert "-> the whole teacher distilled into an encoder" in summary
    summary, blurb = described["learned"]
    assert ("(the empty context and contexts of 1 to 2 tokens; contexts of 4, 6 tokens counted "
            "only from text already read)") in summary
    assert "score-first" not in summary
    summary, blurb = described["none"]
    assert "mixing in no memory (EAM_CONTEXT_ORDER=0)" in summary
    assert "its lowest 1 layers distilled" in summary and "(the lowest 1 layers of a" in blurb
    summary, blurb = described["scored"]
    assert ("16 tokens), none shipped: all counted only from text already read") in summary
    for summary, blurb in described.values():
        for word in ("Elastic", "associative", "key", "location"):
            assert word not in summary + blurb, word


def test_training_curves_read_every_step_line(tmp_path: Path) -> None:
    result = submission.read_results([write_log(tmp_path / "a.txt")])[0]
    assert plots.curve(result, train_gpt.TEACHER_PHASE) == ([1, 2], [6.931, 4.5])
    assert plots.curve(result, train_gpt.DISTILL_PHASE) == ([1, 4], [6.0, 5.0])


def test_record_from_a_real_tiny_run(pipeline_runs, tmp_path: Path,
                                     capsys: pytest.CaptureFixture) -> None:
    """The real log format end to end: a run on the demo corpus makes a folder only as a
    demonstration, whose method says what ran; only what one seed lacks fails."""
    workdir, _ = pipeline_runs
    log = workdir / "logs" / f"{PIPELINE_RUN_ID}.txt"
    argv = ["--logs", str(log), "--run-dir", str(workdir), "--out", str(tmp_path), "--author",
            "Some One", "--github-id", "someone", "--date", "2026-05-01"]
    assert make_record.main(argv) == 2
    assert "the demo corpus" in capsys.readouterr().err and not list(tmp_path.iterdir())
    status = make_record.main([*argv, "--demonstration"])
    out = capsys.readouterr().out
    assert status == 1
    assert failures(out) == [
        "1. submission.json: missing or empty field(s) ['val_loss_std', 'val_bpb_std']",
        "2. 3 seeds are needed, the logs have 1 complete: [1337]"]
    assert "artifact" not in " ".join(line for line in out.splitlines() if "not found" in line)
    folder = next(tmp_path.glob("track_non_record_16mb/2026-05-01_*"))
    assert (folder / "train_gpt.py").read_bytes() == (REPO_ROOT / "train_gpt.py").read_bytes()
    doc = json.loads((folder / "submission.json").read_text())
    assert doc["cuda_version"] and doc["flash_attn_version"] and doc["pytorch_version"]
    assert "Teacher GPT 2x128" in doc["technique_summary"]
    # The record describes the memory the run built, and says it is a demonstration.
    assert "a memory of next-token counts of exact contexts" in doc["technique_summary"]
    assert doc["blurb"].startswith("A transformer encoder")
    assert "is the demo corpus" in doc["demonstration"]
    assert "3,000 of the validation split's" in doc["demonstration"]  # VAL_TOKENS=3000
    readme = (folder / "README.md").read_text()
    assert readme.splitlines()[2].startswith("> **A demonstration, not a leaderboard entry")
    for text in ("the empty context and contexts of 2 to 3 tokens",
                 "Contexts of 4, 6 tokens never ship", "test-time training takes 1 optimizer",
                 "the memory counts the chunk's"):
        assert text in readme, text
    for text in ("k-means", "kNN store takes", "Elastic", "{{"):
        assert text not in readme, text


# ---- tools/gpu_check -----------------------------------------------------------------------


def test_gpu_check_on_cpu_runs_one_ranks_share_and_prints_its_table(demo_data, tmp_path,
                                                                      monkeypatch, capsys):
    """What CI runs so that the GPU check cannot rot: the same run and table at tiny shapes."""
    monkeypatch.chdir(tmp_path)
    status = gpu_check.main(["--cpu", "--quiet", "--env", f"DATA_PATH={demo_data}", "--env",
                             f"TOKENIZER_PATH={demo_data / 'tokenizer.model'}",
                             "--logs-dir", str(tmp_path / "logs")])
    table = capsys.readouterr().out
    assert status == 0, table
    for check in ("run completed", "training within its limit", "artifact + code",
                  "evaluation of the whole split", "packing"):
        assert f"| {check}" in table and "FAIL" not in table


def test_gpu_check_fails_a_broken_graph_a_recompile_and_a_slow_packing():
    """Its table from a GPU run's lines: the teacher's graph breaks, the distillation's graphs
    growing after its first step and a packing over its reserve each fail."""
    lines = [
        "run_id:g profile:competition code_sha256:x code_bytes:1",
        "python:3 torch:2 device:cuda device_name:H100 world_size:1 threads:1 attention:fa3 "
        "cuda:13 flash_attn:3",
        "setting TEACHER_TIME_FRAC=0.62", "setting DISTILL_TIME_FRAC=0.38",
        "setting MAX_WALLCLOCK_SECONDS=300",
        "data val_tokens:100 val_split_tokens:62000000 val_sha256:x",
        *(f"teacher step:{n} loss:3 lr_mult:1 elapsed_ms:{40000 + 100 * n}"
          for n in (1, 25, 50, 75)),
        "stage:teacher time_ms:1 params:26000000 steps:75 step_ms:1 tokens:1 train_loss:3",
        "compile phase:teacher mode:compiled",
        "compile_graphs phase:teacher graphs:3 after_first_step:3 graph_breaks:2",
        "compile phase:distill mode:compiled",
        "compile_graphs phase:distill graphs:5 after_first_step:4 graph_breaks:3",
        "artifact_fit at:distill context_pairs:1 dropped_context_pairs:0 reserve_bytes:0 "
        "fit_ms:9000 build_ms:2000",
        "stage:pack time_ms:9000",
        "train_time train_time_ms:299000 limit_ms:300000 within_limit:1 "
        "peak_memory_bytes:30000000000",
        "artifact code_bytes:1 model_bytes:1 total_bytes:15000000 limit:16000000",
        "stage:eval time_ms:1 tokens:100 tokens_per_s:50000 knn:0 ttt_steps:1 memory_writes:1",
    ]
    text = "\n".join(lines)
    run = runs.Run(label="g", log_path=None, records=runs.parse_log(text), text=text)
    rows = {row.check: row for row in gpu_check.check_table(run, True, 80 * 2**30)}
    assert not rows["compile teacher"].ok and not rows["compile distill"].ok
    assert not rows["packing"].ok  # 9 s against 4 x 2 s
    assert rows["artifact + code"].ok and rows["peak GPU memory"].ok
    assert rows["evaluation of the whole split"].ok  # 62M / 8 / 50k = 155 s
    assert "~" in rows["teacher step (one rank's share)"].value


# ---- tools/pretrain_teacher ------------------------------------------------------------------


def test_pretraining_resumed_after_a_stop_ends_with_the_teacher_of_a_run_straight_through(
        demo_data, tmp_path, monkeypatch):
    """Saved every 2 steps, stopped after the first save and run again: the same 4 steps, the
    same weights as a run that never stopped; the checkpoint then starts a run's teacher."""
    from tools import pretrain_teacher

    args = train_gpt.Hyperparameters.from_env({
        "PROFILE": "cpu_smoke", "DATA_PATH": str(demo_data), "NUM_LAYERS": "1",
        "XSA_LAYERS": "1", "ENC_LAYERS": "1", "MODEL_DIM": "32", "NUM_HEADS": "2",
        "NUM_KV_HEADS": "1", "TRAIN_BATCH_TOKENS": "256", "TRAIN_SEQ_LEN": "64",
        "GRAD_ACCUM_WORLD": "1", "INIT_CHECKPOINT": str(tmp_path / "straight.pt")})
    parameters = pretrain_teacher.non_embedding_parameters(
        train_gpt.GPT(train_gpt.settings_view(train_gpt.GPTConfig, args)))
    per_parameter = 4 * 256 / parameters  # four steps
    pretrain_teacher.pretrain(args, per_parameter, save_every=2, echo=lambda line: None)
    resumed = dataclasses.replace(args, init_checkpoint=str(tmp_path / "resumed.pt"))
    real = train_gpt.run_training

    def stop_after_one_segment(*call, **kwargs):
        monkeypatch.setattr(pretrain_teacher.train_gpt, "run_training", stopped)
        return real(*call, **kwargs)

    def stopped(*call, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pretrain_teacher.train_gpt, "run_training", stop_after_one_segment)
    with pytest.raises(KeyboardInterrupt):
        pretrain_teacher.pretrain(resumed, per_parameter, save_every=2, echo=lambda line: None)
    assert not (tmp_path / "resumed.pt").exists() and (tmp_path / "resumed.pt.partial").exists()
    monkeypatch.setattr(pretrain_teacher.train_gpt, "run_training", real)
    pretrain_teacher.pretrain(resumed, per_parameter, save_every=2, echo=lambda line: None)
    straight = torch.load(tmp_path / "straight.pt", weights_only=True)
    again = torch.load(tmp_path / "resumed.pt", weights_only=True)
    assert straight["tokens"] == again["tokens"] == 4 * 256
    for name, value in straight["state"].items():
        assert torch.equal(value, again["state"][name]), name
    with pytest.raises(FileExistsError, match="exists"):  # never overwritten
        pretrain_teacher.pretrain(args, per_parameter, save_every=2, echo=lambda line: None)
    # The run's teacher starts from it, and a run of another shape is refused.
    assert train_gpt.read_checkpoint(args)["config"] == straight["config"]
    with pytest.raises(ValueError, match="a teacher of config"):
        train_gpt.read_checkpoint(dataclasses.replace(args, num_layers=2, xsa_layers=2))
