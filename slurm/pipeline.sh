#!/usr/bin/env bash
# The pipeline as plain sbatch jobs chained with --dependency=afterok, for those who prefer sbatch
# to submitit: the same stages, configs and resources as `rnnpipe run PIPELINE --executor slurm`
# (`rnnpipe plan` derives them from the same YAML; every value arrives shell-quoted).
#
#   slurm/pipeline.sh PIPELINE.yaml [key=value | stage.key=value ...]
#   rnnpipe status RUN_DIR [--wait]
#
# Stages already complete are skipped; a failed stage cancels those after it
# (--kill-on-invalid-dep). Logs: RUN_DIR/logs/. RNNPIPE: the rnnpipe command (default: on PATH).
# The jobs run the snapshot of the code that `rnnpipe plan` took ($CODE/bin/rnnpipe and
# $CODE/rnnpipe/slurm), not the working tree: edits made after this script returns do not reach
# jobs still in the queue. With rnnpipe installed from a wheel, the script is in the package:
#   bash "$(rnnpipe configs --slurm-dir)/pipeline.sh" quickstart
set -euo pipefail
SLURM_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export RNNPIPE=${RNNPIPE:-rnnpipe} RNNPIPE_SLURM_DIR=$SLURM_DIR

plan=$("$RNNPIPE" plan "$@")
eval "$plan"

after=""
record_extra=()
submit() {  # submit STAGE SETUP LOG [sbatch options...] SCRIPT [args...]: sets $after to the job id
  local stage=$1 setup=$2 log=$3
  shift 3
  local dep=()
  if [ -n "$after" ]; then dep=(--dependency="afterok:$after" --kill-on-invalid-dep=yes); fi
  local id
  id=$(RNNPIPE_SETUP=$setup RNNPIPE="$CODE/bin/rnnpipe" RNNPIPE_SLURM_DIR="$CODE/rnnpipe/slurm" \
    sbatch --parsable "${dep[@]}" "$@")
  id=${id%%;*}
  "$RNNPIPE" status "$RUN_DIR" --record "$stage" "$id" "$log" --after "${after:+afterok:$after}" \
    "${record_extra[@]}"
  echo "$stage: Slurm job $id${after:+ (afterok:$after)}"
  after=$id
  record_extra=()
}

if [ "$PREPARE_DONE" = 0 ]; then
  submit prepare "$PREPARE_SETUP" "$RUN_DIR/logs/prepare-%j.out" "${PREPARE_SBATCH[@]}" \
    "$SLURM_DIR/prepare.sbatch" "$PREPARE_CONFIG"
else
  echo "prepare: complete, skipped"
fi
if [ "$PRETRAIN_DONE" = 0 ]; then
  submit pretrain "$PRETRAIN_SETUP" "$RUN_DIR/logs/pretrain-%j.out" "${PRETRAIN_SBATCH[@]}" \
    "$SLURM_DIR/pretrain.sbatch" "$PRETRAIN_CONFIG"
else
  echo "pretrain: complete, skipped"
fi
if [ -n "$FINETUNE_CONFIG" ]; then
  if [ -n "$FINETUNE_INDICES" ]; then
    record_extra=(--tasks "${FINETUNE_TASKS[@]}")  # array task i runs grid job i
    submit finetune "$FINETUNE_SETUP" "$RUN_DIR/logs/finetune-%A_%a.out" \
      "${FINETUNE_SBATCH[@]}" --array="$FINETUNE_INDICES%$FINETUNE_PARALLELISM" \
      "$SLURM_DIR/finetune.sbatch" "$FINETUNE_CONFIG"
  else
    echo "finetune: every job complete, skipped"
  fi
  if [ "$COLLECT_DONE" = 0 ]; then
    submit collect "$COLLECT_SETUP" "$RUN_DIR/logs/collect-%j.out" "${COLLECT_SBATCH[@]}" \
      "$SLURM_DIR/collect.sbatch" "$FINETUNE_CONFIG"
  else
    echo "collect: complete, skipped"
  fi
fi
echo "follow it: $RNNPIPE status $RUN_DIR"
