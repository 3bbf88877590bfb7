"""``rnnpipe status RUN_DIR``: each stage of a pipeline run, its job(s), state and, for a stage that
failed, which task failed and the tail of its log.

On Slurm the states come from sacct (squeue without accounting); for a local run, from the
record the run kept as it went.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from rnnpipe.launch.processes.record import read_state, recently_submitted
from rnnpipe.launch.processes.slurm import JobState, job_states, log_tail, of_job

TAIL_LINES = 20


def _expand_log(pattern: str, job_id: str) -> str:
    """A log path with sbatch's %j, %A and %a filled in for ``job_id`` (123 or 123_4)."""
    array, _, task = job_id.partition("_")
    return pattern.replace("%A", array).replace("%a", task).replace("%j", job_id)


def _log_of(entry: dict[str, Any], job_id: str) -> str:
    logs = entry.get("logs") or []
    if not logs:
        return ""
    if len(logs) == 1:
        return _expand_log(logs[0], job_id)
    task = job_id.partition("_")[2]
    return _expand_log(logs[int(task)], job_id) if task.isdigit() and int(task) < len(logs) else ""


def _task_name(entry: dict[str, Any], job_id: str) -> str:
    names = entry.get("tasks") or []
    task = job_id.partition("_")[2]
    return names[int(task)] if task.isdigit() and int(task) < len(names) else ""


def _summary(jobs: list[JobState]) -> str:
    if len(jobs) == 1 and "_" not in jobs[0].job_id:
        j = jobs[0]
        extra = j.reason if j.state == "PENDING" else j.nodes
        return f"{j.state:<10} {j.elapsed:>10}  {extra}"
    counts: dict[str, int] = {}
    for j in jobs:
        n = 1
        if "[" in j.job_id:  # 123_[4-7]: array tasks not started yet
            inner = j.job_id.split("[", 1)[1].rstrip("]").split("%")[0]
            n = sum(
                int(b) - int(a) + 1 if "-" in r else 1
                for r in inner.split(",")
                for a, _, b in [r.partition("-")]
            )
        counts[j.state] = counts.get(j.state, 0) + n
    return ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + " (array tasks)"


def show(run_dir: str, out: TextIO = sys.stdout) -> int:
    """Print the run's stages; returns 1 when a stage failed or was cancelled, else 0."""
    state = read_state(run_dir)
    entries = list(state.get("stages", {}).values())  # recorded in stage order
    executor = state.get("executor", "?")
    print(f"{run_dir} ({executor})", file=out)
    code = state.get("code")
    if code:
        print(f"  code: snapshot {code['digest'][:12]} in {code['path']}", file=out)
    bad = False
    if executor != "slurm":
        for e in entries:
            detail = e.get("detail") or (f"{e['seconds']:.0f} s" if "seconds" in e else "")
            print(f"  {e['stage']:<9} {e['state']:<10} {detail}", file=out)
        for e in entries:
            if e["state"] == "FAILED":
                bad = True
                print(f"\n{e['stage']} FAILED:\n  " + e.get("error", "").replace("\n", "\n  "), file=out)
            bad = bad or e["state"] == "CANCELLED"
        return 1 if bad else 0

    states = job_states([e["job_id"] for e in entries if e.get("job_id")])
    failures: list[tuple[dict[str, Any], JobState]] = []
    for e in entries:
        if not e.get("job_id"):
            print(f"  {e['stage']:<9} {'-':>8}  {e.get('state', '?'):<10} {e.get('detail', '')}", file=out)
            continue
        mine = of_job(states, e["job_id"])
        if not mine:
            known = "SUBMITTED" if recently_submitted(e) else "UNKNOWN (not in sacct)"
            print(
                f"  {e['stage']:<9} {e['job_id']:>8}  {known}",
                file=out,
            )
            continue
        print(f"  {e['stage']:<9} {e['job_id']:>8}  {_summary(mine)}", file=out)
        cancelled = False
        for j in mine:
            if j.ended and not j.ok:
                never_ran = j.elapsed in ("", "00:00:00") and j.nodes in ("", "None assigned")
                # Not a failure of its own: cancelled while waiting on a stage that failed (sacct's
                # reason says Dependency, or None when the cancel came before the scheduler looked).
                if j.state == "CANCELLED" and never_ran and (bad or "Dependency" in j.reason):
                    cancelled = True
                else:
                    failures.append((e, j))
                bad = True
        if cancelled:
            print(f"  {'':<9} {'':>8}  cancelled: a stage it depends on failed", file=out)
    for e, j in failures:
        name = _task_name(e, j.job_id)
        what = f"task {j.job_id}" + (f" ({name})" if name else "") if "_" in j.job_id else f"job {j.job_id}"
        log = _log_of(e, j.job_id)
        print(f"\n{e['stage']} FAILED: {what}, {j.state}, exit code {j.exit_code}", file=out)
        tail = log_tail(log, TAIL_LINES) if log else []
        if tail:
            print(f"  log tail ({log}):", file=out)
            for line in tail:
                print(f"    {line}", file=out)
        elif log:
            print(f"  no log at {log}", file=out)
    return 1 if bad else 0
