"""Tests for tools/: size_audit, seed_sweep, ablate, make_record, check_record, plots, _runs.

Everything runs on synthetic logs, a tiny artifact and a fake trainer script, so the whole file
takes seconds: the tools' logic is tested here, train_gpt.py's training elsewhere (the one real
run a record folder is built from is the pipeline tests' tiny run, a conftest fixture).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

import train_gpt
from tests.helpers import PIPELINE_RUN_ID
from tests.helpers import REPO as REPO_ROOT
from tools import _runs as runs
from tools import _submission as submission
from tools import ablate, check_record, make_record, plots, seed_sweep, size_audit

# ------------------------------------------------------------------------------------------------
# Synthetic logs in the exact formats train_gpt.py writes
# ------------------------------------------------------------------------------------------------


def log_text(run_id: str = "cpu_smoke_seed1337", seed: int = 1337, bpb: float = 1.14,
             loss: float = 1.90, memory_bpb: float | None = 1.20, teacher_bpb: float = 1.10,
             profile: str = "cpu_smoke", complete: bool = True, knn: bool = True,
             total_bytes: int = 300, settings: dict | None = None, code_sha: str = "ab",
             code_bytes: int = 100, teacher_ms: int = 1234, eval_ms: int = 50,
             extra_lines: tuple[str, ...] = ()) -> str:
    lines = [f"run_id:{run_id} profile:{profile} code_sha256:{code_sha} code_bytes:{code_bytes}",
             "python:3.11 torch:2.13.0 device:cpu device_name:x86_64 world_size:1 threads:2 "
             "attention:sdpa cuda:none flash_attn:none",
             f"setting PROFILE={profile}", f"setting SEED={seed}", f"setting RUN_ID={run_id}"]
    lines += [f"setting {k}={v}" for k, v in (settings or {}).items()]
    stage = train_gpt.stage_record
    lines += ["teacher step:1 loss:6.9310 lr_mult:0.100 elapsed_ms:12",
              "replicas teacher:identical ranks:1 digest:0123",
              f"{stage('teacher')} time_ms:{teacher_ms} params:1 steps:2 step_ms:617.0 "
              "train_loss:4.5000",
              f"{stage('eam_write')} time_ms:200 writes:4096 locations:512",
              f"{train_gpt.KEY_PHASE} step:1 loss:0.5000 lr_mult:0.200 elapsed_ms:10",
              f"{train_gpt.LM_PHASE} step:1 loss:6.0000 lr_mult:0.200 elapsed_ms:20",
              f"{stage('distill')} time_ms:566 params:1 dec_sees_encoder:1 distill_keys_steps:3 "
              "distill_keys_loss:0.1000 distill_lm_steps:4 distill_lm_loss:5.0000 "
              "key_drift:0.2500",
              f"{train_gpt.COMPONENT_RECORD} name:memory.patterns raw_bytes:150 zstd_bytes:120",
              f"{train_gpt.COMPONENT_RECORD} name:encoder raw_bytes:90 zstd_bytes:80",
              f"{train_gpt.FIT_RECORD} dropped_locations:0 kept_locations:500",
              f"{train_gpt.ARTIFACT_RECORD} code_bytes:{code_bytes} "
              f"model_bytes:{total_bytes - code_bytes} total_bytes:{total_bytes} limit:16000000",
              f"{stage('pack')} time_ms:30",
              f"{train_gpt.TEACHER_RECORD} val_loss:1.80000000 val_bpb:{teacher_bpb:.8f} "
              "tokens:100 eval_time_ms:40"]
    if memory_bpb is not None:
        lines.append(f"{train_gpt.MEMORY_RECORD} val_loss:2.00000000 val_bpb:{memory_bpb:.8f} "
                     "tokens:100")
    if complete:
        if knn:
            lines.append(f"{train_gpt.SCORE_RECORD} val_loss:{loss:.8f} val_bpb:{bpb:.8f} "
                         f"eval_time_ms:{eval_ms}")
        lines.append(f"{stage('eval')} time_ms:{eval_ms} tokens:100 tokens_per_s:2000 "
                     f"knn:{int(knn)}")
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


# ------------------------------------------------------------------------------------------------
# Log reading (_runs, through train_gpt.parse_log)
# ------------------------------------------------------------------------------------------------


def test_read_complete_log(tmp_path: Path) -> None:
    run = runs.read_run("x", write_log(tmp_path / "a.txt"))
    assert run.status == "ok" and run.ok
    assert run.records[train_gpt.stage_record("teacher")]["time_ms"] == "1234"
    assert run.records[train_gpt.ARTIFACT_RECORD]["total_bytes"] == "300"
    assert run.records[train_gpt.HEADER_RECORD]["device_name"] == "x86_64"
    assert run.records[train_gpt.SETTINGS_RECORD]["SEED"] == "1337"
    assert runs.number(run.records, runs.SCORE_RECORD, "val_bpb") == pytest.approx(1.14)
    assert runs.train_time_s(run.records) == pytest.approx((1234 + 200 + 566) / 1000)
    assert runs.eval_time_s(run.records) == pytest.approx(0.05)
    assert runs.stage_times_ms(run.records)["pack"] == 30


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
    assert "2x128" not in doc["technique_summary"]  # the fake logs carry no model settings
    assert doc["profile"] == "cpu_smoke" and "not a leaderboard score" in doc["note"]
    assert doc["compliance"] == dict(train_under_600s=True, eval_under_600s=True,
                                     artifact_under_16mb=True, three_seeds=True,
                                     train_time_max_s=2.0, eval_time_max_s=0.05,
                                     artifact_bytes_max=302, eval_knn_store=True,
                                     eval_score_first_ttt=False)  # no ttt_steps in these logs
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
    write_log(logs / "ablate_noknn.txt", knn=False, memory_bpb=1.28)
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
    assert transformer[2:8] == ["transformer", "ok", "1.1000", "-", "1.2900", "1.2700"]
    noknn = table[4].split("|")
    assert noknn[6].strip() == "1.2800" and noknn[7].strip() == "-"
    doc = json.loads(out.read_text())
    assert [row["name"] for row in doc["variants"]] == ["xsa0", "transformer", "base", "noknn",
                                                        "broken"]
    assert doc["variants"][0]["knn_bpb"] == pytest.approx(1.25)
    assert doc["variants"][0]["teacher_bpb"] == pytest.approx(1.10)
    assert doc["variants"][0]["key_drift"] == pytest.approx(0.25)
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
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    args = train_gpt.Hyperparameters(profile="cpu_smoke", num_layers=1, model_dim=32,
                                     num_heads=2, num_kv_heads=1, rope_dims=8, xsa_layers=1,
                                     enc_layers=1, dec_hidden=32, eam_key_dim=8, vocab_size=64,
                                     mlp_mult=2)
    tables = train_gpt.next_token_tables(F.normalize(torch.randn(16, 8), dim=1),
                                         torch.rand(16, 64), args.eam_top_tokens)
    model = train_gpt.MemoryLM(train_gpt.student_config(args), tables)
    path = tmp_path_factory.mktemp("artifact") / "tiny.eam"
    path.write_bytes(train_gpt.build_artifact(model, tables, args))
    return path


CODE = str(REPO_ROOT / "train_gpt.py")


def test_size_audit_fits(tiny_artifact: Path, capsys: pytest.CaptureFixture) -> None:
    assert size_audit.main(["--code", CODE, "--artifact", str(tiny_artifact)]) == 0
    out = capsys.readouterr().out
    assert "memory.patterns" in out and "margin" in out and "OK: fits" in out
    assert size_audit.main(["--code", CODE, "--artifact", str(tiny_artifact), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    code_bytes = Path(CODE).stat().st_size
    assert result["code_bytes"] == code_bytes
    assert result["model_bytes"] == tiny_artifact.stat().st_size
    assert result["total_bytes"] == code_bytes + result["model_bytes"]
    assert result["margin"] == 16_000_000 - result["total_bytes"] and result["fits"] is True
    groups = {c["group"] for c in result["components"]}
    assert {"memory.addresses", "memory.patterns"} <= groups


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


def fake_sweep(root: Path, model_bytes: dict[int, int] | None = None,
               seeds: list[tuple[int, float, float]] = SEEDS) -> dict:
    """A code file, one artifact per seed and logs whose sha256 and sizes are the files' own.

    `model_bytes` gives a seed's artifact size (a sparse file, so 16 MB costs nothing)."""
    code = root / "code" / "train_gpt.py"
    code.parent.mkdir(parents=True)
    code.write_text("print('a stand-in for train_gpt.py')\n" * 40, encoding="utf-8")
    code_bytes, sha = code.stat().st_size, hashlib.sha256(code.read_bytes()).hexdigest()
    run_dir = root / "run"
    logs = []
    for i, (seed, bpb, loss) in enumerate(seeds):
        size = (model_bytes or {}).get(seed, 1000 + i)
        artifact = run_dir / f"cpu_smoke_seed{seed}.eam"
        artifact.parent.mkdir(parents=True, exist_ok=True)
        with artifact.open("wb") as handle:
            handle.truncate(size)
        logs.append(write_log(run_dir / "logs" / f"cpu_smoke_seed{seed}.txt",
                              run_id=f"cpu_smoke_seed{seed}", seed=seed, bpb=bpb, loss=loss,
                              code_sha=sha, code_bytes=code_bytes, total_bytes=code_bytes + size,
                              settings={"ARTIFACT_PATH": artifact.name}))
    return dict(code=code, run_dir=run_dir, logs=logs)


