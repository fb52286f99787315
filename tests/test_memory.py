"""The memory: context codes, counting, its runs of counts, and the Witten-Bell read."""

import math

import pytest
import torch

import train_gpt
from tests.helpers import CPU, counted_contexts, tiny_args
from tools import make_demo_data


def witten_bell_reference(history: list[int], stream: list[int], lengths: list[int], vocab: int,
                          skipped: int | None = None) -> list[float]:
    """The interpolated Witten-Bell distribution after `history`, written out plainly: from the
    uniform distribution, the counts of each context of `lengths` tokens (0: the empty one) in
    `stream` (of its targets stream[1:]), shortest first; the target at stream index `skipped`
    (and its contexts) not counted."""
    probs = [1 / vocab] * vocab
    for length in lengths:
        if len(history) < length:
            break
        context = tuple(history[len(history) - length:])
        followers: dict[int, int] = {}
        for end in range(max(length, 1), len(stream)):
            if end != skipped and tuple(stream[end - length: end]) == context:
                followers[stream[end]] = followers.get(stream[end], 0) + 1
        if followers:
            total, types = sum(followers.values()), len(followers)
            probs = [(followers.get(token, 0) + types * p) / (total + types)
                     for token, p in enumerate(probs)]
    return probs


CONTEXT_HISTORIES = [[], [2], [0, 1], [1, 1, 0], [4, 4, 4], [2, 0, 1, 2], [0, 4, 1]]


def counted_stream(lengths: tuple[int, ...], vocab: int = 5, longest: int = 3):
    """A stream of three tokens of five (some never follow anything), its memory at `lengths`,
    and the recent tokens of CONTEXT_HISTORIES: (stream, memory, recent)."""
    torch.manual_seed(0)
    stream = torch.randint(0, 3, (200,))
    recent = train_gpt.recent_tokens(stream[None, :-1], longest)[0]
    tables = train_gpt.context_tables(
        *train_gpt.count_context_pairs(recent, stream[1:], vocab, lengths), vocab)
    queries = torch.tensor([[-1] * (longest - len(h)) + h[-longest:] for h in CONTEXT_HISTORIES])
    return stream, train_gpt.ContextCounts(tables, vocab), queries


@pytest.mark.parametrize("lengths", [(0, 1, 2, 3), (0, 2, 3), (0,), (0, 3)])
def test_the_read_is_witten_bell_interpolation_from_the_uniform_distribution(lengths):
    stream, memory, queries = counted_stream(lengths)
    probs, evidence = train_gpt.read_contexts(queries, memory, lengths)
    for row, history in enumerate(CONTEXT_HISTORIES):
        expected = witten_bell_reference(history, stream.tolist(), list(lengths), 5)
        torch.testing.assert_close(probs[row], torch.tensor(expected), atol=1e-6, rtol=0)
    torch.testing.assert_close(probs.sum(1), torch.ones(len(CONTEXT_HISTORIES)))
    assert (probs > 0).all()  # tokens 3 and 4 never follow anything, and keep mass
    # The empty context is held everywhere; a longer one only where the history holds it (row 3
    # has every length; token 4 never occurs, row 4 finds nothing longer).
    assert evidence.shape == (len(CONTEXT_HISTORIES), len(lengths))
    assert (evidence[:, 0] == math.log1p(199)).all()
    assert (evidence[3] > 0).all() and (evidence[4, 1:] == 0).all()


def test_an_empty_memory_reads_the_uniform_distribution():
    memory = train_gpt.ContextCounts(train_gpt.no_contexts(), 5)
    probs, evidence = train_gpt.read_contexts(torch.tensor([[0, 1, 2]]), memory, (0, 2))
    torch.testing.assert_close(probs, torch.full((1, 5), 0.2))
    assert (evidence == 0).all()
    probs, evidence = train_gpt.read_contexts(torch.tensor([[0, 1, 2]]), memory, ())
    torch.testing.assert_close(probs, torch.full((1, 5), 0.2)) and evidence.shape == (1, 0)


