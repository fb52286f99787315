#!/bin/bash
# One cpu_converged run: NAME SEED [SETTING=VALUE ...], in this folder, with commit 275f811
# checked out at ./checkout and the teacher of tools.pretrain_teacher at checkpoints/ (the
# web text and its tokenizer at ../shared/data). Each run was pinned to its own core.
name=$1; seed=$2; shift 2
export DATA_PATH=../shared/data/webmix_sp1024 TOKENIZER_PATH=../shared/data/tokenizers/fineweb_1024_bpe.model INIT_CHECKPOINT=checkpoints/cpu_converged_teacher.pt
env PROFILE=cpu_converged SEED=$seed TEACHER_REFERENCE=0 EAM_LEARNED_LENGTHS=4,6,8,12,16 "$@" RUN_ID=${name}_s$seed python checkout/train_gpt.py > ${name}_s$seed.out 2>&1
