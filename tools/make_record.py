"""Assemble the folder of a pull request to openai/parameter-golf from a sweep's logs.

A record is a folder records/track_<track>/YYYY-MM-DD_Description/ holding README.md,
submission.json, train_gpt.py, the training logs and requirements.txt. This writes all of it
from the logs alone: the exact train_gpt.py that ran (its sha256 must equal the one every log
recorded, or nothing is written), one `train_seed<SEED>.log` per seed, submission.json in the
merged records' fields (tools/_submission.py), the plots (tools/plots.py) and a README with the
results table, the method, the legality argument, the reproduction command and the size
breakdown. Then it runs tools.check_record on the folder and exits with its verdict.

    python -m tools.make_record --logs logs/competition_seed1337.txt \\
        logs/competition_seed42.txt logs/competition_seed2024.txt \\
        --name "EAM + context memory" --blurb "..." --out ../parameter-golf/records

The folder is new each time (an existing one is never overwritten). Do not commit it here: its
copy of train_gpt.py belongs to the runs, not to this repository's history.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import train_gpt
from tools import _runs, _submission, check_record, plots
from tools._submission import SeedResult

PROJECT_README = _runs.REPO_ROOT / "README.md"
PROJECT_REQUIREMENTS = _runs.REPO_ROOT / "requirements.txt"
TOOLS_ONLY_MARK = "tools/ only"  # requirements.txt lines train_gpt.py itself does not need
# The folder sits at records/track_<track>/<name>/ of a parameter-golf checkout, whose data
# script writes data/datasets/<variant>/ and data/tokenizers/ at the checkout's root.
CHECKOUT_ROOT_FROM_FOLDER = "../../.."
# Settings a reproduction sets itself (per seed, or pointing at the checkout's data).
PER_RUN_SETTINGS = ("SEED", "RUN_ID", "ARTIFACT_PATH", "DATA_PATH", "TOKENIZER_PATH")


class RecordError(ValueError):
    """Input that cannot become a record folder (the message says why)."""


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------


def validate_runs(results: Sequence[SeedResult], code_path: Path) -> str:
    """Every run complete, seeds distinct, one code version equal to `code_path`; its sha256."""
    broken = [f"{r.run.label} ({r.run.status}: {r.run.detail})" for r in results if not r.run.ok]
    if broken:
        raise RecordError("incomplete or failed runs cannot go into a record: "
                          + ", ".join(broken))
    seeds = [r.seed for r in results]
    if None in seeds or len(set(seeds)) != len(seeds):
        raise RecordError(f"each log needs its own SEED setting; the logs have seeds {seeds}")
    logged = {r.header("code_sha256") for r in results}
    if len(logged) != 1 or None in logged:
        raise RecordError("the logs ran different (or unrecorded) train_gpt.py versions: "
                          + ", ".join(f"{r.run.label}: {r.header('code_sha256')}"
                                      for r in results))
    if not code_path.is_file():
        raise RecordError(f"--code {code_path}: no such file")
    actual = check_record.sha256_file(code_path)
    if actual not in logged:
        raise RecordError(f"--code {code_path} has sha256 {actual}, but the logs ran "
                          f"{logged.pop()}: check out the commit the runs used (the folder must "
                          "carry the exact code that ran)")
    return actual


def description_of(text: str) -> str:
    description = re.sub(r"[^A-Za-z0-9_.+-]+", "_", text).strip("_.+-")
    if not description:
        raise RecordError(f"--description {text!r}: needs letters or digits")
    return description


# ------------------------------------------------------------------------------------------------
# README.md
# ------------------------------------------------------------------------------------------------


def project_section(heading: str) -> str:
    """A '## heading...' section of this project's README (written once, there)."""
    text = PROJECT_README.read_text(encoding="utf-8")
    match = re.search(rf"^## {re.escape(heading)}.*?$(.*?)(?=^## |\Z)", text, re.M | re.S)
    if match is None:
        raise RecordError(f"{PROJECT_README}: no '## {heading}' section")
    return match.group(1).strip()


def challenge_data_path(logged: str) -> str | None:
    """The logged DATA_PATH / TOKENIZER_PATH seen from the record folder, when it is the
    challenge's layout (data/datasets/..., data/tokenizers/...); None otherwise."""
    for part in ("datasets/", "tokenizers/"):
        if part in logged:
            return f"{CHECKOUT_ROOT_FROM_FOLDER}/data/{part}{logged.split(part, 1)[1]}"
    return None


