"""``rnnpipe collect DIR``: the ``result.json`` files under DIR as one table.

One row per (task, init, other hyper-parameters, backbone): mean ± sample standard deviation over
seeds of the task's main metric on dev and test (accuracy %, conlleval F1 %, or per-word perplexity;
for language modelling also test bits per byte). Each row names the backbone its jobs fine-tuned
(the exported weights' sha256 and step), so results of different pretrained models never share a
row. Written as ``results.md``, ``results.csv`` and ``results.json`` (the rows, which results they
came from and a fingerprint of them) in DIR, and to TensorBoard's hparams view under
``DIR/tensorboard-hparams`` (one run per job).
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pipeline import fsio
from pipeline.config import fingerprint
from pipeline.errors import PipelineError
from pipeline.provenance import describe_code, provenance

RESULT = "result.json"


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
    if not values:
        return "—"
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.2f} ± {std:.2f}"


def _others(res: dict[str, Any]) -> str:
    hp = {k: v for k, v in res.get("hparams", {}).items() if k not in ("task", "init", "seed")}
    return ", ".join(f"{k}={v}" for k, v in sorted(hp.items())) or "—"


def backbone_label(res: dict[str, Any]) -> str:
    """``1a2b3c4d5e@200``: the first 10 hex digits of the backbone's sha256 and its step."""
    b = res.get("backbone") or {}
    return f"{b['sha256'][:10]}@{b.get('step')}" if b.get("sha256") else "—"


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
        dev = [r["dev"][metric] for r in rs]
        test = [r["test"][metric] for r in rs if r.get("test")]
        bpb = [r["test"]["bpb"] for r in rs if r.get("test") and "bpb" in r["test"]]
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


def _hparams_view(root: str, results: list[dict[str, Any]]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    base = fsio.join(fsio.absolute(root), "tensorboard-hparams")
    if fsio.exists(base):
        fsio.remove(base, recursive=True)  # derived from the results: rebuilt every time
    for r in results:
        hp = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in r["hparams"].items()}
        hp.update(task=r["task"], init=r["init"], seed=r["seed"], backbone=backbone_label(r))
        if r.get("provenance"):
            hp["code"] = describe_code(r["provenance"]["code"])
        metrics = {f"hparam/dev_{k}": float(v) for k, v in r["dev"].items()}
        metrics.update({f"hparam/test_{k}": float(v) for k, v in (r.get("test") or {}).items()})
        with SummaryWriter(str(Path(base) / Path(r["dir"]).name)) as w:
            w.add_hparams(hp, metrics, run_name=".")


def collect(root: str, results: list[dict[str, Any]] | None = None) -> tuple[str, list[dict[str, Any]]]:
    """Aggregate ``results`` (each with its ``"dir"``; default: every result.json under DIR) into
    DIR's results.md, results.csv, results.json and the hparams view; returns (the Markdown table,
    its rows)."""
    results = find_results(root) if results is None else results
    if not results:
        raise PipelineError(f"{root}: no {RESULT} files under it (has the sweep run?)")
    rows = table(results)
    md = markdown(rows)
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
        "provenance": provenance(),
    }
    fsio.write_text_atomic(fsio.join(base, "results.json"), json.dumps(record, indent=1) + "\n")
    if fsio.is_local(base):
        _hparams_view(root, results)
    return md, rows
