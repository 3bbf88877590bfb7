"""Logging: TensorBoard's hparams view across runs, Weights & Biases (offline), the documented tags,
and the results table's one-seed rows."""

from __future__ import annotations

import json
import re
import struct
import sys
from pathlib import Path

import psutil
import pytest
import torch
from harness import REPO, data_file

from rnnpipe.launch.stages.pretrain import PretrainJob, stage_config
from rnnpipe.pipeline.config import load_config, to_dict
from rnnpipe.pipeline.engine.metrics import PRETRAIN_HPARAMS, PRETRAIN_TAGS, WANDB_ID, Metrics
from rnnpipe.pipeline.errors import ConfigError
from rnnpipe.pipeline.finetune.collect import collect, hparams_metrics, markdown, table
from rnnpipe.pipeline.finetune.config import TaskKind
from rnnpipe.pipeline.train.config import resume_changes, run_fingerprint, run_view

PRETRAIN = REPO / "configs" / "pretrain" / "tiny-lrn.yaml"


def _result(task: str, kind: str, metric: str, dev: dict, test: dict | None, seed: int = 0) -> dict:
    """A result.json as a fine-tune job writes it (the keys collect reads)."""
    return {
        "task": task,
        "kind": kind,
        "init": "pretrained",
        "seed": seed,
        "metric": metric,
        "hparams": {"task": task, "init": "pretrained", "seed": seed},
        "dev": dev,
        "test": test,
        "steps": 8,
        "wall_s": 1.0,
        "backbone": {"sha256": "a" * 64, "step": 10},
        "fingerprint": f"{seed}" * 64,
    }


CONLL = _result(
    "conll",
    "tagging",
    "f1",
    {"f1": 60.0, "precision": 61.0, "recall": 59.0, "accuracy": 90.0},
    {"f1": 55.0, "precision": 56.0, "recall": 54.0, "accuracy": 88.0},
)
SST2 = _result("sst2", "classification", "accuracy", {"accuracy": 80.0}, None)  # GLUE's test: no labels
PTB = _result(
    "ptb", "lm", "ppl", {"ppl": 150.0, "bpb": 1.9, "loss": 1.3}, {"ppl": 140.0, "bpb": 1.8, "loss": 1.2}
)


def _pretrain_config(*overrides: str) -> dict:
    """The tiny pretrain config as the loop sees it (plain values), with ``overrides``."""
    return to_dict(stage_config(load_config(PretrainJob, str(PRETRAIN), list(overrides))))


def _write_results(sweep: Path, results: list[dict]) -> None:
    for r in results:
        d = sweep / "jobs" / f"{r['task']}-pretrained-seed{r['seed']}"
        d.mkdir(parents=True)
        (d / "result.json").write_text(json.dumps(r))


def _pretrain_like(run_dir: Path, **kwargs) -> Metrics:
    """What the pretrain loop logs, through Metrics: two log steps, an evaluation, a sample."""
    m = Metrics(run_dir, True, 0, 20, **kwargs)
    m.text(0, "provenance", "```\n{}\n```")
    for step, loss in ((10, 2.0), (20, 1.5)):
        m.scalars(step, {"train/loss": loss, "train/lr": 1e-3 * step})
    m.scalars(20, {"valid/loss": 1.1, "valid/bpb": 1.5, "valid/ppl": 3.0})
    m.text(20, "valid/sample", "```\nthe <cat> ⟶ sat\n```")
    m.scalars(20, {"test/loss": 1.2, "test/bpb": 1.6, "test/ppl": 3.3})
    final = {"valid/loss": 1.1, "valid/bpb": 1.5, "valid/ppl": 3.0, "test/loss": 1.2, "test/bpb": 1.6}
    m.hparams({"model.d_model": 32, "train.steps": 20, "code.dirty": False, "metrics.wandb.tags": []}, final)
    return m


# ---------------------------------------------------------------------------------- hparams view


