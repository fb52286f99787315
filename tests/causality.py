"""The causality harness: can anything but earlier tokens move a scored distribution?

A path is a function `distributions(tokens) -> {name: [T - 1, V] log-probs}` returning every
distribution the evaluation scores ('model', and 'knn' for the mixture), row j for target j
(token j + 1, predicted from tokens 0..j). `assert_causal` changes every token from position
c + 1 on and requires rows 0..c to stay bit-identical (C1; row c is the first changed target's
own row, so a path that reads the target fails, C2), each row a normalized distribution over the
whole vocabulary (C2) and exactly one row per target (C4). Something later must change too, so
a path that ignores its input cannot pass by accident. The cuts (`path_cuts`) sit at every edge
of the path's own chunks and one position either side, where a learner that takes in one token
past its chunk shows, and inside windows, off their last column.

Every scoring through `artifact_distributions` also ties the reported score to the rows: each
target scored once (the rows' target indices are exactly 0..T-2), and the reported loss is minus
the mean of the rows' log-probabilities at the true next tokens.

EVAL_PATHS names every evaluation path and option by the settings that switch it on, and
`artifact_distributions` runs one through the real scoring code (`train_gpt.score_artifact`:
artifact file -> load -> evaluate). To cover a new path, add one line to EVAL_PATHS with the
settings that turn it on; a path that is not a setting wraps its own scorer in a
`distributions` function and calls `assert_causal` with it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

import train_gpt
from tests.helpers import CPU, tiny_student, unit_byte_tables, write_artifact

VOCAB = 256  # the tiny student's vocabulary
Distributions = Callable[[torch.Tensor], dict[str, torch.Tensor]]


def harness_tokens(count: int = 160, seed: int = 1) -> torch.Tensor:
    """Text of the 8 token ids the tiny students' memories are counted from (so their contexts
    are found), a 24-token phrase recurring in it (so contexts learned while scoring are found
    again) between random stretches."""
    generator = torch.Generator().manual_seed(seed)
    phrase = torch.randint(0, 8, (24,), generator=generator)
    parts = []
    while sum(part.numel() for part in parts) < count:
        parts += [phrase, torch.randint(0, 8, (int(torch.randint(4, 16, (1,),
                                                                  generator=generator)),),
                                        generator=generator)]
    return torch.cat(parts)[:count]


# Every evaluation path and option, as the settings that switch it on (tiny_student's sizes:
# 32-token windows, stride 8). Test-time training on every parameter, two steps a chunk,
# learning fast enough to move every later score: 32-token chunks (4 windows; the first chunk
# scores targets 0..55, the next ones 32 each), cut into one-row micro-batches, so two ranks
# share a chunk's gradients.
TTT = dict(ttt_steps=2, ttt_params="all", ttt_lr_scale=1.0, eval_chunk_tokens=32,
           ttt_batch_rows=1)
LEARNED = dict(eval_memory_writes=True, eam_learned_lengths="4,6,8")
EVAL_PATHS: dict[str, dict[str, object]] = {
    # The memory mixed in through its prefix-only gate, alone, with the kNN store, and none.
    "memory": dict(knn_lambda=0.0),
    "no_memory": dict(knn_lambda=0.0, eam_context_order=0, **TTT),
    "knn": dict(knn_lambda=0.5),
    # A kNN store smaller than the split: it wraps, overwriting its oldest entries.
    "knn_wraps": dict(knn_lambda=0.5, knn_capacity=40, eval_chunk_tokens=32),
    "ttt": dict(knn_lambda=0.0, **TTT),
    "ttt_decoder": dict(knn_lambda=0.5, **TTT | dict(ttt_params="decoder")),
    # Evaluation-time memory writes, with the long contexts learned while scoring, and the kNN
    # store beside them.
    "writes": dict(knn_lambda=0.0, eval_memory_writes=True, eval_chunk_tokens=32),
    "writes_learned": dict(knn_lambda=0.0, eval_chunk_tokens=32, **LEARNED),
    "writes_knn": dict(knn_lambda=0.5, eval_chunk_tokens=32, **LEARNED),
    # The shipped defaults' combination: the memory, its writes, TTT of every parameter and the
    # kNN store.
    "defaults": dict(knn_lambda=0.1, eval_memory_writes=True, **TTT),
    "defaults_learned": dict(knn_lambda=0.1, **LEARNED, **TTT),
    # Past its time the evaluation stops its learners (after the first chunk, here).
    "shed": dict(knn_lambda=0.5, max_wallclock_seconds=1e-6, **LEARNED, **TTT),
    # Every option at once, with test-time training of every parameter or of the decoder and
    # the gate.
    "everything": dict(knn_lambda=0.5, knn_capacity=60, **LEARNED, **TTT),
    "everything_decoder_gate": dict(knn_lambda=0.5, **LEARNED,
                                    **TTT | dict(ttt_params="decoder,gate")),
    "baseline": dict(model="transformer", knn_lambda=0.5),  # MODEL=transformer and its kNN
    "baseline_ttt": dict(model="transformer", knn_lambda=0.5, **TTT),
}


def path_artifact(settings: dict[str, object], folder: Path, name: str = "causality.eam"):
    """(settings, artifact path) of a tiny random student with these settings, packed (its
    gate, decoder and memory inputs all non-zero, so every read feeds the distribution)."""
    args, student = tiny_student(**settings)
    path = folder / name
    if args.model == "transformer":  # the baseline: the student's encoder as the teacher
        path.write_bytes(train_gpt.build_artifact(
            train_gpt.TransformerLM.from_teacher(student.encoder, args), args))
        return args, path
    return args, write_artifact(path, args, student)


def scored_rows(args, path: Path, tokens: torch.Tensor, runtime=CPU) -> dict[str, torch.Tensor]:
    """Every distribution the evaluation scores from the artifact, row j for target j, after
    checking that the reported score is the rows' (every target once, the loss theirs)."""
    _, totals = train_gpt.score_artifact(runtime, args, path, tokens, unit_byte_tables(VOCAB),
                                         keep_rows=True)
    rows = {}
    for name, total in totals.items():
        indices = torch.cat(total.indices)
        order = indices.argsort()
        assert torch.equal(indices[order], torch.arange(tokens.numel() - 1)), (
            f"{name}: not every target scored exactly once")
        rows[name] = torch.cat(total.rows)[order]
        loss, _, count = total.reduced(runtime)
        truth = -rows[name].double().gather(1, tokens[1:, None]).mean().item()
        assert count == tokens.numel() - 1 and abs(loss - truth) <= 1e-6 * max(1, abs(truth)), (
            f"{name}: the reported loss {loss} is not the rows' {truth}")
    return rows


