"""Benchmark packing at a profile's size: the fit of the memories to SIZE_LIMIT, and its time.

Why: before distillation and again at packing, fit_artifact packs candidate artifacts at
ZSTD_LEVEL until code + artifact fit SIZE_LIMIT, inside the training budget. At the
competition's 16 MB and level 22 that is the step to time on the host before a submission run
(docs/measurements.md, "Packing time"), and no CPU profile packs anything that large. This
counts the context memory from the training shards as the write stage does (count_contexts:
EAM_CONTEXT_TOKENS tokens, pairs seen EAM_CONTEXT_MIN_COUNT times), builds the profile's student
around it with random weights (trained ones pack about alike), fits it as packing does (the
code's bytes as the size rule counts them) and times the fit and one packing of what it kept.

Settings come from the environment, as for train_gpt.py (PROFILE, DATA_PATH, SIZE_LIMIT, ...),
and LOCAL_WORLD_SIZE as torchrun sets it: every rank fits at once before distillation, each
packing on its share of the host's CPUs (compression_threads), so set it to the ranks a host runs:

    LOCAL_WORLD_SIZE=8 python -m tools.bench_pack    # the competition profile and its data
    PROFILE=cpu_proxy python -m tools.bench_pack --json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

import torch

import train_gpt

CPU = train_gpt.Runtime(0, 1, 0, torch.device("cpu"), None)


def random_student(args: train_gpt.Hyperparameters,
                   contexts: train_gpt.ContextTables) -> train_gpt.MemoryLM:
    """The profile's student with random weights."""
    generator = torch.Generator().manual_seed(args.seed)
    student = train_gpt.MemoryLM(train_gpt.student_config(args), contexts)
    with torch.no_grad():
        for parameter in student.parameters():
            parameter.copy_(0.02 * torch.randn(parameter.shape, generator=generator))
    return student


def run(args: train_gpt.Hyperparameters) -> dict:
    started = time.perf_counter()
    loader = train_gpt.DistributedTokenLoader(train_gpt.shard_paths(args.data_path, "train"),
                                              CPU, args.vocab_size)
    contexts, counted = train_gpt.count_contexts(CPU, args, loader)
    count_s = time.perf_counter() - started
    student = random_student(args, contexts)
    code_bytes = train_gpt.code_size(args)
    started = time.perf_counter()
    artifact, fitted = train_gpt.fit_artifact(student, args, code_bytes)
    fit_s = time.perf_counter() - started
    started = time.perf_counter()
    train_gpt.build_artifact(student, args, fitted)
    pack_s = time.perf_counter() - started
    return dict(profile=args.profile, data_path=args.data_path, tokens_counted=counted.tokens,
                pairs_counted=contexts.counts.numel(), pairs_kept=fitted.counts.numel(),
                code_bytes=code_bytes, artifact_bytes=len(artifact), limit=args.size_limit,
                zstd_level=args.zstd_level, threads=train_gpt.compression_threads(),
                count_s=count_s, fit_s=fit_s, pack_s=pack_s)


def markdown(result: dict) -> str:
    r = result
    return "\n".join([
        f"profile {r['profile']} ({r['data_path']}): {r['tokens_counted']:,} tokens counted, "
        f"{r['pairs_counted']:,} context pairs in {r['count_s']:.1f} s",
        f"fit to {r['limit']:,} bytes (code {r['code_bytes']:,}): kept {r['pairs_kept']:,} "
        f"pairs, artifact {r['artifact_bytes']:,} bytes",
        f"time at zstd level {r['zstd_level']} on {r['threads']} threads: the fit "
        f"{r['fit_s']:.1f} s, one packing of what it kept {r['pack_s']:.1f} s"])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print JSON, not the summary")
    options = parser.parse_args(argv)
    args = train_gpt.Hyperparameters.from_env()
    if args.model != "eam":
        raise SystemExit(f"MODEL={args.model}: the baseline has no memory to fit")
    result = run(args)
    print(json.dumps(result, indent=2) if options.json else markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
