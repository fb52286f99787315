#!/bin/bash
# cpu_converged's regime figure: the baseline with the remaining budget, and with twice it
# (commit 40bf798 checked out at ./checkout; paths as in job.sh).
export DATA_PATH=../shared/data/webmix_sp1024 TOKENIZER_PATH=../shared/data/tokenizers/fineweb_1024_bpe.model INIT_CHECKPOINT=checkpoints/cpu_converged_teacher.pt
for t in 300 600; do
  PROFILE=cpu_converged MODEL=transformer MAX_WALLCLOCK_SECONDS=$t RUN_ID=regime_b$t python checkout/train_gpt.py > regime_b$t.out 2>&1
done
