"""``rnnpipe collect DIR``: the ``result.json`` files under DIR as one table.

One row per (task, init, other hyper-parameters, backbone): mean ± sample standard deviation over
seeds of the task's main metric on dev and test (accuracy %, conlleval F1 %, or per-word perplexity;
for language modelling also test bits per byte); a row of one seed shows its value alone. Each row
names the backbone its jobs fine-tuned (the exported weights' sha256 and step), so results of
different pretrained models never share a row. Written as ``results.md``, ``results.csv`` and
``results.json`` (the rows, which results they came from and a fingerprint of them) in DIR, and to
TensorBoard's hparams view under ``DIR/tensorboard-hparams``: one session per job with the values
the table shows, as ``hparam/<task>/dev_<metric>``, ``hparam/<task>/test_<metric>`` (and for
language modelling ``hparam/<task>/test_bpb``), so that each task's metric has columns of its own.

Results of GLUE tasks (``glue`` in their task config) also make a second table, the GLUE score:
per (init, other hyper-parameters, backbone), the mean of the task scores over the GLUE tasks
run, each task's score as GLUE counts it (CoLA's MCC, SST-2's and RTE's accuracy, MRPC's mean of
F1 and accuracy, STS-B's mean of Pearson and Spearman: the job's main metric), naming the tasks it
covers. Its spread is over seeds, where every task ran the same seeds (each seed's score: the mean
over the tasks at that seed).
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rnnpipe.pipeline import fsio
from rnnpipe.pipeline.config import fingerprint
from rnnpipe.pipeline.errors import PipelineError
from rnnpipe.pipeline.provenance import describe_code, provenance

RESULT = "result.json"
GLUE_TASK_COUNT = 9  # CoLA, SST-2, MRPC, STS-B, QQP, MNLI, QNLI, RTE, WNLI
GLUE_NOTE = (
    "GLUE score: the mean of the task scores over the GLUE tasks run (CoLA: MCC; SST-2, RTE: "
    "accuracy; MRPC: mean of F1 and accuracy; STS-B: mean of Pearson and Spearman; all × 100)"
)


def find_results(root: str) -> list[dict[str, Any]]:
    """Every result.json under ``root`` (any depth), each with its directory under ``"dir"``."""
    fs, path = fsio.filesystem(fsio.absolute(root))
    files = sorted(fs.glob(path.rstrip("/") + "/**/" + RESULT))
    out = []
    for f in files:
        try:
            res = json.loads(fs.cat_file(f).decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise PipelineError(f"{f}: not a valid result.json ({e})") from e
        res["dir"] = f.rsplit("/", 1)[0]
        out.append(res)
    return out


def _fmt(values: list[float]) -> str:
    """``82.00 ± 2.00`` (mean ± sample standard deviation); one value alone (its spread is not
    known, not 0); ``—`` for none."""
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"


def table_values(res: dict[str, Any]) -> dict[str, float]:
    """What the table shows of one result: ``dev`` and ``test`` (the task's metric) and, for
    language modelling, ``test_bpb``; a split without labels (or without the metric) is left out."""
    metric, test = res["metric"], res.get("test") or {}
    out = {"dev": float(res["dev"][metric])}
    if metric in test:
        out["test"] = float(test[metric])
    if "bpb" in test:
        out["test_bpb"] = float(test["bpb"])
    return out


def _others(res: dict[str, Any]) -> str:
    hp = {k: v for k, v in res.get("hparams", {}).items() if k not in ("task", "init", "seed")}
    return ", ".join(f"{k}={v}" for k, v in sorted(hp.items())) or "—"


def backbone_label(res: dict[str, Any]) -> str:
    """``1a2b3c4d5e@200``: the first 10 hex digits of the backbone's sha256 and its step; an elmo
    result's adds its backward LM's (``1a2b3c4d5e@200+9f8e7d6c5b@300``), so that results of
    other backward LMs (or none) never share a row."""
    b = res.get("backbone") or {}
    label = f"{b['sha256'][:10]}@{b.get('step')}" if b.get("sha256") else "—"
    backward = res.get("backward") or {}
    if backward.get("sha256"):
        label += f"+{backward['sha256'][:10]}@{backward.get('step')}"
    return label


def results_fingerprint(results: Iterable[dict[str, Any]]) -> str:
    """What a table is made of: the fingerprint of each result, by job directory name."""
    return fingerprint({Path(r["dir"]).name: r.get("fingerprint") for r in results})


def table(results: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows: task, init, hparams, backbone, seeds, metric, dev and test mean ± std (and values),
    test bpb."""
    groups: dict[tuple[str, str, str, str], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["task"], r["init"], _others(r), backbone_label(r)), []).append(r)
    rows = []
    for (task, init, others, backbone), rs in sorted(groups.items()):
        metric = rs[0]["metric"]
        shown = [table_values(r) for r in rs]
        dev = [v["dev"] for v in shown]
        test = [v["test"] for v in shown if "test" in v]
        bpb = [v["test_bpb"] for v in shown if "test_bpb" in v]
        rows.append(
            {
                "task": task,
                "init": init,
                "hparams": others,
                "backbone": backbone,
                "seeds": len(rs),
                "metric": metric,
                "dev": _fmt(dev),
                "test": _fmt(test),
                "test_bpb": _fmt(bpb) if bpb else "—",
                "dev_mean": statistics.fmean(dev),
                "test_mean": statistics.fmean(test) if test else None,
                "steps": round(statistics.fmean(r["steps"] for r in rs)),
                "wall_s": round(sum(r["wall_s"] for r in rs), 1),
            }
        )
    return rows