def assemble(root: Path, sweep: dict, *extra: str, logs: list[Path] | None = None,
             code: Path | None = None) -> tuple[int, Path | None]:
    out = root / "records"
    status = make_record.main([
        "--logs", *map(str, logs or sweep["logs"]), "--code", str(code or sweep["code"]),
        "--run-dir", str(sweep["run_dir"]), "--out", str(out), "--author", "Some One",
        "--github-id", "someone", "--name", "EAM test", "--date", "2026-05-01", *extra])
    folders = sorted(out.glob("track_*/*"))
    return status, folders[0] if folders else None


def check(folder: Path, run_dir: Path, capsys: pytest.CaptureFixture) -> tuple[int, str]:
    capsys.readouterr()
    status = check_record.main([str(folder), "--run-dir", str(run_dir)])
    return status, capsys.readouterr().out


def failures(out: str) -> list[str]:
    return [line.strip() for line in out.splitlines() if line.startswith("  ")]


@pytest.fixture(scope="module")
def good_record(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One folder assembled from three consistent runs (the failure tests copy and break it)."""
    root = tmp_path_factory.mktemp("record")
    sweep = fake_sweep(root)
    status, folder = assemble(root, sweep, "--reference-bpb", "1.2")
    return dict(sweep, status=status, folder=folder, root=root)


def copy_of(record: dict, tmp_path: Path) -> Path:
    """The good folder, copied to the same place under tmp_path (track folder and name kept)."""
    import shutil

    folder = record["folder"]
    target = tmp_path / folder.parent.name / folder.name
    shutil.copytree(folder, target)
    return target


def test_record_folder_in_the_challenges_conventions(good_record: dict,
                                                     capsys: pytest.CaptureFixture) -> None:
    folder, sweep = good_record["folder"], good_record
    assert good_record["status"] == 0
    assert folder.parent.name == "track_non_record_16mb"
    assert folder.name == "2026-05-01_EAM_context_cpu_smoke"
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
    for text in ("## Results", "## Method", "## Legality", "C1", "C4", "## Reproduction",
                 "## Size", train_gpt.SCORE_RECORD, "total_bytes", "SEED=$SEED",
                 "for SEED in 42 1337 2024", hashlib.sha256(sweep["code"].read_bytes()).hexdigest(),
                 *(f"]({name})" for name, _ in plots.PLOTS.values())):
        assert text in readme, text
    requirements = (folder / "requirements.txt").read_text()
    assert "torch" in requirements and "zstandard" in requirements
    assert "scipy" not in requirements and "none" in requirements  # tools-only; logged CUDA
    status, out = check(folder, sweep["run_dir"], capsys)
    assert status == 0 and "PASS" in out and "not found" not in out


def test_check_fails_one_byte_over(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code_bytes = len("print('a stand-in for train_gpt.py')\n" * 40)
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
    import shutil

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
    doc["track"] = "10min_16mb"
    (moved / "submission.json").write_text(json.dumps(doc))
    status, out = check(moved, good_record["run_dir"], capsys)
    assert status == 1
    assert failures(out) == ["1. track 10min_16mb needs the competition profile on 8xH100; the "
                             "logs ran ['cpu_smoke'] on 1x CPU x86_64 (2 threads)"]


def test_check_of_logs_times_and_artifacts(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    sweep = fake_sweep(tmp_path)
    logs, code, run_dir = sweep["logs"], sweep["code"], sweep["run_dir"]
    assert check_record.main(["--logs", *map(str, logs), "--code", str(code),
                              "--run-dir", str(run_dir)]) == 0
    capsys.readouterr()
    sha, size = hashlib.sha256(code.read_bytes()).hexdigest(), code.stat().st_size
    # Older logs: the training stages' sum (600.001 s); newer: the train_time / eval_time lines.
    write_log(logs[0], seed=1337, code_sha=sha, code_bytes=size, total_bytes=size + 1000,
              teacher_ms=600_001 - 200 - 566, settings={"ARTIFACT_PATH": "cpu_smoke_seed1337.eam"})
    write_log(logs[1], seed=42, code_sha=sha, code_bytes=size, total_bytes=size + 1001,
              settings={"ARTIFACT_PATH": "cpu_smoke_seed42.eam"}, extra_lines=(
                  f"{train_gpt.TRAIN_TIME_RECORD} train_time_ms:12000 limit_ms:600000 "
                  "within_limit:1",
                  f"{train_gpt.EVAL_TIME_RECORD} eval_time_ms:600500 limit_ms:600000 "
                  "within_limit:0"))
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
    assert runs.train_time_s(records) == 12.0 and runs.eval_time_s(records) == 600.5
    digest = hashlib.sha256(bytes(1001)).hexdigest()
    write_log(logs[2], seed=2024, code_sha=sha, code_bytes=size, total_bytes=size + 999,
              extra_lines=(f"{train_gpt.ARTIFACT_RECORD} code_bytes:{size} model_bytes:999 "
                           f"total_bytes:{size + 999} limit:16000000 "
                           f"path:cpu_smoke_seed2024.eam sha256:{digest}",))
    assert check_record.main(["--logs", str(logs[2]), "--code", str(code),
                              "--run-dir", str(run_dir)]) == 1
    assert "is not the one logged" in capsys.readouterr().out


def test_descriptions_follow_the_memories_the_run_built(tmp_path: Path) -> None:
    """One associative location (the profiles where the limit binds) is not described as
    regions of key space; many are, with their key width; the context memory when it is on."""
    stats = {"val_bpb_mean": 1.0, "val_bpb_std": None}
    described = {}
    for name, settings in (("one", {"EAM_LOCATIONS": "1", "EAM_CONTEXT_ORDER": "4",
                                    "EAM_CONTEXT_MIN_LENGTH": "2"}),
                           ("many", {"EAM_LOCATIONS": "4096", "EAM_KEY_DIM": "64",
                                     "EAM_CONTEXT_ORDER": "0"})):
        result = submission.read_results([write_log(tmp_path / f"{name}.txt",
                                                    settings=settings)])
        described[name] = (submission.technique_summary(result),
                           submission.default_blurb(result, stats))
    summary, blurb = described["one"]
    assert "(one associative location; a context memory of exact contexts of 2 to 3" in summary
    assert "key space" not in blurb and "followed each exact recent context of" in blurb
    summary, blurb = described["many"]
    assert "(up to 4096 associative locations, keys 64-dim) ->" in summary
    assert "followed each region of a teacher transformer's key space;" in blurb


def test_training_curves_read_every_step_line(tmp_path: Path) -> None:
    result = submission.read_results([write_log(tmp_path / "a.txt")])[0]
    assert plots.curve(result, "teacher") == ([1, 2], [6.931, 4.5])
    assert plots.curve(result, "distill_keys") == ([1, 3], [0.5, 0.1])
    assert plots.curve(result, "distill_lm") == ([1, 4], [6.0, 5.0])


def test_record_from_a_real_tiny_run(pipeline_runs, tmp_path: Path,
                                     capsys: pytest.CaptureFixture) -> None:
    """The real log format end to end: only what one seed lacks fails (three are needed)."""
    workdir, _ = pipeline_runs
    log = workdir / "logs" / f"{PIPELINE_RUN_ID}.txt"
    status = make_record.main(["--logs", str(log), "--run-dir", str(workdir), "--out",
                               str(tmp_path), "--author", "Some One", "--github-id", "someone",
                               "--date", "2026-05-01"])
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
    # The record describes the memory the run built: the default, next-token counts.
    assert "Memory of next-token counts" in doc["technique_summary"]
    assert doc["blurb"].startswith("An Elastic Associative Memory counts the tokens")
    readme = (folder / "README.md").read_text()
    assert "spherical k-means" in readme and "hidden state" not in readme
