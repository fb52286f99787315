"""Fixtures shared by the tests: demo data and the tiny pipeline runs, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import PIPELINE_RUN_ID, REPO, TINY_RUN, run_script
from tools import _runs, make_demo_data


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """Challenge-format shards and a tokenizer made from the stdlib's docstrings (no downloads)."""
    out = tmp_path_factory.mktemp("demo") / "demo_sp1024"
    make_demo_data.build_demo_data(out, max_train_tokens=400_000, challenge_tokenizer=None)
    return out


@pytest.fixture(scope="session")
def pipeline_runs(demo_data, tmp_path_factory) -> tuple[Path, dict[str, dict]]:
    """Tiny runs shared by the pipeline and tools tests: one process twice, torchrun x2 bounded
    by time, an evaluation-only torchrun x2 of the first artifact, the transformer baseline, and
    torchrun x2 bounded by steps. Returns (working folder, parsed logs)."""
    workdir = tmp_path_factory.mktemp("runs")
    base = {**TINY_RUN, "DATA_PATH": str(demo_data),
            "TOKENIZER_PATH": str(demo_data / "tokenizer.model")}
    logs = {}
    for name, nproc, extra in [
        (PIPELINE_RUN_ID, 1, {}),
        ("again", 1, {}),
        # Bounded by time alone: the one deadline must hold with setup and packing counted.
        ("ddp", 2, {"MAX_WALLCLOCK_SECONDS": "8", "ITERATIONS": "0", "DISTILL_ITERATIONS": "0"}),
        ("eval_ddp", 2, {"EVAL_ONLY": "1", "ARTIFACT_PATH": f"{PIPELINE_RUN_ID}.eam"}),
        ("baseline", 1, {"MODEL": "transformer"}),
        # A size limit that binds (the memory's pairs take more than the room beside the
        # model), so both ranks fit them before distillation, alike.
        ("memory_ddp", 2, {"SIZE_LIMIT": str((REPO / "train_gpt.py").stat().st_size
                                             + 395_000)}),
    ]:
        env = {**base, "RUN_ID": name, "ARTIFACT_PATH": f"{name}.eam", **extra}
        run_script(env, workdir, nproc=nproc)
        logs[name] = _runs.parse_log((workdir / "logs" / f"{name}.txt").read_text())
    return workdir, logs
