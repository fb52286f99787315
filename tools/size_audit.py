"""Size checks against the 16,000,000-byte rule: an artifact, a plan, and the fit of the memory.

The challenge counts the UTF-8 bytes of train_gpt.py as it is on disk plus the bytes of the
compressed model. Three modes answer the three questions asked of that rule, each with
train_gpt's own functions, so a check can never disagree with the packer:

    python -m tools.size_audit                          # train_gpt.py + competition_seed1337.eam
    python -m tools.size_audit --artifact run.eam --json
    MODEL=transformer python -m tools.size_audit --plan  # before training: the settings' weights
    LOCAL_WORLD_SIZE=8 python -m tools.size_audit --fit  # the memory's fit to the limit, timed

The default audits an artifact on disk: does it fit, by how much, and where do the bytes go
(artifact_accounting, read_artifact, which checks the magic, version and sha256, and
component_sizes).

--plan sizes the weights the settings in the environment (PROFILE, MODEL, NUM_LAYERS, ...) would
ship, before any training: their bytes at the widths they pack to, the least the check before
training assumes (train_gpt.SMALLEST_PACKED_SHARE of the widths at train_gpt.fewest_bits: the
baseline may pack to fewer bits than QUANT_BITS) and, packed for real, the same shapes
filled with Gaussian values. Trained weights pack smaller the heavier their rows' tails, so
Gaussian weights that fit will fit trained.

--fit times the step that fits the memory to SIZE_LIMIT: before distillation and again at
packing, fit_artifact packs candidate artifacts at ZSTD_LEVEL until code + artifact fit, inside
the training budget; at the competition's 16 MB and level 22 that is the step to time on the host
before a submission run. It counts the memory from the
training shards as the write stage does (count_contexts: EAM_CONTEXT_TOKENS tokens, pairs seen
EAM_CONTEXT_MIN_COUNT times), builds the profile's student around it with random weights (trained
ones pack about alike), fits it as packing does (the code's bytes as the size rule counts them)
and times the fit and one packing of what it kept, on the threads rank 0 packs with.

Exit status: 0 fits, 1 over the limit (with --plan: Gaussian weights at QUANT_BITS, which the
baseline may still meet at fewer bits), 2 unreadable (missing, corrupted or foreign file) or,
with --fit, a model without a memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

import train_gpt

DEFAULTS = train_gpt.Hyperparameters()
CPU = train_gpt.Runtime(0, 1, 0, torch.device("cpu"), None)


def audit(code: Path, artifact: Path, limit: int, zstd_level: int) -> dict:
    """Sizes of the artifact's components and the code + artifact total against `limit`.

    Raises ValueError naming the file when either file cannot be read as what it should be.
    """
    if not code.is_file():
        raise ValueError(f"{code}: code file not found")
    if not artifact.is_file():
        raise ValueError(f"{artifact}: artifact not found")
    try:
        config, _, arrays = train_gpt.read_artifact(artifact)
    except ValueError:
        raise
    except Exception as error:  # a foreign payload behind a valid prefix: zstd, JSON, layout
        raise ValueError(f"{artifact}: unreadable artifact ({type(error).__name__}: {error})"
                         ) from error
    sizes = train_gpt.artifact_accounting(code, artifact, limit)
    components = [dict(group=group, raw_bytes=raw, zstd_bytes=packed)
                  for group, (raw, packed) in train_gpt.component_sizes(arrays,
                                                                        zstd_level).items()]
    components.sort(key=lambda c: -c["zstd_bytes"])
    return dict(code=str(code), artifact=str(artifact), components=components, **sizes,
                fits=sizes["total_bytes"] <= limit, model=dataclasses.asdict(config))


def report_text(result: dict) -> str:
    width = max([len("component")] + [len(c["group"]) for c in result["components"]])
    lines = [f"{'component':<{width}}  {'raw bytes':>12}  {'zstd alone':>12}  {'share':>6}"]
    packed_sum = sum(c["zstd_bytes"] for c in result["components"]) or 1
    for c in result["components"]:
        lines.append(f"{c['group']:<{width}}  {c['raw_bytes']:>12,}  {c['zstd_bytes']:>12,}  "
                     f"{100 * c['zstd_bytes'] / packed_sum:>5.1f}%")
    lines.append(f"{'(sum)':<{width}}  {sum(c['raw_bytes'] for c in result['components']):>12,}"
                 f"  {sum(c['zstd_bytes'] for c in result['components']):>12,}")
    lines.append("(zstd alone: each group compressed by itself; the artifact compresses them "
                 "together)")
    lines.append("")
    for label, key in (("code bytes", "code_bytes"), ("artifact bytes", "model_bytes"),
                       ("total bytes", "total_bytes"), ("limit", "limit"), ("margin", "margin")):
        lines.append(f"{label:<15}{result[key]:>14,}")
    if result["fits"]:
        lines.append(f"OK: fits, {result['margin']:,} bytes to spare ({result['code']} + "
                     f"{result['artifact']})")
    else:
        lines.append(f"OVER the limit by {-result['margin']:,} bytes ({result['code']} + "
                     f"{result['artifact']})")
    return "\n".join(lines)


def plan(args: train_gpt.Hyperparameters, code: Path) -> dict:
    """The bytes of the weights `args` would ship (no memory), before training: at their
    widths, at the check's least share of those, and packed with Gaussian values."""
    model = train_gpt.model_skeleton(args).to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    gaussian = len(train_gpt.build_artifact(model, args))  # its memory is empty
    width = train_gpt.width_bytes(model, args.quant_bits)
    fewest = train_gpt.fewest_bits(args)  # the check's: the baseline may pack to fewer bits
    # The code as the size rule counts it: the file, or SIZE_CODE_BYTES's stand-in.
    code_bytes = args.size_code_bytes or code.stat().st_size
    return dict(model=args.model, quant_bits=args.quant_bits, code_bytes=code_bytes,
                width_bytes=width, fewest_bits=fewest,
                smallest_bytes=round(train_gpt.SMALLEST_PACKED_SHARE
                                     * train_gpt.width_bytes(model, fewest)),
                gaussian_bytes=gaussian, limit=args.size_limit,
                margin=args.size_limit - code_bytes - gaussian,
                fits=code_bytes + gaussian <= args.size_limit)


