#!/bin/bash
# The base fix at equal steps on identical teachers, cpu_proxy on web text, 65,536 validation
# tokens: before = commit 13b5f91 (the one associative location's top-128 tokens as the base),
# after = commit 77e79be (the uniform distribution and the empty context), checked out at
# ../before and ../after. EAM_WRITE_TOKENS caps the associative writes, whose stage would otherwise run to its share of 20,000 s.
export DATA_PATH=../shared/data/webmix_sp1024 TOKENIZER_PATH=../shared/data/tokenizers/fineweb_1024_bpe.model
for seed in 1337 42; do
  for side in before after; do
    PROFILE=cpu_proxy SEED=$seed MAX_WALLCLOCK_SECONDS=20000 ITERATIONS=483 DISTILL_ITERATIONS=282 \
      EAM_WRITE_TOKENS=65536 RUN_ID=${side}_s$seed taskset -c ${CORE:-1} python ../$side/train_gpt.py > ${side}_s$seed.out 2>&1
  done
done
