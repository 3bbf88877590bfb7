"""What a first job on a GPU cluster would hit, caught on CPU: GPU selection under per-task GPU
binding, a crashed rank ending the job at once, the process group's timeout, Slurm's nodelists and
environment, node memory, the plain-sbatch requeue on preemption, and the figures MFU divides by."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

import pytest
import torch
from harness import REPO

from rnnpipe.launch.processes import distributed
from rnnpipe.pipeline.errors import ConfigError, PipelineError


class FakeCuda:
    """torch.cuda as a task sees it: ``count`` visible devices, a generator state per device."""

    def __init__(self, count: int):
        self.count, self.current = count, 0
        self.states = {i: torch.full((8,), i, dtype=torch.uint8) for i in range(count)}

    def install(self, monkeypatch) -> None:
        m = torch.cuda
        monkeypatch.setattr(m, "is_available", lambda: True)
        monkeypatch.setattr(m, "device_count", lambda: self.count)
        monkeypatch.setattr(m, "set_device", self.set_device)
        monkeypatch.setattr(m, "current_device", lambda: self.current)
        monkeypatch.setattr(
            m, "get_rng_state", lambda device="cuda": self.states[self._index(device)].clone()
        )
        monkeypatch.setattr(m, "set_rng_state", self.set_rng_state)
        monkeypatch.setattr(
            m, "get_rng_state_all", lambda: [self.states[i].clone() for i in range(self.count)]
        )

        def set_all(states):
            for i, s in enumerate(states):
                self.set_rng_state(s, i)

        monkeypatch.setattr(m, "set_rng_state_all", set_all)

    def _index(self, device) -> int:
        index = device if isinstance(device, int) else torch.device(device).index
        return self.current if index is None else index

    def set_device(self, index: int) -> None:
        if not 0 <= index < self.count:
            raise RuntimeError("CUDA error: invalid device ordinal")
        self.current = index

    def set_rng_state(self, state, device="cuda") -> None:
        index = self._index(device)
        if not 0 <= index < self.count:
            raise RuntimeError("CUDA error: invalid device ordinal")
        self.states[index] = state.clone()


def _slurm_env(monkeypatch, localid: int, procid: int, ntasks: int, nodelist: str = "gpu01") -> None:
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID", "RNNPIPE_LAUNCHER_PID"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_PROCID", str(procid))
    monkeypatch.setenv("SLURM_LOCALID", str(localid))
    monkeypatch.setenv("SLURM_NTASKS", str(ntasks))
    monkeypatch.setenv("SLURM_JOB_NODELIST", nodelist)


def _init_without_a_process_group(monkeypatch) -> dict:
    """distributed.init() up to DeepSpeed's init_distributed, which records its arguments."""
    import deepspeed

    seen: dict = {}
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kw: seen.update(kw))
    monkeypatch.setattr(distributed, "node_address", lambda name: "127.0.0.1")
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(key, os.environ.get(key, ""))  # restored after the test
    return seen


def test_one_gpu_bound_per_task_is_used_whatever_the_local_rank(monkeypatch):
    """--gpus-per-task=1: task 3 of a node sees one GPU, as its device 0 (it died with 'invalid
    device ordinal' asking for device 3); with every GPU visible, task 3 takes device 3."""
    fake = FakeCuda(1)
    fake.install(monkeypatch)
    _slurm_env(monkeypatch, localid=3, procid=3, ntasks=8)
    seen = _init_without_a_process_group(monkeypatch)
    distributed.init(timeout_min=7)
    assert fake.current == 0 and seen["dist_backend"] == "nccl"
    assert seen["timeout"].total_seconds() == 7 * 60  # explicit, not DeepSpeed's default
    fake = FakeCuda(8)
    fake.install(monkeypatch)
    distributed.init()
    assert fake.current == 3 and seen["timeout"].total_seconds() == distributed.DEFAULT_TIMEOUT_MIN * 60