def reproduction(results: Sequence[SeedResult]) -> tuple[str, list[str]]:
    """(shell command run from the record folder, notes), from the settings the logs recorded."""
    first = results[0]
    env: dict[str, str] = {}
    profile = first.header("profile") or "competition"
    if profile != "competition":
        env["PROFILE"] = profile
    notes = []
    for key in ("DATA_PATH", "TOKENIZER_PATH"):
        logged = first.setting(key) or ""
        env[key] = challenge_data_path(logged) or logged
        if challenge_data_path(logged) is None:
            notes.append(f"`{key}={logged}` is not the challenge's data layout: it is the "
                         "path the runs used")
    changed = [_runs.changed_settings(r.run.records) for r in results]
    for key, value in sorted(changed[0].items()):
        if key not in PER_RUN_SETTINGS and all(c.get(key) == value for c in changed):
            env[key] = value
    differing = sorted({k for c in changed for k in c if k not in PER_RUN_SETTINGS} - set(env))
    if differing:
        notes.append(f"settings that differed between the seeds' runs: {differing}")
    world = int(first.header("world_size") or 1)
    launcher = ("python train_gpt.py" if world == 1 else
                f"torchrun --standalone --nproc_per_node={world} train_gpt.py")
    lines: list[str] = []
    for assignment in (f"{k}={shlex.quote(v)}" for k, v in env.items()):
        if lines and len(lines[-1]) + len(assignment) < 96:
            lines[-1] += " " + assignment
        else:
            lines.append(assignment)
    assignments = " \\\n  ".join(lines)
    seeds = " ".join(str(r.seed) for r in results)
    command = (f"for SEED in {seeds}; do\n  {assignments} \\\n"
               f"  SEED=$SEED RUN_ID=train_seed$SEED ARTIFACT_PATH=train_seed$SEED.eam \\\n"
               f"  {launcher}\ndone")
    return command, notes


def number(value: object, digits: int) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}f}"


def results_section(document: dict, results: Sequence[SeedResult], stats: dict) -> list[str]:
    rows = ["| seed | val_bpb | val_loss | memory path bpb | teacher bpb | artifact bytes | "
            "teacher steps | step ms | train s | eval s |", "|" + "---:|" * 10]
    for r in results:
        s = document["seed_results"][str(r.seed)]
        rows.append(f"| {r.seed} | **{number(s['val_bpb'], 8)}** | {number(s['val_loss'], 8)} | "
                    f"{number(s['memory_val_bpb'], 4)} | {number(s['teacher_val_bpb'], 4)} | "
                    f"{number(s['artifact_bytes'], 0)} | {number(s['steps'], 0)} | "
                    f"{number(s['step_avg_ms'], 1)} | {number(s['train_time_s'], 1)} | "
                    f"{number(s['eval_time_s'], 1)} |")
    rows.append(f"| **mean** | **{number(document['val_bpb'], 8)}** | "
                f"{number(document['val_loss'], 8)} | | | | | | | |")
    lines = ["## Results", "", *rows, ""]
    if stats["val_bpb_std"] is not None:
        low, high = stats["val_bpb_ci95"]
        lines.append(f"Sample std {stats['val_bpb_std']:.8f} bpb ({stats['val_loss_std']:.8f} "
                     f"nats); 95% t-interval of the mean [{low:.5f}, {high:.5f}].")
    test = stats.get("test")
    if test and test.get("p_value") is not None:
        verdict = "significant" if test["significant"] else "not significant"
        lines.append(f"Against the record's {test['reference_bpb']} bpb: mean improvement "
                     f"{test['mean_improvement_nats']:.5f} nats, one-sided t-test of an "
                     f"improvement above {test['margin_nats']} nats: t = {test['t']:.3f}, "
                     f"p = {test['p_value']:.3g} ({verdict} at {test['alpha']}).")
    lines += [
        "",
        f"Each seed's score is its `{_runs.SCORE_RECORD} val_loss:X val_bpb:Y` line (computed "
        "from the artifact after a round trip through its bytes), its size the "
        f"`{_runs.ARTIFACT_RECORD} code_bytes:N model_bytes:N total_bytes:N limit:"
        f"{_submission.SIZE_LIMIT}` line, in `{_submission.seed_log_name('<SEED>')}`. The memory "
        f"path (`{_runs.MEMORY_RECORD}`) and the teacher (`{_runs.TEACHER_RECORD}`, a "
        "diagnostic on the same windows, when logged) are shown for comparison; only the "
        "memory model is shipped and scored.", ""]
    if document.get("note"):
        lines += [f"**Note:** {document['note']}.", ""]
    return lines


