"""Legality of every evaluation path (tests/causality.py), and proof the harness catches leaks."""

import datetime
import inspect
import textwrap
from pathlib import Path

import pytest
import torch

import train_gpt
from tests.causality import EVAL_PATHS, VOCAB, artifact_distributions, assert_causal
from tests.helpers import (
    CPU,
    counted_contexts,
    tiny_args,
    tiny_student,
    unit_byte_tables,
    write_artifact,
)


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models gain nothing from a second thread, and on a busy machine two threads that
    # wait for each other make these many small evaluations several times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# 160 tokens: 17 windows; cuts inside the first window, on a kNN chunk's edge, in later windows
# and at the last target.
TOKENS = torch.randint(0, VOCAB, (160,), generator=torch.Generator().manual_seed(1))
CUTS = [3, 40, 71, 112, 158]


@pytest.mark.parametrize("path", sorted(EVAL_PATHS))
def test_no_evaluation_path_lets_later_tokens_move_earlier_scores(path, tmp_path):
    assert_causal(artifact_distributions(EVAL_PATHS[path], tmp_path), TOKENS, CUTS)


@pytest.mark.parametrize("path", ["knn", "everything"])
def test_a_split_shorter_than_one_window_scores_each_target_once(path, tmp_path):
    # 20 tokens, 32-token windows: the padded tail of the one window must score nothing.
    assert_causal(artifact_distributions(EVAL_PATHS[path], tmp_path), TOKENS[:20], [0, 9, 18])


def context_distributions(folder: Path, min_length: int):
    """The tiny students' random context memories rarely hold the harness's longer contexts;
    this one is counted from the scored tokens themselves (a fixed artifact, as any), so every
    position finds contexts of every length kept (min_length..4); the shipped defaults beside it
    (evaluation-time writes and TTT)."""
    args, student = tiny_student(**EVAL_PATHS["defaults"], eam_context_order=5,
                                 eam_context_min_length=min_length)
    path = write_artifact(folder / "contexts.eam", args,
                          train_gpt.MemoryLM(student.config, counted_contexts(args, TOKENS)))

    def distributions(tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        _, totals = train_gpt.score_artifact(CPU, args, path, tokens, unit_byte_tables(VOCAB),
                                             keep_rows=True)
        return {name: torch.cat(total.rows) for name, total in totals.items()}
    return distributions


@pytest.mark.parametrize("min_length", [1, 2])
def test_the_context_memory_reads_only_the_prefix_when_every_context_is_found(min_length,
                                                                              tmp_path):
    assert_causal(context_distributions(tmp_path, min_length), TOKENS, CUTS)


def test_the_score_does_not_depend_on_how_windows_are_batched(tmp_path):
    scores = []
    for windows in (1, 4, 8):
        settings = {**EVAL_PATHS["everything"], "eval_batch_windows": windows}
        scores.append(artifact_distributions(settings, tmp_path)(TOKENS))
    for other in scores[1:]:
        for name in ("model", "knn"):
            torch.testing.assert_close(other[name], scores[0][name], atol=1e-5, rtol=0)


# ---- the harness catches leaks: six deliberate ones, each must fail it -----------------------


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


# The kNN store learns each batch (its targets included) before scoring it.
leaky_store = source_leak("sims, neighbour_targets = store.search(keys, args.knn_k)",
                          "store.add(keys.float(), targets); "
                          "sims, neighbour_targets = store.search(keys, args.knn_k)")
# The mixture weight looks at the model's probability of the target.
leaky_gate = source_leak("knn_lambda(sims, args.knn_lambda)",
                         "knn_lambda(sims, args.knn_lambda) "
                         "* log_probs.exp().gather(1, targets[:, None]).squeeze(1)")
# Test-time training learns each chunk (its targets included) before scoring it.
leaky_training = source_leak("new_keys, new_targets = [], []",
                             "new_keys, new_targets = [], []; "
                             "ttt.learn(tokens, int(chunk[0, 1]), int(chunk[-1, 2]))")
# The context memory counts each chunk's text (its targets included) before scoring it.
leaky_text_writes = source_leak("new_keys, new_targets = [], []",
                                "new_keys, new_targets = [], []; "
                                "count_scored_text(writes, tokens, int(chunk[0, 1]), "
                                "int(chunk[-1, 2]))")


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


def test_the_harness_catches_a_context_memory_that_reads_the_target(tmp_path, monkeypatch):
    leak = source_leak("recent_tokens(inputs, model.recent_length)",
                       "recent_tokens(torch.roll(inputs, -1, dims=1), model.recent_length)")
    monkeypatch.setattr(train_gpt, "model_scores", leak(train_gpt.model_scores))
    with pytest.raises(AssertionError, match="leak"):
        assert_causal(context_distributions(tmp_path, 2), TOKENS, CUTS)


@pytest.mark.parametrize("target, leak, path", [
    ("evaluate", leaky_store, "knn"), ("evaluate", leaky_gate, "knn"),
    ("student_scorer", leaky_input, "knn"), ("student_scorer", leaky_query, "knn"),
    ("evaluate", leaky_training, "ttt"), ("evaluate", leaky_text_writes, "writes")])
def test_the_harness_catches_each_deliberate_leak(target, leak, path, tmp_path, monkeypatch):
    monkeypatch.setattr(train_gpt, target, leak(getattr(train_gpt, target)))
    with pytest.raises(AssertionError, match="leak"):
        assert_causal(artifact_distributions(EVAL_PATHS[path], tmp_path), TOKENS, CUTS)


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
    args = tiny_args(vocab_size=VOCAB, dec_hidden=64, **EVAL_PATHS[path])
    results = []
    for tokens in (TOKENS, TOKENS[:20]):
        _, totals = train_gpt.score_artifact(runtime, args, Path(folder) / "causality.eam", tokens,
                                             unit_byte_tables(VOCAB))
        results.append({name: total.reduced(runtime) for name, total in totals.items()})
    if rank == 0:
        torch.save(results, f"{folder}/world{world}.pt")
    if world > 1:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("path", ["everything", "everything_decoder_gate"])
def test_world_sizes_one_two_and_eight_give_the_identical_score(path, tmp_path):
    artifact_distributions(EVAL_PATHS[path], tmp_path)  # writes the artifact
    scores = {}
    for world in (1, 2, 8):
        if world == 1:
            score_on_ranks(0, 1, str(tmp_path), path)
        else:
            # fork: the ranks start in milliseconds and share this process's imports.
            torch.multiprocessing.start_processes(score_on_ranks, (world, str(tmp_path), path),
                                                  nprocs=world, start_method="fork")
        scores[world] = torch.load(tmp_path / f"world{world}.pt")
    assert scores[1][1]["model"][2] == 19  # the short split: 19 targets, each scored once
    for world in (2, 8):
        for split, expected in zip(scores[world], scores[1], strict=True):
            for name, (loss, bpb, count) in split.items():
                assert count == expected[name][2]
                assert f"{loss:.8f} {bpb:.8f}" == (f"{expected[name][0]:.8f} "
                                                   f"{expected[name][1]:.8f}"), (world, name)