def test_a_task_seeing_too_few_gpus_is_told_what_to_ask_slurm_for(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    with pytest.raises(
        PipelineError, match=r"local rank 3 sees 2 GPUs.*CUDA_VISIBLE_DEVICES=4,5.*gpus-per-task"
    ):
        distributed.cuda_device(3, 2)


def test_the_rng_state_resumes_under_another_gpu_binding(monkeypatch):
    """Saved on a node where the task saw 8 GPUs (device 3), resumed where it sees one."""
    from rnnpipe.pipeline.engine.state import rng_state, set_rng_state

    fake = FakeCuda(8)
    fake.install(monkeypatch)
    fake.set_device(3)
    saved = rng_state()
    assert torch.equal(saved["cuda"], fake.states[3])  # its own device's generator, not all 8
    one = FakeCuda(1)
    one.install(monkeypatch)
    set_rng_state(saved)
    assert torch.equal(one.states[0], fake.states[3])
    # a checkpoint of the earlier format (every visible device's generator) still loads
    set_rng_state({**saved, "cuda": [fake.states[i] for i in range(8)]})
    assert torch.equal(one.states[0], fake.states[0])


def test_the_submitted_job_ends_when_one_rank_fails(tmp_path, monkeypatch):
    """submitit's srun line carries --kill-on-bad-exit (a crashed rank otherwise leaves the others
    waiting in a collective until the timeout), and the ranks get the job's timeout."""
    import submitit

    from rnnpipe.launch.stages.pretrain import slurm_executor
    from rnnpipe.launch.stages.pretrain_job import PretrainJob
    from rnnpipe.pipeline.config import load_config

    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: f"/usr/bin/{name}")
    job = load_config(
        PretrainJob,
        str(REPO / "configs/pretrain/tiny-lrn.yaml"),
        ["distributed.nodes=2", "distributed.timeout_min=12", "executor.slurm.mem_gb=64"],
    )
    ex = slurm_executor(job, str(tmp_path))
    script = ex._make_submission_file_text("python -m x", "JOBID")
    assert "--kill-on-bad-exit=1" in next(line for line in script.splitlines() if line.startswith("srun"))
    submitted = {}
    monkeypatch.setattr(submitit.SlurmExecutor, "submit", lambda self, fn, *a: submitted.update(args=a))
    from rnnpipe.launch.stages import pretrain

    monkeypatch.setattr(
        pretrain, "slurm_executor", lambda *a, **k: submitit.SlurmExecutor(folder=str(tmp_path))
    )
    pretrain._submit_job(job, str(tmp_path), "", None, export=False)
    assert submitted["args"][-1] == 12


@pytest.mark.parametrize(
    "nodelist",
    ["gpu01", "gpu[03-05,9],cpu1", "rack[1-2]-node[01-04]", "a[1-2]b[08-10],c[7]"],
)
def test_nodelists_expand_as_scontrol_shows_them(nodelist):
    expected = {
        "gpu01": ["gpu01"],
        "gpu[03-05,9],cpu1": ["gpu03", "gpu04", "gpu05", "gpu9", "cpu1"],
        "rack[1-2]-node[01-04]": [f"rack{r}-node0{n}" for r in (1, 2) for n in (1, 2, 3, 4)],
        "a[1-2]b[08-10],c[7]": ["a1b08", "a1b09", "a1b10", "a2b08", "a2b09", "a2b10", "c7"],
    }[nodelist]
    assert distributed.hostnames(nodelist) == expected
    assert distributed.first_host(nodelist) == expected[0]  # was "rack1" for rack[1-2]-node[01-04]
    if shutil.which("scontrol"):  # the real Slurm's reading, where one is installed
        shown = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True)
        if shown.returncode == 0:
            assert shown.stdout.split() == expected


def test_slurm_layout_wins_over_a_stray_rank_exported_in_the_shell(monkeypatch):
    _slurm_env(monkeypatch, localid=1, procid=5, ntasks=16, nodelist="gpu[01-02]")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    d = distributed.detect()
    assert (d.rank, d.local_rank, d.world_size, d.master_addr, d.source) == (5, 1, 16, "gpu01", "slurm")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abc")  # torchrun inside an allocation: its own ranks
    assert distributed.detect().source == "torchrun"