def _hparams_view(logdir: Path) -> tuple[list[str], list[str], dict[str, dict[str, float]]]:
    """What TensorBoard's hparams dashboard shows for ``logdir``, from the plugin's own backend:
    (hparam columns, metric columns, {session run: {metric: value}})."""
    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.hparams import api_pb2, backend_context, get_experiment, list_session_groups

    mux = plugin_event_multiplexer.EventMultiplexer()
    mux.AddRunsFromDirectory(str(logdir))
    mux.Reload()
    provider = data_provider.MultiplexerDataProvider(mux, str(logdir))
    backend = backend_context.Context(base_plugin.TBContext(logdir=str(logdir), data_provider=provider))
    ctx = context.RequestContext()
    exp = get_experiment.Handler(ctx, backend, "", api_pb2.GetExperimentRequest()).run()
    request = api_pb2.ListSessionGroupsRequest(start_index=0, slice_size=1000)
    request.allowed_statuses.extend([api_pb2.STATUS_UNKNOWN, api_pb2.STATUS_SUCCESS])
    groups = list_session_groups.Handler(ctx, backend, "", request).run().session_groups
    rows = {s.name: {m.name.tag: m.value for m in s.metric_values} for g in groups for s in g.sessions}
    return [h.name for h in exp.hparam_infos], [m.name.tag for m in exp.metric_infos], rows


def _sessions(logdir: Path) -> dict[str, tuple[dict, dict[str, float]]]:
    """Each run's hparams session under ``logdir``, read back with EventAccumulator and the plugin's
    metadata parsing: {run: (hparams, {scalar tag: value})}; and that none has an experiment."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    out = {}
    for run in sorted({events.parent for events in logdir.rglob("events.out.tfevents.*")}):
        ea = EventAccumulator(str(run))
        ea.Reload()
        try:
            content = ea.PluginTagToContent(metadata.PLUGIN_NAME)
        except KeyError:  # no hparams data in this run (training curves)
            continue
        assert metadata.EXPERIMENT_TAG not in content, run  # the cause of blank rows
        if metadata.SESSION_START_INFO_TAG not in content:
            continue
        start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
        hparams = {
            k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()
        }
        values = {tag: ea.Scalars(tag)[-1].value for tag in ea.Tags()["scalars"]}
        out[str(run.relative_to(logdir))] = (hparams, values)
    return out


def test_the_pipeline_logdir_hparams_view_has_each_runs_metric_in_its_own_filled_column(tmp_path):
    # The pipeline's run dir: pretrain/ (with its own training curves) and the sweep's finetune/.
    _pretrain_like(tmp_path / "pretrain").close()
    _write_results(tmp_path / "finetune", [CONLL, SST2, PTB])
    collect(str(tmp_path / "finetune"))

    sessions = _sessions(tmp_path)
    assert set(sessions) == {
        "pretrain/tensorboard/hparams",
        "finetune/tensorboard-hparams/conll-pretrained-seed0",
        "finetune/tensorboard-hparams/sst2-pretrained-seed0",
        "finetune/tensorboard-hparams/ptb-pretrained-seed0",
    }
    hp, values = sessions["pretrain/tensorboard/hparams"]
    assert hp == {"model.d_model": 32, "train.steps": 20, "code.dirty": False}  # not metrics.*
    assert values == pytest.approx({"hparam/pretrain/valid_bpb": 1.5, "hparam/pretrain/test_bpb": 1.6})
    # CoNLL: F1 (what the table shows), not token accuracy; SST-2: dev only (its test is unlabelled)
    _, conll = sessions["finetune/tensorboard-hparams/conll-pretrained-seed0"]
    assert conll == {"hparam/conll/dev_f1": 60.0, "hparam/conll/test_f1": 55.0}
    _, sst2 = sessions["finetune/tensorboard-hparams/sst2-pretrained-seed0"]
    assert sst2 == {"hparam/sst2/dev_accuracy": 80.0}
    _, ptb = sessions["finetune/tensorboard-hparams/ptb-pretrained-seed0"]
    assert ptb == pytest.approx(
        {"hparam/ptb/dev_ppl": 150.0, "hparam/ptb/test_ppl": 140.0, "hparam/ptb/test_bpb": 1.8}
    )

    # What the dashboard shows at that logdir: every metric a column, every row filled with its own.
    hparams, metrics, rows = _hparams_view(tmp_path)
    assert sorted(metrics) == sorted(
        [*PRETRAIN_HPARAMS.values(), *conll, *sst2, *ptb]
    )  # and no training curve (train/loss) among them
    assert {"model.d_model", "task", "init", "seed", "backbone"} <= set(hparams)
    assert rows["pretrain/tensorboard/hparams"] == pytest.approx(values)
    for name, run_values in (("conll", conll), ("sst2", sst2), ("ptb", ptb)):
        assert rows[f"finetune/tensorboard-hparams/{name}-pretrained-seed0"] == pytest.approx(run_values)


def test_the_hparams_view_metrics_are_the_values_the_table_shows():
    rows = {r["task"]: r for r in table([CONLL, SST2, PTB])}
    for res in (CONLL, SST2, PTB):
        view = hparams_metrics(res)
        row = rows[res["task"]]
        assert view[f"hparam/{res['task']}/dev_{row['metric']}"] == row["dev_mean"]
        assert view.get(f"hparam/{res['task']}/test_{row['metric']}") == row["test_mean"]
        assert ("test_bpb" in " ".join(view)) == (row["test_bpb"] != "—")


def test_a_finished_runs_session_is_replaced_not_added_to(tmp_path):
    _pretrain_like(tmp_path).close()
    m = Metrics(tmp_path, True, 20, 40)  # resumed with more steps, finishing again
    m.hparams({"train.steps": 40}, {"valid/bpb": 1.25, "test/bpb": 1.5})
    m.close()
    assert len(list((tmp_path / "tensorboard" / "hparams").iterdir())) == 1
    ((hp, values),) = _sessions(tmp_path).values()
    assert hp == {"train.steps": 40} and values["hparam/pretrain/valid_bpb"] == 1.25


# ----------------------------------------------------------------------------------------- W&B


def _wandb_records(path: Path) -> list:
    """The records of an offline run's ``.wandb`` file (LevelDB's log format: 32 KiB blocks of
    chunks, each with a 7-byte header; wandb no longer ships a Python reader)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:7] == b":W&B\xe1\xbe\x00", "not a .wandb file of the format this reader knows"
    records, pos, buf = [], 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            records.append(record)
            buf = b""
    return records


