"""Section (a) of benchmarks/gpu_check.py: a rank that is not the node's first starts on a node that
gives each task one GPU, and the compute-node preflight's findings.

The rank runs in a subprocess (``python benchmarks/gpu_check_start.py --probe OUT.json``) whose
environment is a Slurm task's: ``SLURM_LOCALID=1`` and ``LOCAL_RANK=1`` (the node's second task of
two), ``CUDA_VISIBLE_DEVICES`` naming one GPU (``--gpus-per-task=1``), alone in its step (world 1)
so that its process group forms without peers. It calls ``rnnpipe.launch.processes.distributed.init`` with an
explicit ``timeout_min`` (one no default has) and reports the device it chose
(``cuda_device(local_rank, visible)``), the process group's backend and timeout (as
``init_process_group`` received it and as the group holds it), an all-reduce through the group, and
``rnnpipe.launch.processes.preflight``'s ``check_gpus``, ``check_triton_launcher`` and ``check_nccl`` on that
environment. The probe writes what it found even when a part fails.
"""

from __future__ import annotations

import json
import os
import random
import socket
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TIMEOUT_MIN = 7.5  # distributed.init's timeout_min here: neither DeepSpeed's 10 nor rnnpipe's 30
RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR")
RANK_VARS += ("MASTER_PORT", "TORCHELASTIC_RUN_ID", "RNNPIPE_LAUNCHER_PID")


def slurm_port_job() -> str:
    """A SLURM_JOB_ID whose rendezvous port (launch/processes/distributed.py: PORT_BASE + id % PORT_SPAN) is
    free on this machine now."""
    from rnnpipe.launch.processes.distributed import PORT_BASE, PORT_SPAN

    for _ in range(50):
        port = random.randrange(PORT_BASE, PORT_BASE + PORT_SPAN)
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
        return str(100 * PORT_SPAN + port - PORT_BASE)  # a job id of a realistic size
    raise RuntimeError("no free port in Slurm's rendezvous range")


def one_visible_gpu() -> str:
    """The GPU the task is given: the last of those this process sees (by CUDA_VISIBLE_DEVICES's
    own names where it is set), or "0" without CUDA (the variable is then ignored)."""
    import torch

    shown = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if shown:
        return shown[-1].strip()
    return str(max(torch.cuda.device_count() - 1, 0))


def rank_env(cuda: bool) -> dict[str, str | None]:
    """The probe's environment changes: every launcher's variables removed, a Slurm task's set."""
    env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("SLURM_")}
    env.update({k: None for k in RANK_VARS})
    env.update(
        SLURM_JOB_ID=slurm_port_job(),
        SLURM_STEP_ID="0",
        SLURM_PROCID="0",
        SLURM_NTASKS="1",
        SLURM_STEP_NUM_TASKS="1",
        SLURM_NODEID="0",
        SLURM_LOCALID="1",
        LOCAL_RANK="1",
        SLURM_NTASKS_PER_NODE="2",
        SLURM_TASKS_PER_NODE="2",
        SLURM_JOB_NODELIST="localhost",
        SLURM_STEP_NODELIST="localhost",
        CUDA_VISIBLE_DEVICES=one_visible_gpu(),
    )
    if cuda:  # (without CUDA, GPUs on the node would be the finding "torch is a CPU build")
        env["SLURM_GPUS_ON_NODE"] = "2"
    return env


# ------------------------------------------------------------------------------------- the probe


def _timeout_held(device: str) -> float | None:
    """Seconds of the default process group's timeout as its backend holds it (None if unreadable)."""
    import torch
    from torch.distributed import distributed_c10d as c10d

    try:
        backend = c10d._get_default_group()._get_backend(torch.device(device))
        return backend.options._timeout.total_seconds()
    except Exception:  # a private API: another torch may lack it
        return None