def artifact_distributions(settings: dict[str, object], folder: Path) -> Distributions:
    """The path of these settings through train_gpt.score_artifact (the submission's)."""
    args, path = path_artifact(settings, folder)
    return lambda tokens: scored_rows(args, path, tokens)


def path_cuts(settings: dict[str, object], num_tokens: int) -> list[int]:
    """Where to cut: every edge of the path's chunks (the first target of the next chunk) and
    one position either side, a position inside each of two windows (off their last column),
    the first target and the last."""
    args, _ = tiny_student(**settings)
    windows = train_gpt.sliding_windows(num_tokens, args.eval_seq_len, args.eval_stride)
    chunks = windows.split(max(1, args.eval_chunk_tokens // args.eval_stride))
    edges = [int(chunk[-1, 2]) for chunk in chunks[:-1]]
    inside = [int(windows[w, 1]) + 3 for w in (1, len(windows) // 2) if w < len(windows)]
    cuts = {0, num_tokens - 2, *inside, *(edge + shift for edge in edges for shift in (-1, 0, 1))}
    return sorted(cut for cut in cuts if 0 <= cut <= num_tokens - 2)


def assert_causal(distributions: Distributions, tokens: torch.Tensor, cuts: list[int]) -> None:
    """For each cut c: tokens from c + 1 on changed, rows 0..c identical (see the module doc)."""
    reference = distributions(tokens)
    generator = torch.Generator().manual_seed(0)
    for cut in cuts:
        changed = tokens.clone()
        shift = torch.randint(1, VOCAB, (tokens.numel() - cut - 1,), generator=generator)
        changed[cut + 1:] = (tokens[cut + 1:] + shift) % VOCAB  # every later token differs
        after = distributions(changed)
        for name, rows in reference.items():
            assert rows.shape == (tokens.numel() - 1, VOCAB), f"{name}: not one row per target"
            sums = rows.double().exp().sum(dim=1)
            assert torch.allclose(sums, torch.ones_like(sums), atol=1e-4), f"{name}: not normalized"
            moved = (rows != after[name]).any(dim=1).nonzero().flatten()
            if moved.numel():
                assert int(moved[0]) > cut, (f"{name}: leak: row {int(moved[0])} changed when "
                                             f"tokens from {cut + 1} on changed (rows 0..{cut} "
                                             "must not)")
            # Rows after the cut see changed tokens: an unchanged pair proves nothing.
            assert moved.numel() or cut + 1 == rows.size(0), f"{name}: nothing changed (vacuous)"


def assert_prefix_consistent(distributions: Distributions, tokens: torch.Tensor,
                             lengths: list[int]) -> None:
    """Scoring the first L tokens gives the first L - 1 rows of scoring all of them: nothing
    depends on how long the split is (a capacity, a schedule, a normaliser). Up to float
    rounding: the prefix's last batch is smaller, and a product of other shapes rounds
    otherwise (as test_the_score_does_not_depend_on_how_windows_are_batched allows)."""
    whole = distributions(tokens)
    for length in lengths:
        prefix = distributions(tokens[:length])
        for name, rows in prefix.items():
            moved = (rows - whole[name][: length - 1]).abs().max().item()
            assert moved <= 1e-5, (f"{name}: scoring the first {length} tokens moved rows of the "
                                   f"whole split's by up to {moved}")
