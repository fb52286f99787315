"""Bad input fails before training, naming the problem; runs never clobber each other."""

import dataclasses
import os
import shutil
import struct
import types

import numpy as np
import pytest
import torch

import train_gpt
from tests.helpers import CPU, tiny_args, tiny_student, write_artifact
from tools.make_demo_data import write_shard


def write_bad_shard(path, tokens, word: int, value: int) -> None:
    """A shard with header word `word` (0 magic, 1 version, 2 token count) set to `value`."""
    write_shard(path, tokens)
    with open(path, "r+b") as handle:
        handle.seek(4 * word)
        handle.write(struct.pack("<i", value))


class TrainingStarted(Exception):
    pass


@pytest.fixture
def run_dir(demo_data, tmp_path, monkeypatch):
    """A working folder with small good data (cpu_smoke sizes) and main() stopped at training."""
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(demo_data / "tokenizer.model", data / "tokenizer.model")
    rng = np.random.default_rng(0)
    write_shard(data / "fineweb_train_000000.bin", rng.integers(0, 1024, 20000))
    write_shard(data / "fineweb_train_000001.bin", rng.integers(0, 1024, 20000))
    write_shard(data / "fineweb_val_000000.bin", rng.integers(0, 1024, 3000))
    monkeypatch.chdir(tmp_path)
    for name, value in {"PROFILE": "cpu_smoke", "DATA_PATH": str(data), "RUN_ID": "check",
                        "TOKENIZER_PATH": str(data / "tokenizer.model")}.items():
        monkeypatch.setenv(name, value)

    def stop(*args, **kwargs):
        raise TrainingStarted
    monkeypatch.setattr(train_gpt, "train_teacher", stop)
    return tmp_path


def checkpoint(data, fingerprint: str | None = None, **shape) -> None:
    """teacher.pt beside the data folder, as tools.pretrain_teacher writes it, for the
    environment's settings (with `shape` changed) and data (or another `fingerprint`)."""
    args = dataclasses.replace(train_gpt.Hyperparameters.from_env(), **shape)
    config = train_gpt.settings_view(train_gpt.GPTConfig, args)
    fingerprint = fingerprint or train_gpt.data_fingerprint(
        train_gpt.shard_paths(str(data), "train"))
    torch.save(dict(config=dataclasses.asdict(config), data=fingerprint,
                    state=train_gpt.GPT(config).state_dict()), data.parent / "teacher.pt")


def bad_token(ids: list[int]):
    def write(data):
        write_shard(data / "fineweb_val_000000.bin", ids)
    return write