def _preflight(found: dict[str, Any]) -> None:
    """The preflight's parts on this environment, each with its findings and seconds."""
    import torch

    from rnnpipe.launch.processes import preflight

    env = dict(os.environ)
    cuda = torch.cuda.is_available()
    parts = {
        "check_gpus": lambda: preflight.check_gpus(env, cuda, torch.cuda.device_count(), torch.version.cuda),
        "check_triton_launcher": preflight.check_triton_launcher,
        "check_nccl": lambda: preflight.check_nccl(env),
    }
    for name, fn in parts.items():
        t = time.perf_counter()
        try:
            found[name] = {"findings": fn(), "s": time.perf_counter() - t}
        except Exception as e:
            found[name] = {"error": f"{type(e).__name__}: {e}", "s": time.perf_counter() - t}
    found["tasks_on_node"] = preflight.tasks_on_node(env)
    found["nccl_env"] = {k: v for k, v in sorted(env.items()) if k.startswith(("NCCL_", "TORCH_NCCL_"))}


def probe(out: Path) -> None:
    """The rank's start, as the module's docstring says; writes ``out`` whatever happens."""
    import torch
    import torch.distributed as dist

    from rnnpipe.launch.processes import distributed
    from rnnpipe.pipeline.errors import PipelineError

    found: dict[str, Any] = {"env": {k: os.environ.get(k) for k in ("LOCAL_RANK", "SLURM_LOCALID")}}
    found["env"]["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES")
    cuda = torch.cuda.is_available()
    found["visible"] = torch.cuda.device_count()
    found["choice"] = {
        "1 of 1": distributed.cuda_device(1, 1, {}),
        "1 of 8": distributed.cuda_device(1, 8, {}),
    }
    try:
        distributed.cuda_device(3, 2, {"CUDA_VISIBLE_DEVICES": "0,1"})
        found["choice"]["3 of 2"] = "accepted"
    except PipelineError:
        found["choice"]["3 of 2"] = "refused"
    seen: dict[str, Any] = {}
    real = dist.init_process_group

    def spy(*args: Any, **kwargs: Any) -> Any:  # what DeepSpeed passes on to torch
        timeout = kwargs.get("timeout")
        seen["timeout_s"] = timeout.total_seconds() if timeout is not None else None
        return real(*args, **kwargs)

    dist.init_process_group = spy
    try:
        t = time.perf_counter()
        d = distributed.init(timeout_min=TIMEOUT_MIN)
        found["init_s"] = time.perf_counter() - t
        found["layout"] = {
            "source": d.source,
            "rank": d.rank,
            "local_rank": d.local_rank,
            "world": d.world_size,
        }
        found["master"] = f"{d.master_addr}:{d.master_port}"
        device = f"cuda:{torch.cuda.current_device()}" if cuda else "cpu"
        found["device"] = device
        found["device_name"] = torch.cuda.get_device_name() if cuda else "cpu"
        found["backend"] = dist.get_backend()
        found["timeout_passed_s"] = seen.get("timeout_s")
        found["timeout_held_s"] = _timeout_held("cuda" if cuda else "cpu")
        x = torch.ones(1, device=device)
        dist.all_reduce(x)
        found["all_reduce"] = {"value": float(x.item()), "device": str(x.device)}
    except Exception as e:
        found["init_error"] = f"{type(e).__name__}: {e}"
    finally:
        dist.init_process_group = real
    _preflight(found)
    out.write_text(json.dumps(found, indent=1, default=str) + "\n")
    if "init_error" not in found:
        distributed.shutdown()
    distributed.exit_now(0)


# ------------------------------------------------------------------------------------ the section


