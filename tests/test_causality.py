"""Legality of every evaluation path (tests/causality.py), and proof the harness catches leaks."""

import contextlib
import datetime
import inspect
import textwrap
from pathlib import Path

import pytest
import torch

import train_gpt
from tests.causality import (
    EVAL_PATHS,
    VOCAB,
    artifact_distributions,
    assert_causal,
    assert_prefix_consistent,
    harness_tokens,
    path_artifact,
    path_cuts,
    scored_rows,
)
from tests.helpers import counted_contexts, tiny_student, write_artifact


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models gain nothing from a second thread, and on a busy machine two threads that
    # wait for each other make these many small evaluations several times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TOKENS = harness_tokens()  # 160 tokens: 17 windows, five chunks of the 32-token paths


@pytest.mark.parametrize("path", sorted(EVAL_PATHS))
def test_no_evaluation_path_lets_later_tokens_move_earlier_scores(path, tmp_path):
    assert_causal(artifact_distributions(EVAL_PATHS[path], tmp_path), TOKENS,
                  path_cuts(EVAL_PATHS[path], TOKENS.numel()))


@pytest.mark.parametrize("path", sorted(EVAL_PATHS))
def test_a_prefix_of_the_split_is_scored_as_the_splits_first_targets(path, tmp_path):
    # Lengths ending at a chunk's edge, inside a chunk, inside the first window.
    assert_prefix_consistent(artifact_distributions(EVAL_PATHS[path], tmp_path), TOKENS,
                             [20, 57, 100, 121])


def cuda_dtypes(monkeypatch):
    """The CUDA path's dtypes on the CPU: bf16 autocast, and a kNN store of fp16 keys."""
    monkeypatch.setattr(train_gpt, "autocast",
                        lambda runtime: torch.autocast("cpu", dtype=torch.bfloat16))
    real_init = train_gpt.KnnStore.__init__

    def half_keys(store, capacity, dim, device):
        real_init(store, capacity, dim, device)
        store.keys = store.keys.half()

    monkeypatch.setattr(train_gpt.KnnStore, "__init__", half_keys)


@pytest.mark.parametrize("path", ["defaults_learned", "everything", "baseline_ttt"])
def test_the_cuda_paths_dtypes_leak_nothing_either(path, tmp_path, monkeypatch):
    cuda_dtypes(monkeypatch)
    distributions = artifact_distributions(EVAL_PATHS[path], tmp_path)
    assert_causal(distributions, TOKENS, path_cuts(EVAL_PATHS[path], TOKENS.numel()))
    assert_prefix_consistent(distributions, TOKENS, [57, 121])


@pytest.mark.parametrize("path", ["knn", "everything"])
def test_a_split_shorter_than_one_window_scores_each_target_once(path, tmp_path):
    # 20 tokens, 32-token windows: the padded tail of the one window must score nothing.
    assert_causal(artifact_distributions(EVAL_PATHS[path], tmp_path), TOKENS[:20], [0, 9, 18])


def context_distributions(folder: Path, min_length: int):
    """A memory counted from the scored tokens themselves (a fixed artifact, as any), so every
    position finds contexts of every length shipped (min_length..4); the student keeps its
    (non-zero) gate and decoder, so every read feeds the distribution; the shipped defaults
    beside it (evaluation-time writes of learned lengths too, and TTT)."""
    args, student = tiny_student(**EVAL_PATHS["defaults_learned"] | dict(
        eam_context_order=5, eam_learned_lengths="6,8", eam_context_min_length=min_length))
    model = train_gpt.MemoryLM(student.config, counted_contexts(args, TOKENS))
    model.load_state_dict(student.state_dict() | {name: getattr(model, name)
                                                  for name in train_gpt.MEMORY_BUFFERS})
    path = write_artifact(folder / "contexts.eam", args, model)
    return lambda tokens: scored_rows(args, path, tokens)


@pytest.mark.parametrize("min_length", [1, 2])
def test_the_memory_reads_only_the_prefix_when_every_context_is_found(min_length, tmp_path):
    assert_causal(context_distributions(tmp_path, min_length), TOKENS,
                  path_cuts(EVAL_PATHS["defaults_learned"], TOKENS.numel()))


def test_the_score_does_not_depend_on_how_windows_are_batched(tmp_path):
    scores = []
    for windows in (1, 4, 8):
        settings = {**EVAL_PATHS["everything"], "eval_batch_windows": windows}
        scores.append(artifact_distributions(settings, tmp_path)(TOKENS))
    for other in scores[1:]:
        for name in ("model", "knn"):
            torch.testing.assert_close(other[name], scores[0][name], atol=1e-5, rtol=0)


# ---- the harness catches leaks: each deliberate one must fail it -----------------------------


