"""tools/bench_eam.py at tiny sizes: per-item and batched accumulate agree, the JSON is complete."""

from __future__ import annotations

import json

import torch

import train_gpt
from tools import bench_eam

TINY = ["--key-dim", "16", "--value-dim", "8", "--locations", "64", "--write-k", "4",
        "--clusters", "16", "--organize", "1024", "--writes", "2048", "--batch", "256",
        "--reference-writes", "256", "--repeats", "1", "--seed", "3"]


def test_bench_eam_tiny(capsys, monkeypatch):
    assert bench_eam.main([*TINY, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["check"]["ok"] and result["check"]["keys"] == 256
    assert result["check"]["max_abs_diff"] <= 1e-9 * result["check"]["scale"]
    assert [(r["implementation"], r["phase"]) for r in result["rows"]] == [
        ("vectorized", "organize"), ("vectorized", "accumulate"),
        ("per-item", "organize"), ("per-item", "accumulate")]
    for r in result["rows"]:
        assert {"writes", "seconds", "writes_per_s", "speedup", "recon_cos",
                "locations"} <= r.keys() and r["writes_per_s"] > 0
    for stats in result["memories"].values():
        assert 0 < stats["locations"] <= 64 and 0 < stats["share_written"] <= 1
        assert 0 < stats["recon_cos"] <= 1 and stats["max_count"] >= stats["median_count"]
    assert {"writes_per_s", "measured", "met"} <= result["target"].keys()
    assert "| implementation | phase |" in bench_eam.markdown(result)

    # The check has teeth: plain indexed += drops the updates of colliding rows in a batch.
    def lossy(memory, top_index, weights, values):
        index = top_index.flatten()
        memory.counts[index] += weights.flatten()
        memory.counters[index] += (weights[:, :, None] * values[:, None]).flatten(0, 1)

    monkeypatch.setattr(train_gpt.ElasticMemory, "_accumulate", lossy)
    cfg = bench_eam.parse_args(TINY)
    keys, values = bench_eam.Synthetic(cfg).draw(512)
    assert torch.allclose(keys.norm(dim=1), torch.ones(512)) and values.shape == (512, 8)
    memory = bench_eam.new_memory(cfg)
    bench_eam.vector_organize(memory, keys, values, cfg.batch)
    assert not bench_eam.accumulate_check(cfg, memory, keys, values)["ok"]
