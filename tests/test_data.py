import random

import numpy as np
import pytest
import torch
from conftest import train_gpt


def write_shard(path, tokens, magic=train_gpt.SHARD_MAGIC, version=1, declared=None):
    header = np.zeros(train_gpt.HEADER_WORDS, dtype="<i4")
    header[:3] = magic, version, len(tokens) if declared is None else declared
    path.write_bytes(header.tobytes() + np.asarray(tokens, dtype="<u2").tobytes())


def test_shard_round_trip(tmp_path):
    write_shard(tmp_path / "ok.bin", [1, 5, 7])
    assert train_gpt.read_shard(tmp_path / "ok.bin").tolist() == [1, 5, 7]


@pytest.mark.parametrize("kwargs, message", [
    (dict(magic=123), "wrong magic"),
    (dict(version=2), "unsupported version"),
    (dict(declared=10), "declares 10 tokens"),
])
def test_shard_reader_rejects_bad_files(tmp_path, kwargs, message):
    write_shard(tmp_path / "bad.bin", [1, 2, 3], **kwargs)
    with pytest.raises(ValueError, match=message):
        train_gpt.read_shard(tmp_path / "bad.bin")


def test_shard_reader_rejects_truncated_header(tmp_path):
    (tmp_path / "short.bin").write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="truncated"):
        train_gpt.read_shard(tmp_path / "short.bin")


def test_missing_data_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="DATA_PATH"):
        train_gpt.shard_paths(str(tmp_path), "train")


def test_vocab_size_must_match_tokenizer(demo_data):
    with pytest.raises(ValueError, match="VOCAB_SIZE"):
        train_gpt.build_byte_tables(str(demo_data / "tokenizer.model"), 2048)


def random_document(rng: random.Random) -> str:
    words = ["the", "memory", "Zürich", "naïve", "東京", "3.14159", "2024", "x=y+1", "emoji🙂",
             "Ω", "  spaced", "tab\there", "ÆØÅ", "def", "(parens)", "ünïcödé", "ℌ", "ﬁ"]
    return " ".join(rng.choice(words) for _ in range(rng.randint(1, 30)))


def test_byte_tables_count_exactly_the_decoded_utf8_bytes(demo_data):
    import sentencepiece as spm

    path = str(demo_data / "tokenizer.model")
    processor = spm.SentencePieceProcessor(model_file=path)
    tables = train_gpt.build_byte_tables(path, processor.vocab_size())
    rng = random.Random(0)
    sequence, expected = [], 0
    for _ in range(200):
        ids = processor.encode(random_document(rng))
        sequence += [processor.bos_id(), *ids]
        expected += len(processor.decode(ids).encode("utf-8"))
    sequence = torch.tensor(sequence)
    assert any(processor.is_byte(i) for i in sequence.tolist()), "no byte-fallback piece tested"
    counted = tables.target_bytes(sequence[:-1], sequence[1:]).sum().item()
    # The first BOS is never a target; every other token's bytes are counted once.
    assert counted == expected


def test_loader_gives_each_rank_a_disjoint_part(tmp_path):
    write_shard(tmp_path / "fineweb_train_000000.bin", list(range(1000)))
    paths = train_gpt.shard_paths(str(tmp_path), "train")
    seen = []
    for rank in range(2):
        runtime = train_gpt.Runtime(rank, 2, 0, torch.device("cpu"), None)
        loader = train_gpt.DistributedTokenLoader(paths, runtime)
        x, y = loader.next_batch(16, 8)
        assert x.shape == (2, 8) and torch.equal(x.flatten()[1:], y.flatten()[:-1])
        seen.append(set(x.flatten().tolist()))
    assert not seen[0] & seen[1]