def mutated(function, old: str, new: str):
    """`function` with one piece of its real source replaced: a deliberately broken variant."""
    source = textwrap.dedent(inspect.getsource(function))
    assert old in source, f"{function.__name__} no longer contains {old!r}"
    namespace = dict(vars(train_gpt))
    exec(compile(source.replace(old, new), f"<leaky {function.__name__}>", "exec"), namespace)
    return namespace[function.__name__]


def source_leak(old: str, new: str):
    """A leak made by replacing a piece of a function's source (see mutated)."""
    return lambda function: mutated(function, old, new)


def leaky_input(scorer):
    # The model reads the next token (its target): inputs shifted left by one.
    def score(model):
        real = scorer(model)
        return lambda inputs, mask: real(torch.roll(inputs, -1, dims=1), mask)
    return score


def leaky_query(scorer):
    # The model's distribution is honest, but the kNN query comes from a window with the target.
    def score(model):
        real = scorer(model)

        def both(inputs, mask):
            log_probs, _ = real(inputs, mask)
            return log_probs, real(torch.roll(inputs, -1, dims=1), mask)[1]
        return both
    return score


def altered_loss(totals):
    """ScoreTotals whose summed loss is a thousandth of a nat a token off its rows'."""
    class Altered(totals):
        def add(self, log_probs, targets, target_bytes, indices):
            super().add(log_probs, targets, target_bytes, indices)
            self.sums = self.sums + self.sums.new_tensor([1e-3 * targets.numel(), 0, 0])
    return Altered


# Each: (what it breaks, the function changed, the change, the path that must catch it).
LEAKS = {
    "store_learns_before_scoring": ("evaluate", source_leak(
        "sims, neighbour_targets = store.search(keys, args.knn_k)",
        "store.add(keys.float(), targets); "
        "sims, neighbour_targets = store.search(keys, args.knn_k)"), "knn"),
    "mixture_weight_reads_the_target": ("evaluate", source_leak(
        "knn_lambda(sims, args.knn_lambda)",
        "knn_lambda(sims, args.knn_lambda) "
        "* log_probs.exp().gather(1, targets[:, None]).squeeze(1)"), "knn"),
    "model_reads_the_target": ("student_scorer", leaky_input, "knn"),
    "query_reads_the_target": ("student_scorer", leaky_query, "knn"),
    "training_learns_a_chunk_before_scoring_it": ("evaluate", source_leak(
        "new_keys, new_targets = [], []",
        "new_keys, new_targets = [], []; ttt and ttt.learn(tokens, int(chunk[0, 1]), "
        "int(chunk[-1, 2]))"), "ttt"),
    "memory_counts_a_chunk_before_scoring_it": ("evaluate", source_leak(
        "new_keys, new_targets = [], []",
        "new_keys, new_targets = [], []; writes and count_scored_text(writes, tokens, "
        "int(chunk[0, 1]), int(chunk[-1, 2]))"), "writes"),
    # One token past the chunk: the next chunk's first target.
    "training_learns_one_token_past_its_chunk": ("evaluate", source_leak(
        "ttt.learn(tokens, score_from, score_to)", "ttt.learn(tokens, score_from, score_to + 1)"),
        "ttt"),
    "memory_counts_one_token_past_its_chunk": ("evaluate", source_leak(
        "count_scored_text(writes, tokens, score_from, score_to)",
        "count_scored_text(writes, tokens, score_from, score_to + 1)"), "writes_learned"),
    # Only once the kNN store is full does it take in a batch before scoring it.
    "a_full_store_learns_before_scoring": ("evaluate", source_leak(
        "sims, neighbour_targets = store.search(keys, args.knn_k)",
        "store.size == store.capacity and store.add(keys.float(), targets); "
        "sims, neighbour_targets = store.search(keys, args.knn_k)"), "knn_wraps"),
    # A long context's code read from the next position's recent tokens (the target among them).
    "long_contexts_read_the_target": ("read_contexts", source_leak(
        "codes = context_codes(recent, vocab)[:, longer]",
        "codes = context_codes(torch.roll(recent, -1, 0), vocab)[:, longer]"), "writes_learned"),
    # The reported score is not the rows': a per-token loss altered as it is summed.
    "reported_loss_is_not_the_rows": ("ScoreTotals", lambda cls: altered_loss(cls), "memory"),
    # Window bookkeeping: later windows score one target back (scored twice), the last target
    # never, the count kept.
    "a_target_scored_twice_and_one_never": ("window_batch", source_leak(
        "mask = (unclamped >= rows[:, 1:2]) & (unclamped < rows[:, 2:3])",
        "back = (rows[:, 1:2] > 0).long(); "
        "mask = (unclamped >= rows[:, 1:2] - back) & (unclamped < rows[:, 2:3] - back)"),
        "memory"),
    # A capacity that follows the split's length: the store wraps at half of it.
    "capacity_follows_the_splits_length": ("evaluate", source_leak(
        "KnnStore(args.knn_capacity,", "KnnStore(min(args.knn_capacity, tokens.numel() // 2),"),
        "knn"),
}


