"""Run train_gpt.py for several seeds (or read their logs) and write the submission's evidence.

A Parameter Golf record needs more than one good number: three seeds, their mean val_bpb, and a
one-sided t-test that the improvement over the current record is at least 0.005 nats at
p < 0.01, plus a `submission.json` and the training logs. This tool produces all of it from the
logs that train_gpt.py writes, read with train_gpt.parse_log, so the numbers in the submission are
exactly the numbers in the logs. A run that failed or never reached its final score line is shown
as such and left out of the statistics, never silently dropped.

    python -m tools.seed_sweep --nproc 8                         # seeds 1337 42 2024, competition
    python -m tools.seed_sweep --profile cpu_smoke --seeds 1 2 3
    python -m tools.seed_sweep --logs logs/a.txt logs/b.txt logs/c.txt --reference-bpb 1.1147

The Student-t distribution is computed here in pure Python (no scipy needed on the GPU box).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tools import _runs

DEFAULT_SEEDS = (1337, 42, 2024)


# ------------------------------------------------------------------------------------------------
# Statistics (pure Python)
# ------------------------------------------------------------------------------------------------


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz's method)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        for numerator in (m * (b - m) * x / ((qam + m2) * (a + m2)),
                          -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            delta = c * d
            h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if not (a > 0 and b > 0):
        raise ValueError(f"incomplete beta needs a, b > 0 (got {a}, {b})")
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    # The continued fraction converges fast for x < (a+1)/(a+b+2); use symmetry otherwise.
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be positive (got {df})")
    if math.isnan(t):
        return math.nan
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    # P(|T| > |t|) = I_x(df/2, 1/2) with x = df / (df + t^2); near t = 0, x rounds to 1, so there
    # use the complement 1 - I_y(1/2, df/2) with y = t^2 / (df + t^2), computed without that loss.
    x, y = df / (df + t * t), t * t / (df + t * t)
    if y < x:
        tail = 0.5 * (1.0 - regularized_incomplete_beta(0.5, df / 2.0, y))
    else:
        tail = 0.5 * regularized_incomplete_beta(df / 2.0, 0.5, x)
    return 1.0 - tail if t > 0 else tail


def t_ppf(q: float, df: float) -> float:
    """The q-quantile of Student's t (bisection on t_cdf)."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"quantile must lie in (0, 1) (got {q})")
    low, high = -1.0, 1.0
    while t_cdf(low, df) > q:
        low *= 2.0
    while t_cdf(high, df) < q:
        high *= 2.0
    for _ in range(200):
        middle = 0.5 * (low + high)
        if t_cdf(middle, df) < q:
            low = middle
        else:
            high = middle
        if high - low < 1e-12 * max(1.0, abs(middle)):
            break
    return 0.5 * (low + high)


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def sample_std(values: Sequence[float]) -> float:
    """Standard deviation with n - 1 in the denominator (needs two values)."""
    center = mean(values)
    return math.sqrt(sum((v - center) ** 2 for v in values) / (len(values) - 1))


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    n = len(values)
    half = t_ppf(0.5 + confidence / 2.0, n - 1) * sample_std(values) / math.sqrt(n)
    return mean(values) - half, mean(values) + half


def one_sided_t_test(values: Sequence[float], margin: float) -> dict[str, float]:
    """H0: mean(values) <= margin against H1: mean(values) > margin (one-sample, one-sided)."""
    n = len(values)
    center, spread = mean(values), sample_std(values)
    if spread == 0.0:
        t = math.inf if center > margin else (-math.inf if center < margin else math.nan)
        p_value = 0.0 if center > margin else 1.0
    else:
        t = (center - margin) / (spread / math.sqrt(n))
        p_value = t_cdf(-t, n - 1)  # the upper tail, without cancellation
    return dict(t=t, df=n - 1, p_value=p_value, mean=center, std=spread)


# ------------------------------------------------------------------------------------------------
# Per-seed results
# ------------------------------------------------------------------------------------------------


@dataclass
class SeedResult:
    run: _runs.Run
    seed: int | None

    def value(self, record: str, key: str) -> float | None:
        return _runs.number(self.run.records, record, key)

    @property
    def val_bpb(self) -> float | None:
        return self.value(_runs.SCORE_RECORD, "val_bpb")

    @property
    def val_loss(self) -> float | None:
        return self.value(_runs.SCORE_RECORD, "val_loss")

    def bytes(self, key: str) -> int | None:
        value = self.value("artifact", key)
        return None if value is None else int(value)

    def header(self, key: str) -> str | None:
        return self.run.records.get("header", {}).get(key)

    def summary(self) -> dict:
        return dict(seed=self.seed, val_bpb=self.val_bpb, val_loss=self.val_loss,
                    bytes_total=self.bytes("total_bytes"), bytes_code=self.bytes("code_bytes"),
                    bytes_model=self.bytes("model_bytes"),
                    train_time_s=_runs.train_time_s(self.run.records),
                    eval_time_s=_runs.eval_time_s(self.run.records),
                    log=str(self.run.log_path) if self.run.log_path else None)


