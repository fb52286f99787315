"""The whole pipeline as users run it: one process, twice (determinism), and torchrun x2."""

import math

import pytest

import train_gpt
from tests.helpers import PIPELINE_RUN_ID, REPO, TINY_RUN
from tools import _runs


def test_single_process_logs_every_stage_and_fits(pipeline_runs):
    workdir, logs = pipeline_runs
    records = logs[PIPELINE_RUN_ID]
    for stage in train_gpt.STAGES:
        assert int(records[train_gpt.stage_record(stage)]["time_ms"]) >= 0
    for line in (train_gpt.MEMORY_RECORD, train_gpt.SCORE_RECORD, train_gpt.TEACHER_RECORD,
                 train_gpt.PREPACK_RECORD):
        assert 0 < float(records[line]["val_bpb"]) < 20
    assert int(records[train_gpt.MEMORY_RECORD]["tokens"]) == 2999
    artifact = records[train_gpt.ARTIFACT_RECORD]
    assert int(artifact["total_bytes"]) <= 16_000_000
    assert int(artifact["code_bytes"]) == (REPO / "train_gpt.py").stat().st_size
    artifact_file = workdir / f"{PIPELINE_RUN_ID}.eam"
    assert int(artifact["model_bytes"]) == artifact_file.stat().st_size
    assert artifact["path"] == artifact_file.name
    assert artifact["sha256"] == train_gpt.file_sha256(artifact_file)
    assert records[_runs.SETTINGS_RECORD]["SEED"] == "1337"
    assert artifact["quant_bits"] == records[_runs.SETTINGS_RECORD]["QUANT_BITS"]
    # The per-component report compresses the artifact a second time: after the training clock.
    text = (workdir / "logs" / f"{PIPELINE_RUN_ID}.txt").read_text()
    assert text.index(f"\n{train_gpt.TRAIN_TIME_RECORD} ") < text.index(
        f"\n{train_gpt.COMPONENT_RECORD} ")


def test_same_seed_gives_byte_identical_artifacts(pipeline_runs):
    workdir, _ = pipeline_runs
    assert (workdir / f"{PIPELINE_RUN_ID}.eam").read_bytes() == (workdir / "again.eam").read_bytes()


def test_two_ranks_end_with_identical_teacher_memory_and_student(pipeline_runs):
    _, logs = pipeline_runs
    header = logs["ddp"][_runs.HEADER_RECORD]
    assert header["world_size"] == "2"
    assert train_gpt.SCORE_RECORD in logs["ddp"]
    text = (pipeline_runs[0] / "logs" / "ddp.txt").read_text()
    for name in ("teacher", "memory", "student"):
        assert f"replicas {name}:identical ranks:2" in text


def test_evaluation_does_not_depend_on_the_world_size(pipeline_runs):
    _, logs = pipeline_runs
    for line in (train_gpt.MEMORY_RECORD, train_gpt.SCORE_RECORD):
        one = float(logs[PIPELINE_RUN_ID][line]["val_loss"])
        two = float(logs["eval_ddp"][line]["val_loss"])
        assert two == pytest.approx(one, rel=1e-6, abs=1e-6), line


def test_training_and_evaluation_report_their_time_against_the_limit(pipeline_runs):
    _, logs = pipeline_runs
    for name in (PIPELINE_RUN_ID, "ddp"):
        train_time = logs[name][train_gpt.TRAIN_TIME_RECORD]
        assert int(train_time["train_time_ms"]) <= int(train_time["limit_ms"]), name
        assert train_time["within_limit"] == "1"
    assert logs["ddp"][train_gpt.TRAIN_TIME_RECORD]["limit_ms"] == "8000"
    # Scoring only: nothing read training data.
    assert train_gpt.TRAIN_TIME_RECORD not in logs["eval_ddp"]
    for name in logs:
        assert int(logs[name][train_gpt.EVAL_TIME_RECORD]["eval_time_ms"]) > 0


def test_the_baseline_ships_the_same_teacher_and_is_scored_the_same_way(pipeline_runs):
    """MODEL=transformer packs the teacher the memory model learned from (equal steps here) and
    scores it from its artifact: its model-only score is the teacher's up to quantization."""
    workdir, logs = pipeline_runs

    def teacher_digest(name: str) -> str:
        text = (workdir / "logs" / f"{name}.txt").read_text()
        line = next(line for line in text.splitlines() if line.startswith("replicas teacher:"))
        return _runs.parse_log(line)["replicas"]["digest"]

    assert teacher_digest("baseline") == teacher_digest(PIPELINE_RUN_ID)
    baseline, memory = logs["baseline"], logs[PIPELINE_RUN_ID]
    for line in (train_gpt.BASELINE_RECORD, train_gpt.BASELINE_SCORE_RECORD):
        assert 0 < float(baseline[line]["val_bpb"]) < 20
    for absent in (train_gpt.SCORE_RECORD, train_gpt.stage_record("distill")):
        assert absent not in baseline
    teacher_bpb = float(memory[train_gpt.TEACHER_RECORD]["val_bpb"])
    assert abs(float(baseline[train_gpt.BASELINE_RECORD]["val_bpb"]) - teacher_bpb) < 0.02
    assert int(baseline[train_gpt.ARTIFACT_RECORD]["total_bytes"]) <= 16_000_000


def test_the_memory_is_built_and_shipped_alike_on_two_ranks(pipeline_runs):
    """Every rank ends with the identical memory and student (fitted to a binding size limit
    before distillation), and the artifact ships the gate and the memory."""
    workdir, logs = pipeline_runs
    records = logs["memory_ddp"]
    write = records[train_gpt.stage_record("eam_write")]
    # The context memory is a distribution over the whole vocabulary: on text it did not count,
    # its loss is below a uniform guess's, and the unigram counts' is above its own.
    assert 0 < float(write["memory_nll"]) <= float(write["unigram_nll"]) < math.log(1024)
    # The context memory: both ranks' counts, gathered, at least the budget of tokens.
    assert int(write["context_tokens"]) >= int(TINY_RUN["EAM_CONTEXT_TOKENS"])
    assert int(write["context_pairs"]) > 0
    text = (workdir / "logs" / "memory_ddp.txt").read_text()
    for name in ("teacher", "memory", "student"):
        assert f"replicas {name}:identical ranks:2" in text
    for line in (train_gpt.MEMORY_RECORD, train_gpt.SCORE_RECORD):
        assert 0 < float(records[line]["val_bpb"]) < 20
    _, entries, arrays = train_gpt.read_artifact(workdir / "memory_ddp.eam")
    tensors = train_gpt.unpack_tensors(entries, arrays)
    assert "gate.weight" in tensors
    pairs = int(records[train_gpt.FIT_RECORD]["context_pairs"])
    assert tensors["context_next_tokens"].numel() == pairs
    # The fit before distillation cut the memories, leaving room for the untrained decoder;
    # packing's fit is the record's last word.
    fits = [_runs.parse_log(line)[train_gpt.FIT_RECORD] for line in text.splitlines()
            if line.startswith(train_gpt.FIT_RECORD)]
    assert [fit["at"] for fit in fits] == ["distill", "pack"]
    assert int(fits[0]["dropped_context_pairs"]) > 0 and int(fits[0]["reserve_bytes"]) > 0
    artifact = records[train_gpt.ARTIFACT_RECORD]
    assert int(artifact["total_bytes"]) <= int(artifact["limit"])
