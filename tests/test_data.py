import random
import struct

import pytest
import torch

import train_gpt
from tools import make_demo_data


def test_shards_have_the_challenge_layout_and_read_back(tmp_path):
    make_demo_data.write_shard(tmp_path / "ok.bin", [1, 5, 65535])
    raw = (tmp_path / "ok.bin").read_bytes()
    # The challenge's format, spelled out: 256 int32 words (magic, version, count), then uint16.
    assert raw == struct.pack("<3i", 20240520, 1, 3) + bytes(253 * 4) + struct.pack("<3H", 1, 5,
                                                                                   65535)
    assert train_gpt.read_shard(tmp_path / "ok.bin").tolist() == [1, 5, 65535]
    with pytest.raises(ValueError, match="uint16"):
        make_demo_data.write_shard(tmp_path / "big.bin", [1, 65536])


@pytest.mark.parametrize("word, value, message", [
    (0, 123, "wrong magic"),
    (1, 2, "unsupported version"),
    (2, 10, "declares 10 tokens"),
])
def test_shard_reader_rejects_bad_files(tmp_path, word, value, message):
    make_demo_data.write_shard(tmp_path / "bad.bin", [1, 2, 3])
    raw = bytearray((tmp_path / "bad.bin").read_bytes())
    raw[4 * word: 4 * word + 4] = struct.pack("<i", value)
    (tmp_path / "bad.bin").write_bytes(bytes(raw))
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
    with pytest.raises(ValueError, match="VOCAB_SIZE: a vocabulary of 2048 tokens.*1024 pieces"):
        train_gpt.build_byte_tables(str(demo_data / "tokenizer.model"), 2048, "VOCAB_SIZE")


def random_document(rng: random.Random) -> str:
    words = ["the", "memory", "Zürich", "naïve", "東京", "3.14159", "2024", "x=y+1", "emoji🙂",
             "Ω", "  spaced", "tab\there", "ÆØÅ", "def", "(parens)", "ünïcödé", "ℌ", "ﬁ"]
    return " ".join(rng.choice(words) for _ in range(rng.randint(1, 30)))


def test_byte_tables_count_exactly_the_decoded_utf8_bytes(demo_data):
    import sentencepiece as spm

    path = str(demo_data / "tokenizer.model")
    processor = spm.SentencePieceProcessor(model_file=path)
    tables = train_gpt.build_byte_tables(path, processor.vocab_size(), "test")
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
    make_demo_data.write_shard(tmp_path / "fineweb_train_000000.bin", list(range(1000)))
    paths = train_gpt.shard_paths(str(tmp_path), "train")
    seen = []
    for rank in range(2):
        runtime = train_gpt.Runtime(rank, 2, 0, torch.device("cpu"), None)
        loader = train_gpt.DistributedTokenLoader(paths, runtime)
        x, y = loader.next_batch(16, 8)
        assert x.shape == (2, 8) and torch.equal(x.flatten()[1:], y.flatten()[:-1])
        seen.append(set(x.flatten().tolist()))
    assert not seen[0] & seen[1]


def test_batches_know_the_stream_index_of_their_targets(tmp_path):
    """next_batch's first target, over ranks and past the corpus's end (the stream wraps)."""
    make_demo_data.write_shard(tmp_path / "fineweb_train_000000.bin", list(range(100)))
    make_demo_data.write_shard(tmp_path / "fineweb_train_000001.bin", list(range(100, 150)))
    paths = train_gpt.shard_paths(str(tmp_path), "train")
    for rank in range(2):
        loader = train_gpt.DistributedTokenLoader(
            paths, train_gpt.Runtime(rank, 2, 0, torch.device("cpu"), None))
        assert loader.stream.corpus_tokens == 150
        for _ in range(5):  # 5 x 2 x 17 tokens: the stream wraps once
            _, y = loader.next_batch(16, 8)
            index = loader.first_target_index + torch.arange(16)
            assert torch.equal(y.flatten(), index % 150)  # token i of the corpus is i here


@pytest.mark.parametrize("world_size", [1, 3])
def test_running_text_gives_every_token_once_with_its_history(tmp_path, world_size):
    make_demo_data.write_shard(tmp_path / "fineweb_train_000000.bin", list(range(70)))
    paths = train_gpt.shard_paths(str(tmp_path), "train")
    loaders = [train_gpt.DistributedTokenLoader(
        paths, train_gpt.Runtime(rank, world_size, 0, torch.device("cpu"), None))
        for rank in range(world_size)]
    for loader in loaders:
        loader.next_batch(4, 4)  # the stream has begun: 5 x world tokens read
    begun = 5 * world_size
    targets = []
    for _ in range(4):  # 4 x world x 6 tokens: past the corpus's end
        for loader in loaders:
            text, first = loader.next_text(6, history=3)
            expected = torch.arange(first - 3, first + 6)
            assert torch.equal(text, torch.where(expected >= 0, expected % 70, -1))
            targets += range(first, first + 6)
    assert sorted(targets) == list(range(begun, begun + 24 * world_size))
    # At the stream's start there is no history: -1 stands for it.
    fresh = train_gpt.DistributedTokenLoader(paths, loaders[0].runtime)
    text, first = fresh.next_text(6, history=3)
    assert first == 0 and text[:3].tolist() == [-1, -1, -1] and text[3:].tolist() == list(range(6))
    with pytest.raises(ValueError, match="history"):
        fresh.next_text(6, history=train_gpt.STREAM_TAIL_TOKENS + 1)
