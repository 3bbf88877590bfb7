# Sourced by the sbatch scripts: the rnnpipe command, the stage's setup lines, node-local caches.
# RNNPIPE: the command to run (default: rnnpipe on PATH; sbatch exports the submitting shell's
# environment, so activate the virtualenv before submitting). RNNPIPE_SETUP: shell lines from the
# stage's executor.slurm.setup (module load ...), set by slurm/pipeline.sh.
RNNPIPE=${RNNPIPE:-rnnpipe}
eval "${RNNPIPE_SETUP:-}"
# Triton and torch extensions compile into the home directory by default: a shared file system on
# which every node of a job would write the same files at once. Keep them on the node.
_rnnpipe_cache="${TMPDIR:-/tmp}/rnnpipe-$(id -un)"
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$_rnnpipe_cache/triton}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$_rnnpipe_cache/torch_extensions}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