def span(values: Sequence[float | None]) -> str | None:
    """'556' or '556-598' over the seeds (None when no log has it)."""
    present = sorted({int(v) for v in values if v is not None})
    if not present:
        return None
    return f"{present[0]:,}" + (f"-{present[-1]:,}" if len(present) > 1 else "")


def memory_paragraphs(first: SeedResult, writes: str | None, kept: str | None,
                      sees: str) -> list[str]:
    """The Memory and Distillation paragraphs."""

    def s(name: str) -> str:
        return first.setting(name) or "?"

    return [
        "**Memory.** An Elastic Associative Memory counts what the teacher's contexts "
        f"lead to: a key is a fixed random projection ({s('EAM_KEY_DIM')} dims) of the "
        "teacher's state, normalized; addresses are placed by a few passes of spherical "
        "k-means on a sample of keys every rank shares; each written token adds a softmax "
        f"over its top {s('EAM_WRITE_K')} locations' similarities to its next token's "
        "count there, and the counts of all ranks are summed, so every rank ends with the "
        f"same memory. A location ships its top {s('EAM_TOP_TOKENS')} tokens and its "
        f"write count ({writes or '?'} writes, {kept or '?'} locations kept in the artifact).",
        "",
        *context_paragraph(first),
        f"**Distillation.** A causal {s('ENC_LAYERS')}-layer encoder, initialised from the "
        "teacher's lowest blocks, maps tokens to memory keys; the read, a softmax over the "
        f"top {s('EAM_READ_K')} locations differentiable in the query, gives a next-token "
        f"distribution smoothed toward uniform (alpha {s('EAM_READ_ALPHA')}); a decoder "
        f"maps the encoder's features {sees}to logits through the tied embedding, and a "
        "learned gate that reads only the prefix (the features, the read's similarities, "
        "its entropy and peak) mixes the two distributions. Keys are trained first (cosine "
        "to the teacher's key), then the whole student end to end on the mixture's "
        "cross-entropy + KL to the teacher on the decoder's part (temperature "
        f"{s('DISTILL_TEMPERATURE')}).", ""]


def context_paragraph(first: SeedResult) -> list[str]:
    """The context memory's paragraph, if the run had one (EAM_CONTEXT_ORDER > 0)."""
    lengths = first.context_lengths()
    if lengths is None:
        return []
    counted = first.value(train_gpt.stage_record("eam_write"), "context_tokens")
    shipped = first.value(_runs.FIT_RECORD, "context_pairs")
    return [
        "**Context memory.** Beside it, the counts of the tokens that followed each exact "
        f"context of {lengths} tokens in {number(counted, 0)} training tokens "
        f"(pairs seen at least {first.setting('EAM_CONTEXT_MIN_COUNT') or '?'} times; "
        f"{number(shipped, 0)} shipped, the most counted, fitted to the size limit before "
        "distillation so that the student learns with them), read by Witten-Bell interpolation "
        "over the associative read; after each chunk is scored it also counts that chunk's "
        "pairs, if `EVAL_MEMORY_WRITES` is on.", ""]


def method_section(results: Sequence[SeedResult]) -> list[str]:
    first = results[0]

    def s(name: str) -> str:
        return first.setting(name) or "?"

    kept = span([r.value(_runs.FIT_RECORD, "kept_locations") for r in results])
    writes = span([r.value(train_gpt.stage_record("eam_write"), "writes") for r in results])
    sees_encoder = first.value(train_gpt.stage_record("distill"), "dec_sees_encoder")
    sees = "and the read's expected token embedding " if sees_encoder == 1 else ""
    knn = first.value(_submission.EVAL_STAGE, "knn") == 1
    ttt = (first.value(_submission.EVAL_STAGE, "ttt_steps") or 0) > 0
    return [
        "## Method", "",
        f"**Teacher.** A {s('NUM_LAYERS')}-layer, {s('MODEL_DIM')}-wide GPT ({s('NUM_HEADS')} "
        f"query / {s('NUM_KV_HEADS')} key-value heads, {s('MLP_MULT')}x MLP, exclusive "
        f"self-attention in the last {s('XSA_LAYERS')} layers, EMA {s('EMA_DECAY')}) is trained "
        "with Muon for matrices and Adam for the rest inside its share of the time budget "
        f"(`TEACHER_TIME_FRAC={s('TEACHER_TIME_FRAC')}`). It is never shipped.", "",
        *memory_paragraphs(first, writes, kept, sees),
        f"**Artifact and score.** Encoder, memory and decoder are quantized per row "
        f"(int{s('QUANT_BITS')}), compressed with zstd level {s('ZSTD_LEVEL')} and written "
        "with a checksum; when code + artifact would exceed 16,000,000 bytes the least-written "
        "locations are dropped, never the count. Evaluation rebuilds the model from the "
        f"artifact bytes alone and scores sliding windows of {s('EVAL_SEQ_LEN')} tokens at "
        f"stride {s('EVAL_STRIDE')}"
        + (f", mixing in a kNN store of already-scored tokens ({s('KNN_K')} neighbours, weight "
           f"{s('KNN_LAMBDA')} x the best neighbour's similarity, filled chunk by chunk of "
           f"{s('EVAL_CHUNK_TOKENS')} tokens after each chunk is scored)." if knn else ".")
        + (f" After each chunk is scored, the model takes {s('TTT_STEPS')} optimizer step(s) "
           f"on that chunk's tokens (test-time training of `{s('TTT_PARAMS')}`, Muon and Adam "
           f"at {s('TTT_LR_SCALE')} x the training rates), so only tokens already scored teach "
           "it." if ttt else ""),
        ""]


