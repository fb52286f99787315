"""Issue 38: the memory's cost per evaluation chunk at table sizes of 10M-50M pairs, on CPU.

Fills a ContextCounts with `pairs` random (context, token) pairs of the competition's
vocabulary in the runs the evaluation's writes make (chunks of 65,536 tokens x 8 lengths), then
times one more chunk's write and the read of 4,096 positions (one CPU batch; the GPU's is 8 x 32
windows x 64 scored targets = 16,384 per rank).

    PYTHONPATH=<checkout> python memory_cost.py 10000000 50000000
"""

import sys
import time

import torch

import train_gpt

VOCAB, LENGTHS, CHUNK = 1024, (0, 2, 3, 4, 6, 8, 12, 16), 65536


def chunk_pairs(generator, text_tokens=CHUNK):
    text = torch.randint(0, VOCAB, (text_tokens + 16,), generator=generator)
    recent = train_gpt.recent_tokens(text[None, :-1], 16)[0, 15:]
    return train_gpt.count_context_pairs(recent, text[16:], VOCAB, LENGTHS)


def main(sizes):
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    for size in sizes:
        memory = train_gpt.ContextCounts(train_gpt.no_contexts(), VOCAB)
        chunks, filling = 0, 0.0
        while memory.pairs < size:
            pairs = chunk_pairs(generator)
            started = time.perf_counter()
            memory.add(*pairs)
            filling += time.perf_counter() - started
            chunks += 1
        pairs = chunk_pairs(generator)
        started = time.perf_counter()
        memory.add(*pairs)
        write_s = time.perf_counter() - started
        text = torch.randint(0, VOCAB, (4096 + 16,), generator=generator)
        recent = train_gpt.recent_tokens(text[None, :-1], 16)[0, 15:]
        started = time.perf_counter()
        train_gpt.read_contexts(recent, memory, LENGTHS)
        read_s = time.perf_counter() - started
        print(f"pairs:{memory.pairs} runs:{len(memory.runs)} bytes:{16 * memory.pairs} "
              f"write_chunk_s:{write_s:.3f} mean_write_chunk_s:{filling / chunks:.3f} "
              f"read_4096_s:{read_s:.3f}", flush=True)


if __name__ == "__main__":
    main([int(size) for size in sys.argv[1:]])
