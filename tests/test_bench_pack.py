"""tools/bench_pack.py on the demo data: it counts, fits under a binding limit and reports."""

from __future__ import annotations

import json

from tests.helpers import REPO
from tools import bench_pack


def test_bench_pack_fits_the_counted_memory_under_the_limit(capsys, monkeypatch, demo_data):
    limit = (REPO / "train_gpt.py").stat().st_size + 400_000
    for name, value in {"PROFILE": "cpu_smoke", "DATA_PATH": str(demo_data),
                        "TOKENIZER_PATH": str(demo_data / "tokenizer.model"),
                        "EAM_CONTEXT_TOKENS": "65536", "SIZE_LIMIT": str(limit)}.items():
        monkeypatch.setenv(name, value)
    assert bench_pack.main(["--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens_counted"] >= 65536 and result["limit"] == limit
    assert 0 < result["pairs_kept"] < result["pairs_counted"]  # the limit binds
    assert result["code_bytes"] + result["artifact_bytes"] <= limit
    assert result["fit_s"] > 0 and result["pack_s"] > 0
    assert bench_pack.markdown(result).count("\n") == 2