@pytest.mark.parametrize("lengths", [(0, 1, 2, 3), (0, 2, 3)])
def test_leaving_a_counted_target_out_reads_as_if_it_was_never_counted(lengths):
    """Distillation reads counted text as the evaluation reads new text: each position's own
    occurrence taken out of the counts (leave-one-out) gives the distribution of counts made
    without it, at every length; a count of 0 (text not counted) changes nothing."""
    stream, memory, _ = counted_stream(lengths)
    positions = torch.arange(3, 200, 7)  # targets stream[p], each with 3 tokens of history
    recent = torch.stack([stream[p - 3: p] for p in positions])
    targets = stream[positions]
    ones = torch.ones_like(targets)
    probs, evidence = train_gpt.read_contexts(recent, memory, lengths, (targets, ones))
    for row, position in enumerate(positions.tolist()):
        expected = witten_bell_reference(recent[row].tolist(), stream.tolist(), list(lengths), 5,
                                         skipped=position)
        torch.testing.assert_close(probs[row], torch.tensor(expected), atol=1e-6, rtol=0)
    full, full_evidence = train_gpt.read_contexts(recent, memory, lengths)
    assert (evidence <= full_evidence).all() and (evidence < full_evidence).any()
    none_left_out = train_gpt.read_contexts(recent, memory, lengths, (targets, 0 * ones))
    assert torch.equal(none_left_out[0], full) and torch.equal(none_left_out[1], full_evidence)
    # A context seen once, left out, is no context; the empty context keeps the other tokens.
    once = torch.tensor([0, 1, 2, 3, 4])
    single = train_gpt.context_tables(*train_gpt.count_context_pairs(
        train_gpt.recent_tokens(once[None, :-1], 3)[0], once[1:], 5, lengths), 5)
    alone, alone_evidence = train_gpt.read_contexts(
        torch.tensor([[0, 1, 2]]), train_gpt.ContextCounts(single, 5), lengths,
        (torch.tensor([3]), torch.tensor([1])))
    expected = witten_bell_reference([0, 1, 2], once.tolist(), list(lengths), 5, skipped=3)
    torch.testing.assert_close(alone[0], torch.tensor(expected), atol=1e-6, rtol=0)
    assert (alone_evidence[:, 1:] == 0).all() and alone_evidence[0, 0] == math.log(4)


def test_context_codes_tell_lengths_apart_and_mark_incomplete_contexts():
    recent = torch.tensor([[-1, -1, 0], [-1, 0, 0], [0, 0, 0], [3, 1, 2]])
    codes = train_gpt.context_codes(recent, vocab_size=4)
    assert codes[0].tolist() == [0, 1, -1, -1] and codes[1].tolist() == [0, 1, 6, -1]
    assert len(set(codes[2].tolist())) == 4  # "", "0", "0 0" and "0 0 0" differ
    assert codes[3].tolist() == [0, 3, 3 * 5 + 2, (3 * 5 + 2) * 5 + 4]
    # The exact codes' limit: a code times V plus a token must fit int64.
    assert train_gpt.exact_length(1024) == 5 and train_gpt.exact_length(4) == 26


def test_long_contexts_are_hashed_above_every_exact_code_and_collide_by_chance_alone():
    vocab, longest = 1024, 16
    generator = torch.Generator().manual_seed(0)
    # Text of a few tokens (many shared suffixes) and repeats: equal contexts, equal codes.
    text = torch.randint(0, 6, (20_000,), generator=generator)
    text = torch.cat([text, text[:5000]])
    recent = train_gpt.recent_tokens(text[None], longest)[0, longest - 1:]
    codes = train_gpt.context_codes(recent, vocab)  # [N, 17]
    exact = train_gpt.exact_length(vocab)
    first_hash = (vocab + 1) ** exact
    assert (codes[:, 1: exact + 1] < first_hash).all()
    assert (codes[:, exact + 1:] >= first_hash).all()
    assert (codes * vocab + vocab - 1 > 0).all()  # no overflow: a pair code fits int64
    for length in range(exact + 1, longest + 1):
        contexts = {tuple(row) for row in recent[:, longest - length:].tolist()}
        hashed = set(codes[:, length].tolist())
        assert len(hashed) == len(contexts), length  # one code per distinct context
    # Row i is the context ending at position i + 15; the repeat starts at position 20,000.
    assert torch.equal(codes[20_000: 24_985], codes[0: 4_985])


def test_writes_in_any_order_and_any_runs_count_what_counting_at_once_counts():
    torch.manual_seed(1)
    stream = torch.randint(0, 4, (3001,))
    lengths = (0, 1, 2)
    recent = train_gpt.recent_tokens(stream[None, :-1], 2)[0]
    whole = train_gpt.count_context_pairs(recent, stream[1:], 4, lengths)
    shipped = train_gpt.context_tables(*train_gpt.count_context_pairs(
        recent[:500], stream[1:501], 4, lengths), 4)
    shipped_counts = shipped.counts.clone()
    memory = train_gpt.ContextCounts(shipped, 4)
    for begin in (2500, 500, 1700, 900, 2000, 2900, 1300):  # chunks out of order
        end = {2500: 2900, 500: 900, 1700: 2000, 900: 1300, 2000: 2500, 2900: 3000,
               1300: 1700}[begin]
        memory.add(*train_gpt.count_context_pairs(recent[begin:end], stream[1:][begin:end], 4,
                                                  lengths))
        codes = torch.cat([run[0] for run in memory.runs])
        assert codes.unique().numel() == codes.numel()  # no pair in two runs
        assert len(memory.runs) <= 1 + math.log2(max(memory.pairs, 2))
    merged = torch.cat([run[0] for run in memory.runs]), torch.cat([run[1] for run in memory.runs])
    order = merged[0].argsort()
    assert torch.equal(merged[0][order], whole[0]) and torch.equal(merged[1][order], whole[1])
    assert torch.equal(shipped.counts, shipped_counts)  # the shipped tables are never written


