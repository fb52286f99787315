import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import train_gpt
from tests.helpers import tiny_args


def new_memory(vocab: int = 6, **overrides) -> train_gpt.ElasticMemory:
    config = train_gpt.memory_write_config(tiny_args(**overrides))
    return train_gpt.ElasticMemory(config, vocab, torch.device("cpu"))

def memory_with_addresses(addresses: torch.Tensor, vocab: int = 6, **overrides):
    memory = new_memory(vocab, eam_locations=max(64, addresses.size(0)),
                        eam_key_dim=addresses.size(1), **overrides)
    memory.addresses[: addresses.size(0)] = addresses
    memory.size = addresses.size(0)
    return memory

def read(queries: torch.Tensor, tables: train_gpt.MemoryTables, vocab: int = 6,
         alpha: float = 0.5) -> torch.Tensor:
    """p_mem [N, V]: the memory's next-token distribution at unit queries (top 4, beta 20)."""
    config = train_gpt.MemoryReadConfig(k=4, beta=20.0, count_prior=0.0, alpha=alpha)
    return train_gpt.read_next_tokens(queries, tables, config,
                                      train_gpt.next_token_rows(tables, vocab))[0]

def test_writes_in_one_region_leave_other_locations_untouched():
    # Four pairs of nearby addresses; a key on a pair's axis has that pair as its top 2.
    pairs = torch.eye(8) + 0.5 * torch.eye(8)[[1, 0, 3, 2, 5, 4, 7, 6]]
    memory = memory_with_addresses(F.normalize(pairs, dim=1), eam_write_k=2)
    memory.accumulate(torch.eye(8)[:2], torch.tensor([1, 2]))
    before = memory.counters.clone()
    query = torch.eye(8)[:1]
    read_before = read(query, memory.tables())
    memory.accumulate(torch.eye(8)[4:6], torch.tensor([3, 4]))
    # The second write went to its own pair only, mass 1 per token.
    assert memory.counters[4:6].sum().item() == pytest.approx(2)
    assert torch.equal(memory.counters[:4], before[:4])
    assert torch.equal(memory.counters[6:8], before[6:8])
    torch.testing.assert_close(read(query, memory.tables()), read_before, atol=1e-6, rtol=0)

def test_memories_from_two_halves_sum_to_the_whole():
    torch.manual_seed(0)
    addresses = F.normalize(torch.randn(32, 8), dim=1)
    keys, tokens = F.normalize(torch.randn(500, 8), dim=1), torch.randint(0, 6, (500,))
    whole, first, second = (memory_with_addresses(addresses) for _ in range(3))
    whole.accumulate(keys, tokens)
    first.accumulate(keys[:250], tokens[:250])
    second.accumulate(keys[250:], tokens[250:])
    torch.testing.assert_close(first.counters + second.counters, whole.counters)
    torch.testing.assert_close(first.counts + second.counts, whole.counts)

def test_a_single_stored_key_reads_back_its_token():
    memory = new_memory()
    key = F.normalize(torch.randn(1, 8), dim=1)
    memory.place(key)
    memory.accumulate(key, torch.tensor([3]))
    assert memory.size == 1
    # Written once (n = 1): (n q + alpha / V) / (n + alpha), q all on token 3.
    expected = (F.one_hot(torch.tensor([3]), 6) + 0.5 / 6) / 1.5
    torch.testing.assert_close(read(key, memory.tables()), expected)

def test_empty_locations_never_contribute_to_a_read():
    memory = memory_with_addresses(torch.eye(8), eam_write_k=1)
    memory.accumulate(torch.eye(8)[:1], torch.tensor([2]))
    tables = memory.tables()
    assert tables.addresses.size(0) == 1
    # The query sits on an empty location; the only written distribution must come back
    # undiluted.
    expected = (F.one_hot(torch.tensor([2]), 6) + 0.5 / 6) / 1.5
    torch.testing.assert_close(read(torch.eye(8)[3:4], tables), expected)

def test_read_is_differentiable_with_respect_to_the_query():
    torch.manual_seed(0)
    memory = memory_with_addresses(F.normalize(torch.randn(16, 8), dim=1))
    memory.accumulate(F.normalize(torch.randn(100, 8), dim=1), torch.randint(0, 6, (100,)))
    query = F.normalize(torch.randn(3, 8), dim=1).requires_grad_()
    read(query, memory.tables()).square().sum().backward()
    assert query.grad is not None and query.grad.abs().sum() > 0

