"""Benchmark the Elastic Associative Memory's build: k-means placement and next-token writes.

Why: train_gpt.py builds its memory with batched tensor code, ElasticMemory.place (a few passes
of spherical k-means over a sample of keys) and ElasticMemory.accumulate (every key's top-k
softmax weights added to its next token's counts with one index_add_), worth its complexity only
if much faster than writing one key at a time and exact. This times the placement, times the
accumulate against a plain per-item loop of the same write, and checks in float64 that the
batched accumulate gives the per-item counts (index_add_ loses no colliding update).

Speed target checked: the write itself (accumulate, addresses frozen) at >= 100,000 writes/s on
2 CPU cores with K=128 key dims, 4,096 locations, top-20 writes and a 1,024-token vocabulary.

Seeded synthetic data: unit keys around a few hundred cluster centres (structure to find), each
cluster with its own skewed next-token distribution (so a read can predict the token). Quality:
train_gpt's own memory diagnostics on held-out keys, the memory's next-token loss beside that of
one location holding every write (the unigram).

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
TOKEN_SHARPNESS = 3.0  # scale of a cluster's next-token logits: higher, more predictable tokens
HELD_OUT = 8192


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--key-dim", type=int, default=128)
    add("--vocab", type=int, default=1024)
    add("--locations", type=int, default=4096)
    add("--write-k", type=int, default=20)
    add("--clusters", type=int, default=256, help="cluster centres of the key distribution")
    add("--organize", type=int, default=32768,
        help="keys in the sample k-means places the addresses on (EAM_ORGANIZE_TOKENS)")
    add("--writes", type=int, default=262144, help="keys written by the vectorized accumulate")
    add("--batch", type=int, default=8192)
    add("--reference-writes", type=int, default=4096, help="keys for the per-item accumulate")
    add("--repeats", type=int, default=3, help="timings of each phase (median reported)")
    add("--seed", type=int, default=1337)
    add("--json", action="store_true", help="print JSON instead of the markdown table")
    return parser.parse_args(argv)


class Synthetic:
    """Seeded source of (unit keys [n, K], next tokens [n]) from one fixed distribution."""

    def __init__(self, cfg: argparse.Namespace):
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.centres = F.normalize(torch.randn(cfg.clusters, cfg.key_dim,
                                               generator=self.generator), dim=1)
        self.token_probs = torch.softmax(TOKEN_SHARPNESS * torch.randn(
            cfg.clusters, cfg.vocab, generator=self.generator), dim=1)

    def draw(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        which = torch.randint(self.centres.size(0), (n,), generator=self.generator)
        noise = torch.randn(n, self.centres.size(1), generator=self.generator)
        keys = F.normalize(self.centres[which] + KEY_NOISE * noise / noise.size(1) ** 0.5, dim=1)
        tokens = torch.multinomial(self.token_probs[which], 1, generator=self.generator)
        return keys, tokens.squeeze(1)


def settings(cfg: argparse.Namespace) -> train_gpt.Hyperparameters:
    return train_gpt.Hyperparameters(profile="bench", vocab_size=cfg.vocab,
                                     eam_locations=cfg.locations, eam_key_dim=cfg.key_dim,
                                     eam_write_k=cfg.write_k, eam_batch=cfg.batch,
                                     seed=cfg.seed)


def new_memory(cfg: argparse.Namespace, addresses_from=None) -> train_gpt.ElasticMemory:
    """An empty memory, or one with the (frozen) addresses of another and zero counts."""
    memory = train_gpt.ElasticMemory(train_gpt.memory_write_config(settings(cfg)), cfg.vocab,
                                     torch.device("cpu"))
    if addresses_from is not None:
        memory.addresses.copy_(addresses_from.addresses)
        memory.size = addresses_from.size
    return memory


# -- vectorized: train_gpt's own code, driven as write_memory drives it ---------------------------
def vector_accumulate(memory, keys, tokens, batch: int) -> None:
    for begin in range(0, keys.size(0), batch):
        memory.accumulate(keys[begin: begin + batch], tokens[begin: begin + batch])


# -- per-item reference: the same write, one key at a time --------------------------------------
def item_accumulate(memory, keys, tokens) -> None:
    """Each key adds softmax(EAM_READ_BETA x its top-k similarities) to its next token's count
    at those k locations."""
    config = memory.config
    for key, token in zip(keys, tokens.tolist(), strict=True):
        top_sims, top = (memory.addresses[: memory.size] @ key).topk(
            min(config.write_k, memory.size))
        weights = torch.softmax(config.read_beta * top_sims, dim=0)
        # The k locations of one key are distinct, so plain indexed += loses nothing.
        memory.counters[top, token] += weights
        memory.counts[top] += weights


# -- measurement ------------------------------------------------------------------------------
def timed(function, *args) -> float:
    started = time.perf_counter()  # the caller's data is ready: only the work itself is timed
    function(*args)
    return time.perf_counter() - started


def memory_diagnostics(read, memory, keys, tokens) -> dict[str, float]:
    """On keys and next tokens never written: the memory's own loss (nats per token) beside that
    of a single location holding all the writes, packed alike (the unigram), and the share of
    the written mass the packed top tokens keep."""
    tables = memory.tables()
    written = memory.counters[: memory.size]
    single = train_gpt.next_token_tables(tables.addresses[:1], written.sum(0, keepdim=True),
                                         tables.patterns.size(1))
    nll = {}
    for name, read_tables in (("memory", tables), ("unigram", single)):
        rows = train_gpt.next_token_rows(read_tables, written.size(1))
        p_mem = train_gpt.read_next_tokens(keys, read_tables, read, rows)[0]
        nll[name] = -p_mem.gather(1, tokens[:, None]).log().mean().item()
    kept = written.topk(tables.patterns.size(1), dim=1).values.sum() / written.sum()
    return dict(memory_nll=nll["memory"], unigram_nll=nll["unigram"],
                top_tokens_mass=kept.item())


def quality(cfg, memory, keys, tokens) -> dict:
    """The memory's diagnostics on held-out keys, and how the locations are used."""
    used = memory.counts[: memory.size]
    diagnostics = memory_diagnostics(train_gpt.memory_read_config(settings(cfg)),
                                     memory, keys, tokens)
    return dict(diagnostics, locations=memory.size, share_written=(used > 0).float().mean().item(),
                median_count=used.median().item(), max_count=used.max().item())