def size_section(results: Sequence[SeedResult]) -> list[str]:
    lines = ["## Size", "", "| seed | train_gpt.py bytes | artifact bytes | total | margin to "
             f"{_submission.SIZE_LIMIT:,} |", "|---:|---:|---:|---:|---:|"]
    for r in results:
        code, model, total = (r.bytes(k) for k in ("code_bytes", "model_bytes", "total_bytes"))
        margin = None if total is None else _submission.SIZE_LIMIT - total
        lines.append(f"| {r.seed} | {number(code, 0)} | {number(model, 0)} | "
                     f"{number(total, 0)} | {number(margin, 0)} |")
    largest = max(results, key=lambda r: r.bytes("total_bytes") or 0)
    components = _runs.line_records(largest.run.text, _runs.COMPONENT_RECORD)
    if components:
        lines += ["", f"Components of seed {largest.seed}'s artifact (each compressed alone, "
                  "so they need not add up to the artifact):", "",
                  "| component | raw bytes | zstd bytes |", "|---|---:|---:|"]
        lines += [f"| {c.get('name')} | {int(c.get('raw_bytes', 0)):,} | "
                  f"{int(c.get('zstd_bytes', 0)):,} |" for c in components]
    return [*lines, ""]


def render_readme(document: dict, results: Sequence[SeedResult], stats: dict,
                  plot_files: dict[str, Path], code_sha: str) -> str:
    first = results[0]
    command, notes = reproduction(results)
    captions = {key: caption for key, (_, caption) in plots.PLOTS.items()}
    image = {key: f"![{captions[key]}]({path.name})" for key, path in plot_files.items()}
    std = ("" if document["val_bpb_std"] is None else f", std {document['val_bpb_std']:.5f}")
    vocab = first.setting("VOCAB_SIZE") or "1024"
    data_step = []
    if challenge_data_path(first.setting("DATA_PATH") or "") is not None:
        data_step = ["From the root of an openai/parameter-golf checkout, fetch the data "
                     "(it lands in `data/datasets/` and `data/tokenizers/`):", "", "```bash",
                     f"python3 data/cached_challenge_fineweb.py --variant sp{vocab}", "```", ""]
    lines = [
        f"# {document['name']}", "",
        f"**val_bpb {document['val_bpb']:.5f}** ({len(results)}-seed mean{std}) | "
        f"**{document['bytes_total']:,} bytes** of {_submission.SIZE_LIMIT:,} | "
        f"{document['hardware']} | track `{document['track']}`", "",
        document["blurb"] or "", "",
        *results_section(document, results, stats),
        image["scores"], "", image["curves"], "",
        *method_section(results),
        f"Techniques: {document['technique_summary']}.", "",
        "## Legality", "",
        "The challenge's four conditions (openai/parameter-golf issue 1017) and how this code "
        "meets each; the tests are in the eam-golf repository's `tests/`.", "",
        project_section("Legality"), "",
        "## Reproduction", "",
        *data_step,
        f"{'Then, in' if data_step else 'In'} this folder (`pip install -r requirements.txt`; "
        "train_gpt.py sha256 "
        f"`{code_sha}`):", "", "```bash", command, "```", "",
        *[f"- {note}" for note in notes], *([""] if notes else []),
        *size_section(results), image["size"], "",
        "## Time", "",
        "| seed | training s (everything that read training data) | evaluation s |",
        "|---:|---:|---:|",
        *[f"| {r.seed} | {number(r.train_time_s, 1)} | {number(r.eval_time_s, 1)} |"
          for r in results],
        "", f"Each against the {_submission.TIME_LIMIT_S:.0f} s limit.", "", image["time"], "",
        "## Files", "",
        "- `train_gpt.py`: the whole pipeline, exactly the file the logs ran (sha256 above)",
        *[f"- `{_submission.seed_log_name(r.seed)}`: the log of seed {r.seed}" for r in results],
        "- `submission.json`: the fields above, computed from the logs",
        "- `requirements.txt`: what train_gpt.py needs",
        *[f"- `{path.name}`: {captions[key]}" for key, path in plot_files.items()], ""]
    return "\n".join(lines)


