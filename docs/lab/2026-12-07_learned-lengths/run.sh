#!/bin/bash
# Issue 38's table: the longest context learned while scoring, cpu_proxy on web text at equal
# steps (identical teachers), seed 1337, the whole validation split; commit ec4f523,
# checked out at ./ (the data path is relative to it).
export DATA_PATH=../shared/data/webmix_sp1024 TOKENIZER_PATH=../shared/data/tokenizers/fineweb_1024_bpe.model
common="PROFILE=cpu_proxy SEED=1337 MAX_WALLCLOCK_SECONDS=20000 ITERATIONS=483 DISTILL_ITERATIONS=282 VAL_TOKENS=0 TEACHER_REFERENCE=0"
for v in "l3:" "l16:4,6,8,12,16" "l6:4,5,6" "l10:4,6,8,10"; do
  name=${v%%:*}; lengths=${v#*:}
  env $common EAM_LEARNED_LENGTHS=$lengths RUN_ID=$name taskset -c 0 python ./train_gpt.py > $name.out 2>&1
  for mode in "nolearn:EVAL_MEMORY_WRITES=0 TTT_STEPS=0" "writes:TTT_STEPS=0"; do
    m=${mode%%:*}; envs=${mode#*:}
    env $common EAM_LEARNED_LENGTHS=$lengths EVAL_ONLY=1 ARTIFACT_PATH=$name.eam RUN_ID=${name}_$m $envs taskset -c 0 python ./train_gpt.py > ${name}_$m.out 2>&1
  done
done
