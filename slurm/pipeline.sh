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

# Every stage the plan lists, in order (prepare, pretrain, pretrain-backward, finetune, collect:
# each declares its script and resources once, in its slurm_shape).
submit_stage() {  # submit_stage I: stage I of the plan, or say why it is skipped
  local -n name=STAGE_$1_NAME run=STAGE_$1_RUN config=STAGE_$1_CONFIG script=STAGE_$1_SCRIPT \
    setup=STAGE_$1_SETUP log=STAGE_$1_LOG array=STAGE_$1_ARRAY options=STAGE_$1_SBATCH \
    tasks=STAGE_$1_TASKS
  if [ "$run" != 1 ]; then
    echo "$name: complete, skipped"
    return
  fi
  local extra=()
  if [ -n "$array" ]; then
    extra=(--array="$array")
    record_extra=(--tasks "${tasks[@]}")  # array task i runs the stage's job i
  fi
  submit "$name" "$setup" "$log" "${options[@]}" "${extra[@]}" "$SLURM_DIR/$script" "$config"
}

for i in "${!STAGES[@]}"; do
  submit_stage "$i"
done
echo "follow it: $RNNPIPE status $RUN_DIR"
