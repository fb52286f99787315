#!/bin/bash
# cpu_proxy on web text at equal steps (483 teacher + 282 distillation steps, identical teachers
# per seed): the context counts of 1,048,576 training tokens shipped (the profile's default)
# against none shipped (EAM_CONTEXT_TOKENS=0). Run from the repository root at c29c91b.
export DATA_PATH=../shared/data/webmix_sp1024
export TOKENIZER_PATH=../shared/data/tokenizers/fineweb_1024_bpe.model
for seed in 1337 42; do
  for v in shipped none; do
    extra=""; [ $v = none ] && extra="EAM_CONTEXT_TOKENS=0"
    env $extra RUN_ID=pc_${v}_s$seed ARTIFACT_PATH=pc_${v}_s$seed.eam PROFILE=cpu_proxy \
      SEED=$seed MAX_WALLCLOCK_SECONDS=2400 ITERATIONS=483 DISTILL_ITERATIONS=282 \
      OMP_NUM_THREADS=1 taskset -c 1 python train_gpt.py > pc_${v}_s$seed.log 2>&1
  done
done
# The same shipped runs again at 318dc93, whose train_gpt.py is 19,112 bytes smaller: the fit
# spends them on pairs (logs shipped_318dc93_s*.log).
# for seed in 1337 42; do RUN_ID=pa_s$seed ARTIFACT_PATH=pa_s$seed.eam PROFILE=cpu_proxy \
#   SEED=$seed MAX_WALLCLOCK_SECONDS=2400 ITERATIONS=483 DISTILL_ITERATIONS=282 \
#   OMP_NUM_THREADS=1 taskset -c 1 python train_gpt.py > shipped_318dc93_s$seed.log 2>&1; done
# Beside them, at 7e1c61f (the same scores as c29c91b, step-capped): the baseline 4x160 at the 562
# steps it took in 420 s (2026-11-25), and the memory removed, for seed in 1337 42:
#   MODEL=transformer NUM_LAYERS=4 MODEL_DIM=160 XSA_LAYERS=4 ITERATIONS=562
#   ITERATIONS=483 DISTILL_ITERATIONS=282 EAM_CONTEXT_TOKENS=0 EVAL_MEMORY_WRITES=0 EAM_LEARNED_LENGTHS=
# (each with PROFILE=cpu_proxy SEED=$seed MAX_WALLCLOCK_SECONDS=2400 and the exports above).
