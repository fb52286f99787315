"""Tests for tools/make_demo_data.py: shards, tokenizer, determinism and caching."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from tools import make_demo_data
from train_gpt import read_shard

# Keeps each build to a few seconds; tokenizer training still sees the whole train split.
SMALL_TRAIN_TOKENS = 200_000


@pytest.fixture(scope="module")
def built_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out_dir = tmp_path_factory.mktemp("demo_first")
    make_demo_data.build_demo_data(
        out_dir, challenge_tokenizer=None, max_train_tokens=SMALL_TRAIN_TOKENS
    )
    return out_dir


def test_shards_read_back_with_the_training_reader(built_dir: Path) -> None:
    shard_paths = sorted(built_dir.glob("fineweb_*.bin"))
    assert [path.name for path in shard_paths] == [
        "fineweb_train_000000.bin",
        "fineweb_val_000000.bin",
    ]
    for shard_path in shard_paths:
        assert read_shard(shard_path).size > 0  # the reader checks magic, version and count


def test_manifest_matches_shards(built_dir: Path) -> None:
    manifest = make_demo_data.build_demo_data(
        built_dir, challenge_tokenizer=None, max_train_tokens=SMALL_TRAIN_TOKENS
    )
    assert manifest["tokenizer_source"] == "trained"
    assert manifest["train_tokens"] == SMALL_TRAIN_TOKENS
    # The held-out split is sized for the full corpus, not the truncated train split.
    assert manifest["val_tokens"] >= 50_000
    assert manifest["val_docs"] > 0 and manifest["train_docs"] > manifest["val_docs"]


def test_tokens_start_with_bos_and_fit_vocab(built_dir: Path) -> None:
    train_tokens = read_shard(built_dir / "fineweb_train_000000.bin")
    val_tokens = read_shard(built_dir / "fineweb_val_000000.bin")
    assert train_tokens[0] == 1
    assert val_tokens[0] == 1
    assert int(train_tokens.max()) < 1024
    assert int(val_tokens.max()) < 1024


def test_tokenizer_matches_challenge_settings_and_round_trips(built_dir: Path) -> None:
    processor = spm.SentencePieceProcessor(model_file=str(built_dir / "tokenizer.model"))
    assert processor.vocab_size() == 1024
    assert (processor.pad_id(), processor.bos_id(), processor.eos_id(), processor.unk_id()) == (
        0,
        1,
        2,
        3,
    )
    sentence = "Return the number of items in the list, or 42 if it is empty."
    assert processor.decode(processor.encode(sentence)) == sentence
    # Digits are split one per piece, as in the challenge tokenizer.
    assert processor.encode("1234", out_type=str) == ["1", "2", "3", "4"]


def test_val_shard_decodes_to_readable_text(built_dir: Path) -> None:
    processor = spm.SentencePieceProcessor(model_file=str(built_dir / "tokenizer.model"))
    val_tokens = read_shard(built_dir / "fineweb_val_000000.bin")
    document_starts = np.flatnonzero(val_tokens == 1)
    first_document = val_tokens[1 : document_starts[1]].tolist()
    text = processor.decode(first_document)
    assert len(text) >= make_demo_data.MIN_DOC_CHARS
    assert processor.encode(text) == first_document


def test_rebuild_is_byte_identical(built_dir: Path, tmp_path: Path) -> None:
    make_demo_data.build_demo_data(
        tmp_path, challenge_tokenizer=None, max_train_tokens=SMALL_TRAIN_TOKENS
    )
    for name in ["tokenizer.model", "fineweb_train_000000.bin", "fineweb_val_000000.bin"]:
        assert (tmp_path / name).read_bytes() == (built_dir / name).read_bytes(), name


def test_rerun_without_force_is_a_no_op(
    built_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mtimes_before = {path.name: path.stat().st_mtime_ns for path in built_dir.iterdir()}
    exit_code = make_demo_data.main(
        [
            "--out",
            str(built_dir),
            "--challenge-tokenizer",
            str(built_dir / "missing.model"),
            "--max-train-tokens",
            str(SMALL_TRAIN_TOKENS),
        ]
    )
    assert exit_code == 0
    assert "up to date" in capsys.readouterr().out
    assert {path.name: path.stat().st_mtime_ns for path in built_dir.iterdir()} == mtimes_before


def test_changed_settings_are_not_up_to_date(built_dir: Path) -> None:
    manifest = make_demo_data.build_demo_data(
        built_dir, challenge_tokenizer=None, max_train_tokens=SMALL_TRAIN_TOKENS
    )
    settings = {key: manifest[key] for key in ["seed", "max_train_tokens", "tokenizer_source"]}
    assert make_demo_data.is_up_to_date(built_dir, settings)
    assert not make_demo_data.is_up_to_date(built_dir, {**settings, "seed": 7})
    assert not make_demo_data.is_up_to_date(built_dir, {**settings, "max_train_tokens": 0})
    assert not make_demo_data.is_up_to_date(
        built_dir, {**settings, "tokenizer_source": "challenge"}
    )


def test_challenge_tokenizer_is_copied(built_dir: Path, tmp_path: Path) -> None:
    challenge_tokenizer = tmp_path / "fineweb_1024_bpe.model"
    challenge_tokenizer.write_bytes((built_dir / "tokenizer.model").read_bytes())
    out_dir = tmp_path / "out"
    manifest = make_demo_data.build_demo_data(
        out_dir, challenge_tokenizer=challenge_tokenizer, max_train_tokens=1_000
    )
    assert manifest["tokenizer_source"] == "challenge"
    assert (out_dir / "tokenizer.model").read_bytes() == challenge_tokenizer.read_bytes()


def test_a_damaged_shard_is_not_up_to_date(built_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(built_dir, copy)
    settings = {key: value for key, value in make_demo_data.build_demo_data(
        copy, challenge_tokenizer=None, max_train_tokens=SMALL_TRAIN_TOKENS).items()
        if key in ("seed", "max_train_tokens", "tokenizer_source")}
    assert make_demo_data.is_up_to_date(copy, settings)
    shard = copy / "fineweb_val_000000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    assert not make_demo_data.is_up_to_date(copy, settings)