def _items(update) -> dict:
    return {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in update}


def _offline_run(wandb_dir: Path) -> dict:
    """The run, its config, history rows (by step) and summary, from its one offline-run dir."""
    (run_file,) = wandb_dir.glob("wandb/offline-run-*/run-*.wandb")
    out: dict = {"run": None, "config": {}, "history": {}, "summary": {}}
    for r in _wandb_records(run_file):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out["run"] = r.run
            out["config"].update(_items(r.run.config.update))
        elif kind == "config":
            out["config"].update(_items(r.config.update))
        elif kind == "history":
            out["history"][r.history.step.num] = _items(r.history.item)
        elif kind == "summary":
            out["summary"].update(_items(r.summary.update))
    return out


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """W&B without a network: offline, no settings file or API key of the user's; afterwards, no
    W&B process left behind (Metrics.close stops W&B's service process)."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    yield
    import wandb

    try:
        left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
        _, alive = psutil.wait_procs(left, timeout=5)
        assert not alive, [p.cmdline() for p in alive]
    finally:
        wandb.teardown()  # whatever the test left running


@pytest.mark.timeout(60)
def test_wandb_offline_gets_the_scalars_text_config_and_results(offline, tmp_path):
    from rnnpipe.pipeline.train.config import WandbConfig

    run_dir = tmp_path / "tiny-run"
    cfg = WandbConfig(project="rnnpipe-test", group="g", tags=["t1"], mode="online")  # $WANDB_MODE wins
    config = {"model": {"d_model": 32}, "train": {"steps": 20}, "metrics": {"wandb": {"project": "p"}}}
    _pretrain_like(run_dir, wandb=cfg, config=config).close()

    run_id = (run_dir / WANDB_ID).read_text().strip()
    got = _offline_run(run_dir)  # dir: the run dir by default
    assert got["run"].run_id == run_id and got["run"].project == "rnnpipe-test"
    assert got["run"].display_name == "tiny-run" and got["run"].run_group == "g"
    assert list(got["run"].tags) == ["t1"]
    # the config, flattened, without the logging settings; the loop's extra hparams added at the end
    config_keys = {k for k in got["config"] if not k.startswith("_")}
    assert config_keys == {"model.d_model", "train.steps", "code.dirty"}
    assert got["config"]["model.d_model"] == 32 and got["config"]["code.dirty"] is False
    # the same scalars under the same tags at the same steps as TensorBoard
    history = got["history"]
    assert history[10]["train/loss"] == 2.0 and history[10]["train/lr"] == pytest.approx(0.01)
    assert history[20]["train/loss"] == 1.5 and history[20]["valid/bpb"] == 1.5
    assert history[20]["test/ppl"] == 3.3
    assert history[20]["valid/sample/_type"] == "html-file" and history[0]["provenance/_type"] == "html-file"
    (page,) = run_dir.glob("wandb/offline-run-*/files/" + history[20]["valid/sample/path"])
    assert "<pre>the &lt;cat&gt; ⟶ sat</pre>" in page.read_text(encoding="utf-8")  # escaped, no fence
    # the final results (and the hparams view's metrics) in the summary
    summary = got["summary"]
    assert summary["hparam/pretrain/valid_bpb"] == 1.5 and summary["hparam/pretrain/test_bpb"] == 1.6
    assert summary["valid/ppl"] == 3.0 and summary["test/loss"] == 1.2


@pytest.mark.timeout(60)
def test_a_resumed_run_continues_its_wandb_run_and_a_fresh_one_starts_another(offline, tmp_path):
    from rnnpipe.pipeline.train.config import WandbConfig

    cfg = WandbConfig(project="rnnpipe-test", mode="offline")
    Metrics(tmp_path, True, 0, 20, wandb=cfg).close()
    first = (tmp_path / WANDB_ID).read_text()
    m = Metrics(tmp_path, True, 10, 20, wandb=cfg)  # resumed from the checkpoint of step 10
    assert m.wandb.id == first.strip()
    m.close()
    assert (tmp_path / WANDB_ID).read_text() == first
    Metrics(tmp_path, True, 0, 20, wandb=cfg).close()  # step 0: a new run (overwritten, say)
    assert (tmp_path / WANDB_ID).read_text() != first


def test_wandb_settings_change_neither_the_fingerprint_nor_the_resume_check():
    plain = _pretrain_config()
    logged = _pretrain_config(
        "metrics.wandb.project=p", "metrics.wandb.tags=[a,b]", "metrics.wandb.mode=offline"
    )
    assert run_fingerprint(plain, "d", 1) == run_fingerprint(logged, "d", 1)
    refused, allowed = resume_changes(run_view(plain, "d", 1), run_view(logged, "d", 1))
    assert not refused and set(allowed) == {
        "metrics.wandb.project",
        "metrics.wandb.tags",
        "metrics.wandb.mode",
    }
    # A checkpoint header from before the section existed: the same run, resumable, no change at all.
    older = {k: v for k, v in plain.items() if k != "metrics"}
    assert run_fingerprint(older, "d", 1) == run_fingerprint(plain, "d", 1)
    assert resume_changes(run_view(older, "d", 1), run_view(plain, "d", 1)) == ({}, {})
    assert not resume_changes(run_view(older, "d", 1), run_view(logged, "d", 1))[0]


def test_a_wandb_project_without_wandb_installed_fails_early_saying_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    monkeypatch.delenv("WANDB_MODE", raising=False)
    with pytest.raises(ConfigError, match=r"metrics\.wandb\.project='p'.*pip install 'rnnpipe\[wandb\]'"):
        _pretrain_config("metrics.wandb.project=p")
    _pretrain_config("metrics.wandb.project=p", "metrics.wandb.mode=disabled")
    _pretrain_config()  # no project: wandb is not needed
    with pytest.raises(ConfigError, match=r"metrics\.wandb\.mode must be online or offline or disabled"):
        _pretrain_config("metrics.wandb.mode=cloud")


# --------------------------------------------------------------------------------- documented tags


def _documented(doc: str, section: str, column: str) -> dict[str, set[str]]:
    """The tags of the Markdown table(s) in ``section`` of ``doc``: {the row's ``column`` value:
    the backticked tags of its first cell}."""
    text = (REPO / "docs" / doc).read_text(encoding="utf-8")
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    out: dict[str, set[str]] = {}
    header: list[str] = []
    for line in body.splitlines():
        if not line.startswith("|"):
            header = []
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if not header:
            header = cells
        elif set(cells[0]) - set("-:") and header[0] == "tag" and column in header:
            out.setdefault(cells[header.index(column)], set()).update(re.findall(r"`([^`]+)`", cells[0]))
    return out


def test_docs_pretrain_lists_exactly_the_tags_the_loop_may_log():
    doc = _documented("pretrain.md", "Monitoring", "kind")
    assert doc == {
        "scalar": set(PRETRAIN_TAGS.scalars),
        "text": set(PRETRAIN_TAGS.texts),
        "hparams": set(PRETRAIN_TAGS.hparams.values()),
    }


def test_the_loop_logs_only_declared_tags(tmp_path):
    """Metrics refuses an undeclared tag on every rank; the loop's literal tags are declared, and
    its evaluation tags (split/metric, built from evaluate's result) too."""
    from rnnpipe.pipeline.engine.rank import RankContext
    from rnnpipe.pipeline.finetune.tasks import ArrayReader, LMText
    from rnnpipe.pipeline.models import LanguageModel, ModelConfig
    from rnnpipe.pipeline.train.evaluate import evaluate
    from rnnpipe.pipeline.train.report import report

    for enabled in (True, False):
        m = Metrics(tmp_path, enabled, 0, 1, jsonl=False)
        with pytest.raises(ValueError, match="'train/typo' is not declared"):
            m.scalars(1, {"train/typo": 1.0})
        with pytest.raises(ValueError, match="'sample' is not declared"):
            m.text(1, "sample", "x")
        m.close()
    source = "".join((REPO / "pipeline" / "train" / f).read_text() for f in ("loop.py", "report.py"))
    literal = set(re.findall(r'"((?:train|valid|test)/\w+)"', source))
    assert literal and literal <= set(PRETRAIN_TAGS.scalars)
    assert set(re.findall(r'metrics\.text\([^,]+, "(\w+)"', source)) <= set(PRETRAIN_TAGS.texts)

    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(n_layers=1, d_model=16, mlp_ratio=2.0), 256)
    reader = ArrayReader(LMText(torch.randint(0, 256, (200,)).numpy(), 200, 40))
    cfg = stage_config(load_config(PretrainJob, str(PRETRAIN), ["train.sample_tokens=0"]))
    m = Metrics(tmp_path, True, 0, 1, jsonl=False)
    for split in ("valid", "test"):
        result = evaluate(model, reader, RankContext.single(), 2, 16)
        logged = report(None, cfg, split, 1, result, m, 1, torch.device("cpu"), reader)
        assert set(logged) <= PRETRAIN_TAGS.scalars
    m.close()


