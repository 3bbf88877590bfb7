"""Host synchronisations per optimizer step in the pretrain loop, counted on CPU.

A GPU runs ahead of the host until the host reads something back; the loop may do that once per
step outside logging, evaluation and checkpoint steps (docs/pretrain.md, "Host synchronisations").
One process (world size 1, gloo) trains a tiny LRN for a few steps with every call that would wait
for the device on a GPU counted — a tensor read on the host (``item``, ``tolist``, ``bool``,
``float``, ``int``, ``numpy``, ``cpu``), a tensor made from host data on a device
(``torch.tensor(..., device=)``: a blocking copy) — and every collective, each attributed to the
first rnnpipe or DeepSpeed frame that made it (the CPU kernels, ``kernels/cpu_*.py``, run on
host tensors only and are left out: on a GPU the Triton kernels run instead); the counts are
taken between two ``engine.step`` calls that each ended an optimizer step, for steps that
neither log nor evaluate nor checkpoint.

At ZeRO-0 (fp32) the whole step, DeepSpeed's part included, makes one; at ZeRO >= 1 DeepSpeed's
optimizer checks the gradients for overflow itself (its own reads), and only rnnpipe's are held
to one. The run is a subprocess (this file run as a module) so that its process group and the
patched methods do not outlive it. Its TORCH_EXTENSIONS_DIR is a fresh folder, which must stay
empty: no DeepSpeed extension (the shared-memory collectives, FusedAdam) is built.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from harness import REPO, TINY_PRETRAIN

pytest.importorskip("deepspeed")
CONFIG = REPO / "configs" / "pretrain" / "tiny-lrn.yaml"
STEPS = 8  # the last one logs, evaluates and checkpoints; 3..STEPS-1 are plain steps
TINY = [
    *TINY_PRETRAIN,
    "train.grad_accum=2",  # micro-steps must not synchronise either
    f"train.steps={STEPS}",
    "train.log_every=1000",
    "train.checkpoint_every=0",
    "train.eval_max_tokens=200",
    "train.time_limit_min=600",  # (its check is folded into the step's read too)
    "executor.kind=inline",
]
ZERO_STAGES = (0, 2)
READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu")
COPIES = ("tensor", "as_tensor")  # with a device= (host data onto a device)
COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
    "broadcast",
    "barrier",
    "all_gather_object",
    "broadcast_object_list",
    "gather_object",
)


@pytest.fixture(scope="module")
def counts(tmp_path_factory, tiny_enwik8) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("sync")
    data = tiny_enwik8
    out, extensions = root / "counts.json", root / "torch_extensions"
    env = {
        **os.environ,
        "RNNPIPE_PROGRESS": "0",
        "OMP_NUM_THREADS": "1",
        "TORCH_EXTENSIONS_DIR": str(extensions),
        "PYTHONPATH": str(REPO / "tests"),  # (this file, run as a script, imports harness)
    }
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_ID"):
        env.pop(key, None)
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), str(data), str(root), str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    result["extensions"] = sorted(str(p.relative_to(extensions)) for p in extensions.rglob("*"))
    return result


@pytest.mark.parametrize("zero", ZERO_STAGES)
def test_a_plain_step_synchronises_the_host_at_most_once(counts, zero):
    cycles = counts[f"zero{zero}"]["cycles"]
    assert len(cycles) == STEPS - 2  # steps 3..STEPS, each from the end of the one before
    for cycle in cycles:
        ours = Counter({k: n for k, n in cycle.items() if k.startswith("rnnpipe")})
        reads = sum(n for k, n in ours.items() if k.split(" ")[1] in (*READS, *COPIES))
        collectives = sum(n for k, n in ours.items() if k.split(" ")[1] in COLLECTIVES)
        assert reads <= 1 and collectives <= 1, f"ZeRO-{zero}: {dict(cycle)}"
        if zero == 0:  # DeepSpeed's part reads nothing (the loop takes and clips the norm itself)
            theirs = {k: n for k, n in cycle.items() if k.startswith("deepspeed")}
            assert set(theirs) <= {"deepspeed all_reduce"}, f"ZeRO-0: {dict(cycle)}"  # the gradients'
    assert counts[f"zero{zero}"]["finite_loss"]


def test_no_deepspeed_extension_is_built_and_the_gpu_optimizer_is_torchs_fused_adamw(counts):
    assert counts["extensions"] == []  # neither the shared-memory collectives nor FusedAdam
    assert counts["gpu_optimizer"] == {"class": "AdamW", "fused": True}


# ------------------------------------------------------------------------------ the subprocess


def _where(frame: Any) -> str:
    """Who made a call: the first rnnpipe or DeepSpeed frame from ``frame`` outwards, or torch's
    optimizer (its step counters are host tensors, read on a GPU too without waiting for it);
    torch's other frames are skipped."""
    while frame is not None:
        path = Path(frame.f_code.co_filename)
        if "site-packages" in path.parts:
            inside = path.parts[path.parts.index("site-packages") + 1 :]
            if inside[0] == "deepspeed":
                return "deepspeed"
            if inside[:2] == ("torch", "optim"):
                return "torch.optim"
        elif path.is_relative_to(REPO) and path.name != Path(__file__).name:
            if path.parent.name == "kernels" and path.name.startswith("cpu_"):
                return "cpu-only kernel"  # (its tensors are host tensors: a GPU runs Triton's)
            return f"rnnpipe:{path.relative_to(REPO)}:{frame.f_lineno}"
        frame = frame.f_back
    return "other"