def render_requirements(document: dict) -> str:
    """This project's requirements.txt without its tools-only lines, with the logged versions."""
    wanted = [line for line in PROJECT_REQUIREMENTS.read_text(encoding="utf-8").splitlines()
              if line.strip() and not line.startswith("#") and TOOLS_ONLY_MARK not in line]
    return "\n".join([
        f"# The runs used torch {document['pytorch_version']}, CUDA {document['cuda_version']}, "
        f"flash-attn {document['flash_attn_version']}.",
        "# flash-attn is optional (FA3/FA2 are used when importable, else PyTorch SDPA).",
        *wanted]) + "\n"


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def assemble(args: argparse.Namespace) -> Path:
    """Write the folder; returns its path. Raises RecordError before writing anything."""
    sources = _submission.read_results(args.logs)
    code_sha = validate_runs(sources, args.code)
    plots.pyplot()  # fail now, not after the folder is half written
    profile = sources[0].header("profile") or "competition"
    description = description_of(args.description or (
        "EAM_context" if profile == "competition" else f"EAM_context_{profile}"))
    stats = _submission.statistics(sources, args.reference_bpb, args.margin_nats, args.alpha)
    meta = _submission.metadata(args, sources, stats)
    folder = (args.out / _submission.track_folder(meta["track"])
              / _submission.record_folder_name(meta["date"], description))
    if folder.exists():
        raise RecordError(f"{folder} exists: remove it or choose another --description")
    folder.mkdir(parents=True)
    shutil.copyfile(args.code, folder / "train_gpt.py")
    for result in sources:
        shutil.copyfile(result.run.log_path, folder / _submission.seed_log_name(result.seed))
    # From here on everything is read back from the folder, exactly as the check reads it.
    results = _submission.read_results(_submission.folder_logs(folder))
    stats = _submission.statistics(results, args.reference_bpb, args.margin_nats, args.alpha)
    meta = _submission.metadata(args, results, stats)
    document = _submission.build_submission(results, stats, meta)
    _submission.write_json(document, folder / "submission.json")
    plot_files = plots.write_plots(results, stats, folder)
    (folder / "README.md").write_text(render_readme(document, results, stats, plot_files,
                                                    code_sha), encoding="utf-8")
    (folder / "requirements.txt").write_text(render_requirements(document), encoding="utf-8")
    return folder


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Assemble records/track_<track>/YYYY-MM-DD_Description/ for a pull request "
                    "to openai/parameter-golf from a sweep's logs, then check it.")
    parser.add_argument("--logs", nargs="+", type=Path, required=True, metavar="LOG",
                        help="one complete log per seed (e.g. logs/competition_seed1337.txt)")
    parser.add_argument("--out", type=Path, default=Path("records"),
                        help="the records/ folder to add to (default: %(default)s; point it at "
                             "a parameter-golf checkout's records/)")
    parser.add_argument("--description", default=None,
                        help="the folder's name after the date (default: EAM_context[_profile])")
    parser.add_argument("--code", type=Path, default=_runs.TRAIN_SCRIPT,
                        help="the train_gpt.py to ship; its sha256 must be the logged one "
                             "(default: this repository's)")
    parser.add_argument("--run-dir", type=Path, default=Path("."),
                        help="the folder the runs started in, to find their artifacts for the "
                             "check (default: the current folder)")
    _submission.add_test_arguments(parser)
    _submission.add_metadata_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        folder = assemble(args)
    except (ValueError, RuntimeError) as error:  # RecordError, a bad --date, no matplotlib
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {folder}")
    report = check_record.check_folder(folder, args.run_dir)
    print(report.text(str(folder)))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