def plan_text(result: dict) -> str:
    share = f"{train_gpt.SMALLEST_PACKED_SHARE:.0%}"
    lines = [f"MODEL={result['model']} QUANT_BITS={result['quant_bits']}, weights only:"]
    for label, key in (("at their widths", "width_bytes"),
                       (f"the check's least ({share}, {result['fewest_bits']} bits)",
                        "smallest_bytes"),
                       ("Gaussian, packed", "gaussian_bytes"), ("code bytes", "code_bytes"),
                       ("limit", "limit"), ("margin", "margin")):
        lines.append(f"{label:<28}{result[key]:>14,}")
    if result["fits"]:
        lines.append(f"OK: Gaussian weights fit beside the code, {result['margin']:,} bytes to "
                     "spare (the memory model's memory fills what is left)")
    else:
        lines.append(f"OVER by {-result['margin']:,} bytes with Gaussian weights: trained ones "
                     "fit only if they pack smaller (heavier tails)"
                     + (f", or at fewer bits (down to {result['fewest_bits']})"
                        if result["fewest_bits"] < result["quant_bits"] else ""))
    return "\n".join(lines)


def random_student(args: train_gpt.Hyperparameters,
                   contexts: train_gpt.ContextTables) -> train_gpt.MemoryLM:
    """The profile's student around `contexts`, with random weights."""
    generator = torch.Generator().manual_seed(args.seed)
    student = train_gpt.MemoryLM(train_gpt.student_config(args), contexts)
    with torch.no_grad():
        for parameter in student.parameters():
            parameter.copy_(0.02 * torch.randn(parameter.shape, generator=generator))
    return student