def _instrument(events: list[Any]) -> None:
    """Count every read and collective into ``events`` while ``events[0]`` is True; mark the end of
    every optimizer step (``("STEP", n)``)."""
    import deepspeed.runtime.engine as ds_engine
    import torch
    import torch.distributed as dist

    def counted(kind: str, original: Any, when: Any = None) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if events[0] and (when is None or when(*args, **kwargs)):
                events[0] = False  # (what the original calls is not counted again)
                try:
                    events.append(f"{_where(sys._getframe(1))} {kind}")
                finally:
                    events[0] = True
            return original(*args, **kwargs)

        return wrapper

    for name in READS:
        setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
    for name in COPIES:  # host data onto a device: a blocking copy on a GPU
        setattr(torch, name, counted(name, getattr(torch, name), lambda *a, **k: k.get("device") is not None))
    for name in COLLECTIVES:
        setattr(dist, name, counted(name, getattr(dist, name)))
    step = ds_engine.DeepSpeedEngine.step

    def marked(self: Any, *args: Any, **kwargs: Any) -> Any:
        before = self.global_steps
        out = step(self, *args, **kwargs)
        if self.global_steps != before:
            events.append(("STEP", self.global_steps))
        return out

    ds_engine.DeepSpeedEngine.step = marked


def _cycles(events: list[Any]) -> list[dict[str, int]]:
    """The counts between the end of step k and the end of step k + 1, for k + 1 in 3..STEPS."""
    cycles, current, seen = [], Counter(), 0
    for e in events[1:]:
        if isinstance(e, tuple):
            if seen >= 2:
                cycles.append(dict(current))
            seen, current = e[1], Counter()
        elif seen >= 2:
            current[e] += 1
    return cycles


def _main(data: str, root: str, out: str) -> None:
    import torch

    from rnnpipe.launch.processes import distributed
    from rnnpipe.launch.stages.pretrain import PretrainJob, stage_config
    from rnnpipe.pipeline.config import load_config
    from rnnpipe.pipeline.train.config import deepspeed_config
    from rnnpipe.pipeline.train.loop import train

    port = distributed.free_port()
    os.environ.update(
        RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    distributed.init()
    result: dict[str, Any] = {}
    events: list[Any] = [False]
    _instrument(events)
    for zero in ZERO_STAGES:
        job = load_config(
            PretrainJob,
            str(CONFIG),
            [*TINY, f"run_dir={root}/run{zero}", f"data.path={data}", f"train.zero_stage={zero}"],
        )
        events[:] = [True]
        try:
            done = train(stage_config(job))
        finally:
            events[0] = False
        rows = [json.loads(line) for line in Path(f"{root}/run{zero}/metrics.jsonl").read_text().splitlines()]
        losses = [r["train/loss"] for r in rows if "train/loss" in r]
        result[f"zero{zero}"] = {
            "cycles": _cycles(events),
            "finite_loss": done.step == STEPS and bool(losses) and all(0 < x < 10 for x in losses),
        }
    import deepspeed

    gpu = deepspeed_config(stage_config(job), on_gpu=True)  # its optimizer, built here on CPU
    gpu["zero_optimization"] = {"stage": 0}
    model = torch.nn.Linear(4, 4)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=gpu)
    optimizer = engine.basic_optimizer
    result["gpu_optimizer"] = {"class": type(optimizer).__name__, "fused": optimizer.defaults.get("fused")}
    Path(out).write_text(json.dumps(result, indent=1))
    distributed.shutdown()


if __name__ == "__main__":
    _main(*sys.argv[1:4])
    from rnnpipe.launch.processes import distributed

    distributed.exit_now(0)