def test_docs_finetune_lists_exactly_what_a_job_logs_and_the_view_shows(tmp_path):
    from rnnpipe.pipeline.finetune.job import METRICS, tensorboard_tags

    doc = _documented("finetune.md", "A job", "tasks")
    for kind in TaskKind:
        assert doc["all"] | doc[kind.value] == set(tensorboard_tags(kind).scalars), kind
    view = _documented("finetune.md", "Collect", "tasks")
    tags = {r["task"]: set(hparams_metrics(r)) for r in (CONLL, PTB)}
    assert {t.replace("<task>", "conll").replace("<metric>", "f1") for t in view["all"]} == tags["conll"]
    assert {t.replace("<task>", "ptb").replace("<metric>", "ppl") for t in view["all"] | view["lm"]} == tags[
        "ptb"
    ]
    assert set(METRICS) == set(TaskKind)


@pytest.mark.timeout(120)
def _tiny_tagging_job(tmp_path, **extra):
    """A real (tiny) CoNLL job on a random 1-layer backbone; returns its result."""
    from rnnpipe.pipeline.finetune.config import JobConfig, TaskConfig
    from rnnpipe.pipeline.finetune.job import run_job
    from rnnpipe.pipeline.models import LanguageModel, ModelConfig
    from rnnpipe.pipeline.models.pretrained import save_pretrained

    conll = data_file("conll2003")
    torch.manual_seed(0)
    lm = LanguageModel(ModelConfig(n_layers=1, d_model=16, mlp_ratio=2.0), 256)
    save_pretrained(
        tmp_path / "model", lm.state_dict(), to_dict(lm.cfg), {"kind": "bytes", "vocab_size": 256}
    )
    task = TaskConfig(
        kind=TaskKind.tagging,
        train=f"{conll}/train.txt",
        dev=f"{conll}/valid.txt",
        test=f"{conll}/test.txt",
        max_train=16,
        max_dev=8,
        max_test=8,
    )
    cfg = JobConfig(
        task="conll",
        task_config=task,
        pretrained=str(tmp_path / "model"),
        out_dir=str(tmp_path / "sweep" / "jobs" / "job"),
        max_steps=2,
        eval_every=2,
        batch_size=8,
        max_len=48,
        **extra,
    )
    return run_job(cfg)