def test_merged_and_pruned_counts_equal_counting_at_once():
    torch.manual_seed(1)
    stream = torch.randint(0, 4, (301,))
    recent = train_gpt.recent_tokens(stream[None, :-1], 2)[0]
    whole = train_gpt.count_context_pairs(recent, stream[1:], 4, (0, 1, 2))
    parts = [train_gpt.count_context_pairs(recent[begin: begin + 100], stream[1:][begin:][:100],
                                           4, (0, 1, 2)) for begin in (0, 100, 200)]
    merged = train_gpt.merge_pairs(*parts)
    # Row boundaries lose no context: recent_tokens was taken over the whole stream.
    assert torch.equal(merged[0], whole[0]) and torch.equal(merged[1], whole[1])
    tables = train_gpt.context_tables(*whole, 4)
    pruned = tables.pruned(5)
    assert (pruned.counts >= 5).all() and pruned.counts.sum() == whole[1][whole[1] >= 5].sum()
    assert pruned.sizes.sum() == pruned.counts.numel() and (pruned.sizes > 0).all()
    assert torch.isin(pruned.codes, tables.codes).all()


def test_counted_text_knows_how_often_each_stream_index_was_counted():
    """times against counting by hand, in a stream that repeats a corpus of 7 tokens."""
    corpus = 7
    for first, end in ((3, 5), (3, 10), (2, 30), (12, 12), (5, 11), (6, 8)):
        counted = train_gpt.CountedText(first, end, corpus)
        indices = torch.arange(0, 60)
        brute = [sum(1 for j in range(first, end) if j % corpus == i % corpus) for i in range(60)]
        assert counted.times(indices).tolist() == brute, (first, end)
        assert counted.tokens == end - first


def test_the_context_memory_counts_running_text_and_says_which(tmp_path):
    """Counting reads the stream as running text: the pairs of every counted target, with its
    whole context across batch rows, exactly the pairs of the text counted at once."""
    tokens = torch.randint(0, 6, (500,), generator=torch.Generator().manual_seed(3))
    make_demo_data.write_shard(tmp_path / "fineweb_train_000000.bin", tokens.numpy())
    args = tiny_args(vocab_size=6, eam_context_order=4, eam_context_min_length=1,
                     eam_context_min_count=1, eam_context_tokens=600, train_seq_len=8,
                     train_batch_tokens=64, grad_accum_world=1)
    loader = train_gpt.DistributedTokenLoader(train_gpt.shard_paths(str(tmp_path), "train"), CPU)
    loader.next_batch(64, 8)  # the teacher read first: 65 tokens
    contexts, counted = train_gpt.count_contexts(CPU, args, loader)
    assert (counted.first, counted.end, counted.corpus_tokens) == (65, 65 + 640, 500)
    stream = tokens[torch.arange(counted.first - 3, counted.end) % 500]
    recent = train_gpt.recent_tokens(stream[None, :-1], 3)[0, 2:]
    whole = train_gpt.context_tables(*train_gpt.count_context_pairs(
        recent, stream[3:], 6, train_gpt.shipped_lengths(args)), 6)
    for name in train_gpt.CONTEXT_BUFFERS:
        assert torch.equal(getattr(contexts, name), getattr(whole, name)), name


def test_the_memory_is_a_distribution_over_the_vocabulary_on_text_it_never_counted():
    """The stage line's diagnostics: the memory's loss on unseen text, and its unigram's, stay
    below a uniform guess's on text with any structure, the memory's below the unigram's."""
    generator = torch.Generator().manual_seed(4)
    vocab = 64
    # A text of 16 of the 64 tokens whose next token mostly follows from the last two.
    stream = [0, 1]
    noise = torch.randint(0, 3, (6000,), generator=generator).tolist()
    for step in range(6000):
        stream.append((stream[-1] * 3 + stream[-2] + noise[step]) % 16)
    stream = torch.tensor(stream)
    args = tiny_args(vocab_size=vocab, eam_context_order=3, eam_context_min_length=1)
    contexts = counted_contexts(args, stream[:5000])
    quality = train_gpt.memory_diagnostics(contexts, stream[4998:], (0, 1, 2), vocab)
    assert quality["memory_nll"] < quality["unigram_nll"] <= math.log(vocab) + 1e-6