def accumulate_check(cfg, memory, keys, tokens) -> dict:
    """Per-item and batched accumulate of the same keys on the same frozen addresses.

    Run in float64: float32 GEMM (batch) and GEMV (one key) round differently, and near-ties at
    the k-th similarity (gaps of 1e-7 occur) could then pick different locations.
    """
    item, vector = new_memory(cfg, memory), new_memory(cfg, memory)
    for copy in (item, vector):
        for name in ("addresses", "counters", "counts"):
            setattr(copy, name, getattr(copy, name).double())
    item_accumulate(item, keys.double(), tokens)
    vector_accumulate(vector, keys.double(), tokens, cfg.batch)
    diff = max((item.counters - vector.counters).abs().max().item(),
               (item.counts - vector.counts).abs().max().item())
    scale = max(vector.counters.abs().max().item(), vector.counts.max().item(), 1.0)
    return dict(keys=keys.size(0), max_abs_diff=diff, scale=scale, ok=diff <= 1e-9 * scale)


def row(implementation, phase, writes, seconds, baseline_rate) -> dict:
    """One timing; speedup against the per-item loop's rate (None: no loop to compare with)."""
    rate = writes / seconds
    return dict(implementation=implementation, phase=phase, writes=writes, seconds=seconds,
                writes_per_s=rate, speedup=rate / baseline_rate if baseline_rate else None)


def run(cfg: argparse.Namespace) -> dict:
    data = Synthetic(cfg)
    sample, _ = data.draw(cfg.organize)
    keys, tokens = data.draw(cfg.writes)
    test_keys, test_tokens = data.draw(HELD_OUT)
    ref = min(cfg.reference_writes, cfg.writes)

    place_s, acc_vector_s, acc_item_s = [], [], []
    for _ in range(cfg.repeats):  # placement is seeded: each repeat places the same addresses
        placed = new_memory(cfg)
        place_s.append(timed(placed.place, sample))
    for _ in range(cfg.repeats):  # every repeat builds the same counts from zero
        vector = new_memory(cfg, addresses_from=placed)
        acc_vector_s.append(timed(vector_accumulate, vector, keys, tokens, cfg.batch))
        # Per-item writes of the first keys on the same frozen addresses, also float32.
        item = new_memory(cfg, addresses_from=vector)
        acc_item_s.append(timed(item_accumulate, item, keys[:ref], tokens[:ref]))
    place, acc_vector = statistics.median(place_s), statistics.median(acc_vector_s)
    acc_item = statistics.median(acc_item_s)
    check = accumulate_check(cfg, vector, keys[:ref], tokens[:ref])
    rows = [row("vectorized", "place (k-means)", cfg.organize, place, None),
            row("vectorized", "accumulate", cfg.writes, acc_vector, ref / acc_item),
            row("per-item", "accumulate", ref, acc_item, ref / acc_item)]
    rate = rows[1]["writes_per_s"]
    return dict(config=vars(cfg), torch_threads=torch.get_num_threads(), rows=rows,
                memory=quality(cfg, vector, test_keys, test_tokens), check=check,
                target=dict(writes_per_s=TARGET_WRITES_PER_S, measured=rate,
                            met=rate >= TARGET_WRITES_PER_S))


def markdown(result: dict) -> str:
    lines = ["| implementation | phase | keys | seconds | keys/s | speed-up |",
             "|---|---|---:|---:|---:|---:|"]
    for r in result["rows"]:
        speedup = "" if r["speedup"] is None else f"{r['speedup']:.1f}x"
        lines.append(f"| {r['implementation']} | {r['phase']} | {r['writes']:,} | "
                     f"{r['seconds']:.3f} | {r['writes_per_s']:,.0f} | {speedup} |")
    lines.append("")
    m, c, t = result["memory"], result["check"], result["target"]
    lines.append(f"memory: {m['locations']:,} locations, {m['share_written']:.1%} written, "
                 f"median count {m['median_count']:.1f}, max {m['max_count']:.1f}; held-out "
                 f"next-token loss {m['memory_nll']:.4f} nats (one location: "
                 f"{m['unigram_nll']:.4f}); the top tokens keep {m['top_tokens_mass']:.1%} of "
                 "the written mass")
    lines.append(f"accumulate check, per-item vs vectorized counts on {c['keys']:,} keys: "
                 f"max |diff| {c['max_abs_diff']:.2e} -> {'ok' if c['ok'] else 'MISMATCH'}")
    lines.append(f"target: write itself {t['measured']:,.0f} writes/s vs >= "
                 f"{t['writes_per_s']:,} -> {'met' if t['met'] else 'BELOW TARGET'} "
                 f"({result['torch_threads']} torch threads)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    result = run(parse_args(argv))
    print(json.dumps(result, indent=2) if result["config"]["json"] else markdown(result))
    return 0 if result["check"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