def seed_of(run: _runs.Run, fallback: int | None = None) -> int | None:
    raw = run.records.get("settings", {}).get("SEED")
    try:
        return int(raw) if raw is not None else fallback
    except ValueError:
        return fallback


def statistics(valid: list[SeedResult], reference_bpb: float | None, margin_nats: float,
               alpha: float) -> dict:
    """Mean, sample std, 95% t-interval of val_bpb; the record test when a reference is given."""
    bpbs = [r.val_bpb for r in valid]
    losses = [r.val_loss for r in valid]
    stats: dict = dict(n=len(valid), val_bpb_mean=mean(bpbs) if bpbs else None,
                       val_loss_mean=mean(losses) if losses else None)
    if len(valid) < 2:
        stats.update(val_bpb_std=None, val_bpb_ci95=None,
                     unavailable=f"{len(valid)} valid seed(s): std, interval and test need >= 2")
    else:
        stats.update(val_bpb_std=sample_std(bpbs), val_bpb_ci95=list(t_interval(bpbs)))
    if reference_bpb is None:
        return stats
    # Each run's own nats-per-bit-per-byte ratio (val_loss / val_bpb) converts the reference.
    improvements = [reference_bpb * (r.val_loss / r.val_bpb) - r.val_loss for r in valid]
    test: dict = dict(reference_bpb=reference_bpb, margin_nats=margin_nats, alpha=alpha,
                      improvement_nats=improvements,
                      mean_improvement_nats=mean(improvements) if improvements else None)
    if len(valid) >= 2:
        result = one_sided_t_test(improvements, margin_nats)
        test.update(t=result["t"], df=result["df"], p_value=result["p_value"],
                    significant=bool(result["p_value"] < alpha))
    else:
        test.update(t=None, df=None, p_value=None, significant=None,
                    unavailable="the test needs at least 2 valid seeds")
    stats["test"] = test
    return stats


# ------------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------------


def seed_table(results: list[SeedResult]) -> str:
    rows = []
    for r in results:
        s = r.summary()
        status = r.run.status + (f" ({r.run.detail})" if r.run.detail else "")
        rows.append([s["seed"], status, _runs.fmt(s["val_bpb"], 8), _runs.fmt(s["val_loss"], 8),
                     s["bytes_total"], _runs.fmt(s["train_time_s"], 1),
                     _runs.fmt(s["eval_time_s"], 1), s["log"]])
    return _runs.markdown_table(["seed", "status", "val_bpb", "val_loss", "bytes_total",
                                 "train_s", "eval_s", "log"], rows)


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


def joined(values: list[str | None]) -> str:
    unique = sorted({v for v in values if v})
    return "; ".join(unique)


def submission(results: list[SeedResult], stats: dict, args: argparse.Namespace) -> dict:
    valid = [r for r in results if r.run.ok]
    profile = joined([r.header("profile") for r in valid]) or args.profile or ""
    hardware = joined([f"{r.header('device_name')} x {r.header('world_size')}" for r in valid
                       if r.header("device_name")])
    summaries = [r.summary() for r in valid]
    train_times = [s["train_time_s"] for s in summaries if s["train_time_s"] is not None]
    eval_times = [s["eval_time_s"] for s in summaries if s["eval_time_s"] is not None]
    totals = [s["bytes_total"] for s in summaries if s["bytes_total"] is not None]
    codes = [s["bytes_code"] for s in summaries if s["bytes_code"] is not None]
    if profile == "competition":
        note = f"competition profile on {hardware or 'unknown hardware'}"
    else:
        note = (f"profile {profile or 'unknown'}: a CPU run on stand-in data (not FineWeb), "
                "not a leaderboard score")
    compliance: dict = dict(score_first_eval=True, normalized_mixture=True,
                            no_validation_in_training=True,
                            train_time_s=max(train_times) if train_times else None,
                            eval_time_s=max(eval_times) if eval_times else None)
    document = dict(
        name=args.name, github_id=args.github_id, val_bpb=stats["val_bpb_mean"],
        val_bpb_std=stats.get("val_bpb_std"), val_loss=stats["val_loss_mean"],
        seeds=[s["seed"] for s in summaries], results=summaries,
        bytes_total=max(totals) if totals else None, bytes_code=max(codes) if codes else None,
        hardware=hardware, pytorch_version=joined([r.header("torch") for r in valid]),
        date=datetime.date.today().isoformat(), profile=profile, compliance=compliance,
        note=note)
    document["val_bpb_ci95"] = stats.get("val_bpb_ci95")
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