def _scores(rs: list[dict[str, Any]], split: str) -> dict[int, float]:
    """{seed: the task score on ``split``} of one task's results (a seed's results averaged)."""
    by_seed: dict[int, list[float]] = {}
    for r in rs:
        value = table_values(r).get(split)
        if value is not None:
            by_seed.setdefault(int(r["seed"]), []).append(value)
    return {seed: statistics.fmean(v) for seed, v in by_seed.items()}


def _glue_split(by_task: dict[str, list[dict[str, Any]]], split: str) -> tuple[str, float | None]:
    """(mean ± std over seeds, mean) of the GLUE score on ``split``; ``—`` and None unless every
    task has a score there."""
    scores = {task: _scores(rs, split) for task, rs in by_task.items()}
    if not all(scores.values()):
        return "—", None
    mean = statistics.fmean(statistics.fmean(s.values()) for s in scores.values())
    seeds = [set(s) for s in scores.values()]
    if all(x == seeds[0] for x in seeds):  # one score per seed: its spread is the seeds'
        per_seed = [statistics.fmean(s[seed] for s in scores.values()) for seed in sorted(seeds[0])]
        return _fmt(per_seed), mean
    return _fmt([mean]), mean


def glue_table(results: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """GLUE score rows: init, hparams, backbone, the GLUE tasks covered, seeds, dev and test (mean
    ± std over seeds), their means and each task's mean dev score."""
    groups: dict[tuple[str, str, str], dict[str, list[dict[str, Any]]]] = {}
    for r in results:
        if r.get("glue"):
            key = (r["init"], _others(r), backbone_label(r))
            groups.setdefault(key, {}).setdefault(r["glue"], []).append(r)
    rows = []
    for (init, others, backbone), by_task in sorted(groups.items()):
        by_task = dict(sorted(by_task.items()))
        dev, dev_mean = _glue_split(by_task, "dev")
        test, test_mean = _glue_split(by_task, "test")
        rows.append(
            {
                "init": init,
                "hparams": others,
                "backbone": backbone,
                "tasks": ", ".join(by_task),
                "n_tasks": len(by_task),
                "seeds": len({r["seed"] for rs in by_task.values() for r in rs}),
                "dev": dev,
                "test": test,
                "dev_mean": dev_mean,
                "test_mean": test_mean,
                "task_dev": {t: statistics.fmean(_scores(rs, "dev").values()) for t, rs in by_task.items()},
            }
        )
    return rows


def glue_markdown(rows: list[dict[str, Any]]) -> str:
    """The GLUE score table, after a line saying how it is made."""
    lines = [
        GLUE_NOTE + ".",
        "",
        "| init | hyper-parameters | GLUE tasks covered | seeds | dev | test | backbone |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        covers = f"{r['tasks']} ({r['n_tasks']} of GLUE's {GLUE_TASK_COUNT})"
        lines.append(
            f"| {r['init']} | {r['hparams']} | {covers} | {r['seeds']} | {r['dev']} | {r['test']} | "
            f"{r['backbone']} |"
        )
    return "\n".join(lines) + "\n"


def markdown(rows: list[dict[str, Any]]) -> str:
    head = (
        "| task | init | hyper-parameters | seeds | metric | dev | test | test bits/byte | steps | wall s "
        "| backbone |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['task']} | {r['init']} | {r['hparams']} | {r['seeds']} | {r['metric']} | {r['dev']} | "
            f"{r['test']} | {r['test_bpb']} | {r['steps']} | {r['wall_s']} | {r['backbone']} |"
        )
    return "\n".join(lines) + "\n"


def hparams_metrics(res: dict[str, Any]) -> dict[str, float]:
    """One result's metrics in the hparams view: the values the table shows, each task's under
    tags of its own (``hparam/conll/dev_f1``), so no column mixes two tasks' metrics."""
    task, metric = res["task"], res["metric"]
    names = {"dev": f"dev_{metric}", "test": f"test_{metric}", "test_bpb": "test_bpb"}
    return {f"hparam/{task}/{names[k]}": v for k, v in table_values(res).items()}


def _hparams_view(root: str, results: list[dict[str, Any]]) -> None:
    """``DIR/tensorboard-hparams/<job>``: one hparams session per job (see
    :func:`rnnpipe.pipeline.engine.metrics.write_session`), rebuilt from the results every time."""
    from rnnpipe.pipeline.engine.metrics import write_session

    base = fsio.join(fsio.absolute(root), "tensorboard-hparams")
    if fsio.exists(base):
        fsio.remove(base, recursive=True)  # a job no longer in the results leaves no session behind
    for r in results:
        hp = dict(r["hparams"])
        hp.update(task=r["task"], init=r["init"], seed=r["seed"], backbone=backbone_label(r))
        if r.get("provenance"):
            hp["code"] = describe_code(r["provenance"]["code"])
        write_session(Path(base) / Path(r["dir"]).name, hp, hparams_metrics(r))


def collect(root: str, results: list[dict[str, Any]] | None = None) -> tuple[str, list[dict[str, Any]]]:
    """Aggregate ``results`` (each with its ``"dir"``; default: every result.json under DIR) into
    DIR's results.md, results.csv, results.json and the hparams view; returns (the Markdown table
    and, when GLUE tasks ran, the GLUE score table; the task rows)."""
    results = find_results(root) if results is None else results
    if not results:
        raise PipelineError(f"{root}: no {RESULT} files under it (has the sweep run?)")
    rows = table(results)
    md = markdown(rows)
    glue_rows = glue_table(results)
    if glue_rows:
        md += "\n" + glue_markdown(glue_rows)
    base = fsio.absolute(root)
    fsio.write_text_atomic(fsio.join(base, "results.md"), md)
    buf = io.StringIO()
    keys = [
        "task",
        "init",
        "hparams",
        "backbone",
        "seeds",
        "metric",
        "dev",
        "test",
        "test_bpb",
        "dev_mean",
        "test_mean",
        "steps",
        "wall_s",
    ]
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    fsio.write_text_atomic(fsio.join(base, "results.csv"), buf.getvalue())
    record = {
        "fingerprint": results_fingerprint(results),
        "results": [
            {"dir": r["dir"], "fingerprint": r.get("fingerprint"), "backbone": r.get("backbone")}
            for r in results
        ],
        "rows": rows,
        "glue": glue_rows,
        "provenance": provenance(),
    }
    fsio.write_text_atomic(fsio.join(base, "results.json"), json.dumps(record, indent=1) + "\n")
    if fsio.is_local(base):
        _hparams_view(root, results)
    return md, rows