def test_a_tiny_tagging_job_logs_exactly_its_declared_tags(tmp_path):
    """A real (tiny) CoNLL job: its event file holds exactly tensorboard_tags(tagging)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from rnnpipe.pipeline.finetune.job import tensorboard_tags

    result = _tiny_tagging_job(tmp_path)
    ea = EventAccumulator(str(tmp_path / "sweep" / "jobs" / "job" / "tensorboard"))
    ea.Reload()
    assert set(ea.Tags()["scalars"]) == set(tensorboard_tags(TaskKind.tagging).scalars)
    assert ea.Scalars("final/test_f1")[-1].value == pytest.approx(result["test"]["f1"])


@pytest.mark.timeout(120)
def test_a_finetune_job_logs_to_wandb_as_one_run_of_its_sweeps_group(offline, tmp_path):
    from rnnpipe.pipeline.finetune.job import tensorboard_tags
    from rnnpipe.pipeline.train.config import WandbConfig

    result = _tiny_tagging_job(tmp_path, wandb=WandbConfig(project="rnnpipe-test", mode="offline"))
    job_dir = tmp_path / "sweep" / "jobs" / "job"
    got = _offline_run(job_dir)
    assert got["run"].display_name == "job" and got["run"].run_group == "sweep"
    assert got["config"]["task"] == "conll" and not any(k.startswith("wandb.") for k in got["config"])
    logged = {k for step in got["history"].values() for k in step if not k.startswith("_")}
    assert logged <= set(tensorboard_tags(TaskKind.tagging).scalars) and "final/test_f1" in logged
    final = [h["final/test_f1"] for h in got["history"].values() if "final/test_f1" in h]
    assert final[-1] == pytest.approx(result["test"]["f1"])


# ------------------------------------------------------------------------------------ the table


def test_a_one_seed_row_shows_its_value_without_a_spread():
    two = [
        _result("sst2", "classification", "accuracy", {"accuracy": a}, None, seed=s)
        for s, a in enumerate((80, 84))
    ]
    one = _result("ptb", "lm", "ppl", {"ppl": 150.0}, {"ppl": 140.0, "bpb": 1.8})
    rows = {r["task"]: r for r in table([*two, one])}
    assert rows["sst2"]["dev"] == "82.00 ± 2.83" and rows["sst2"]["test"] == "—"
    assert (rows["ptb"]["dev"], rows["ptb"]["test"], rows["ptb"]["test_bpb"]) == ("150.00", "140.00", "1.80")
    md = markdown(list(rows.values()))
    assert "| ptb | pretrained | — | 1 | ppl | 150.00 | 140.00 | 1.80 |" in md and "± 0.00" not in md