def start_section(ctx: dict[str, Any], out: dict[str, Any]) -> None:
    """(a): start the probe as a Slurm task's second rank; one row per thing it found."""
    from gpu_check_train import finish, start  # (here: the probe, run as a script, needs neither)

    cuda = ctx["device"].type == "cuda"
    work = Path(ctx["work"]).resolve()
    work.mkdir(parents=True, exist_ok=True)
    result, log = work / "start.json", work / "start.log"
    result.unlink(missing_ok=True)
    log.unlink(missing_ok=True)
    env = rank_env(cuda)
    out["notes"] = [
        "a subprocess with a Slurm task's environment: LOCAL_RANK=1, SLURM_LOCALID=1 (the second "
        f"of 2 tasks per node), CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']} (one GPU per task), "
        f"alone in its step (world 1); rnnpipe.launch.processes.distributed.init(timeout_min={TIMEOUT_MIN}) "
        "then "
        "the preflight's check_gpus, check_triton_launcher (a C extension built as Triton builds its "
        "launcher) and check_nccl on that environment",
    ]
    program = [sys.executable, str(HERE / "gpu_check_start.py")]
    deadline = ctx["section_deadline"] - time.perf_counter() - 2
    finish(
        [(start(["--probe", str(result)], log, env, program=program), log, "the LOCAL_RANK=1 rank")], deadline
    )
    found = json.loads(result.read_text())
    out["found"] = found
    out["rows"], out["checks"] = [], []
    for what, text, ok in start_rows(found, cuda):
        out["rows"].append({"what": what, "found": text, "pass": ok})
        out["checks"].append({"name": f"start: {what}", "pass": ok})
        print(f"  {what}: {text} {ok}", flush=True)


def start_rows(found: dict[str, Any], cuda: bool) -> list[tuple[str, str, bool]]:
    """(what, what was found, whether it is right) from the probe's JSON."""
    rows = []
    env = " ".join(f"{k}={v}" for k, v in found["env"].items())
    if "init_error" in found:
        rows.append(("rank starts", f"{env}: {found['init_error']}", False))
    else:
        device = found["device"]
        ok = device == "cuda:0" if cuda else device == "cpu"
        rows.append(
            ("rank starts", f"{env}: {found['visible']} visible, {device} ({found['device_name']})", ok)
        )
        layout = found["layout"]
        want = "nccl" if cuda else "gloo"
        rows.append(
            (
                "process group",
                f"{found['backend']}, {layout['source']} layout, rank {layout['rank']} of {layout['world']}, "
                f"local rank {layout['local_rank']}, {found['master']}, up in {found['init_s']:.1f} s",
                found["backend"] == want and layout["local_rank"] == 1,
            )
        )
        passed, held = found["timeout_passed_s"], found["timeout_held_s"]
        ok = passed == 60 * TIMEOUT_MIN and held in (None, 60 * TIMEOUT_MIN)
        rows.append(
            (
                "explicit timeout",
                f"timeout_min={TIMEOUT_MIN}: init_process_group got {passed} s, the group holds "
                f"{'(unreadable)' if held is None else f'{held:g} s'}",
                ok,
            )
        )
        reduced = found.get("all_reduce", {})
        rows.append(
            ("all-reduce", f"{reduced.get('value')} on {reduced.get('device')}", reduced.get("value") == 1.0)
        )
    c = found["choice"]
    text = f"(local 1, 1 visible) → {c['1 of 1']}; (1, 8) → {c['1 of 8']}; (3, 2) {c['3 of 2']}"
    rows.append(
        (
            "cuda_device(local_rank, visible)",
            text,
            (c["1 of 1"], c["1 of 8"], c["3 of 2"]) == (0, 1, "refused"),
        )
    )
    for part in ("check_gpus", "check_triton_launcher", "check_nccl"):
        r = found.get(part, {"error": "not run"})
        if "error" in r:
            rows.append((f"preflight {part}", r["error"], False))
            continue
        text = "; ".join(r["findings"]) or "no findings"
        if part == "check_gpus":
            text += f" ({found['tasks_on_node']} tasks on the node, {found['visible']} GPU(s) visible)"
        if part == "check_nccl":
            text += (
                f" (NCCL settings: {', '.join(f'{k}={v}' for k, v in found['nccl_env'].items()) or 'none'})"
            )
        rows.append((f"preflight {part}", f"{text}, {r['s']:.1f} s", not r["findings"]))
    return rows


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "--probe":
        sys.exit("usage: python benchmarks/gpu_check_start.py --probe OUT.json")
    probe(Path(sys.argv[2]))