def test_write_mass_usage_against_a_direct_count():
    counts = torch.tensor([50.0, 30.0, 0.0, 20.0] + [0.0] * 196)  # 200 slots, 3 written
    usage = train_gpt.write_mass_usage(counts[:4], capacity=200)
    assert usage["held_share"] == 3 / 200
    assert usage["top1pct_mass"] == pytest.approx(0.8)  # the busiest 2 slots of 200
    assert usage["max_mass"] == pytest.approx(0.5)


@pytest.mark.parametrize("block_rows", [train_gpt.SIMILARITY_ROWS, 7])
def test_next_token_writes_equal_a_per_item_loop(monkeypatch, block_rows):
    """counters[location, next token] += softmax(beta * top-k sims) for every written item,
    however many rows a block of similarities holds."""
    monkeypatch.setattr(train_gpt, "SIMILARITY_ROWS", block_rows)
    torch.manual_seed(0)
    addresses = F.normalize(torch.randn(12, 8), dim=1)
    memory = memory_with_addresses(addresses, vocab=10, eam_write_k=3, eam_read_beta=5.0)
    keys, tokens = F.normalize(torch.randn(200, 8), dim=1), torch.randint(0, 10, (200,))
    memory.accumulate(keys[:120], tokens[:120])
    memory.accumulate(keys[120:], tokens[120:])
    expected = torch.zeros(12, 10, dtype=torch.float64)
    for key, token in zip(keys.double(), tokens.tolist(), strict=True):
        sims = addresses.double() @ key
        top = sims.topk(3)
        weights = torch.exp(5.0 * top.values) / torch.exp(5.0 * top.values).sum()
        for location, weight in zip(top.indices.tolist(), weights.tolist(), strict=True):
            expected[location, token] += weight
    torch.testing.assert_close(memory.counters[:12].double(), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(memory.counts[:12].double(), expected.sum(1), atol=1e-5, rtol=0)
    assert memory.counts.sum().item() == pytest.approx(200, rel=1e-5)  # each item adds mass 1

def test_kmeans_passes_fit_the_keys_better_than_the_seeds_and_use_every_address():
    torch.manual_seed(0)
    centres = F.normalize(torch.randn(16, 16), dim=1)
    keys = F.normalize(centres.repeat(50, 1) + 0.3 * torch.randn(800, 16), dim=1)

    def fit(passes: int) -> tuple[float, torch.Tensor]:
        generator = torch.Generator().manual_seed(3)
        addresses = train_gpt.kmeans_addresses(keys, 24, generator, passes=passes, chunk=100)
        return (keys @ addresses.T).max(dim=1).values.mean().item(), addresses

    seeded, _ = fit(0)
    fitted, addresses = fit(4)
    assert fitted > seeded + 0.01
    assert torch.bincount((keys @ addresses.T).argmax(dim=1), minlength=24).min() > 0
    torch.testing.assert_close(addresses.norm(dim=1), torch.ones(24))
    memory = new_memory(eam_locations=24, eam_key_dim=16)
    memory.place(keys)
    assert memory.size == 24


def dense_location_distributions(tables: train_gpt.MemoryTables, vocab: int, alpha: float):
    """Each location's smoothed distribution written out densely: (n q + s + alpha / V) /
    (n + |s| + alpha), s the counts written at evaluation (none: zero)."""
    counts = tables.log_counts.exp()[:, None]
    dense = torch.zeros(tables.patterns.size(0), vocab).scatter_add_(
        1, tables.next_tokens, tables.patterns)
    scored = (torch.zeros(tables.patterns.size(0), vocab) if tables.scored_counts is None
              else tables.scored_counts)
    return (counts * dense + scored + alpha / vocab) / (counts + scored.sum(1, keepdim=True)
                                                        + alpha)

def test_next_token_read_is_the_weighted_mean_of_smoothed_location_distributions():
    torch.manual_seed(0)
    counts = torch.rand(20, 30) ** 6 * torch.logspace(-1, 2, 20)[:, None]
    tables = train_gpt.next_token_tables(F.normalize(torch.randn(20, 8), dim=1), counts, 5)
    torch.testing.assert_close(tables.patterns.sum(1), torch.ones(20))
    assert torch.equal(tables.next_tokens, counts.topk(5, dim=1).indices)
    read = train_gpt.MemoryReadConfig(k=4, beta=6.0, count_prior=0.0, alpha=0.3)
    queries = F.normalize(torch.randn(7, 8), dim=1)
    rows = train_gpt.next_token_rows(tables, 30)
    p_mem, top_sims = train_gpt.read_next_tokens(queries, tables, read, rows)
    sims = queries @ tables.addresses.T
    top = sims.topk(4, dim=1)
    weights = torch.softmax(6.0 * top.values, dim=1)
    expected = (weights[:, :, None] * dense_location_distributions(tables, 30, 0.3)[
        top.indices]).sum(1)
    torch.testing.assert_close(p_mem, expected)
    torch.testing.assert_close(top_sims, top.values)
    torch.testing.assert_close(p_mem.sum(1), torch.ones(7))
    assert (p_mem > 0).all()
    # A location written a billion times still leaves every token a positive probability.
    heavy = train_gpt.next_token_tables(tables.addresses, counts * 1e9, 5)
    heavy_rows = train_gpt.next_token_rows(heavy, 30)
    assert (train_gpt.read_next_tokens(queries, heavy, read, heavy_rows)[0] > 0).all()
    # Counts written at evaluation (some locations only) join each location's own.
    scored = torch.poisson(torch.rand(20, 30) * 3) * (torch.rand(20, 1) < 0.5)
    written = dataclasses.replace(tables, scored_counts=scored)
    p_written, _ = train_gpt.read_next_tokens(queries, written, read, rows)
    expected = (weights[:, :, None] * dense_location_distributions(written, 30, 0.3)[
        top.indices]).sum(1)
    torch.testing.assert_close(p_written, expected)
    torch.testing.assert_close(p_written.sum(1), torch.ones(7))


# ---- the context memory ----------------------------------------------------------------------


def witten_bell_reference(history: list[int], stream: list[int], longest: int, vocab: int,
                          base: list[float], shortest: int = 1,
                          skipped: int | None = None) -> list[float]:
    """The interpolated Witten-Bell distribution after `history`, written out plainly: counts
    of the empty context and of every context of shortest..longest tokens in `stream` (of its
    targets stream[1:]), shortest first, over `base`; the target at stream index `skipped` (and
    its contexts) not counted."""
    probs = list(base)
    for length in [0, *range(shortest, longest + 1)]:
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


def counted_stream(vocab: int = 5, longest: int = 3, shortest: int = 1):
    """A stream of three tokens of five (some never follow anything), its context tables of
    shortest..longest tokens, and the recent tokens of CONTEXT_HISTORIES: (stream, tables,
    starts, recent)."""
    torch.manual_seed(0)
    stream = torch.randint(0, 3, (200,))
    recent = train_gpt.recent_tokens(stream[None, :-1], longest)[0]
    tables = train_gpt.context_tables(
        *train_gpt.count_context_pairs(recent, stream[1:], vocab, shortest), vocab)
    starts = torch.cumsum(tables.sizes, 0) - tables.sizes
    queries = torch.tensor([[-1] * (longest - len(h)) + h[-longest:] for h in CONTEXT_HISTORIES])
    return stream, tables, starts, queries


@pytest.mark.parametrize("shortest", [1, 2])
def test_the_context_read_is_witten_bell_interpolation_over_its_base(shortest):
    stream, tables, starts, queries = counted_stream(shortest=shortest)
    base = torch.softmax(torch.randn(len(CONTEXT_HISTORIES), 5), dim=1)
    probs, evidence = train_gpt.read_contexts(queries, tables, starts, base)
    for row, history in enumerate(CONTEXT_HISTORIES):
        expected = witten_bell_reference(history, stream.tolist(), 3, 5, base[row].tolist(),
                                         shortest)
        torch.testing.assert_close(probs[row], torch.tensor(expected), atol=1e-6, rtol=0)
    torch.testing.assert_close(probs.sum(1), torch.ones(len(CONTEXT_HISTORIES)))
    # The empty context is found everywhere; no longer one (an empty history; token 4 never
    # occurs; a single token when the shortest kept is two).
    assert (evidence[:, 0] > 0).all()
    for row in (0, 4) if shortest == 1 else (0, 1, 4):
        assert (evidence[row, 1:] == 0).all()
    # Every length kept is found, and no shorter one.
    assert (evidence[3, shortest:] > 0).all() and (evidence[3, 1:shortest] == 0).all()
    # Over the uniform base, tokens never counted keep mass: a distribution over the vocabulary.
    uniform = torch.full((len(CONTEXT_HISTORIES), 5), 0.2)
    assert (train_gpt.read_contexts(queries, tables, starts, uniform)[0] > 0).all()


def test_the_context_read_passes_the_gradient_its_interpolation_scales_the_base_by():
    stream, tables, starts, queries = counted_stream()
    base = torch.softmax(torch.randn(len(CONTEXT_HISTORIES), 5), dim=1).requires_grad_()
    weights = torch.randn(len(CONTEXT_HISTORIES), 5)
    probs, _ = train_gpt.read_contexts(queries, tables, starts, base)
    (weights * probs).sum().backward()
    for row, history in enumerate(CONTEXT_HISTORIES):
        # The reference is affine in the base, s * base + a: twice the base gives s.
        once, twice = (torch.tensor(witten_bell_reference(history, stream.tolist(), 3, 5,
                                                          (times * base[row]).tolist()))
                       for times in (1, 2))
        scale = (twice - once) / base[row].detach()
        torch.testing.assert_close(base.grad[row], weights[row] * scale, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("shortest", [1, 2])
def test_leaving_a_counted_target_out_reads_as_if_it_was_never_counted(shortest):
    """Distillation reads counted text as the evaluation reads new text: each position's own
    occurrence taken out of the counts (leave-one-out) gives the distribution of counts made
    without it, at every length; a count of 0 (text not counted) changes nothing."""
    stream, tables, starts, _ = counted_stream(shortest=shortest)
    positions = torch.arange(3, 200, 7)  # targets stream[p], each with 3 tokens of history
    recent = torch.stack([stream[p - 3: p] for p in positions])
    targets = stream[positions]
    base = torch.softmax(torch.randn(positions.numel(), 5), dim=1)
    ones = torch.ones_like(targets)
    probs, evidence = train_gpt.read_contexts(recent, tables, starts, base, (targets, ones))
    for row, position in enumerate(positions.tolist()):
        expected = witten_bell_reference(recent[row].tolist(), stream.tolist(), 3, 5,
                                         base[row].tolist(), shortest, skipped=position)
        torch.testing.assert_close(probs[row], torch.tensor(expected), atol=1e-6, rtol=0)
    full, full_evidence = train_gpt.read_contexts(recent, tables, starts, base)
    assert (evidence <= full_evidence).all() and (evidence < full_evidence).any()
    none_left_out = train_gpt.read_contexts(recent, tables, starts, base, (targets, 0 * ones))
    assert torch.equal(none_left_out[0], full) and torch.equal(none_left_out[1], full_evidence)
    # A context seen once, left out, is no context; the empty context keeps the other tokens.
    once = torch.tensor([0, 1, 2, 3, 4])
    single = train_gpt.context_tables(*train_gpt.count_context_pairs(
        train_gpt.recent_tokens(once[None, :-1], 3)[0], once[1:], 5, shortest), 5)
    single_starts = torch.cumsum(single.sizes, 0) - single.sizes
    alone, alone_evidence = train_gpt.read_contexts(
        torch.tensor([[0, 1, 2]]), single, single_starts, base[:1],
        (torch.tensor([3]), torch.tensor([1])))
    expected = witten_bell_reference([0, 1, 2], once.tolist(), 3, 5, base[0].tolist(), shortest,
                                     skipped=3)
    torch.testing.assert_close(alone[0], torch.tensor(expected), atol=1e-6, rtol=0)
    assert (alone_evidence[:, 1:] == 0).all() and alone_evidence[0, 0] == math.log(4)


def test_counted_text_knows_how_often_each_stream_index_was_counted():
    """times against counting by hand; overlaps (whether a batch meets the counted text at
    all) against times."""
    corpus = 7
    for first, end in ((3, 5), (3, 10), (2, 30), (12, 12), (5, 11), (6, 8)):
        counted = train_gpt.CountedText(first, end, corpus)
        indices = torch.arange(0, 60)
        brute = [sum(1 for j in range(first, end) if j % corpus == i % corpus) for i in range(60)]
        assert counted.times(indices).tolist() == brute, (first, end)
        assert counted.tokens == end - first
        for begin in range(0, 20):
            for count in (0, 1, 2, 5, 7, 9):
                hit = counted.times(torch.arange(begin, begin + count)) > 0
                assert counted.overlaps(begin, count) == bool(hit.any()), (first, end, begin)


def test_the_context_memory_counts_running_text_and_says_which(tmp_path):
    """Counting reads the stream as running text: the pairs of every counted target, with its
    whole context across batch rows, exactly the pairs of the text counted at once."""
    tokens = torch.randint(0, 6, (500,), generator=torch.Generator().manual_seed(3))
    train_gpt.write_shard(tmp_path / "fineweb_train_000000.bin", tokens.numpy())
    args = tiny_args(vocab_size=6, eam_context_order=4, eam_context_min_length=1,
                     eam_context_min_count=1, eam_context_tokens=600, train_seq_len=8,
                     train_batch_tokens=64, grad_accum_world=1)
    loader = train_gpt.DistributedTokenLoader(train_gpt.shard_paths(str(tmp_path), "train"),
                                              train_gpt.Runtime(0, 1, 0, torch.device("cpu"),
                                                                None))
    loader.next_batch(64, 8)  # the teacher read first: 65 tokens
    contexts, counted = train_gpt.count_contexts(train_gpt.Runtime(0, 1, 0, torch.device("cpu"),
                                                                   None), args, loader)
    assert (counted.first, counted.end, counted.corpus_tokens) == (65, 65 + 640, 500)
    stream = tokens[torch.arange(counted.first - 3, counted.end) % 500]
    recent = train_gpt.recent_tokens(stream[None, :-1], 3)[0, 2:]
    whole = train_gpt.context_tables(*train_gpt.count_context_pairs(recent, stream[3:], 6, 1), 6)
    for name in train_gpt.CONTEXT_BUFFERS:
        assert torch.equal(getattr(contexts, name), getattr(whole, name)), name


def test_context_codes_tell_lengths_apart_and_mark_incomplete_contexts():
    recent = torch.tensor([[-1, -1, 0], [-1, 0, 0], [0, 0, 0], [3, 1, 2]])
    codes = train_gpt.context_codes(recent, vocab_size=4)
    assert codes[0].tolist() == [0, 1, -1, -1] and codes[1].tolist() == [0, 1, 6, -1]
    assert len(set(codes[2].tolist())) == 4  # "", "0", "0 0" and "0 0 0" differ
    assert codes[3].tolist() == [0, 3, 3 * 5 + 2, (3 * 5 + 2) * 5 + 4]
    assert train_gpt.context_codes_fit(1024, 6) and not train_gpt.context_codes_fit(1024, 7)


def test_merged_and_pruned_counts_equal_counting_at_once():
    torch.manual_seed(1)
    stream = torch.randint(0, 4, (301,))
    recent = train_gpt.recent_tokens(stream[None, :-1], 2)[0]
    whole = train_gpt.count_context_pairs(recent, stream[1:], 4, 1)
    parts = [train_gpt.count_context_pairs(recent[begin: begin + 100], stream[1:][begin:][:100],
                                           4, 1) for begin in (0, 100, 200)]
    merged = train_gpt.merge_pairs(*parts)
    # Row boundaries lose no context: recent_tokens was taken over the whole stream.
    assert torch.equal(merged[0], whole[0]) and torch.equal(merged[1], whole[1])
    tables = train_gpt.context_tables(*whole, 4)
    pruned = tables.pruned(5)
    assert (pruned.counts >= 5).all() and pruned.counts.sum() == whole[1][whole[1] >= 5].sum()
    assert pruned.sizes.sum() == pruned.counts.numel() and (pruned.sizes > 0).all()
    assert torch.isin(pruned.codes, tables.codes).all()
