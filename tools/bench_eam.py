"""Benchmark the Elastic Associative Memory's writes: speed and quality, batched vs per item.

Why: train_gpt.py builds its memory with batched tensor code (ElasticMemory.organize and
accumulate), worth its complexity only if much faster than writing one key at a time and as good.
This measures both against a plain per-item loop of the same algorithm, in one run, and checks
that the batched accumulate gives the per-item counters (index_add_ loses no colliding update).

Speed target checked: the write itself (accumulate, addresses frozen) at >= 100,000 writes/s on
2 CPU cores with K=128 key dims, D=256 value dims, 4,096 locations and top-20 writes.

Seeded synthetic data: unit keys around a few hundred cluster centres (structure to find),
values a fixed random linear function of the key plus noise (so a read can reconstruct them).
Quality: cosine of read_memory(key) with the value, on held-out keys.

    python -m tools.bench_eam                  # the defaults above
    python -m tools.bench_eam --writes 65536 --reference-writes 1024 --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F

import train_gpt

TARGET_WRITES_PER_S = 100_000
KEY_NOISE = 1.25  # norm of the noise added to a cluster centre before normalizing the key
VALUE_NOISE = 0.3  # value noise, relative to the per-dim scale of the linear signal
READ_K, READ_BETA = 32, 20.0
MERGE_EVERY = 8  # organize batches between merges, as write_memory does
HELD_OUT = 8192


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--key-dim", type=int, default=128)
    add("--value-dim", type=int, default=256)
    add("--locations", type=int, default=4096)
    add("--write-k", type=int, default=20)
    add("--clusters", type=int, default=256, help="cluster centres of the key distribution")
    add("--organize", type=int, default=32768, help="keys in the organize sample")
    add("--writes", type=int, default=262144, help="keys written by the vectorized accumulate")
    add("--batch", type=int, default=8192)
    add("--reference-writes", type=int, default=4096, help="keys for the per-item accumulate")
    add("--repeats", type=int, default=3, help="timings of each phase (median reported); "
        "the per-item organize runs once")
    add("--seed", type=int, default=1337)
    add("--json", action="store_true", help="print JSON instead of the markdown table")
    return parser.parse_args(argv)


class Synthetic:
    """Seeded source of (unit keys [n, K], values [n, D]) from one fixed distribution."""

    def __init__(self, cfg: argparse.Namespace):
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.centres = F.normalize(torch.randn(cfg.clusters, cfg.key_dim,
                                               generator=self.generator), dim=1)
        self.mix = torch.randn(cfg.key_dim, cfg.value_dim, generator=self.generator)

    def draw(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        which = torch.randint(self.centres.size(0), (n,), generator=self.generator)
        noise = torch.randn(n, self.centres.size(1), generator=self.generator)
        keys = F.normalize(self.centres[which] + KEY_NOISE * noise / noise.size(1) ** 0.5, dim=1)
        # Unit keys: each signal dim has about unit variance, the scale VALUE_NOISE refers to.
        noise = torch.randn(n, self.mix.size(1), generator=self.generator)
        return keys, keys @ self.mix + VALUE_NOISE * noise


def new_memory(cfg: argparse.Namespace, addresses_from=None) -> train_gpt.ElasticMemory:
    """An empty memory, or one with the (frozen) addresses of another and zero counters."""
    # The hidden-state memory: its writes carry value vectors, which this bench measures.
    args = train_gpt.Hyperparameters(profile="bench", eam_values="hidden",
                                     eam_locations=cfg.locations,
                                     eam_key_dim=cfg.key_dim, eam_write_k=cfg.write_k,
                                     eam_batch=cfg.batch, seed=cfg.seed)
    memory = train_gpt.ElasticMemory(train_gpt.memory_write_config(args), cfg.value_dim,
                                     torch.device("cpu"))
    if addresses_from is not None:
        memory.addresses.copy_(addresses_from.addresses)
        memory.size = addresses_from.size
    return memory


# -- vectorized: train_gpt's own code, driven as write_memory drives it ---------------------------
def vector_organize(memory, keys, values, batch: int) -> None:
    for number, begin in enumerate(range(0, keys.size(0), batch)):
        memory.organize(keys[begin: begin + batch], values[begin: begin + batch])
        if number % MERGE_EVERY == MERGE_EVERY - 1:
            memory.merge_duplicates()
    memory.merge_duplicates()


def vector_accumulate(memory, keys, values, batch: int) -> None:
    for begin in range(0, keys.size(0), batch):
        memory.accumulate(keys[begin: begin + batch], values[begin: begin + batch])


# -- per-item reference: the same algorithm, one key at a time --------------------------------
def item_write(memory, sims: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Write one value to the key's top-k locations, weights max(sim, 0) / best sim."""
    top_sims, top = sims.topk(min(memory.config.write_k, sims.numel()))
    weights = top_sims.clamp_min(0) / top_sims[0].clamp_min(1e-6)
    weights[0] = 1.0
    # The k locations of one key are distinct, so plain indexed += loses nothing.
    memory.counters[top] += weights[:, None] * value
    memory.counts[top] += weights
    return top