def write_train_log(results: list[SeedResult], path: Path) -> None:
    parts = []
    for r in results:
        log = r.run.log_path
        if log is None or not log.exists():
            parts.append(f"===== seed {r.seed}: no log ({r.run.status}: {r.run.detail}) =====\n")
            continue
        text = log.read_text(encoding="utf-8", errors="replace")
        parts.append(f"===== {log} (seed {r.seed}, {r.run.status}) =====\n{text}")
        if not text.endswith("\n"):
            parts.append("\n")
    path.write_text("".join(parts), encoding="utf-8")


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Run train_gpt.py for several seeds (or aggregate existing logs), report "
                    "mean/std/95% interval of val_bpb and the record t-test, and write "
                    "submission.json and train_log.txt.")
    parser.add_argument("--logs", nargs="+", type=Path, metavar="LOG",
                        help="aggregate these existing logs instead of running anything")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(DEFAULT_SEEDS),
                        help="seeds to run (default: %(default)s)")
    parser.add_argument("--profile", default=None,
                        help="PROFILE for the runs (default: $PROFILE or competition)")
    parser.add_argument("--nproc", type=int, default=1,
                        help="processes per run: 1 -> python train_gpt.py, N > 1 -> torchrun "
                             "--standalone --nproc_per_node=N train_gpt.py")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment variable for every run (repeatable)")
    parser.add_argument("--prefix", default=None,
                        help="RUN_ID / artifact prefix: RUN_ID={prefix}_seed{seed}, "
                             "ARTIFACT_PATH={prefix}_seed{seed}.eam (default: the profile)")
    parser.add_argument("--logs-dir", type=Path, default=_runs.TRAIN_LOG_DIR,
                        help="where run logs and captured stdout are kept (default: logs)")
    parser.add_argument("--command", default=None,
                        help="replace the training command (a shell-quoted string; for tests "
                             "and wrappers)")
    parser.add_argument("--quiet", action="store_true", help="do not echo the runs' output")
    parser.add_argument("--reference-bpb", type=float, default=None,
                        help="val_bpb of the record to beat: enables the one-sided t-test")
    parser.add_argument("--margin-nats", type=float, default=0.005,
                        help="required improvement in nats (default: %(default)s)")
    parser.add_argument("--alpha", type=float, default=0.01,
                        help="significance level of the test (default: %(default)s)")
    parser.add_argument("--name", default="eam-golf", help="submission name")
    parser.add_argument("--github-id", default="", help="GitHub id for submission.json")
    parser.add_argument("--out-json", type=Path, default=Path("submission.json"),
                        help="submission file to write (default: %(default)s)")
    parser.add_argument("--out-log", type=Path, default=Path("train_log.txt"),
                        help="concatenated logs to write (default: %(default)s)")
    return parser


def run_seeds(args: argparse.Namespace) -> list[SeedResult] | None:
    try:
        extra = _runs.parse_env_pairs(args.env)
        command = _runs.training_command(args.nproc, args.command)
        for seed in args.seeds:
            _runs.check_settings({**extra, "PROFILE": args.profile, "SEED": str(seed)})
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return None
    unknown = _runs.unknown_settings(extra)
    if unknown:
        print(f"note: not train_gpt settings, passed as plain environment: {unknown}")
    prefix = args.prefix or args.profile
    results = []
    for seed in args.seeds:
        run_id = f"{prefix}_seed{seed}"
        env = {**extra, "PROFILE": args.profile, "SEED": str(seed), "RUN_ID": run_id,
               "ARTIFACT_PATH": f"{run_id}.eam"}
        run = _runs.run_training(f"seed {seed}", command, env, args.logs_dir,
                                 echo=not args.quiet)
        results.append(SeedResult(run, seed_of(run, seed)))
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.profile = args.profile or os.environ.get("PROFILE", "competition")
    if args.logs:
        results = []
        for log in args.logs:
            run = _runs.read_run(str(log), log)
            results.append(SeedResult(run, seed_of(run)))
    else:
        results = run_seeds(args)
        if results is None:
            return 2
    for r in results:
        if r.run.ok and not (r.val_loss is not None and r.val_bpb is not None and r.val_bpb > 0):
            r.run.status, r.run.detail = "incomplete", f"unreadable {_runs.SCORE_RECORD} line"
    valid = [r for r in results if r.run.ok]
    stats = statistics(valid, args.reference_bpb, args.margin_nats, args.alpha)
    print()
    print(seed_table(results))
    print()
    print(stats_text(stats))
    failed = [r for r in results if not r.run.ok]
    if failed:
        print(f"\n{len(failed)} run(s) failed or incomplete, excluded from the statistics: "
              + ", ".join(f"seed {r.seed} ({r.run.status})" for r in failed))
    document = submission(results, stats, args)
    args.out_json.write_text(json.dumps(json_safe(document), indent=2) + "\n",
                             encoding="utf-8")
    write_train_log(results, args.out_log)
    print(f"\nwrote {args.out_json} and {args.out_log}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
