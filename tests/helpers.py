"""Helpers shared by the tests: tiny settings, a tiny student, and running train_gpt.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

import train_gpt

REPO = Path(train_gpt.__file__).resolve().parent
CPU = train_gpt.Runtime(0, 1, 0, torch.device("cpu"), None)

TINY = dict(profile="test", vocab_size=64, num_layers=2, model_dim=32, num_heads=2,
            num_kv_heads=1, mlp_mult=2, rope_dims=8, xsa_layers=1, enc_layers=2, dec_hidden=32,
            knn_key_dim=8, eval_seq_len=32, eval_stride=8, eval_batch_windows=4,
            eval_chunk_tokens=16, knn_k=4, compile=False, ttt_steps=0, eval_memory_writes=False,
            knn_lambda=0.0)
# Test-time training, evaluation-time memory writes and the kNN store run only where a test
# turns them on.


# The pipeline as users run it, with budgets by steps, not seconds, so runs are reproducible
# and quick on any machine (the pipeline_runs fixture).
TINY_RUN = {
    "PROFILE": "cpu_smoke", "MAX_WALLCLOCK_SECONDS": "600", "VAL_TOKENS": "3000",
    "ITERATIONS": "6", "TRAIN_BATCH_TOKENS": "2048", "DISTILL_ITERATIONS": "3",
    "DISTILL_BATCH_TOKENS": "2048", "EVAL_CHUNK_TOKENS": "512", "TRAIN_LOG_EVERY": "1000",
    "EAM_CONTEXT_TOKENS": "32768", "EAM_LEARNED_LENGTHS": "4,6",
}
PIPELINE_RUN_ID = "single"  # the one-process run; its artifact is PIPELINE_RUN_ID.eam


def tiny_args(**overrides) -> train_gpt.Hyperparameters:
    return train_gpt.Hyperparameters(**{**TINY, **overrides})


def counted_contexts(args: train_gpt.Hyperparameters, stream: torch.Tensor
                     ) -> train_gpt.ContextTables:
    """The context memory of `stream` [T] at the shipped lengths of `args`, kept whole."""
    lengths = train_gpt.shipped_lengths(args)
    if not lengths:
        return train_gpt.no_contexts()
    history = max(max(lengths), 1)
    recent = train_gpt.recent_tokens(stream[None, :-1], history)[0]
    pairs = train_gpt.count_context_pairs(recent, stream[1:], args.vocab_size, lengths)
    return train_gpt.context_tables(*pairs, args.vocab_size)


def random_contexts(args: train_gpt.Hyperparameters, tokens: int = 4096
                    ) -> train_gpt.ContextTables:
    """A context memory counted from a random stream of a few tokens of the vocabulary (so that
    contexts repeat)."""
    return counted_contexts(args, torch.randint(0, min(8, args.vocab_size), (tokens + 1,)))


def tiny_student(seed: int = 0, **overrides):
    """(settings, a MemoryLM, by default of vocabulary 256, with a random context memory and
    random weights)."""
    torch.manual_seed(seed)
    args = tiny_args(**{"vocab_size": 256, "dec_hidden": 64, **overrides})
    student = train_gpt.MemoryLM(train_gpt.student_config(args), random_contexts(args))
    with torch.no_grad():  # zero-initialised projections would hide packing mistakes
        for param in student.parameters():
            param.add_(0.02 * torch.randn_like(param))
    return args, student


def unit_byte_tables(vocab: int) -> train_gpt.ByteTables:
    """Byte tables in which every token is one byte (bits per byte = bits per token)."""
    return train_gpt.ByteTables(torch.ones(vocab, dtype=torch.int32),
                                torch.zeros(vocab, dtype=torch.bool),
                                torch.zeros(vocab, dtype=torch.bool))


def write_artifact(path: Path, args: train_gpt.Hyperparameters, model) -> Path:
    """Pack `model` with its own memory into the artifact file `path`."""
    path.write_bytes(train_gpt.build_artifact(model, args))
    return path


def run_script(env: dict[str, str], cwd: Path, nproc: int = 1,
               timeout: int = 300) -> subprocess.CompletedProcess:
    """Run train_gpt.py as a user would (plain python, or torchrun for several processes)."""
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    result = subprocess.run([*launcher, str(REPO / "train_gpt.py")], cwd=cwd, env=full_env,
                            capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"train_gpt.py failed:\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-5000:]}")
    return result
