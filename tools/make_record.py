"""Assemble the folder of a pull request to openai/parameter-golf from a sweep's logs.

A record is a folder records/track_<track>/YYYY-MM-DD_Description/ holding README.md,
submission.json, train_gpt.py, the training logs and requirements.txt. This writes all of it
from the logs alone: the exact train_gpt.py that ran (its sha256 must equal the one every log
recorded, or nothing is written), one `train_seed<SEED>.log` per seed, submission.json in the
merged records' fields (tools/_submission.py), the plots (tools/plots.py) and a README rendered
from the template tools/record_readme.md: results, the method and the legality argument as the
logs say the runs went (nothing about a part that did not run), rule compliance, reproduction,
size, time, and credits. Then it runs tools.check_record on the folder and exits with its
verdict.

    python -m tools.make_record --logs logs/competition_seed1337.txt \
        logs/competition_seed42.txt logs/competition_seed2024.txt \
        --author "Your Name" --github-id you --reference-bpb <the current record's val_bpb> \
        --out ../parameter-golf/records

Runs on the demo corpus (tools.make_demo_data) are refused unless --demonstration is given, and
then the folder says plainly that it is a demonstration (as it does for any other profile than
the competition's, another machine than 8xH100, or a part of the validation split). The folder
is new each time (an existing one is never overwritten). Do not commit it here: its copy of
train_gpt.py belongs to the runs, not to this repository's history.
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

PROJECT_REQUIREMENTS = _runs.REPO_ROOT / "requirements.txt"
TOOLS_ONLY_MARK = "tools/ only"  # requirements.txt lines train_gpt.py itself does not need
# The folder sits at records/track_<track>/<name>/ of a parameter-golf checkout, whose data
# script writes data/datasets/<variant>/ and data/tokenizers/ at the checkout's root.
CHECKOUT_ROOT_FROM_FOLDER = "../../.."
# Settings a reproduction sets itself (per seed, or pointing at the checkout's data).
PER_RUN_SETTINGS = ("SEED", "RUN_ID", "ARTIFACT_PATH", "DATA_PATH", "TOKENIZER_PATH")
DEFAULT_DESCRIPTION = "context_memory"  # the folder's name after the date


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


def demonstration_of(results: Sequence[SeedResult], args: argparse.Namespace) -> str | None:
    """What the folder says when it is a demonstration (None for an entry). Runs on the demo
    corpus are refused unless --demonstration says the folder is one."""
    roots = (_runs.REPO_ROOT, args.run_dir)
    fingerprints = _submission.demo_corpus_fingerprints(roots)
    demo = sorted({reason for reason in (_submission.demo_corpus(r, fingerprints)
                                         for r in results) if reason})
    if demo and not args.demonstration:
        raise RecordError("the runs trained on the demo corpus (tools.make_demo_data: Python "
                          f"docstrings, not FineWeb): {'; '.join(demo)}. Pass --demonstration "
                          "to make a folder that says it is a demonstration")
    reasons = _submission.demonstration_reasons(results, roots)
    if args.demonstration and not reasons:
        reasons = ["so declared by its author (--demonstration)"]
    return _submission.demonstration_text(reasons)


def description_of(text: str) -> str:
    description = re.sub(r"[^A-Za-z0-9_.+-]+", "_", text).strip("_.+-")
    if not description:
        raise RecordError(f"--description {text!r}: needs letters or digits")
    return description


# ------------------------------------------------------------------------------------------------
# README.md, from the template
# ------------------------------------------------------------------------------------------------

TEMPLATE = Path(__file__).with_name("record_readme.md")
PLACEHOLDER = re.compile(r"{{(\w+)}}")
# A section {{#flag}}...{{/flag}} (kept when the flag holds) or {{^flag}}...{{/flag}} (kept when
# it does not), innermost first; a tag alone on its line takes the line with it.
SECTION = re.compile(r"{{([#^])(\w+)}}((?:(?!{{[#^]).)*?){{/\2}}", re.S)
STANDALONE_TAG = re.compile(r"^[ \t]*({{[#^/]\w+}})[ \t]*\n", re.M)


def render_template(template: str, values: dict[str, object]) -> str:
    """Fill `template`'s sections and {{placeholders}} from `values`; a name the values lack is
    an error (so a template edit cannot leave a hole in a README)."""
    def value(name: str) -> object:
        if name not in values:
            raise RecordError(f"{TEMPLATE.name}: no value for {{{{{name}}}}}")
        return values[name]

    def section(match: re.Match) -> str:
        kind, name, body = match.groups()
        return body if bool(value(name)) == (kind == "#") else ""

    text = STANDALONE_TAG.sub(r"\1", template)
    while True:
        text, count = SECTION.subn(section, text)
        if not count:
            break
    text = PLACEHOLDER.sub(lambda match: str(value(match.group(1))), text)
    if "{{" in text:
        raise RecordError(f"{TEMPLATE.name}: an unmatched section tag near "
                          f"{text[text.index('{{'):][:40]!r}")
    return text


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


def span(values: Sequence[float | None]) -> str:
    """'556' or '556-598' over the seeds ('-' when no log has it)."""
    present = sorted({int(v) for v in values if v is not None})
    if not present:
        return "-"
    return f"{present[0]:,}" + (f"-{present[-1]:,}" if len(present) > 1 else "")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], align: str = "---:") -> str:
    return "\n".join(["| " + " | ".join(headers) + " |", "|" + "|".join(
        [align] * len(headers)) + "|", *("| " + " | ".join(map(str, row)) + " |"
                                         for row in rows)])


def results_table(document: dict, results: Sequence[SeedResult]) -> str:
    rows = []
    for r in results:
        s = document["seed_results"][str(r.seed)]
        rows.append([r.seed, f"**{number(s['val_bpb'], 8)}**", number(s["val_loss"], 8),
                     number(s["memory_val_bpb"], 4), number(s["teacher_val_bpb"], 4),
                     number(s["artifact_bytes"], 0), number(s["steps"], 0),
                     number(s["step_avg_ms"], 1), number(s["train_time_s"], 1),
                     number(s["eval_time_s"], 1)])
    rows.append(["**mean**", f"**{number(document['val_bpb'], 8)}**",
                 number(document["val_loss"], 8), *[""] * 7])
    return table(["seed", "val_bpb", "val_loss", "model alone bpb", "teacher bpb",
                  "artifact bytes", "teacher steps", "step ms", "train s", "eval s"], rows)


def size_tables(results: Sequence[SeedResult]) -> tuple[str, str, object]:
    """(the per-seed size table, the largest artifact's components table or '', its seed)."""
    rows = []
    for r in results:
        code, model, total = (r.bytes(k) for k in ("code_bytes", "model_bytes", "total_bytes"))
        margin = None if total is None else _submission.SIZE_LIMIT - total
        rows.append([r.seed, number(code, 0), number(model, 0), number(total, 0),
                     number(margin, 0)])
    sizes = table(["seed", "train_gpt.py bytes", "artifact bytes", "total",
                   f"margin to {_submission.SIZE_LIMIT:,}"], rows)
    largest = max(results, key=lambda r: r.bytes("total_bytes") or 0)
    components = _runs.line_records(largest.run.text, _runs.COMPONENT_RECORD)
    parts = "" if not components else table(
        ["component", "raw bytes", "zstd bytes"],
        [[c.get("name"), f"{int(c.get('raw_bytes', 0)):,}", f"{int(c.get('zstd_bytes', 0)):,}"]
         for c in components], "---")
    return sizes, parts, largest.seed


def learner_names(used: dict[str, bool]) -> list[str]:
    return [name for key, name in (("writes", "the memory's writes"),
                                   ("ttt", "test-time training"), ("knn", "the kNN store"))
            if used[key]]


def compliance_table(document: dict, results: Sequence[SeedResult]) -> str:
    """The challenge's rules against what the logs say, one row each."""
    facts = document["compliance"]
    first = results[0]

    def holds(value: bool) -> str:
        return "yes" if value else "**no**"

    scored = {(r.data("val_tokens"), r.data("val_split_tokens")) for r in results}
    learners = learner_names(first.learners())
    rows = [
        ["training within 600 s (everything that read training data)",
         f"at most {number(facts['train_time_max_s'], 1)} s (`{_runs.TRAIN_TIME_RECORD}`)",
         holds(facts["train_under_600s"])],
        ["evaluation within 600 s", f"at most {number(facts['eval_time_max_s'], 1)} s "
         f"(`{_runs.EVAL_TIME_RECORD}`)", holds(facts["eval_under_600s"])],
        [f"code + artifact within {_submission.SIZE_LIMIT:,} bytes",
         f"at most {number(facts['artifact_bytes_max'], 0)} bytes (`{_runs.ARTIFACT_RECORD}`)",
         holds(facts["artifact_under_16mb"])],
        ["trained from scratch", "`INIT_CHECKPOINT` empty", holds(facts["trained_from_scratch"])],
        ["the real code's bytes counted", "`SIZE_CODE_BYTES=0`", holds(facts["real_code_bytes"])],
        ["evaluation-time learning is score-first",
         (", ".join(learners) + ", each after the chunk is scored") if learners else
         "no learner ran", "yes"],
        ["the whole validation split scored", "; ".join(
            f"{number(int(a), 0) if a else '?'} of {number(int(b), 0) if b else '?'} tokens"
            for a, b in sorted(scored, key=str)), holds(facts["full_validation_split"])],
        [f"{_submission.MIN_SEEDS} seeds of one configuration",
         f"seeds {', '.join(str(r.seed) for r in results)}; settings, code, data and hardware "
         "the same", holds(facts["three_seeds"] and facts["one_configuration"])],
    ]
    return table(["rule", "these runs (from the logs)", "holds"], rows, "---")


# Credits: (the technique, whether these runs used it (settings, learners that ran), where it
# comes from).
LINEAGE = (
    ("the GPT layout, Muon for matrices, the data shards, tokenizer and bits-per-byte "
     "evaluation", lambda a, used: True, "the challenge's baseline `train_gpt.py` "
     "(openai/parameter-golf); Muon: Jordan et al. 2024 (modded-nanogpt)"),
    ("LeakyReLU(0.5)^2 MLP", lambda a, used: a.mlp_leaky_slope > 0, "the challenge's records"),
    ("partial RoPE", lambda a, used: 0 < a.rope_dims < a.model_dim // a.num_heads,
     "the challenge's records"),
    ("layer-norm scale 1/sqrt(layer)", lambda a, used: a.ln_scale, "the challenge's records"),
    ("exclusive self-attention (XSA)", lambda a, used: a.xsa_layers > 0,
     "Zhai 2026 (arXiv:2603.09078), in the challenge's records from PR #287 on"),
    ("QK-norm with a learned gain started above the baseline's 1.5",
     lambda a, used: a.qk_gain_init > 1.5, "the challenge's records"),
    ("EMA of weights", lambda a, used: a.ema_decay > 0,
     "the challenge's records from PR #287 on"),
    ("MuonEq-R (row-equalized Muon updates)", lambda a, used: a.muon_row_norm,
     "Chang et al. 2026 (arXiv:2603.28254), in the challenge's records"),
    ("Muon weight decay", lambda a, used: a.muon_weight_decay > 0, "the challenge's records"),
    ("per-row integer quantization with zstd, sliding-window evaluation", lambda a, used: True,
     "the challenge's records"),
    ("distillation from a teacher (KL to its distribution)", lambda a, used: a.model == "eam",
     "Hinton et al. 2015"),
    ("Witten-Bell interpolation of context counts",
     lambda a, used: a.model == "eam" and bool(train_gpt.shipped_lengths(a)),
     "Witten and Bell 1991; Chen and Goodman 1998"),
    ("mixing the memory's distribution in with a weight from the prefix alone",
     lambda a, used: a.model == "eam", "as kNN-LM mixes its neighbours, Khandelwal et al. 2020"),
    ("a kNN store of scored tokens", lambda a, used: used["knn"],
     "kNN-LM, Khandelwal et al. 2020"),
    ("score-first test-time training", lambda a, used: used["ttt"],
     "the challenge's records; the conditions of openai/parameter-golf issue 1017"),
)


def lineage(first: SeedResult) -> str:
    args, used = first.args, first.learners()
    return "\n".join(f"- {technique}: {source}" for technique, applies, source in LINEAGE
                     if args is not None and applies(args, used))


def readme_values(document: dict, results: Sequence[SeedResult], stats: dict,
                  plot_files: dict[str, Path], code_sha: str) -> dict[str, object]:
    """Every value tools/record_readme.md names, from the logs (and submission.json, itself
    computed from them)."""
    first, args = results[0], results[0].args
    if args is None:
        raise RecordError(f"{first.name}: its settings are not this train_gpt.py's")
    captions = {key: caption for key, (_, caption) in plots.PLOTS.items()}
    images = {f"{key}_image": f"![{captions[key]}]({path.name})"
              for key, path in plot_files.items()}
    command, notes = reproduction(results)
    sizes, components, components_seed = size_tables(results)
    used = first.learners()
    ttt_taken = [int(r.first_line(_runs.TTT_RECORD).get("steps", 0)) for r in results]
    shed = [r.seed for r in results if _runs.SHED_RECORD in r.run.records]
    shipped = train_gpt.shipped_lengths(args)
    counted = first.value(_submission.WRITE_STAGE, "context_tokens") or 0
    fit = first.run.records.get(_runs.FIT_RECORD, {})  # the last fit: the one packed
    test = stats.get("test") or {}
    spread = stats["val_bpb_std"] is not None
    scored = first.data("val_tokens")
    learned = train_gpt.learned_lengths(args)
    s = first.setting
    return dict(
        images, name=document["name"], demonstration=document.get("demonstration") or "",
        val_bpb=f"{document['val_bpb']:.5f}", seed_count=len(results),
        std_text="" if not spread else f", std {document['val_bpb_std']:.5f}",
        bytes_total=f"{document['bytes_total']:,}", size_limit=f"{_submission.SIZE_LIMIT:,}",
        size_limit_raw=_submission.SIZE_LIMIT, hardware=document["hardware"],
        track=document["track"], blurb=document["blurb"] or "",
        results_table=results_table(document, results), spread=spread,
        bpb_std=f"{stats['val_bpb_std']:.8f}" if spread else "",
        loss_std=f"{stats['val_loss_std']:.8f}" if spread else "",
        ci_low=f"{stats['val_bpb_ci95'][0]:.5f}" if spread else "",
        ci_high=f"{stats['val_bpb_ci95'][1]:.5f}" if spread else "",
        test=test.get("p_value") is not None, reference_bpb=test.get("reference_bpb"),
        improvement=f"{test.get('mean_improvement_nats') or 0:.5f}",
        margin=test.get("margin_nats"), t=f"{test.get('t') or 0:.3f}",
        p=f"{test.get('p_value') or 0:.3g}", alpha=test.get("alpha"),
        verdict="significant" if test.get("significant") else "not significant",
        score_record=_runs.SCORE_RECORD, artifact_record=_runs.ARTIFACT_RECORD,
        memory_record=_runs.MEMORY_RECORD, teacher_record=_runs.TEACHER_RECORD,
        seed_log=_submission.seed_log_name("<SEED>"), note=document.get("note") or "",
        num_layers=args.num_layers, model_dim=args.model_dim, num_heads=args.num_heads,
        num_kv_heads=args.num_kv_heads, mlp_mult=args.mlp_mult, xsa_layers=args.xsa_layers,
        ema_decay=args.ema_decay, teacher_time_frac=args.teacher_time_frac,
        teacher_steps=span([r.value(_submission.TEACHER_STAGE, "steps") for r in results]),
        memory=bool(shipped) and counted > 0,
        scored_memory=bool(shipped) and not counted and args.eval_memory_writes,
        no_memory="EAM_CONTEXT_ORDER=0" if not shipped else "EAM_CONTEXT_TOKENS=0",
        shipped_lengths=_submission.lengths_text(shipped) or "",
        context_tokens=span([r.value(_submission.WRITE_STAGE, "context_tokens")
                             for r in results]),
        min_count=args.eam_context_min_count,
        shipped_pairs=span([r.value(_runs.FIT_RECORD, "context_pairs") for r in results]),
        dropped=(_runs.number(first.run.records, _runs.FIT_RECORD, "dropped_context_pairs")
                 or 0) > 0 and bool(fit),
        dropped_pairs=span([r.value(_runs.FIT_RECORD, "dropped_context_pairs")
                            for r in results]),
        learned=bool(learned), learned_lengths=", ".join(map(str, learned)),
        enc_layers=args.enc_layers, dec_hidden=args.dec_hidden,
        distill_steps=span([r.value(_submission.DISTILL_STAGE, "steps") for r in results]),
        kl_weight=args.distill_kl_weight, temperature=args.distill_temperature,
        quant_bits=span([r.value(_runs.ARTIFACT_RECORD, "quant_bits") for r in results]),
        zstd_level=args.zstd_level, eval_seq_len=args.eval_seq_len,
        eval_stride=args.eval_stride, eval_chunk_tokens=f"{args.eval_chunk_tokens:,}",
        learners=any(used.values()), writes=used["writes"], ttt=used["ttt"],
        learners_on=", ".join(name for name, on in (
            ("the memory's writes", args.eval_memory_writes), ("test-time training",
                                                               args.ttt_steps > 0),
            ("the kNN store", args.knn_lambda > 0)) if on),
        ttt_taken=" / ".join(f"{steps:,}" for steps in ttt_taken), ttt_steps=args.ttt_steps,
        ttt_params=args.ttt_params, ttt_lr_scale=args.ttt_lr_scale, knn=used["knn"],
        knn_k=args.knn_k, knn_lambda=args.knn_lambda,
        shed=bool(shed), shed_seeds=", ".join(f"seed {seed}" for seed in shed),
        shed_record=_runs.SHED_RECORD, technique_summary=document["technique_summary"],
        learner_list=" and ".join(learner_names(used)),
        tokens_scored=number(int(scored) - 1, 0) if scored else "?",
        val_tokens=number(int(scored), 0) if scored else "?",
        compliance_table=compliance_table(document, results),
        data_step=challenge_data_path(s("DATA_PATH") or "") is not None,
        vocab_size=args.vocab_size, code_sha=code_sha, command=command,
        reproduction_notes="\n".join(f"- {note}" for note in notes),
        size_table=sizes, components=components, components_seed=components_seed,
        time_table=table(["seed", "training s (everything that read training data)",
                          "evaluation s"],
                         [[r.seed, number(r.train_time_s, 1), number(r.eval_time_s, 1)]
                          for r in results]),
        time_limit=f"{_submission.TIME_LIMIT_S:.0f}", lineage=lineage(first),
        files="\n".join([
            "- `train_gpt.py`: the whole pipeline, exactly the file the logs ran (sha256 above)",
            *[f"- `{_submission.seed_log_name(r.seed)}`: the log of seed {r.seed}"
              for r in results],
            "- `submission.json`: the fields above, computed from the logs",
            "- `requirements.txt`: what train_gpt.py needs",
            *[f"- `{path.name}`: {captions[key]}" for key, path in plot_files.items()]]))


def render_readme(document: dict, results: Sequence[SeedResult], stats: dict,
                  plot_files: dict[str, Path], code_sha: str) -> str:
    values = readme_values(document, results, stats, plot_files, code_sha)
    return render_template(TEMPLATE.read_text(encoding="utf-8"), values)


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
    demonstration = demonstration_of(sources, args)
    profile = sources[0].header("profile") or "competition"
    description = description_of(args.description or (
        DEFAULT_DESCRIPTION if profile == "competition" else f"{DEFAULT_DESCRIPTION}_{profile}"))
    stats = _submission.statistics(sources, args.reference_bpb, args.margin_nats, args.alpha)
    meta = _submission.metadata(args, sources, stats, demonstration)
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
    meta = _submission.metadata(args, results, stats, demonstration)
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
                        help="the folder's name after the date (default: "
                             f"{DEFAULT_DESCRIPTION}[_profile])")
    parser.add_argument("--code", type=Path, default=_runs.TRAIN_SCRIPT,
                        help="the train_gpt.py to ship; its sha256 must be the logged one "
                             "(default: this repository's)")
    parser.add_argument("--run-dir", type=Path, default=Path("."),
                        help="the folder the runs started in, to find their artifacts for the "
                             "check (default: the current folder)")
    parser.add_argument("--demonstration", action="store_true",
                        help="the folder is a demonstration, not an entry, and says so (needed "
                             "for runs on the demo corpus)")
    _submission.add_test_arguments(parser)
    _submission.add_metadata_arguments(parser, required=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        folder = assemble(args)
    except (ValueError, RuntimeError) as error:  # RecordError, a bad --date, no matplotlib
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {folder}")
    report = check_record.check_folder(folder, args.run_dir, args.reference_bpb)
    print(report.text(str(folder)))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