def item_accumulate(memory, keys, values) -> None:
    for key, value in zip(keys, values, strict=True):
        item_write(memory, memory.addresses[: memory.size] @ key, value)


def item_organize(memory, keys, values, batch: int) -> None:
    """Novelty, write, conscience winner and address pulls for one key at a time.

    Splits (after every key) and merges (at write_memory's cadence) reuse ElasticMemory's own
    regulation, so the comparison isolates the batched vs sequential write and address learning.
    """
    a = memory.config
    for number, (key, value) in enumerate(zip(keys, values, strict=True), start=1):
        size = memory.size
        sims = memory.addresses[:size] @ key
        if size < a.locations and (size == 0 or sims.max() < a.novelty):
            memory.addresses[size], memory.counters[size], memory.counts[size] = key, value, 1.0
            memory.size += 1
            memory.events["novel"] += 1
        else:
            top = item_write(memory, sims, value)
            counts = memory.counts[:size]
            penalty = a.gamma * counts / counts.mean().clamp_min(1e-6)
            winner = int((sims - penalty).argmax())
            rate = memory.eta / (1 + memory.counts[winner].item() / a.tau)
            # The winner moves first, then the neighbours (distinct locations: one step).
            for location, pull in [(winner, rate), (top[1:], rate / 10)]:
                moved = memory.addresses[location] + pull * (key - memory.addresses[location])
                memory.addresses[location] = F.normalize(moved, dim=-1)
            memory.eta = max(a.eta_floor, memory.eta * a.eta_decay)
        memory.split_overloaded()
        if number % (batch * MERGE_EVERY) == 0:
            memory.merge_duplicates()
    memory.merge_duplicates()


# -- measurement ------------------------------------------------------------------------------
def timed(function, *args) -> float:
    started = time.perf_counter()  # the caller's data is ready: only the writes are timed
    function(*args)
    return time.perf_counter() - started


def quality(memory, keys, values) -> dict:
    """Reconstruction cosine on held-out keys and how the locations are used."""
    readout = train_gpt.read_memory(keys, memory.tables(), READ_K, READ_BETA, 0.0)
    used = memory.counts[: memory.size]
    return dict(recon_cos=F.cosine_similarity(readout, values, dim=1).mean().item(),
                locations=memory.size, share_written=(used > 0).float().mean().item(),
                median_count=used.median().item(), max_count=used.max().item())


def accumulate_check(cfg, memory, keys, values) -> dict:
    """Per-item and batched accumulate of the same keys on the same frozen addresses.

    Run in float64: float32 GEMM (batch) and GEMV (one key) round differently, and near-ties at
    the k-th similarity (gaps of 1e-7 occur) could then pick different locations.
    """
    item, vector = new_memory(cfg, memory), new_memory(cfg, memory)
    for copy in (item, vector):
        for name in ("addresses", "counters", "counts"):
            setattr(copy, name, getattr(copy, name).double())
    item_accumulate(item, keys.double(), values.double())
    vector_accumulate(vector, keys.double(), values.double(), cfg.batch)
    diff = max((item.counters - vector.counters).abs().max().item(),
               (item.counts - vector.counts).abs().max().item())
    scale = max(vector.counters.abs().max().item(), vector.counts.max().item(), 1.0)
    return dict(keys=keys.size(0), max_abs_diff=diff, scale=scale, ok=diff <= 1e-9 * scale)


def row(implementation, phase, writes, seconds, baseline_rate, recon_cos, locations) -> dict:
    rate = writes / seconds
    return dict(implementation=implementation, phase=phase, writes=writes, seconds=seconds,
                writes_per_s=rate, speedup=rate / baseline_rate if baseline_rate else 1.0,
                recon_cos=recon_cos, locations=locations)