def test_the_rendezvous_port_stays_below_the_ephemeral_range():
    ports = {
        distributed.detect({"SLURM_JOB_ID": str(j), "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}).master_port
        for j in range(0, 200_000, 7)
    }
    assert min(ports) >= 1024 and max(ports) < 32768  # Linux hands out 32768-60999 to connections


def test_a_gpu_job_asking_too_little_node_memory_is_refused_before_submission():
    from rnnpipe.launch.stages.pretrain import _check_node_memory
    from rnnpipe.launch.stages.pretrain_job import PretrainJob
    from rnnpipe.pipeline.config import load_config

    required = ["run_dir=r", "data.path=d", "distributed.gpus_per_node=8"]
    job = load_config(PretrainJob, None, required)
    with pytest.raises(ConfigError, match=r"mem_gb=16 is each node's memory: 2.0 GB for each of its 8"):
        _check_node_memory(job)
    _check_node_memory(load_config(PretrainJob, None, [*required, "executor.slurm.mem_gb=256"]))


def test_mfu_divides_by_the_gpu_actually_there():
    from rnnpipe.pipeline.train.loop import dense_bf16_flops

    assert dense_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert dense_bf16_flops("NVIDIA H100 PCIe") == 756e12  # was credited the SXM figure
    assert dense_bf16_flops("NVIDIA H100 NVL") == 835e12
    assert dense_bf16_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert dense_bf16_flops("Some Future GPU") is None


def test_gpu_zero_1_and_2_overlap_their_reduction_with_the_backward_pass():
    from rnnpipe.pipeline.train.config import PretrainConfig, deepspeed_config

    for stage in (1, 2):
        cfg = PretrainConfig()
        cfg.train.zero_stage = stage
        zero = deepspeed_config(cfg, on_gpu=True)["zero_optimization"]
        assert zero == {"stage": stage, "overlap_comm": True, "contiguous_gradients": True}
        assert deepspeed_config(cfg, on_gpu=False)["zero_optimization"] == {"stage": stage}


def test_the_plain_sbatch_script_requeues_after_a_preemptions_term(tmp_path):
    """Preemption sends TERM to the batch shell as well as to the ranks: the shell must live until
    srun returns 75 (the ranks' checkpoint) and then requeue. A fake srun and scontrol stand in."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\ntrap 'exit 75' TERM\nwhile :; do sleep 0.05; done\n")
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/scontrol.log\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "RNNPIPE_SLURM_DIR": str(REPO / "slurm"),
        "SLURM_JOB_ID": "777",
        "SLURM_SUBMIT_DIR": str(tmp_path),
    }
    shell = subprocess.Popen(
        ["bash", str(REPO / "slurm" / "pretrain.sbatch"), "cfg.yaml"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.0)
    # what Slurm does on preemption: TERM to every process of the job, the batch shell included
    srun = subprocess.run(["pgrep", "-P", str(shell.pid)], capture_output=True, text=True).stdout.split()
    for pid in [shell.pid, *map(int, srun)]:
        os.kill(pid, signal.SIGTERM)
    _, err = shell.communicate(timeout=30)
    assert shell.returncode == 0, err
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "777"]


def test_fp32_on_a_gpu_runs_tf32_products_the_rate_mfu_is_stated_against():
    from rnnpipe.pipeline.train.config import Precision
    from rnnpipe.pipeline.train.loop import gpu_matmul_precision

    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = matmul.allow_tf32, cudnn.allow_tf32
    try:
        matmul.allow_tf32 = cudnn.allow_tf32 = False
        gpu_matmul_precision(Precision.bf16)
        assert not matmul.allow_tf32
        gpu_matmul_precision(Precision.fp32)
        assert matmul.allow_tf32 and cudnn.allow_tf32
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = saved


# ----------------------------------------------------------------------------------- preflight


def test_preflight_finds_a_cpu_torch_on_a_gpu_node_and_gpus_shared_by_ranks():
    from rnnpipe.launch.processes.preflight import check_gpus, tasks_on_node

    gpu_job = {"SLURM_GPUS_ON_NODE": "8", "SLURM_NTASKS_PER_NODE": "8"}
    (cpu_build,) = check_gpus(gpu_job, cuda_available=False, visible=0, torch_cuda=None)
    assert "torch is a CPU build" in cpu_build and "download.pytorch.org" in cpu_build
    (blind,) = check_gpus(gpu_job, cuda_available=False, visible=0, torch_cuda="12.8")
    assert "sees none" in blind and "nvidia-smi" in blind
    assert check_gpus({}, cuda_available=False, visible=0, torch_cuda=None) == []  # a CPU job
    (shared,) = check_gpus(gpu_job, cuda_available=True, visible=2, torch_cuda="12.8")
    assert "8 ranks on this node but each sees 2 GPUs" in shared and "--gpus-per-task=1" in shared
    for visible in (1, 8):  # one bound per task, or all of them
        assert check_gpus(gpu_job, cuda_available=True, visible=visible, torch_cuda="12.8") == []
    layout = {"SLURM_TASKS_PER_NODE": "8(x2),4"}
    assert [tasks_on_node({**layout, "SLURM_NODEID": str(n)}) for n in range(3)] == [8, 8, 4]


def test_preflight_builds_a_launcher_as_triton_does_and_names_a_missing_compiler(tmp_path, monkeypatch):
    from rnnpipe.launch.processes.preflight import check_triton_launcher

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "ok"))
    assert check_triton_launcher() == []  # gcc and Python.h are here
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "broken"))
    monkeypatch.setenv("CC", "/bin/false")
    (problem,) = check_triton_launcher()
    assert "Triton cannot build its kernel launcher" in problem and "C compiler: /bin/false" in problem


def test_preflight_checks_nccl_interfaces_and_disk_space(tmp_path):
    from rnnpipe.launch.processes.preflight import check_disk, check_nccl

    net, ib = tmp_path / "net", tmp_path / "ib"
    for name in ("lo", "eth0", "ib0"):
        (net / name).mkdir(parents=True)
    (ib / "mlx5_0").mkdir(parents=True)
    assert check_nccl({"NCCL_SOCKET_IFNAME": "eth", "NCCL_IB_HCA": "mlx5_0:1"}, net, ib) == []
    assert check_nccl({"NCCL_SOCKET_IFNAME": "^docker,lo"}, net, ib) == []
    (bad,) = check_nccl({"NCCL_SOCKET_IFNAME": "ens"}, net, ib)
    assert "NCCL_SOCKET_IFNAME=ens names no interface" in bad and "eth0" in bad
    assert "NCCL_IB_HCA=mlx4" in check_nccl({"NCCL_IB_HCA": "mlx4"}, net, ib)[0]
    assert check_disk(str(tmp_path / "run"), params=1000) == []
    (full,) = check_disk(str(tmp_path / "run"), params=10**13)
    assert "two are kept" in full and str(tmp_path / "run") in full


def test_a_gpu_job_with_a_cpu_torch_stops_in_the_preflight_with_exit_2(tmp_path, monkeypatch, capsys):
    """End to end: the rank refuses before DeepSpeed or a process group exists."""
    from harness import rnnpipe

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the state carries the stream forward.\n" * 2000)
    data = tmp_path / "data"
    assert rnnpipe("-q", "prepare", "tinyshakespeare", f"output={data}", f"source.paths=[{corpus}]",
                   "shards.sample_tokens=2048", "--executor", "inline") == 0  # fmt: skip
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "4")
    started = time.time()
    code = rnnpipe(
        "pretrain", "tiny-lrn", f"run_dir={tmp_path / 'run'}", f"data.path={data}", "--executor", "inline"
    )
    assert code == 2 and time.time() - started < 30
    err = capsys.readouterr().err
    assert "preflight: the job has 4 GPU(s) on this node but torch is a CPU build" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_first_contact_report_joins_the_all_reduce_and_the_runs(tmp_path):
    import json

    from rnnpipe.launch.commands.first_contact import bus_bandwidth, report

    assert bus_bandwidth(2**30, 0.01, 8) == pytest.approx(2**30 / 0.01 * 14 / 8 / 1e9)  # nccl-tests'
    assert bus_bandwidth(2**20, 0.01, 1) == 0.0
    rows = [{"bytes": 2**20 * m, "ms": m / 10, "busbw_gbs": 10.0 * m} for m in (1, 4)]
    (tmp_path / "allreduce-16.json").write_text(
        json.dumps({"world": 16, "nodes": 2, "backend": "nccl", "dtype": "bfloat16", "rows": rows})
    )
    run = tmp_path / "runs" / "2-nodes-zero2"
    run.mkdir(parents=True)
    steps = [
        {"step": 5 * i, "train/tokens_per_s": 1000.0 * i, "train/mfu": 0.1 * i, "train/step_time_s": 1.0 / i}
        | {"train/memory_gb": float(i)}
        for i in range(1, 5)
    ]
    (run / "metrics.jsonl").write_text("\n".join(map(json.dumps, steps)) + "\n")
    (tmp_path / "runs" / "1-node").mkdir()  # a run that logged nothing
    table = report(str(tmp_path))
    assert "| 16 | 2 | nccl | 4 MiB | 0.400 | 40.0 |" in table
    assert "| 2-nodes-zero2 | 3 | 3,000 | 30.0% | 0.333 | 4.0 |" in table  # the first logged step skipped
    assert "| 1-node | — (no steps logged" in table and (tmp_path / "first-contact.md").read_text() == table


def test_the_documented_h100_estimates_are_what_the_model_gives():
    """docs/benchmarks.md's estimates come from benchmarks/estimate_gpu.py as it is (refresh: python
    benchmarks/estimate_gpu.py --write docs/benchmarks.md), and the roofline adds up."""
    from harness import benchmark

    estimate_gpu = benchmark("estimate_gpu")
    doc = (REPO / "docs" / "benchmarks.md").read_text()
    assert f"{estimate_gpu.BEGIN}\n{estimate_gpu.table()}\n{estimate_gpu.END}" in doc
    e = estimate_gpu.estimate("enwik8-50m", 256)
    assert 0 < e["mfu"] < 1 and 0 < e["matmul_share"] < 1
    assert e["mfu"] == pytest.approx(e["train_flops_per_token"] * e["tokens_per_s"] / estimate_gpu.PEAK_BF16)