@pytest.mark.parametrize("env, damage, message", [
    ({}, bad_token([1, 5, 2000, 7]), r"validation split: token id 2000 at position 2 is >= "
                                     r"VOCAB_SIZE=1024"),
    ({}, lambda data: write_shard(data / "fineweb_train_000000.bin", [1, 1500]),
     r"fineweb_train_000000.bin: token id 1500 at position 1"),
    ({}, lambda data: write_bad_shard(data / "fineweb_val_000000.bin", [1, 2], 0, 7),
     "wrong magic 7"),
    ({}, lambda data: write_bad_shard(data / "fineweb_val_000000.bin", [1, 2], 2, 9),
     "declares 9 tokens but file holds 2"),
    ({}, lambda data: write_bad_shard(data / "fineweb_train_000001.bin", [1, 2], 2, 3),
     "fineweb_train_000001.bin: header declares 3"),
    ({"VOCAB_SIZE": "2048"}, None, "VOCAB_SIZE: a vocabulary of 2048 tokens, but .* has 1024"),
    ({}, lambda data: (data / "manifest.json").write_text('{"tokenizer_sha256": "00ff"}'),
     "names 00ff: the shards were made with another tokenizer"),
    ({"SIZE_LIMIT": "1000"}, None, "SIZE_LIMIT=1000: the code alone counts"),
    ({"ARTIFACT_PATH": "taken.eam"}, lambda data: (data.parent / "taken.eam").write_bytes(b"x"),
     "ARTIFACT_PATH='taken.eam' exists"),
    ({"ARTIFACT_PATH": "missing/model.eam"}, None, "cannot write in its folder"),
    ({"DISTILL_BATCH_TOKENS": "100"}, None, "DISTILL_BATCH_TOKENS=100 does not split"),
    ({"VAL_TOKENS": "1"}, None, "VAL_TOKENS=1: 1 validation tokens, at least 2"),
    ({"EVAL_ONLY": "1", "ARTIFACT_PATH": "absent.eam"}, None,
     "ARTIFACT_PATH='absent.eam': no such file"),
    # Weights that cannot fit beside the code, whatever they pack to, at either kind of model.
    ({"SIZE_LIMIT": "300000"}, None, "SIZE_LIMIT=300000: MODEL=eam at these sizes cannot fit"),
    ({"SIZE_LIMIT": "300000", "MODEL": "transformer"}, None,
     "SIZE_LIMIT=300000: MODEL=transformer at these sizes cannot fit"),
    ({"TTT_STEPS": "1", "TTT_PARAMS": "decoder", "MODEL": "transformer"}, None,
     r"TTT_PARAMS='decoder': \['decoder'\] names no parameter of the transformer model"),
    # A teacher to start from that is absent, of another shape, or pretrained on other data.
    ({"INIT_CHECKPOINT": "absent.pt"}, None, "INIT_CHECKPOINT='absent.pt': no such file"),
    ({"INIT_CHECKPOINT": "teacher.pt"}, lambda data: checkpoint(data, num_layers=3),
     "INIT_CHECKPOINT='teacher.pt': a teacher of config"),
    ({"INIT_CHECKPOINT": "teacher.pt"}, lambda data: checkpoint(data, fingerprint="0000"),
     "INIT_CHECKPOINT='teacher.pt': pretrained on data 0000, but DATA_PATH="),
])
def test_bad_input_fails_before_training_and_the_log_says_why(run_dir, monkeypatch, env,
                                                               damage, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if damage is not None:
        damage(run_dir / "data")
    with pytest.raises((ValueError, OSError), match=message) as error:
        train_gpt.main()
    log = (run_dir / "logs" / "check.txt").read_text()
    assert "error rank:0" in log and str(error.value) in log


# The competition's teacher shape: as the baseline it must not be refused, since the challenge's
# records pack int6 weights of its shape under 16,000,000 bytes (README, "The baseline on 8xH100").
COMPETITION_SHAPE = {name.upper(): str(getattr(train_gpt.Hyperparameters, name)) for name in (
    "num_layers", "model_dim", "num_heads", "num_kv_heads", "mlp_mult", "xsa_layers")}


@pytest.mark.parametrize("env", [{}, {"MODEL": "transformer", "SIZE_LIMIT": "16000000",
                                      **COMPETITION_SHAPE}, {"INIT_CHECKPOINT": "teacher.pt"}])
def test_good_input_reaches_training(run_dir, monkeypatch, env):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if "INIT_CHECKPOINT" in env:
        checkpoint(run_dir / "data")
    with pytest.raises(TrainingStarted):
        train_gpt.main()


def test_the_check_sizes_the_baseline_at_its_fewest_bits(run_dir, monkeypatch):
    """The baseline packs to fewer bits where QUANT_BITS does not fit (fit_baseline): a limit
    that only its fewest bits could meet reaches training. The memory model's fewest are
    QUANT_BITS: it drops memory instead."""
    monkeypatch.setenv("MODEL", "transformer")
    args = train_gpt.Hyperparameters.from_env(dict(os.environ))
    model = train_gpt.model_skeleton(args)
    code = os.path.getsize(train_gpt.__file__)
    least = {bits: train_gpt.SMALLEST_PACKED_SHARE * train_gpt.width_bytes(model, bits)
             for bits in (train_gpt.LOWEST_QUANT_BITS, args.quant_bits)}
    limit = code + round(least[train_gpt.LOWEST_QUANT_BITS]) + 1
    assert limit < code + least[args.quant_bits]
    monkeypatch.setenv("SIZE_LIMIT", str(limit))
    with pytest.raises(TrainingStarted):
        train_gpt.main()
    assert train_gpt.fewest_bits(dataclasses.replace(args, model="eam")) == args.quant_bits


@pytest.mark.parametrize("environ, variable", [
    ({"MAX_WALLCLOCK_SECONDS": "nan"}, "MAX_WALLCLOCK_SECONDS=nan: must be a finite number"),
    ({"KNN_BETA": "inf"}, "KNN_BETA=inf: must be a finite number"),
    ({"KNN_CAPACITY": "0"}, "KNN_CAPACITY=0: must be positive"),
    ({"TRAIN_LOG_EVERY": "0"}, "TRAIN_LOG_EVERY=0"),
    ({"LOGIT_SOFTCAP": "0"}, "LOGIT_SOFTCAP=0.0"),
    ({"DISTILL_TEMPERATURE": "0"}, "DISTILL_TEMPERATURE=0.0"),
    ({"DISTILL_BATCH_TOKENS": "0"}, "DISTILL_BATCH_TOKENS=0"),
    ({"EAM_CONTEXT_MIN_COUNT": "0"}, "EAM_CONTEXT_MIN_COUNT=0: must be positive"),
    ({"ZSTD_LEVEL": "23"}, "ZSTD_LEVEL=23"),
    ({"TRAIN_RESERVE_FRAC": "1"}, "TRAIN_RESERVE_FRAC=1.0"),
    ({"EVAL_ONLY": "1"}, "EVAL_ONLY=1: set ARTIFACT_PATH"),
    ({"TEACHER_TIME_FRAC": "0.9"}, r"= 0.9 \+ 0.38 must be <= 1"),
])
def test_bad_settings_print_the_offending_values(environ, variable):
    with pytest.raises(ValueError, match=variable):
        train_gpt.Hyperparameters.from_env(environ)


def test_a_later_training_shard_is_checked_when_the_loader_opens_it(tmp_path):
    write_shard(tmp_path / "fineweb_train_000000.bin", list(range(40)))
    write_shard(tmp_path / "fineweb_train_000001.bin", [3, 4000, 5])
    stream = train_gpt.TokenStream(train_gpt.shard_paths(str(tmp_path), "train"), 1024)
    stream.take(30)
    with pytest.raises(ValueError, match="000001.bin: token id 4000 at position 1"):
        stream.take(20)


# ---- runs never clobber each other ------------------------------------------------------------


def test_a_chosen_run_id_whose_log_exists_is_refused_and_the_log_kept(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "mine.txt").write_text("an earlier run\n")
    with pytest.raises(FileExistsError, match="RUN_ID=mine: logs/mine.txt exists"):
        train_gpt.claim_run(train_gpt.Hyperparameters.from_env({"RUN_ID": "mine"}))
    assert (tmp_path / "logs" / "mine.txt").read_text() == "an earlier run\n"


def test_the_default_run_id_moves_on_to_a_fresh_name_and_artifact(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = train_gpt.Hyperparameters.from_env({"PROFILE": "cpu_smoke"})
    assert (args.run_id, args.artifact_path) == ("cpu_smoke_seed1337", "cpu_smoke_seed1337.eam")
    first, log = train_gpt.claim_run(args)
    assert log.read_text() == "" and first.run_id == "cpu_smoke_seed1337"
    (tmp_path / "cpu_smoke_seed1337_2.eam").write_bytes(b"taken")  # an artifact without a log
    second, log = train_gpt.claim_run(args)
    assert (second.run_id, second.artifact_path) == ("cpu_smoke_seed1337_3",
                                                     "cpu_smoke_seed1337_3.eam")
    assert log == train_gpt.LOG_DIR / "cpu_smoke_seed1337_3.txt"
    # Scoring an artifact keeps the path asked for, whatever the log's name becomes.
    scoring = train_gpt.Hyperparameters.from_env({"PROFILE": "cpu_smoke", "EVAL_ONLY": "1",
                                                  "ARTIFACT_PATH": "cpu_smoke_seed1337.eam"})
    assert train_gpt.claim_run(scoring)[0].artifact_path == "cpu_smoke_seed1337.eam"


def test_the_evaluation_refuses_an_artifact_other_than_the_one_packed(tmp_path):
    args, student = tiny_student()
    path = tmp_path / "model.eam"
    write_artifact(path, args, student)
    packed = train_gpt.file_sha256(path)
    train_gpt.load_artifact(path, torch.device("cpu"), sha256=packed)
    _, other = tiny_student(seed=1)
    write_artifact(path, args, other)
    with pytest.raises(ValueError, match=f"is not the {packed} this run packed"):
        train_gpt.load_artifact(path, torch.device("cpu"), sha256=packed)


def test_the_atomic_write_syncs_before_renaming_and_leaves_no_temporary(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"),
                                                     real_replace(a, b))[1])
    train_gpt.write_atomically(tmp_path / "a.eam", b"bytes")
    assert events == ["fsync", "replace", "fsync"]  # the file, the rename, then its folder
    assert [p.name for p in tmp_path.iterdir()] == ["a.eam"]


def test_packing_never_replaces_an_artifact_that_appeared_during_the_run(tmp_path):
    """The check before training finds the path free; another run may write it meanwhile."""
    (tmp_path / "a.eam").write_bytes(b"another run's")
    with pytest.raises(FileExistsError, match="appeared during this run"):
        train_gpt.write_atomically(tmp_path / "a.eam", b"this run's", replace=False)
    assert (tmp_path / "a.eam").read_bytes() == b"another run's"
    assert [p.name for p in tmp_path.iterdir()] == ["a.eam"]  # no temporary left
    train_gpt.write_atomically(tmp_path / "b.eam", b"this run's", replace=False)
    assert (tmp_path / "b.eam").read_bytes() == b"this run's"


# ---- one deadline -----------------------------------------------------------------------------


def test_stage_ends_share_one_deadline_less_the_reserve():
    args = tiny_args(max_wallclock_seconds=100, train_reserve_frac=0.1)
    ends = [train_gpt.stage_end(50.0, args, share) for share in (0.0, 0.5, 1.0)]
    assert ends == [50.0, 95.0, 140.0]


def test_no_training_step_ends_after_its_deadline(demo_data, monkeypatch):
    args = tiny_args(vocab_size=1024, train_seq_len=32, train_batch_tokens=64,
                     grad_accum_world=1, train_log_every=1000)
    loader = train_gpt.DistributedTokenLoader(train_gpt.shard_paths(str(demo_data), "train"),
                                              CPU)
    model = train_gpt.GPT(train_gpt.settings_view(train_gpt.GPTConfig, args, num_layers=1))
    clock = types.SimpleNamespace(now=100.0)
    clock.perf_counter = lambda: clock.now
    monkeypatch.setattr(train_gpt, "time", clock)  # the loop's clock, moved by the steps alone

    def slow_loss(m, x, y):
        clock.now += 0.2  # every step takes 0.2 s
        return m(x, y)
    phase = train_gpt.Phase("teacher", slow_loss, batch_tokens=64, seq_len=32, stop_at=101.1,
                            max_steps=0)
    stats = train_gpt.run_training(CPU, args, model, phase, loader)
    # Five steps end at 101.0; a sixth would end at 101.2, past the deadline (the old loop,
    # which only stopped once past it, took it).
    assert stats["steps"] == 5 and clock.now == pytest.approx(101.0)
