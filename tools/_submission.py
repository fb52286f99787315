"""What a Parameter Golf submission says about its runs, computed from train_gpt.py's logs.

The challenge's reviewers read a record folder's `submission.json` beside its logs: per-seed
scores, sizes and times, their mean and spread, the hardware and library versions, and compliance
facts (training and evaluation within 600 s, code + artifact within 16,000,000 bytes, three seeds
of one configuration, the whole validation split scored). tools.seed_sweep writes that file,
tools.make_record writes it into a pull request's folder and tools.check_record recomputes it;
all three build it here, from the logs alone, so the numbers a reviewer sees are the numbers the
runs logged. Field names follow the challenge's merged records
(`records/track_*/*/submission.json`); our own statistics (95% interval, the one-sided test) are
extra fields. What makes a set of runs a demonstration rather than an entry (another profile or
machine, a part of the validation split, the demo corpus) is decided here too. Nothing runs at
import.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import math
import re
import statistics as pystats
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from scipy import stats as scipy_stats

import train_gpt
from tools import _runs

# The challenge's rules (train_gpt.py's defaults are the rules: 16,000,000 bytes, 600 s).
SIZE_LIMIT = train_gpt.Hyperparameters.size_limit
TIME_LIMIT_S = train_gpt.Hyperparameters.max_wallclock_seconds
MIN_SEEDS = 3
MARGIN_NATS = 0.005
ALPHA = 0.01
# The stage lines a seed's entry reads besides the score.
TEACHER_STAGE, EVAL_STAGE = train_gpt.stage_record("teacher"), train_gpt.stage_record("eval")
WRITE_STAGE, DISTILL_STAGE = train_gpt.stage_record("eam_write"), train_gpt.stage_record("distill")

# The merged records' conventions: folder records/track_<track>/YYYY-MM-DD_Description/ and
# these fields. A memory model belongs to the non-record 16 MB track unless it beats the record.
RECORD_TRACK = "10min_16mb"
TRACKS = (RECORD_TRACK, "non_record_16mb")
DEFAULT_TRACK = "non_record_16mb"
REQUIRED_FIELDS = ("author", "github_id", "name", "blurb", "date", "track", "val_loss",
                   "val_bpb", "val_loss_std", "val_bpb_std", "seeds", "seed_results",
                   "bytes_total", "bytes_code", "hardware", "pytorch_version", "cuda_version",
                   "flash_attn_version", "technique_summary", "compliance")
SEED_FIELDS = ("val_loss", "val_bpb", "artifact_bytes", "steps", "step_avg_ms", "eval_time_s")
DEFAULT_NAME = "Distilled transformer encoder with a memory of next-token counts (eam-golf)"
# Settings that differ from seed to seed of one configuration.
PER_SEED_SETTINGS = ("SEED", "RUN_ID", "ARTIFACT_PATH")
# Facts of a run that must be the same for every seed: (record, key, what it is).
SHARED_FACTS = (
    (_runs.HEADER_RECORD, "code_sha256", "code"),
    (_runs.DATA_RECORD, "train_fingerprint", "training data"),
    (_runs.DATA_RECORD, "val_sha256", "scored validation tokens"),
    (_runs.DATA_RECORD, "val_split_tokens", "validation split"),
    (_runs.HEADER_RECORD, "device_name", "hardware"),
    (_runs.HEADER_RECORD, "world_size", "hardware"),
    (_runs.HEADER_RECORD, "cuda", "hardware"),
    (_runs.HEADER_RECORD, "torch", "software"),
)
COMPETITION_PROFILE = "competition"


def track_folder(track: str) -> str:
    return f"track_{track}"


def record_folder_name(date: str, description: str) -> str:
    return f"{date}_{description}"


RECORD_FOLDER_PATTERN = re.compile(r"^\d{4}-\d{2}-\d{2}_[A-Za-z0-9][A-Za-z0-9_.+-]*$")
SEED_LOG_PATTERN = re.compile(r"^train_seed(.+)\.log$")


def seed_log_name(seed: int | str | None) -> str:
    return f"train_seed{seed}.log"


def claimed_seed(path: Path) -> str | None:
    """The seed a folder's log file claims by its name (train_seed<SEED>.log)."""
    match = SEED_LOG_PATTERN.match(path.name)
    return match.group(1) if match else None


