"""The causality harness: can anything but earlier tokens move a scored distribution?

A path is a function `distributions(tokens) -> {name: [T - 1, V] log-probs}` returning every
distribution the evaluation scores ('model', and 'knn' for the mixture), row j for target j
(token j + 1, predicted from tokens 0..j). `assert_causal` changes every token from position
c + 1 on and requires rows 0..c to stay bit-identical (C1; row c is the first changed target's
own row, so a path that reads the target fails, C2), each row a normalized distribution over the
whole vocabulary (C2) and exactly one row per target (C4). Something later must change too, so
a path that ignores its input cannot pass by accident.

EVAL_PATHS names every evaluation path and option by the settings that switch it on, and
`artifact_distributions` runs one through the real scoring code (`train_gpt.score_artifact`:
artifact file -> load -> evaluate). To cover a new path, add one line to EVAL_PATHS with the
settings that turn it on; a path
that is not a setting wraps its own scorer in a `distributions` function and calls
`assert_causal` with it (as tests/test_causality.py does for its deliberate leaks).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

import train_gpt
from tests.helpers import CPU, tiny_student, unit_byte_tables, write_artifact

VOCAB = 256  # the tiny student's vocabulary
Distributions = Callable[[torch.Tensor], dict[str, torch.Tensor]]

# Every evaluation path and option, as the settings that switch it on (tiny_student's sizes:
# 32-token windows, stride 8, a kNN chunk every 2 windows).
# Test-time training on every parameter, two steps a chunk, learning fast enough to move every
# later score: 32-token chunks (4 windows; the first chunk scores targets 0..55, the next ones 32
# each), cut into one-row micro-batches, so two ranks share a chunk's gradients.
TTT = dict(ttt_steps=2, ttt_params="all", ttt_lr_scale=1.0, eval_chunk_tokens=32,
           ttt_batch_rows=1)
EVAL_PATHS: dict[str, dict[str, object]] = {
    # The memory mixed in through its prefix-only gate, alone and with the kNN store.
    "memory": dict(knn_lambda=0.0),
    "knn": dict(knn_lambda=0.5),
    "ttt": dict(knn_lambda=0.0, **TTT),
    "ttt_decoder": dict(knn_lambda=0.5, **TTT | dict(ttt_params="decoder")),
    # The shipped defaults' combination: the memory, its evaluation-time writes and TTT of every
    # parameter (no kNN store).
    "defaults": dict(knn_lambda=0.0, eval_memory_writes=True, **TTT),
    # The same with the long contexts learned while scoring.
    "defaults_learned": dict(knn_lambda=0.0, eval_memory_writes=True,
                             eam_learned_lengths="4,6,8", **TTT),
    # Evaluation-time writes into the memory, with the kNN store beside them and without.
    "writes": dict(knn_lambda=0.0, eval_memory_writes=True),
    "writes_knn": dict(knn_lambda=0.5, eval_memory_writes=True),
    # Every option at once, with test-time training of every parameter or of the decoder and
    # the gate.
    "everything": dict(knn_lambda=0.5, eval_memory_writes=True, eam_learned_lengths="4,6,8",
                       **TTT),
    "everything_decoder_gate": dict(knn_lambda=0.5, eval_memory_writes=True,
                                    eam_learned_lengths="4,6,8",
                                    **TTT | dict(ttt_params="decoder,gate")),
    "baseline": dict(model="transformer", knn_lambda=0.5),  # MODEL=transformer and its kNN
    "baseline_ttt": dict(model="transformer", knn_lambda=0.5, **TTT),
}


def artifact_distributions(settings: dict[str, object], folder: Path) -> Distributions:
    """A tiny random student with these settings, packed to an artifact in folder, scored by
    train_gpt.score_artifact (the path the submission's score takes)."""
    args, student = tiny_student(**settings)
    if args.model == "transformer":  # the baseline: the student's encoder as the teacher
        student = train_gpt.TransformerLM.from_teacher(student.encoder, args)
        path = folder / "causality.eam"
        path.write_bytes(train_gpt.build_artifact(student, args))
    else:
        path = write_artifact(folder / "causality.eam", args, student)

    def distributions(tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        _, totals = train_gpt.score_artifact(CPU, args, path, tokens, unit_byte_tables(VOCAB),
                                             keep_rows=True)
        return {name: torch.cat(total.rows) for name, total in totals.items()}
    return distributions


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
