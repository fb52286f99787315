"""The whole pipeline as users run it: one process, twice (determinism), and torchrun x2."""

import pytest

import train_gpt
from tests.helpers import REPO, run_script

# Budgets by steps, not seconds, so runs are reproducible and quick on any machine.
TINY_RUN = {
    "PROFILE": "cpu_smoke", "MAX_WALLCLOCK_SECONDS": "600", "VAL_TOKENS": "3000",
    "ITERATIONS": "6", "TRAIN_BATCH_TOKENS": "2048", "EAM_ORGANIZE_TOKENS": "4096",
    "EAM_WRITE_TOKENS": "8192", "EAM_LOCATIONS": "256", "DISTILL_KEY_ITERATIONS": "2",
    "DISTILL_ITERATIONS": "3", "DISTILL_BATCH_TOKENS": "2048", "KNN_CHUNK_TOKENS": "512",
    "TRAIN_LOG_EVERY": "1000",
}


@pytest.fixture(scope="module")
def runs(demo_data, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("runs")
    base = {**TINY_RUN, "DATA_PATH": str(demo_data),
            "TOKENIZER_PATH": str(demo_data / "tokenizer.model")}
    logs = {}
    for name, nproc, extra in [
        ("single", 1, {}),
        ("again", 1, {}),
        ("ddp", 2, {}),
        ("eval_ddp", 2, {"EVAL_ONLY": "1", "ARTIFACT_PATH": "single.eam"}),
    ]:
        env = {**base, "RUN_ID": name, "ARTIFACT_PATH": f"{name}.eam", **extra}
        run_script(env, workdir, nproc=nproc)
        logs[name] = train_gpt.parse_log((workdir / "logs" / f"{name}.txt").read_text())
    return workdir, logs


def test_single_process_logs_every_stage_and_fits(runs):
    workdir, logs = runs
    records = logs["single"]
    for stage in train_gpt.STAGES:
        assert int(records[train_gpt.stage_record(stage)]["time_ms"]) >= 0
    for line in (train_gpt.MEMORY_RECORD, train_gpt.SCORE_RECORD, train_gpt.TEACHER_RECORD):
        assert 0 < float(records[line]["val_bpb"]) < 20
    assert int(records[train_gpt.MEMORY_RECORD]["tokens"]) == 2999
    artifact = records["artifact"]
    assert int(artifact["total_bytes"]) <= 16_000_000
    assert int(artifact["code_bytes"]) == (REPO / "train_gpt.py").stat().st_size
    assert int(artifact["model_bytes"]) == (workdir / "single.eam").stat().st_size
    assert records["settings"]["SEED"] == "1337"


def test_same_seed_gives_byte_identical_artifacts(runs):
    workdir, _ = runs
    assert (workdir / "single.eam").read_bytes() == (workdir / "again.eam").read_bytes()


def test_two_ranks_end_with_identical_teacher_memory_and_student(runs):
    _, logs = runs
    header = logs["ddp"]["header"]
    assert header["world_size"] == "2"
    assert train_gpt.SCORE_RECORD in logs["ddp"]
    text = (runs[0] / "logs" / "ddp.txt").read_text()
    for name in ("teacher", "memory", "student"):
        assert f"replicas {name}:identical ranks:2" in text


def test_evaluation_does_not_depend_on_the_world_size(runs):
    _, logs = runs
    for line in (train_gpt.MEMORY_RECORD, train_gpt.SCORE_RECORD):
        one = float(logs["single"][line]["val_loss"])
        two = float(logs["eval_ddp"][line]["val_loss"])
        assert two == pytest.approx(one, rel=1e-6, abs=1e-6), line