def fit(args: train_gpt.Hyperparameters) -> dict:
    """Count the memory from the training shards, fit it with a random student to SIZE_LIMIT as
    packing does, and time the count, the fit and one packing of what it kept."""
    started = time.perf_counter()
    loader = train_gpt.DistributedTokenLoader(train_gpt.shard_paths(args.data_path, "train"),
                                              CPU, args.vocab_size)
    contexts, counted = train_gpt.count_contexts(CPU, args, loader)
    count_s = time.perf_counter() - started
    student = random_student(args, contexts)
    code_bytes = train_gpt.code_size(args)
    started = time.perf_counter()
    artifact, fitted, _ = train_gpt.fit_artifact(student, args, code_bytes)
    fit_s = time.perf_counter() - started
    started = time.perf_counter()
    train_gpt.build_artifact(student, args, fitted)
    pack_s = time.perf_counter() - started
    return dict(profile=args.profile, data_path=args.data_path, tokens_counted=counted.tokens,
                pairs_counted=contexts.counts.numel(), pairs_kept=fitted.counts.numel(),
                code_bytes=code_bytes, artifact_bytes=len(artifact), limit=args.size_limit,
                fits=code_bytes + len(artifact) <= args.size_limit,
                zstd_level=args.zstd_level, threads=train_gpt.compression_threads(),
                count_s=count_s, fit_s=fit_s, pack_s=pack_s)


def fit_text(result: dict) -> str:
    r = result
    return "\n".join([
        f"profile {r['profile']} ({r['data_path']}): {r['tokens_counted']:,} tokens counted, "
        f"{r['pairs_counted']:,} context pairs in {r['count_s']:.1f} s",
        f"fit to {r['limit']:,} bytes (code {r['code_bytes']:,}): kept {r['pairs_kept']:,} "
        f"pairs, artifact {r['artifact_bytes']:,} bytes",
        f"time at zstd level {r['zstd_level']} on {r['threads']} threads: the fit "
        f"{r['fit_s']:.1f} s, one packing of what it kept {r['pack_s']:.1f} s"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Size checks against the byte limit: an artifact's components and total "
                    "(default), the settings' weights before training (--plan), the timed fit "
                    "of the memory to the limit (--fit). Exit 0 fits, 1 over, 2 unreadable.")
    parser.add_argument("--code", type=Path, default=Path("train_gpt.py"),
                        help="the code file that is counted (default: %(default)s)")
    parser.add_argument("--artifact", type=Path, default=Path(DEFAULTS.artifact_path),
                        help="the compressed model (default: %(default)s)")
    parser.add_argument("--limit", type=int, default=DEFAULTS.size_limit,
                        help="byte limit for code + artifact (default: %(default)s)")
    parser.add_argument("--zstd-level", type=int, default=DEFAULTS.zstd_level,
                        help="zstd level for the per-component sizes (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument("--plan", action="store_true",
                       help="size the weights the environment's settings would ship, before "
                            "training (--code, --json apply; exit 1 when Gaussian ones do not "
                            "fit)")
    modes.add_argument("--fit", action="store_true",
                       help="count the memory from the settings' training data, fit it to "
                            "SIZE_LIMIT as packing does and time it (--json applies)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.plan:
        result = plan(train_gpt.Hyperparameters.from_env(), args.code)
        print(json.dumps(result, indent=2) if args.json else plan_text(result))
        return 0 if result["fits"] else 1
    if args.fit:
        settings = train_gpt.Hyperparameters.from_env()
        if settings.model != "eam":
            print(f"error: MODEL={settings.model}: the baseline has no memory to fit",
                  file=sys.stderr)
            return 2
        try:
            result = fit(settings)
        except ValueError as error:  # fit_artifact: not even an empty memory fits
            print(f"error: {error}", file=sys.stderr)
            return 1
        print(json.dumps(result, indent=2) if args.json else fit_text(result))
        return 0 if result["fits"] else 1
    try:
        result = audit(args.code, args.artifact, args.limit, args.zstd_level)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        if args.json:
            print(json.dumps(dict(error=str(error))))
        return 2
    print(json.dumps(result, indent=2) if args.json else report_text(result))
    return 0 if result["fits"] else 1


if __name__ == "__main__":
    sys.exit(main())