def run(cfg: argparse.Namespace) -> dict:
    data = Synthetic(cfg)
    org_keys, org_values = data.draw(cfg.organize)
    keys, values = data.draw(cfg.writes)
    test_keys, test_values = data.draw(HELD_OUT)
    ref = min(cfg.reference_writes, cfg.writes)

    org_vector_s, acc_vector_s, acc_item_s = [], [], []
    for _ in range(cfg.repeats):  # organize is deterministic: each repeat builds the same memory
        vector = new_memory(cfg)
        org_vector_s.append(timed(vector_organize, vector, org_keys, org_values, cfg.batch))
    organized, org_vector = vector.size, statistics.median(org_vector_s)
    for _ in range(cfg.repeats):  # every repeat rebuilds the same counters from zero
        vector.reset_counters()
        acc_vector_s.append(timed(vector_accumulate, vector, keys, values, cfg.batch))
        # Per-item writes of the first keys on the same frozen addresses, also float32.
        item = new_memory(cfg, addresses_from=vector)
        acc_item_s.append(timed(item_accumulate, item, keys[:ref], values[:ref]))
    acc_vector, acc_item = statistics.median(acc_vector_s), statistics.median(acc_item_s)
    check = accumulate_check(cfg, vector, keys[:ref], values[:ref])

    # Per-item organize, then the same vectorized accumulate: isolates the organize algorithm.
    item_org = new_memory(cfg)
    org_item_s = timed(item_organize, item_org, org_keys, org_values, cfg.batch)
    vector_accumulate(item_org, keys, values, cfg.batch)

    stats = dict(vectorized=quality(vector, test_keys, test_values),
                 per_item_organized=quality(item_org, test_keys, test_values))
    rows = [row("vectorized", "organize", cfg.organize, org_vector, cfg.organize / org_item_s,
                None, organized),
            row("vectorized", "accumulate", cfg.writes, acc_vector, ref / acc_item,
                stats["vectorized"]["recon_cos"], vector.size),
            row("per-item", "organize", cfg.organize, org_item_s, None,
                stats["per_item_organized"]["recon_cos"], item_org.size),
            row("per-item", "accumulate", ref, acc_item, None, None, None)]
    rate = rows[1]["writes_per_s"]
    return dict(config=vars(cfg), torch_threads=torch.get_num_threads(), rows=rows,
                memories=stats, check=check,
                events=dict(vectorized=vector.events, per_item_organized=item_org.events),
                target=dict(writes_per_s=TARGET_WRITES_PER_S, measured=rate,
                            met=rate >= TARGET_WRITES_PER_S))


def markdown(result: dict) -> str:
    lines = ["| implementation | phase | writes | seconds | writes/s | speed-up | recon cos "
             "| locations |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        cos = "" if r["recon_cos"] is None else f"{r['recon_cos']:.4f}"
        locations = "" if r["locations"] is None else f"{r['locations']:,}"
        lines.append(f"| {r['implementation']} | {r['phase']} | {r['writes']:,} | "
                     f"{r['seconds']:.3f} | {r['writes_per_s']:,.0f} | {r['speedup']:.1f}x | "
                     f"{cos} | {locations} |")
    lines.append("")
    for name, s in result["memories"].items():
        lines.append(f"{name} memory: {s['locations']:,} locations, {s['share_written']:.1%} "
                     f"written, median count {s['median_count']:.1f}, max {s['max_count']:.1f}")
    c, t = result["check"], result["target"]
    lines.append(f"accumulate check, per-item vs vectorized counters on {c['keys']:,} keys: "
                 f"max |diff| {c['max_abs_diff']:.2e} -> {'ok' if c['ok'] else 'MISMATCH'}")
    lines.append(f"target: write itself {t['measured']:,.0f} writes/s vs >= "
                 f"{t['writes_per_s']:,} -> {'met' if t['met'] else 'BELOW TARGET'} "
                 f"({result['torch_threads']} torch threads)")
    lines.append("recon cos: read_memory(held-out key) vs its value; the per-item organize row "
                 "is read after the same vectorized accumulate")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    result = run(parse_args(argv))
    print(json.dumps(result, indent=2) if result["config"]["json"] else markdown(result))
    return 0 if result["check"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
