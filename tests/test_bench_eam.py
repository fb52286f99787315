"""tools/bench_eam.py at tiny sizes: per-item and batched accumulate agree, the JSON is complete."""

from __future__ import annotations

import json

import torch

import train_gpt
from tools import bench_eam

TINY = ["--key-dim", "16", "--vocab", "32", "--locations", "64", "--write-k", "4",
        "--clusters", "16", "--organize", "1024", "--writes", "2048", "--batch", "256",
        "--reference-writes", "256", "--repeats", "1", "--seed", "3"]


def test_bench_eam_tiny(capsys, monkeypatch):
    assert bench_eam.main([*TINY, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["check"]["ok"] and result["check"]["keys"] == 256
    assert result["check"]["max_abs_diff"] <= 1e-9 * result["check"]["scale"]
    assert [(r["implementation"], r["phase"]) for r in result["rows"]] == [
        ("vectorized", "place (k-means)"), ("vectorized", "accumulate"),
        ("per-item", "accumulate")]
    for r in result["rows"]:
        assert {"writes", "seconds", "writes_per_s", "speedup"} <= r.keys()
        assert r["writes_per_s"] > 0
    memory = result["memory"]
    assert memory["locations"] == 64 and memory["share_written"] == 1.0
    assert memory["max_count"] >= memory["median_count"] > 0
    # The keys carry their clusters' next tokens: the memory predicts them better than one
    # location holding every write.
    assert memory["memory_nll"] < memory["unigram_nll"] - 0.1
    assert 0 < memory["top_tokens_mass"] <= 1
    assert {"writes_per_s", "measured", "met"} <= result["target"].keys()
    assert "| implementation | phase |" in bench_eam.markdown(result)

    # The check has teeth: plain indexed += drops the updates of colliding cells in a batch.
    def lossy(memory, keys, tokens):
        top_sims, top = (keys @ memory.addresses[: memory.size].T).topk(
            min(memory.config.write_k, memory.size), dim=1)
        weights = torch.softmax(memory.config.read_beta * top_sims, dim=1)
        memory.counters[top, tokens[:, None].expand_as(top)] += weights
        memory.counts[top] += weights

    cfg = bench_eam.parse_args(TINY)
    keys, tokens = bench_eam.Synthetic(cfg).draw(512)
    assert torch.allclose(keys.norm(dim=1), torch.ones(512)) and tokens.shape == (512,)
    memory = bench_eam.new_memory(cfg)
    memory.place(keys)
    assert bench_eam.accumulate_check(cfg, memory, keys, tokens)["ok"]
    monkeypatch.setattr(train_gpt.ElasticMemory, "accumulate", lossy)
    assert not bench_eam.accumulate_check(cfg, memory, keys, tokens)["ok"]
