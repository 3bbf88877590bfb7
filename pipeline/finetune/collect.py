"""``rnnpipe collect DIR``: the ``result.json`` files under DIR as one table.

One row per (task, init, other hyper-parameters): mean ± sample standard deviation over seeds of
the task's main metric on dev and test (accuracy %, conlleval F1 %, or per-word perplexity; for
language modelling also test bits per byte). Written as ``results.md`` and ``results.csv`` in DIR,
and to TensorBoard's hparams view under ``DIR/tensorboard-hparams`` (one run per job).
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
from pipeline.errors import PipelineError

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


def table(results: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows: task, init, hparams, seeds, metric, dev and test mean ± std (and values), test bpb."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["task"], r["init"], _others(r)), []).append(r)
    rows = []
    for (task, init, others), rs in sorted(groups.items()):
        metric = rs[0]["metric"]
        dev = [r["dev"][metric] for r in rs]
        test = [r["test"][metric] for r in rs if r.get("test")]
        bpb = [r["test"]["bpb"] for r in rs if r.get("test") and "bpb" in r["test"]]
        rows.append(
            {
                "task": task,
                "init": init,
                "hparams": others,
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
        "| task | init | hyper-parameters | seeds | metric | dev | test | test bits/byte | steps | wall s |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['task']} | {r['init']} | {r['hparams']} | {r['seeds']} | {r['metric']} | {r['dev']} | "
            f"{r['test']} | {r['test_bpb']} | {r['steps']} | {r['wall_s']} |"
        )
    return "\n".join(lines) + "\n"


def _hparams_view(root: str, results: list[dict[str, Any]]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    base = fsio.join(fsio.absolute(root), "tensorboard-hparams")
    if fsio.exists(base):
        fsio.remove(base, recursive=True)  # derived from the results: rebuilt every time
    for r in results:
        hp = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in r["hparams"].items()}
        hp.update(task=r["task"], init=r["init"], seed=r["seed"])
        metrics = {f"hparam/dev_{k}": float(v) for k, v in r["dev"].items()}
        metrics.update({f"hparam/test_{k}": float(v) for k, v in (r.get("test") or {}).items()})
        with SummaryWriter(str(Path(base) / Path(r["dir"]).name)) as w:
            w.add_hparams(hp, metrics, run_name=".")


def collect(root: str) -> tuple[str, list[dict[str, Any]]]:
    """Aggregate DIR's results; writes results.md, results.csv and the hparams view; returns
    (the Markdown table, its rows)."""
    results = find_results(root)
    if not results:
        raise PipelineError(f"{root}: no {RESULT} files under it (has the sweep run?)")
    rows = table(results)
    md = markdown(rows)
    fsio.write_text_atomic(fsio.join(fsio.absolute(root), "results.md"), md)
    buf = io.StringIO()
    keys = [
        "task",
        "init",
        "hparams",
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
    fsio.write_text_atomic(fsio.join(fsio.absolute(root), "results.csv"), buf.getvalue())
    if fsio.is_local(fsio.absolute(root)):
        _hparams_view(root, results)
    return md, rows