def folder_logs(folder: Path) -> list[Path]:
    """A record folder's per-seed logs, in the order of their seeds."""
    def seed_key(path: Path) -> tuple[int, int | str]:
        seed = claimed_seed(path) or ""
        return (0, int(seed)) if seed.isdigit() else (1, seed)
    return sorted(folder.glob(seed_log_name("*")), key=seed_key)


# ------------------------------------------------------------------------------------------------
# Per-seed results, read from a log
# ------------------------------------------------------------------------------------------------


@dataclass
class SeedResult:
    run: _runs.Run
    seed: int | None

    def value(self, record: str, key: str) -> float | None:
        return _runs.number(self.run.records, record, key)

    def header(self, key: str) -> str | None:
        return self.run.records.get(_runs.HEADER_RECORD, {}).get(key)

    def setting(self, name: str) -> str | None:
        return self.run.records.get(_runs.SETTINGS_RECORD, {}).get(name)

    def data(self, key: str) -> str | None:
        return self.run.records.get(_runs.DATA_RECORD, {}).get(key)

    @property
    def name(self) -> str:
        return self.run.log_path.name if self.run.log_path else f"seed {self.seed}"

    @functools.cached_property
    def args(self) -> train_gpt.Hyperparameters | None:
        """The run's settings as train_gpt reads them (its logged values, parsed with train_gpt's
        own rules, validated as a run validates them); None when they are not this code's."""
        logged = self.run.records.get(_runs.SETTINGS_RECORD, {})
        types = typing.get_type_hints(train_gpt.Hyperparameters)
        try:
            values = {field.name: train_gpt._parse_setting(field.name.upper(),
                                                           logged[field.name.upper()],
                                                           types[field.name])
                      for field in dataclasses.fields(train_gpt.Hyperparameters)
                      if field.name.upper() in logged}
            return train_gpt.Hyperparameters(**values)
        except (TypeError, ValueError):
            return None

    def bytes(self, key: str) -> int | None:
        value = self.value(_runs.ARTIFACT_RECORD, key)
        return None if value is None else int(value)

    def first_line(self, kind: str) -> dict[str, str]:
        """The first line of a kind: the score's own (a reference scored after it repeats it)."""
        lines = _runs.line_records(self.run.text, kind)
        return lines[0] if lines else {}

    @property
    def val_bpb(self) -> float | None:
        return self.value(_runs.SCORE_RECORD, "val_bpb")

    @property
    def val_loss(self) -> float | None:
        return self.value(_runs.SCORE_RECORD, "val_loss")

    @property
    def train_time_s(self) -> float | None:
        return _runs.train_time_s(self.run.records)

    @property
    def eval_time_s(self) -> float | None:
        return _runs.eval_time_s(self.run.records)

    @property
    def hardware(self) -> str | None:
        """'8xNVIDIA H100 80GB HBM3', or '1x CPU x86_64 (2 threads)'."""
        name, world = self.header("device_name"), self.header("world_size")
        if not name or not world:
            return None
        if self.header("device") == "cpu":
            return f"{world}x CPU {name} ({self.header('threads')} threads)"
        return f"{world}x{name.replace('_', ' ')}"  # the log wrote spaces as '_'

    @property
    def on_8xh100(self) -> bool:
        return self.header("world_size") == "8" and "H100" in (self.header("device_name") or "")

    @functools.cached_property
    def learning_chunks(self) -> int:
        """After how many scored chunks the evaluation's learners took the chunk in: every
        chunk but the last (train_gpt's own windows and chunks of the scored tokens), or up to
        the chunk after which the evaluation stopped them (its eval_shed line); 0 where the log
        does not say."""
        args, scored = self.args, self.data("val_tokens")
        shed = self.run.records.get(_runs.SHED_RECORD, {}).get("after_chunk")
        if shed is not None:
            return int(shed)
        if args is None or scored is None:
            return 0
        windows = train_gpt.sliding_windows(int(scored), args.eval_seq_len, args.eval_stride)
        return math.ceil(windows.size(0) / max(1, args.eval_chunk_tokens // args.eval_stride)) - 1

    def learners(self) -> dict[str, bool]:
        """Which score-first learners ran: on in the evaluation's stage line (the memory's
        writes, test-time training, the kNN store), with at least one scored chunk to learn
        from."""
        learned = self.learning_chunks > 0
        return dict(writes=learned and self.value(EVAL_STAGE, "memory_writes") == 1,
                    ttt=learned and (self.value(EVAL_STAGE, "ttt_steps") or 0) > 0,
                    knn=learned and self.value(EVAL_STAGE, "knn") == 1)

    def split_scored(self) -> str | None:
        """What falls short of scoring the whole validation split (None when it was scored
        whole): VAL_TOKENS set, or fewer tokens scored than the split holds."""
        scored, split = self.data("val_tokens"), self.data("val_split_tokens")
        if scored is None or split is None:
            return f"no `{_runs.DATA_RECORD}` line: the tokens scored are not logged"
        problems = []
        if self.setting("VAL_TOKENS") not in (None, "0"):
            problems.append(f"VAL_TOKENS={self.setting('VAL_TOKENS')}")
        if int(scored) < int(split):
            problems.append(f"{int(scored):,} of the validation split's {int(split):,} tokens "
                            "scored")
        return "; ".join(problems) or None

    def summary(self) -> dict:
        """This seed's entry of seed_results (the records' fields first, then ours)."""
        steps = self.value(TEACHER_STAGE, "steps")
        return dict(
            val_loss=self.val_loss, val_bpb=self.val_bpb, artifact_bytes=self.bytes("total_bytes"),
            steps=None if steps is None else int(steps),
            step_avg_ms=self.value(TEACHER_STAGE, "step_ms"), eval_time_s=self.eval_time_s,
            train_time_s=self.train_time_s,
            memory_val_bpb=self.value(_runs.MEMORY_RECORD, "val_bpb"),
            teacher_val_bpb=self.value(_runs.TEACHER_RECORD, "val_bpb"),
            bytes_code=self.bytes("code_bytes"), bytes_model=self.bytes("model_bytes"),
            artifact_sha256=self.run.records.get(_runs.ARTIFACT_RECORD, {}).get("sha256"),
            log=self.run.log_path.name if self.run.log_path else None)


def seed_of(run: _runs.Run, fallback: int | None = None) -> int | None:
    raw = run.records.get(_runs.SETTINGS_RECORD, {}).get("SEED")
    try:
        return int(raw) if raw is not None else fallback
    except ValueError:
        return fallback


def read_results(logs: Sequence[Path]) -> list[SeedResult]:
    """One SeedResult per log; a log without a readable score line is marked incomplete."""
    results = []
    for log in logs:
        run = _runs.read_run(str(log), log)
        result = SeedResult(run, seed_of(run))
        mark_unreadable(result)
        results.append(result)
    return results


def mark_unreadable(result: SeedResult) -> None:
    if result.run.ok and not (result.val_loss is not None and result.val_bpb is not None
                              and result.val_bpb > 0):
        result.run.status = "incomplete"
        result.run.detail = f"unreadable {_runs.SCORE_RECORD} line"


# ------------------------------------------------------------------------------------------------
# One configuration, and what makes runs a demonstration
# ------------------------------------------------------------------------------------------------


def configuration_differences(results: Sequence[SeedResult]) -> list[str]:
    """What differs between the seeds' runs beyond the seed itself: settings (other than
    PER_SEED_SETTINGS), code, data, hardware and software. Empty for one configuration."""
    if len(results) < 2:
        return []
    out = []
    settings = [{k: v for k, v in r.run.records.get(_runs.SETTINGS_RECORD, {}).items()
                 if k not in PER_SEED_SETTINGS} for r in results]
    names = sorted({name for logged in settings for name in logged})
    differing = [name for name in names if len({logged.get(name) for logged in settings}) > 1]
    if differing:
        out.append("settings differ between the seeds' runs: " + "; ".join(
            f"{name} (" + ", ".join(f"{r.name}: {logged.get(name, '(absent)')}"
                                    for r, logged in zip(results, settings, strict=True)) + ")"
            for name in differing))
    for record, key, what in SHARED_FACTS:
        values = [r.run.records.get(record, {}).get(key) for r in results]
        if len(set(values)) > 1:
            out.append(f"the {what} differs between the seeds' runs ({key}: " + ", ".join(
                f"{r.name}: {v or '(absent)'}" for r, v in zip(results, values, strict=True))
                + ")")
    return out


DEMO_FOLDER = Path(train_gpt.DEMO_DATA).name


def demo_corpus_fingerprints(roots: Sequence[Path]) -> dict[str, Path]:
    """{train_fingerprint: folder} of the demo corpora found at DEMO_DATA under `roots` (the
    repository, the folder the runs started in): what the data line of a run on them says."""
    found = {}
    for root in roots:
        folder = Path(root) / train_gpt.DEMO_DATA
        try:
            found[train_gpt.data_fingerprint(train_gpt.shard_paths(str(folder), "train"))] = folder
        except (FileNotFoundError, OSError):
            continue
    return found


def demo_corpus(result: SeedResult, fingerprints: Mapping[str, Path]) -> str | None:
    """Why the run trained on the demo corpus (tools.make_demo_data: Python docstrings with
    their own tokenizer, not FineWeb), or None: DATA_PATH names it, or the data line's
    fingerprint is that of a demo corpus found on this machine."""
    data_path = result.setting("DATA_PATH") or ""
    if Path(data_path).name == DEMO_FOLDER:
        return f"DATA_PATH={data_path} is the demo corpus"
    fingerprint = result.data("train_fingerprint")
    if fingerprint in fingerprints:
        return (f"its training data (train_fingerprint {fingerprint}) is the demo corpus at "
                f"{fingerprints[fingerprint]}")
    return None


def demonstration_reasons(results: Sequence[SeedResult], roots: Sequence[Path] = ()
                          ) -> list[str]:
    """Why these runs cannot stand as a leaderboard entry (empty when they can): another
    profile than the competition's, another machine than 8xH100, a part of the validation
    split scored, the demo corpus (found by name, or by fingerprint under `roots`)."""
    reasons = []
    profiles = sorted({r.header("profile") or "?" for r in results})
    if profiles != [COMPETITION_PROFILE]:
        reasons.append(f"profile {', '.join(profiles)}, not {COMPETITION_PROFILE}")
    if not all(r.on_8xh100 for r in results):
        reasons.append(f"run on {joined([r.hardware for r in results]) or '?'}, not 8xH100")
    fingerprints = demo_corpus_fingerprints(roots)
    for what in (lambda r: demo_corpus(r, fingerprints), SeedResult.split_scored):
        found = sorted({reason for reason in map(what, results) if reason})
        reasons += found
    return reasons


# ------------------------------------------------------------------------------------------------
# Statistics (scipy)
# ------------------------------------------------------------------------------------------------


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Student-t interval of the mean (needs at least 2 values)."""
    n = len(values)
    low, high = scipy_stats.t.interval(confidence, n - 1, loc=pystats.fmean(values),
                                       scale=pystats.stdev(values) / math.sqrt(n))
    return float(low), float(high)


def one_sided_t_test(values: Sequence[float], margin: float) -> dict[str, float]:
    """H0: mean(values) <= margin against H1: mean(values) > margin (one-sample, one-sided)."""
    result = scipy_stats.ttest_1samp(values, margin, alternative="greater")
    return dict(t=float(result.statistic), df=len(values) - 1, p_value=float(result.pvalue))


def statistics(valid: Sequence[SeedResult], reference_bpb: float | None = None,
               margin_nats: float = MARGIN_NATS, alpha: float = ALPHA) -> dict:
    """Mean, sample std and 95% t-interval of the valid seeds' scores; with a reference val_bpb,
    the record test: is the improvement in nats above `margin_nats` at p < alpha?"""
    bpbs = [r.val_bpb for r in valid]
    losses = [r.val_loss for r in valid]
    stats: dict = dict(n=len(valid), val_bpb_mean=pystats.fmean(bpbs) if bpbs else None,
                       val_loss_mean=pystats.fmean(losses) if losses else None)
    if len(valid) < 2:
        stats.update(val_bpb_std=None, val_loss_std=None, val_bpb_ci95=None,
                     unavailable=f"{len(valid)} valid seed(s): std, interval and test need >= 2")
    else:
        stats.update(val_bpb_std=pystats.stdev(bpbs), val_loss_std=pystats.stdev(losses),
                     val_bpb_ci95=list(t_interval(bpbs)))
    if reference_bpb is None:
        return stats
    # Each run's own nats-per-bit-per-byte ratio (val_loss / val_bpb) converts the reference.
    improvements = [reference_bpb * (r.val_loss / r.val_bpb) - r.val_loss for r in valid]
    test: dict = dict(reference_bpb=reference_bpb, margin_nats=margin_nats, alpha=alpha,
                      improvement_nats=improvements,
                      mean_improvement_nats=pystats.fmean(improvements) if improvements else None)
    if len(valid) >= 2:
        result = one_sided_t_test(improvements, margin_nats)
        test.update(result, significant=bool(result["p_value"] < alpha))
    else:
        test.update(t=None, df=None, p_value=None, significant=None,
                    unavailable="the test needs at least 2 valid seeds")
    stats["test"] = test
    return stats


def stats_text(stats: dict) -> str:
    if stats["n"] == 0:
        return "no valid seeds: no statistics"
    lines = [f"valid seeds: {stats['n']}", f"mean val_bpb:  {stats['val_bpb_mean']:.8f}",
             f"mean val_loss: {stats['val_loss_mean']:.8f}"]
    if stats["val_bpb_std"] is None:
        lines.append(f"std / 95% interval / test: unavailable ({stats['unavailable']})")
    else:
        low, high = stats["val_bpb_ci95"]
        lines += [f"sample std val_bpb: {stats['val_bpb_std']:.8f}",
                  f"95% t-interval val_bpb: [{low:.8f}, {high:.8f}]"]
    test = stats.get("test")
    if test:
        lines.append(f"reference val_bpb {test['reference_bpb']}: improvement per seed (nats) "
                     + ", ".join(f"{v:.6f}" for v in test["improvement_nats"]))
        if test["p_value"] is None:
            lines.append(f"one-sided t-test: unavailable ({test['unavailable']})")
        else:
            verdict = "significant" if test["significant"] else "NOT significant"
            lines.append(f"one-sided t-test H1: improvement > {test['margin_nats']} nats: "
                         f"t={test['t']:.4f} df={test['df']} p={test['p_value']:.6g} -> "
                         f"{verdict} at alpha={test['alpha']}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# submission.json
# ------------------------------------------------------------------------------------------------


def joined(values: Sequence[str | None]) -> str | None:
    """The seeds' common value ('a; b' when they differ, None when no log has it)."""
    unique = sorted({v for v in values if v})
    return "; ".join(unique) if unique else None


def compliance(valid: Sequence[SeedResult]) -> dict:
    """The challenge's compliance facts, each computed from the logs (never asserted)."""
    train = [r.train_time_s for r in valid]
    evals = [r.eval_time_s for r in valid]
    totals = [r.bytes("total_bytes") for r in valid]
    learners = [r.learners() for r in valid]

    def every(test) -> bool:
        return bool(valid) and all(test(item) for item in valid)

    return dict(
        train_under_600s=bool(valid) and all(t is not None and t <= TIME_LIMIT_S for t in train),
        eval_under_600s=bool(valid) and all(t is not None and t <= TIME_LIMIT_S for t in evals),
        artifact_under_16mb=bool(valid) and all(b is not None and b <= SIZE_LIMIT
                                                for b in totals),
        three_seeds=len({r.seed for r in valid}) >= MIN_SEEDS,
        train_time_max_s=max((t for t in train if t is not None), default=None),
        eval_time_max_s=max((t for t in evals if t is not None), default=None),
        artifact_bytes_max=max((b for b in totals if b is not None), default=None),
        eval_knn_store=bool(valid) and all(used["knn"] for used in learners),
        eval_score_first_ttt=bool(valid) and all(used["ttt"] for used in learners),
        eval_memory_writes=bool(valid) and all(used["writes"] for used in learners),
        full_validation_split=every(lambda r: r.split_scored() is None),
        trained_from_scratch=every(lambda r: r.setting("INIT_CHECKPOINT") == ""),
        real_code_bytes=every(lambda r: r.setting("SIZE_CODE_BYTES") == "0"),
        one_configuration=bool(valid) and not configuration_differences(valid))


def lengths_text(lengths: Sequence[int]) -> str | None:
    """(0, 2, 3) -> 'the empty context and contexts of 2 to 3 tokens'; None for none."""
    if not lengths:
        return None
    longer = [n for n in lengths if n > 0]
    span = ("" if not longer else f"{longer[0]} tokens" if len(longer) == 1
            else f"{longer[0]} to {longer[-1]} tokens")
    if 0 not in lengths:
        return f"contexts of {span}"
    return "the empty context" + (f" and contexts of {span}" if span else "")


def memory_text(result: SeedResult) -> str:
    """The memory a run shipped, in a phrase, from its settings."""
    args = result.args
    shipped = lengths_text(train_gpt.shipped_lengths(args)) if args else None
    learned = train_gpt.learned_lengths(args) if args else ()
    if shipped is None:
        return "no memory (EAM_CONTEXT_ORDER=0)"
    longer = f"; contexts of {', '.join(map(str, learned))} tokens" if learned else ""
    memory = f"a memory of next-token counts of exact contexts ({shipped}{longer}"
    if not args.eam_context_tokens:
        return memory + "), none shipped: all counted only from text already read"
    return memory + (" counted only from text already read)" if learned else ")")


def learners_text(result: SeedResult) -> str:
    """The score-first learners the evaluation ran, in a phrase ('' when none)."""
    used, s = result.learners(), result.setting
    parts = [text for on, text in (
        (used["writes"], "the memory counts each scored chunk"),
        (used["ttt"], f"test-time training ({s('TTT_STEPS')} step(s) a chunk, "
                      f"{s('TTT_PARAMS')}, lr x{s('TTT_LR_SCALE')})"),
        (used["knn"], f"a kNN store of scored tokens (lambda {s('KNN_LAMBDA')}, "
                      f"k {s('KNN_K')})")) if on]
    return "; score-first: " + ", ".join(parts) if parts else ""


def lowest_layers(first: SeedResult) -> str | None:
    """ENC_LAYERS where the encoder is the teacher's lowest layers; None where it is all of it."""
    layers = first.setting("ENC_LAYERS") or "?"
    return None if layers == first.setting("NUM_LAYERS") else layers


def technique_summary(valid: Sequence[SeedResult]) -> str | None:
    """One line from the logged settings: what was trained, what ships, how it is scored."""
    if not valid:
        return None
    first = valid[0]

    def s(name: str) -> str:
        return first.setting(name) or "?"

    # The bits the matrices packed to (the baseline may pack to fewer than QUANT_BITS).
    bits = first.run.records.get(_runs.ARTIFACT_RECORD, {}).get("quant_bits") or s("QUANT_BITS")
    lowest = lowest_layers(first)
    encoder = "the whole teacher" if lowest is None else f"its lowest {lowest} layers"
    return (f"Teacher GPT {s('NUM_LAYERS')}x{s('MODEL_DIM')} (Muon, EMA {s('EMA_DECAY')}) -> "
            f"{encoder} distilled into an encoder with a decoder and a "
            f"prefix-only gate mixing in {memory_text(first)}; the teacher is dropped; "
            f"int{bits} per-row + zstd-{s('ZSTD_LEVEL')} artifact; scored from the artifact "
            f"with sliding windows ({s('EVAL_SEQ_LEN')}/{s('EVAL_STRIDE')})"
            f"{learners_text(first)}; vocabulary {s('VOCAB_SIZE')}")


def default_blurb(valid: Sequence[SeedResult], stats: dict) -> str | None:
    if not valid or stats["val_bpb_mean"] is None:
        return None
    spread = ("" if stats["val_bpb_std"] is None else f", std {stats['val_bpb_std']:.5f}")
    first = valid[0]
    lowest = lowest_layers(first)
    encoder = ("the whole teacher, trained from scratch and distilled" if lowest is None else
               f"the lowest {lowest} layers of a teacher trained from scratch, distilled")
    return (f"A transformer encoder ({encoder}) with a decoder and a prefix-only gate "
            f"that mixes in {memory_text(first)}; the teacher is dropped and the rest ships. "
            f"{len(valid)}-seed mean val_bpb {stats['val_bpb_mean']:.5f}{spread}, profile "
            f"{joined([r.header('profile') for r in valid])}.")


def add_test_arguments(parser: argparse.ArgumentParser) -> None:
    """The record test's flags: the score to beat, the margin and the significance level."""
    parser.add_argument("--reference-bpb", type=float, default=None,
                        help="val_bpb of the current record (the score to beat): adds the "
                             "one-sided t-test")
    parser.add_argument("--margin-nats", type=float, default=MARGIN_NATS,
                        help="required improvement in nats (default: %(default)s)")
    parser.add_argument("--alpha", type=float, default=ALPHA,
                        help="significance level of the test (default: %(default)s)")


def add_metadata_arguments(parser: argparse.ArgumentParser, required: bool) -> None:
    """The flags for the fields no log can know: who submits, under what title, on which track.
    `required`: --author and --github-id must be given (no fallback to anything else)."""
    group = parser.add_argument_group("submission.json fields the logs cannot give")
    empty = "" if required else " (default: empty)"
    group.add_argument("--author", default="", required=required, help=f"your name{empty}")
    group.add_argument("--github-id", default="", required=required,
                       help=f"your GitHub id{empty}")
    group.add_argument("--name", default=None,
                       help=f"a descriptive title (default: {DEFAULT_NAME!r})")
    group.add_argument("--blurb", default=None,
                       help="one paragraph on the entry (default: generated from the logs)")
    group.add_argument("--technique-summary", default=None,
                       help="one line of techniques (default: generated from logged settings)")
    group.add_argument("--track", default=DEFAULT_TRACK, choices=TRACKS,
                       help="the challenge's track (default: %(default)s)")
    group.add_argument("--date", default=None,
                       help="YYYY-MM-DD of the submission (default: today)")


def demonstration_text(reasons: Sequence[str]) -> str | None:
    """submission.json's `demonstration`: a plain statement with its reasons (None for none)."""
    if not reasons:
        return None
    return "A demonstration, not a leaderboard entry: " + "; ".join(reasons) + "."


def metadata(args: argparse.Namespace, valid: Sequence[SeedResult], stats: dict,
             demonstration: str | None = None) -> dict:
    date = args.date or datetime.date.today().isoformat()
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", date):
        raise ValueError(f"--date {date!r}: expected YYYY-MM-DD")
    return dict(author=args.author or "", github_id=args.github_id or "",
                name=args.name or DEFAULT_NAME, blurb=args.blurb or default_blurb(valid, stats),
                date=date, track=args.track,
                technique_summary=args.technique_summary or technique_summary(valid),
                demonstration=demonstration)


def build_submission(results: Sequence[SeedResult], stats: dict, meta: Mapping) -> dict:
    """submission.json: the merged records' fields, then our statistics and notes."""
    valid = [r for r in results if r.run.ok]
    totals = [r.bytes("total_bytes") for r in valid if r.bytes("total_bytes") is not None]
    codes = [r.bytes("code_bytes") for r in valid if r.bytes("code_bytes") is not None]
    profile = joined([r.header("profile") for r in valid])
    hardware = joined([r.hardware for r in valid])
    document = dict(
        author=meta["author"], github_id=meta["github_id"], name=meta["name"],
        blurb=meta["blurb"], date=meta["date"], track=meta["track"],
        val_loss=stats["val_loss_mean"], val_bpb=stats["val_bpb_mean"],
        val_loss_std=stats["val_loss_std"], val_bpb_std=stats["val_bpb_std"],
        seeds=[r.seed for r in valid],
        seed_results={str(r.seed): r.summary() for r in valid},
        bytes_total=max(totals, default=None), bytes_code=max(codes, default=None),
        hardware=hardware, pytorch_version=joined([r.header("torch") for r in valid]),
        cuda_version=joined([r.header("cuda") for r in valid]),
        flash_attn_version=joined([r.header("flash_attn") for r in valid]),
        technique_summary=meta["technique_summary"], compliance=compliance(valid),
        demonstration=meta.get("demonstration"),
        profile=profile, code_sha256=joined([r.header("code_sha256") for r in valid]),
        val_bpb_ci95=stats["val_bpb_ci95"])
    if profile != COMPETITION_PROFILE:
        document["note"] = (f"profile {profile}: not the competition profile on FineWeb; "
                            "not a leaderboard score")
    if "test" in stats:
        document["statistics"] = stats["test"]
    excluded = [dict(seed=r.seed, status=r.run.status, detail=r.run.detail,
                     log=str(r.run.log_path) if r.run.log_path else None)
                for r in results if not r.run.ok]
    if excluded:
        document["excluded_runs"] = excluded
    return document


def json_safe(value: object) -> object:
    """Strict JSON: an infinite or undefined float (a t statistic with zero spread) as a string."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [json_safe(item) for item in value]
    return value


def write_json(document: dict, path: Path) -> None:
    path.write_text(json.dumps(json_safe(document), indent=2) + "\n", encoding="utf-8")