def leak_catches(target: str, leak, path: str, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(train_gpt, target, leak(getattr(train_gpt, target)))
    distributions = artifact_distributions(EVAL_PATHS[path], tmp_path)
    with pytest.raises(AssertionError, match="leak|scored exactly once|reported loss|moved rows"):
        assert_causal(distributions, TOKENS, path_cuts(EVAL_PATHS[path], TOKENS.numel()))
        assert_prefix_consistent(distributions, TOKENS, [20, 57, 100, 121])


@pytest.mark.parametrize("name", sorted(LEAKS))
def test_the_harness_catches_each_deliberate_leak(name, tmp_path, monkeypatch):
    leak_catches(*LEAKS[name], tmp_path, monkeypatch)


def test_the_harness_catches_a_memory_that_reads_the_target_where_every_context_is_found(
        tmp_path, monkeypatch):
    leak = source_leak("recent_tokens(inputs, model.recent_length)",
                       "recent_tokens(torch.roll(inputs, -1, dims=1), model.recent_length)")
    monkeypatch.setattr(train_gpt, "model_scores", leak(train_gpt.model_scores))
    with pytest.raises(AssertionError, match="leak"):
        assert_causal(context_distributions(tmp_path, 2), TOKENS, [3, 40, 71])


def test_each_leak_is_invisible_to_the_paths_that_do_not_use_what_it_breaks(tmp_path,
                                                                           monkeypatch):
    """The harness is no alarm that rings for anything: a leak in the kNN store passes a path
    without one, so each catch above is the leak's own."""
    target, leak, _ = LEAKS["store_learns_before_scoring"]
    monkeypatch.setattr(train_gpt, target, leak(getattr(train_gpt, target)))
    assert_causal(artifact_distributions(EVAL_PATHS["writes_learned"], tmp_path), TOKENS,
                  path_cuts(EVAL_PATHS["writes_learned"], TOKENS.numel()))


# ---- the same score at every world size ------------------------------------------------------


def score_on_ranks(rank: int, world: int, folder: str, path: str) -> None:
    """One rank of a gloo group: score two splits (one shorter than a window) from the artifact
    and, on rank 0, save (val_loss, val_bpb, tokens) of each distribution."""
    torch.set_num_threads(1)
    if world > 1:
        # A rendezvous file per world size: a file a finished group leaves behind (its last
        # process may exit before removing it) once hung the next group that opened it. A
        # timeout turns any other hang into a failure.
        torch.distributed.init_process_group(
            "gloo", init_method=f"file://{folder}/rendezvous{world}", rank=rank,
            world_size=world, timeout=datetime.timedelta(seconds=120))
    runtime = train_gpt.Runtime(rank, world, 0, torch.device("cpu"), None)
    args, _ = tiny_student(**EVAL_PATHS[path])  # the settings; the test wrote the artifact
    artifact = Path(folder) / "causality.eam"
    results = []
    for tokens in (TOKENS, TOKENS[:20]):
        with contextlib.redirect_stdout(None):
            _, totals = train_gpt.score_artifact(runtime, args, artifact, tokens,
                                                 train_gpt.ByteTables(
                                                     torch.ones(VOCAB, dtype=torch.int32),
                                                     torch.zeros(VOCAB, dtype=torch.bool),
                                                     torch.zeros(VOCAB, dtype=torch.bool)))
        results.append({name: total.reduced(runtime) for name, total in totals.items()})
    if rank == 0:
        torch.save(results, f"{folder}/world{world}.pt")
    if world > 1:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("path, worlds", [
    ("defaults", (1, 2)), ("defaults_learned", (1, 2, 8)), ("ttt", (1, 2)),
    ("writes_learned", (1, 2)), ("knn_wraps", (1, 2)), ("shed", (1, 2)),
    ("everything", (1, 2, 8)), ("everything_decoder_gate", (1, 2)), ("baseline_ttt", (1, 2))])
def test_every_world_size_gives_the_identical_score(path, worlds, tmp_path):
    path_artifact(EVAL_PATHS[path], tmp_path)  # written once, before any rank reads it
    scores = {}
    for world in worlds:
        if world == 1:
            score_on_ranks(0, 1, str(tmp_path), path)
        else:
            # fork: the ranks start in milliseconds and share this process's imports.
            torch.multiprocessing.start_processes(score_on_ranks, (world, str(tmp_path), path),
                                                  nprocs=world, start_method="fork")
        scores[world] = torch.load(tmp_path / f"world{world}.pt")
    assert scores[1][1]["model"][2] == 19  # the short split: 19 targets, each scored once
    for world in worlds[1:]:
        for split, expected in zip(scores[world], scores[1], strict=True):
            for name, (loss, bpb, count) in split.items():
                assert count == expected[name][2]
                assert f"{loss:.8f} {bpb:.8f}" == (f"{expected[name][0]:.8f} "
                                                   f"{expected[name][1]:.8f}"), (world, name)
