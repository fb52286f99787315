"""Tests for tools/size_audit.py, tools/seed_sweep.py, tools/ablate.py and tools/_runs.py.

Everything runs on synthetic logs, a tiny artifact and a fake trainer script, so the whole file
takes seconds: the tools' logic is tested here, train_gpt.py's training elsewhere.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import textwrap
from pathlib import Path

import pytest

import train_gpt
from tests.helpers import REPO as REPO_ROOT
from tools import _runs as runs
from tools import ablate, seed_sweep, size_audit

# ------------------------------------------------------------------------------------------------
# Synthetic logs in the exact formats train_gpt.py writes
# ------------------------------------------------------------------------------------------------


def log_text(run_id: str = "cpu_smoke_seed1337", seed: int = 1337, bpb: float = 1.14,
             loss: float = 1.90, memory_bpb: float | None = 1.20, teacher_bpb: float = 1.10,
             profile: str = "cpu_smoke", complete: bool = True, knn: bool = True,
             total_bytes: int = 300, settings: dict | None = None) -> str:
    lines = [f"run_id:{run_id} profile:{profile} code_sha256:ab code_bytes:100",
             "python:3.11 torch:2.13.0 device:cpu device_name:x86_64 world_size:1 threads:2 "
             "attention:sdpa",
             f"setting PROFILE={profile}", f"setting SEED={seed}", f"setting RUN_ID={run_id}"]
    lines += [f"setting {k}={v}" for k, v in (settings or {}).items()]
    stage = train_gpt.stage_record
    lines += ["teacher step:1 loss:6.9310 lr_mult:0.100 elapsed_ms:12",
              "replicas teacher:identical ranks:1 digest:0123",
              f"{stage('teacher')} time_ms:1234 params:1 steps:2",
              f"{stage('eam_write')} time_ms:200 writes:4096 locations:512",
              f"{stage('distill')} time_ms:566 params:1 dec_sees_encoder:1",
              "artifact_component name:memory.patterns raw_bytes:150 zstd_bytes:120",
              f"artifact code_bytes:100 model_bytes:{total_bytes - 100} "
              f"total_bytes:{total_bytes} limit:16000000",
              f"{stage('pack')} time_ms:30",
              f"{train_gpt.TEACHER_RECORD} val_loss:1.80000000 val_bpb:{teacher_bpb:.8f} "
              "tokens:100 eval_time_ms:40"]
    if memory_bpb is not None:
        lines.append(f"{train_gpt.MEMORY_RECORD} val_loss:2.00000000 val_bpb:{memory_bpb:.8f} "
                     "tokens:100")
    if complete:
        if knn:
            lines.append(f"{train_gpt.SCORE_RECORD} val_loss:{loss:.8f} val_bpb:{bpb:.8f} "
                         "eval_time_ms:50")
        lines.append(f"{stage('eval')} time_ms:50 tokens:100 tokens_per_s:2000 knn:{int(knn)}")
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
    assert run.records["artifact"]["total_bytes"] == "300"
    assert run.records["header"]["device_name"] == "x86_64"
    assert run.records["settings"]["SEED"] == "1337"
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


def test_t_distribution_matches_scipy() -> None:
    from scipy import special, stats

    for df in (1, 2, 3, 4.5, 10, 30, 200):
        for t in (-40.0, -6.0, -2.5, -1.0, -0.3, 0.0, 0.3, 1.0, 2.5, 6.0, 40.0):
            assert seed_sweep.t_cdf(t, df) == pytest.approx(stats.t.cdf(t, df), abs=1e-12)
        for q in (0.005, 0.05, 0.5, 0.975, 0.99):
            assert seed_sweep.t_ppf(q, df) == pytest.approx(stats.t.ppf(q, df), rel=1e-9)
    for a, b, x in ((0.5, 0.5, 0.2), (1.0, 0.5, 0.9), (15.0, 0.5, 0.99), (2.0, 3.0, 0.4)):
        assert seed_sweep.regularized_incomplete_beta(a, b, x) == pytest.approx(
            special.betainc(a, b, x), abs=1e-13)
    assert seed_sweep.t_cdf(math.inf, 3) == 1.0 and seed_sweep.t_cdf(-math.inf, 3) == 0.0


def test_statistics_hand_computed() -> None:
    from scipy import stats

    values = [1.0, 1.1, 1.2]
    assert seed_sweep.mean(values) == pytest.approx(1.1)
    assert seed_sweep.sample_std(values) == pytest.approx(0.1)
    low, high = seed_sweep.t_interval(values)
    half = 4.302652729911275 * 0.1 / math.sqrt(3)  # t_{0.975, 2}
    assert (low, high) == (pytest.approx(1.1 - half), pytest.approx(1.1 + half))

    improvements = [0.020, 0.012, 0.016]
    result = seed_sweep.one_sided_t_test(improvements, 0.005)
    expected = stats.ttest_1samp(improvements, 0.005, alternative="greater")
    assert result["t"] == pytest.approx((0.016 - 0.005) / (0.004 / math.sqrt(3)))
    assert result["t"] == pytest.approx(expected.statistic)
    assert result["p_value"] == pytest.approx(expected.pvalue, rel=1e-9)
    assert result["df"] == 2
    flat = seed_sweep.one_sided_t_test([0.01, 0.01], 0.005)
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
                                     "--github-id", "someone")
    assert code == 0
    bpbs = [bpb for _, bpb, _ in SEEDS]
    losses = [loss for _, _, loss in SEEDS]
    assert doc["name"] == "golf" and doc["github_id"] == "someone"
    assert doc["val_bpb"] == pytest.approx(sum(bpbs) / 3)
    assert doc["val_bpb_std"] == pytest.approx(stats.tstd(bpbs))
    assert doc["val_loss"] == pytest.approx(sum(losses) / 3)
    assert doc["seeds"] == [1337, 42, 2024]
    assert doc["results"][1] == dict(doc["results"][1], seed=42, bytes_total=301, bytes_code=100,
                                     bytes_model=201)
    assert doc["bytes_total"] == 302 and doc["bytes_code"] == 100
    assert doc["hardware"] == "x86_64 x 1" and doc["pytorch_version"] == "2.13.0"
    assert doc["profile"] == "cpu_smoke" and "not a leaderboard score" in doc["note"]
    assert len(doc["date"]) == 10 and doc["date"][4] == "-"
    assert doc["compliance"] == dict(score_first_eval=True, normalized_mixture=True,
                                     no_validation_in_training=True, train_time_s=2.0,
                                     eval_time_s=0.05)
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
    assert doc["note"].startswith("competition profile")
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
    pathlib.Path(env["ARTIFACT_PATH"]).write_bytes(b"artifact")
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
    assert doc["results"][1]["val_bpb"] == pytest.approx(1.1 + 2 / 1e5)
    assert doc["excluded_runs"][0]["seed"] == 3 and doc["excluded_runs"][0]["status"] == "failed"
    for seed in (1, 2, 3):
        assert (tmp_path / f"sweep_seed{seed}.eam").exists()
    assert "Traceback: simulated crash" in (tmp_path / "logs/sweep_seed3.stdout.txt").read_text()
    assert "===== logs/sweep_seed1.txt" in (tmp_path / "train_log.txt").read_text()


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
    variants = tmp_path / "variants.json"
    variants.write_text(json.dumps({"base": {}, "xsa0": {"XSA_LAYERS": 0}, "noknn":
                                    {"KNN_LAMBDA": 0}, "broken": {}}))
    out = tmp_path / "ablation.json"
    code = ablate.main(["--collect-only", "--variants-json", str(variants), "--logs-dir",
                        str(logs), "--out", str(out), "--plot", str(tmp_path / "a.png")])
    assert code == 1  # 'broken' never reached its memory score
    captured = capsys.readouterr()
    table = [line for line in captured.out.splitlines() if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in table[1:]] == ["xsa0", "base", "noknn",
                                                                   "broken"]
    assert "| 1.2500 |" in table[1] and "XSA_LAYERS=0" in table[1]
    noknn = table[3].split("|")
    assert noknn[4].strip() == "1.2800" and noknn[5].strip() == "-"
    doc = json.loads(out.read_text())
    assert [row["name"] for row in doc["variants"]] == ["xsa0", "base", "noknn", "broken"]
    assert doc["variants"][0]["knn_bpb"] == pytest.approx(1.25)
    assert doc["variants"][0]["teacher_bpb"] == pytest.approx(1.10)
    assert doc["variants"][0]["stage_time_ms"]["teacher"] == 1234
    assert doc["variants"][2]["knn_bpb"] is None and doc["variants"][3]["status"] == "incomplete"
    if importlib.util.find_spec("matplotlib") is None:
        assert "matplotlib is not installed" in captured.err
    # Without variants, --collect-only finds every ablate_*.txt in the directory.
    assert ablate.main(["--collect-only", "--logs-dir", str(logs), "--out", str(out)]) == 1
    assert len(json.loads(out.read_text())["variants"]) == 4


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
    tables = train_gpt.MemoryTables(F.normalize(torch.randn(16, 8), dim=1), torch.randn(16, 32),
                                    torch.zeros(16))
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
