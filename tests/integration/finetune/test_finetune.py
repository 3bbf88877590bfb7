"""Fine-tuning: task readers on the real files, conlleval, alignment, heads, jobs, sweeps, collect."""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from harness import CLI, REPO, data_file

from rnnpipe.launch.cli import main
from rnnpipe.pipeline.config import to_dict
from rnnpipe.pipeline.data.tokenizers import (
    ByteTokenizer,
    CharTokenizer,
    SentencePieceTokenizer,
    train_sentencepiece,
)
from rnnpipe.pipeline.errors import PipelineError
from rnnpipe.pipeline.finetune import tasks
from rnnpipe.pipeline.finetune.collect import collect, table
from rnnpipe.pipeline.finetune.config import Features, FinetuneOptim, HeadConfig, Pooling, TaskKind
from rnnpipe.pipeline.finetune.conlleval import conlleval
from rnnpipe.pipeline.finetune.model import FinetuneModel, parameter_groups, reverse_padded
from rnnpipe.pipeline.models import LanguageModel, MixerKind, ModelConfig
from rnnpipe.pipeline.models.pretrained import save_pretrained

# ------------------------------------------------------------------------------ readers, real files


def test_sst2_reader_counts_rows_and_labels():
    texts, labels = tasks.read_tsv(str(data_file("sst2/train.tsv")), "sentence", "label")
    assert len(texts) == len(labels) == 67_349
    assert set(labels) == {"0", "1"}
    assert texts[0] == "hide new secretions from the parental units"
    dev_texts, dev_labels = tasks.read_tsv(str(data_file("sst2/dev.tsv")), "sentence", "label")
    assert len(dev_texts) == 872 and len(dev_labels) == 872
    test_texts, test_labels = tasks.read_tsv(str(data_file("sst2/test.tsv")), "sentence", "label")
    assert len(test_texts) == 1_821 and test_labels is None  # GLUE's test set is unlabelled


def test_conll_reader_counts_sentences_and_keeps_tags():
    counts = {}
    for split in ("train", "valid", "test"):
        sents = tasks.read_conll(str(data_file(f"conll2003/{split}.txt")))
        counts[split] = len(sents)
        assert all(len(w) == len(t) for w, t in sents)
    assert counts == {"train": 14_041, "valid": 3_250, "test": 3_453}
    words, tags = tasks.read_conll(str(data_file("conll2003/train.txt")))[0]
    assert words[:3] == ["EU", "rejects", "German"] and tags[:3] == ["B-ORG", "O", "B-MISC"]
    tagset = {t for _, ts in tasks.read_conll(str(data_file("conll2003/train.txt"))) for t in ts}
    assert {t[2:] for t in tagset if t != "O"} == {"PER", "ORG", "LOC", "MISC"}


def test_ptb_reader_counts_words_as_mikolov_does():
    # Mikolov's PTB: 929k / 73k / 82k tokens, counting one <eos> per line.
    words = {}
    for split in ("train", "valid", "test"):
        lines = tasks.read_lm_lines(str(data_file(f"ptb/ptb.{split}.txt.gz")))
        words[split] = tasks.encode_lm(ByteTokenizer(), lines).words
    assert words == {"train": 929_589, "valid": 73_760, "test": 82_430}


def test_readers_name_the_file_and_line_of_bad_input(tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("sentence\tlabel\ngood one\t1\ntoo\tmany\tfields\n")
    with pytest.raises(PipelineError, match=r"bad\.tsv:3: 3 tab-separated fields"):
        tasks.read_tsv(str(bad), "sentence", "label")
    with pytest.raises(PipelineError, match=r"no column 'text'"):
        tasks.read_tsv(str(bad), "text", "label")
    conll = tmp_path / "bad.conll"
    conll.write_text("EU NNP B-NP B-ORG\nrejects VBZ B-VP X-ORG\n")
    with pytest.raises(PipelineError, match=r"bad\.conll:2: tag 'X-ORG'"):
        tasks.read_conll(str(conll))
    with pytest.raises(PipelineError, match="no such file"):
        tasks.read_lm_lines(str(tmp_path / "absent.txt"))


# ------------------------------------------------------------------------------------- conlleval


def test_conlleval_counts_chunks_and_tokens():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    guess = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "O"]]
    s = conlleval(gold, guess)
    # chunks: gold PER, LOC, ORG; guessed PER, ORG, ORG; correct PER and the second ORG.
    assert (s.found_correct, s.found_guessed, s.correct_chunks, s.tokens) == (3, 3, 2, 6)
    assert s.precision == pytest.approx(200 / 3) and s.recall == pytest.approx(200 / 3)
    assert s.f1 == pytest.approx(200 / 3) and s.accuracy == pytest.approx(500 / 6)
    assert s.per_type["LOC"]["f1"] == 0.0 and s.per_type["PER"]["f1"] == 100.0
    assert s.per_type["ORG"]["precision"] == 50.0 and s.per_type["ORG"]["recall"] == 100.0


def test_conlleval_reads_iob1_like_the_script():
    # IOB1: I-PER I-PER B-PER is two chunks (B only where two chunks of one type touch).
    gold_iob1 = [["I-PER", "I-PER", "B-PER", "O", "I-LOC"]]
    assert tasks.to_iob2(gold_iob1[0]) == ["B-PER", "I-PER", "B-PER", "O", "B-LOC"]
    right = [["B-PER", "I-PER", "B-PER", "O", "B-LOC"]]
    merged = [["B-PER", "I-PER", "I-PER", "O", "B-LOC"]]
    assert conlleval(gold_iob1, right).f1 == 100.0
    s = conlleval(gold_iob1, merged)  # one long PER chunk is neither of the two gold ones
    assert (s.found_correct, s.found_guessed, s.correct_chunks) == (3, 2, 1)
    assert s.f1 == pytest.approx(2 * 50 * (100 / 3) / (50 + 100 / 3))
    for guess in (right, merged, [["O", "I-PER", "I-PER", "O", "O"]]):  # IOB1 and IOB2 gold: same chunks
        a, b = conlleval(gold_iob1, guess), conlleval([tasks.to_iob2(gold_iob1[0])], guess)
        assert (a.precision, a.recall, a.f1, a.per_type) == (b.precision, b.recall, b.f1, b.per_type)


def test_conlleval_ends_chunks_at_sentence_boundaries_and_type_changes():
    gold = [["O", "I-PER"], ["I-PER", "O"]]  # two chunks: the boundary splits them
    assert conlleval(gold, gold).found_correct == 2 and conlleval(gold, gold).f1 == 100.0
    s = conlleval([["B-PER", "I-PER"]], [["B-PER", "I-LOC"]])  # a type change starts a chunk
    assert (s.found_correct, s.found_guessed, s.correct_chunks) == (1, 2, 0)
    assert s.f1 == 0.0
    assert conlleval([["O", "O"]], [["O", "O"]]).f1 == 0.0  # no chunks: 0, as the script prints


# ------------------------------------------------------------------------------------- alignment


def test_word_labels_go_to_the_token_holding_the_words_first_byte():
    words = ["Zürich", "is", "big"]
    ids, first = tasks.encode_words(ByteTokenizer(), words, 256)
    assert len(ids) == len("Zürich is big".encode()) and first.tolist() == [0, 8, 11]
    char = CharTokenizer(sorted(set("Zürich is big")))
    ids, first = tasks.encode_words(char, words, 256)
    assert first.tolist() == [0, 7, 10]
    ids, first = tasks.encode_words(ByteTokenizer(), words, 9)  # truncated: 'big' is cut off
    assert len(ids) == 9 and first.tolist() == [0, 8]


def test_word_alignment_with_sentencepiece_pieces():
    text = [" ".join(w) for w, _ in tasks.read_conll(str(data_file("conll2003/train.txt")), limit=2000)]
    sp = SentencePieceTokenizer(
        train_sentencepiece(
            text, vocab_size=500, model_type="unigram", byte_fallback=True, character_coverage=1.0, threads=1
        )
    )
    for words, _ in tasks.read_conll(str(data_file("conll2003/valid.txt")), limit=50):
        ids, first = tasks.encode_words(sp, words, 10_000)
        assert len(first) == len(words)
        # decoding the pieces from each word's first token on starts with that word (or its space)
        for w, f in zip(words, first, strict=True):
            rest = sp.decode(ids[f:]).decode("utf-8")
            assert rest.lstrip(" ").startswith(w) or rest.startswith(w), (w, rest[:20])


# ----------------------------------------------------------------------------------------- heads


def _tiny_lm(seed: int = 0, mixer: MixerKind = MixerKind.lrn) -> LanguageModel:
    torch.manual_seed(seed)
    return LanguageModel(ModelConfig(mixer=mixer, n_layers=2, d_model=32, mlp_ratio=2.0, n_heads=4), 256)


def test_an_export_whose_weights_were_swapped_is_not_taken_for_the_one_recorded(tmp_path):
    from safetensors.torch import load_file, save_file

    from rnnpipe.pipeline.models.exported import backbone_identity

    export = make_export(tmp_path / "model")
    recorded = backbone_identity(str(export))
    assert recorded["sha256"] == json.loads((export / "rnnpipe.json").read_text())["source"]["weights_sha256"]
    weights = load_file(str(export / "model.safetensors"))
    weights["embed.weight"] = weights["embed.weight"] + 1.0
    save_file(weights, str(export / "model.safetensors"))  # same size, other bytes
    swapped = backbone_identity(str(export))
    assert swapped["sha256"] != recorded["sha256"]
    assert swapped["sha256"] == hashlib.sha256((export / "model.safetensors").read_bytes()).hexdigest()


def test_reverse_padded_reverses_within_each_length():
    x = torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0]])
    r = reverse_padded(x, torch.tensor([3, 2]))
    assert r.tolist() == [[3, 2, 1, 0], [5, 4, 0, 0]]
    assert torch.equal(reverse_padded(r, torch.tensor([3, 2])), x)


@pytest.mark.parametrize("pooling", list(Pooling))
@pytest.mark.parametrize("features", list(Features))
def test_heads_ignore_padding(pooling, features):
    def model_for(kind: TaskKind, n: int) -> FinetuneModel:  # elmo: a backward LM beside the forward one
        backward = _tiny_lm(1) if features is Features.elmo else None
        return FinetuneModel(_tiny_lm(), kind, n, HeadConfig(pooling, features, 0.0), backward).eval()

    model = model_for(TaskKind.classification, 3)
    seqs = [np.array([5, 6, 7, 8, 9]), np.array([10, 11])]
    ids, lengths = tasks.pad(seqs, value=99)
    batch = model(torch.from_numpy(ids), torch.from_numpy(lengths))
    for i, s in enumerate(seqs):
        alone = model(torch.from_numpy(s)[None], torch.tensor([len(s)]))
        torch.testing.assert_close(batch[i], alone[0], rtol=1e-5, atol=1e-5)
    tagger = model_for(TaskKind.tagging, 4)
    out = tagger(torch.from_numpy(ids), torch.from_numpy(lengths))
    alone = tagger(torch.from_numpy(seqs[1])[None], torch.tensor([2]))
    torch.testing.assert_close(out[1, :2], alone[0], rtol=1e-5, atol=1e-5)


def test_layerwise_learning_rate_decay():
    model = FinetuneModel(_tiny_lm(), TaskKind.classification, 2, HeadConfig())
    groups = parameter_groups(model, FinetuneOptim(lr=1.0, layer_decay=0.5, weight_decay=0.1))
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    bb = model.backbone
    assert lr_of[id(model.head.weight)] == 1.0
    assert lr_of[id(bb.norm.weight)] == 0.5
    assert lr_of[id(bb.blocks[1].mixer.proj.weight)] == 0.5
    assert lr_of[id(bb.blocks[0].mixer.proj.weight)] == 0.25
    assert lr_of[id(bb.embed.weight)] == 0.125
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert all(g["weight_decay"] == 0.0 for g in groups if g["params"][0].dim() < 2)


# ------------------------------------------------------------------------------- jobs and sweeps


def make_export(path: Path, seed: int = 0) -> Path:
    """A tiny byte-level LRN LM written as an ``rnnpipe export`` directory."""
    lm = _tiny_lm(seed)
    save_pretrained(path, lm.state_dict(), to_dict(lm.cfg), {"kind": "bytes", "vocab_size": 256})
    return path


def sweep_yaml(tmp_path: Path, grid: dict, job: dict | None = None, **tasks_extra) -> Path:
    sst2, conll, ptb = data_file("sst2"), data_file("conll2003"), data_file("ptb")
    cfg = {
        "out_dir": str(tmp_path / "sweep"),
        "pretrained": str(make_export(tmp_path / "model")),
        "tasks": {
            "sst2": {
                "kind": "classification",
                "train": f"{sst2}/train.tsv",
                "dev": f"{sst2}/dev.tsv",
                "test": f"{sst2}/test.tsv",
                "max_train": 64,
                "max_dev": 32,
            },
            "conll": {
                "kind": "tagging",
                "train": f"{conll}/train.txt",
                "dev": f"{conll}/valid.txt",
                "test": f"{conll}/test.txt",
                "max_train": 48,
                "max_dev": 16,
                "max_test": 16,
            },
            "ptb": {
                "kind": "lm",
                "train": f"{ptb}/ptb.train.txt.gz",
                "dev": f"{ptb}/ptb.valid.txt.gz",
                "test": f"{ptb}/ptb.test.txt.gz",
                "max_train": 100,
                "max_dev": 20,
                "max_test": 20,
            },
            **tasks_extra,
        },
        "job": {
            "max_steps": 8,
            "eval_every": 4,
            "batch_size": 8,
            "max_len": 64,
            "seq_len": 32,
            "optim": {"warmup_steps": 2},
            **(job or {}),
        },
        "grid": grid,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def test_sweep_runs_every_job_writes_the_table_and_skips_them_on_rerun(tmp_path, capsys):
    grid = {"task": ["sst2", "conll"], "init": ["pretrained", "scratch"], "seed": [0, 1]}
    cfg = sweep_yaml(tmp_path, grid)
    assert main(["-q", "finetune", str(cfg), "--executor", "local", "executor.workers=2"]) == 0
    out = capsys.readouterr().out
    jobs = sorted((tmp_path / "sweep" / "jobs").iterdir())
    assert [j.name for j in jobs] == sorted(
        f"{t}-{i}-seed{s}" for t in ("sst2", "conll") for i in ("pretrained", "scratch") for s in (0, 1)
    )
    results = [json.loads((j / "result.json").read_text()) for j in jobs]
    assert all(not (j / "checkpoint.pt").exists() for j in jobs)
    for r in results:
        assert r["steps"] == 8 and r["dev"][r["metric"]] >= 0
        assert (r["test"] is None) == (r["task"] == "sst2")  # SST-2's test file is unlabelled
        assert r["config"]["task_config"]["max_train"] in (64, 48)
    # the table: one row per task × init, two seeds each, the mean of the two dev values
    md = (tmp_path / "sweep" / "results.md").read_text()
    assert md in out and (tmp_path / "sweep" / "results.csv").exists()
    rows = table(results)
    assert len(rows) == 4 and all(r["seeds"] == 2 for r in rows)
    row = next(r for r in rows if r["task"] == "conll" and r["init"] == "scratch")
    f1s = [r["dev"]["f1"] for r in results if r["task"] == "conll" and r["init"] == "scratch"]
    assert row["dev_mean"] == pytest.approx(sum(f1s) / 2)
    # a re-run does nothing and leaves the results as they were
    stamps = [(j / "result.json").stat().st_mtime_ns for j in jobs]
    assert main(["-q", "finetune", str(cfg), "--executor", "local"]) == 0
    assert "0 job(s) run, 8 already complete" in capsys.readouterr().out
    assert stamps == [(j / "result.json").stat().st_mtime_ns for j in jobs]
    # one task's key changed: exactly its jobs run again, and the others keep their results
    args = ["-q", "finetune", str(cfg), "--executor", "local", "executor.workers=2", "tasks.sst2.max_dev=16"]
    assert main(args) == 0
    assert "4 job(s) run, 4 already complete" in capsys.readouterr().out
    for j, stamp in zip(jobs, stamps, strict=True):
        assert (stamp == (j / "result.json").stat().st_mtime_ns) == j.name.startswith("conll"), j.name
    assert json.loads((jobs[-1] / "result.json").read_text())["config"]["task_config"]["max_dev"] == 16


def test_a_failed_job_does_not_stop_the_others(tmp_path, capsys):
    bad = tmp_path / "bad.tsv"
    bad.write_text("sentence\tlabel\ngood one\t1\ntoo\tmany\tfields\n")
    broken = {"kind": "classification", "train": str(bad), "dev": str(bad)}
    cfg = sweep_yaml(tmp_path, {"task": ["broken", "ptb"]}, broken=broken)
    assert main(["-q", "finetune", str(cfg), "--executor", "inline"]) == 1
    err = capsys.readouterr().err
    assert "1 of 2 finetune task(s) failed" in err and "- broken:" in err
    assert "bad.tsv:3: 3 tab-separated fields" in err and "log tail" in err
    assert (tmp_path / "sweep" / "jobs" / "ptb" / "result.json").exists()
    assert not (tmp_path / "sweep" / "jobs" / "broken" / "result.json").exists()


def test_a_missing_task_file_fails_before_any_job(tmp_path, capsys):
    missing = {"train": str(tmp_path / "missing.tsv"), "dev": str(tmp_path / "m.tsv")}
    cfg = sweep_yaml(tmp_path, {"task": ["broken", "ptb"]}, broken={"kind": "classification", **missing})
    assert main(["-q", "finetune", str(cfg), "--executor", "inline"]) == 2
    assert f"tasks.broken.train={tmp_path / 'missing.tsv'}: no such file" in capsys.readouterr().err
    assert not (tmp_path / "sweep" / "jobs").exists()


def test_bad_grid_key_fails_before_any_job(tmp_path, capsys):
    cfg = sweep_yaml(tmp_path, {"task": ["sst2"], "optim.lrr": [0.1]})
    assert main(["-q", "finetune", str(cfg), "--executor", "inline"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'optim.lrr'" in err and "did you mean 'lr'" in err
    assert not (tmp_path / "sweep" / "jobs").exists()


def test_frozen_backbone_keeps_pretrained_weights(tmp_path):
    cfg = sweep_yaml(tmp_path, {"task": ["sst2"]}, job={"optim": {"freeze_steps": -1}, "save_model": True})
    assert main(["-q", "finetune", str(cfg), "--executor", "inline"]) == 0
    saved = torch.load(tmp_path / "sweep" / "jobs" / "sst2" / "model.pt", weights_only=True)
    lm = _tiny_lm()
    for k, v in lm.state_dict().items():
        assert torch.equal(saved[f"backbone.{k}"], v), k
    assert not torch.equal(saved["head.weight"], torch.zeros_like(saved["head.weight"]))


def _run_cli(args: list[str], env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([*CLI, "-q", *args], cwd=REPO, env={**os.environ, **(env or {})})


def test_a_killed_job_resumes_and_ends_as_an_uninterrupted_one(tmp_path):
    grid = {"task": ["conll"], "init": ["pretrained"], "seed": [3]}
    job = {"max_steps": 12, "eval_every": 3, "head": {"dropout": 0.2}}
    a = tmp_path / "a"
    b = tmp_path / "b"
    a.mkdir()
    b.mkdir()
    straight = _run_cli(["finetune", str(sweep_yaml(a, grid, job)), "--executor", "inline"])
    assert straight.wait(timeout=300) == 0
    cfg = sweep_yaml(b, grid, job)
    proc = _run_cli(["finetune", str(cfg), "--executor", "inline"], {"RNNPIPE_TEST_STEP_DELAY": "0.5"})
    ckpt = b / "sweep" / "jobs" / "conll-pretrained-seed3" / "checkpoint.pt"
    deadline = time.time() + 240
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert ckpt.exists(), "no checkpoint was written"
    time.sleep(1.0)  # kill it between two checkpoints
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (ckpt.parent / "result.json").exists()
    assert _run_cli(["finetune", str(cfg), "--executor", "inline"]).wait(timeout=300) == 0
    log = (ckpt.parent / "log.txt").read_text()
    assert "resumed" in log
    want = json.loads((a / "sweep" / "jobs" / ckpt.parent.name / "result.json").read_text())
    got = json.loads((ckpt.parent / "result.json").read_text())
    assert got["dev"] == want["dev"] and got["test"] == want["test"]
    assert got["best_step"] == want["best_step"] and got["steps"] == want["steps"] == 12


def test_lm_task_reports_word_perplexity_and_bits_per_byte(tmp_path):
    cfg = sweep_yaml(tmp_path, {"task": ["ptb"], "init": ["scratch"]})
    assert main(["-q", "finetune", str(cfg), "--executor", "inline"]) == 0
    r = json.loads((tmp_path / "sweep" / "jobs" / "ptb-scratch" / "result.json").read_text())
    lines = tasks.read_lm_lines(str(data_file("ptb/ptb.test.txt.gz")), 20)
    text = tasks.encode_lm(ByteTokenizer(), lines)
    # per-word perplexity and bits per byte are the same nats, counted per word or per byte
    nats = r["test"]["bpb"] * math.log(2) * text.bytes
    assert r["test"]["ppl"] == pytest.approx(math.exp(nats / text.words), rel=1e-6)
    assert r["test"]["loss"] == pytest.approx(nats / text.bytes, rel=1e-6)  # bytes: one token each


def test_collect_aggregates_mean_and_std_over_seeds_of_one_backbone(tmp_path, capsys):
    a, b = "a" * 64, "b" * 64
    for seed, (acc, sha) in enumerate([(80.0, a), (82.0, a), (84.0, a), (50.0, b)]):
        d = tmp_path / "jobs" / f"sst2-pretrained-seed{seed}"
        d.mkdir(parents=True)
        res = {
            "task": "sst2",
            "init": "pretrained",
            "seed": seed,
            "metric": "accuracy",
            "hparams": {"task": "sst2", "init": "pretrained", "seed": seed, "optim.lr": 0.001},
            "dev": {"accuracy": acc},
            "test": None,
            "steps": 10,
            "wall_s": 1.0,
            "backbone": {"sha256": sha, "step": 200 if sha == a else 400},
            "fingerprint": f"{seed}" * 64,
        }
        (d / "result.json").write_text(json.dumps(res))
    assert main(["collect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    # the seeds of one backbone are one row; another backbone's result is a row of its own
    assert "| sst2 | pretrained | optim.lr=0.001 | 3 | accuracy | 82.00 ± 2.00 | — |" in out
    assert out.count("| sst2 | pretrained |") == 2
    assert "| 10 | 3.0 | aaaaaaaaaa@200 |" in out
    assert "| 50.00 | — | — | 10 | 1.0 | bbbbbbbbbb@400 |" in out  # one seed: no spread to show
    csv_rows = (tmp_path / "results.csv").read_text().splitlines()
    assert csv_rows[1].startswith("sst2,pretrained,optim.lr=0.001,aaaaaaaaaa@200,3,")
    recorded = json.loads((tmp_path / "results.json").read_text())
    assert len(recorded["results"]) == 4 and len(recorded["fingerprint"]) == 64
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = sorted((tmp_path / "tensorboard-hparams").iterdir())
    assert len(runs) == 4
    ea = EventAccumulator(str(runs[0]))
    ea.Reload()
    assert ea.PluginTagToContent("hparams")  # the hparams plugin's session records
    assert ea.Scalars("hparam/sst2/dev_accuracy")[0].value == 80.0
    _, rows = collect(str(tmp_path))
    assert rows[0]["dev_mean"] == 82.0 and rows[1]["dev_mean"] == 50.0


@pytest.mark.parametrize("name,jobs", [("demo", 6), ("cpu-results", 18), ("glue-conll-ptb", 84)])
def test_shipped_sweeps_load_and_expand(name, jobs):
    from rnnpipe.launch.stages.finetune import FinetuneJob, stage_config
    from rnnpipe.pipeline.config import load_config
    from rnnpipe.pipeline.finetune.sweep import expand

    job = load_config(FinetuneJob, str(REPO / "configs" / "finetune" / f"{name}.yaml"))
    expanded = expand(stage_config(job), "/models/x")
    assert len(expanded) == jobs
    assert len({j.out_dir for j in expanded}) == jobs
    if name == "glue-conll-ptb":
        assert all((j.head.features is Features.reversed_input) == (j.task == "conll") for j in expanded)


def test_ctrl_c_checkpoints_the_job_at_the_step_in_progress(tmp_path):
    grid = {"task": ["conll"], "init": ["pretrained"], "seed": [3]}
    cfg = sweep_yaml(tmp_path, grid, {"max_steps": 40, "eval_every": 20})
    proc = _run_cli(["finetune", str(cfg), "--executor", "inline"], {"RNNPIPE_TEST_STEP_DELAY": "0.3"})
    job = tmp_path / "sweep" / "jobs" / "conll-pretrained-seed3"
    deadline = time.time() + 240
    while not (job / "tensorboard").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    time.sleep(1.5)  # a few steps in, before the first evaluation's checkpoint (step 20)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    state = torch.load(job / "checkpoint.pt", weights_only=True)["state"]
    assert 1 <= state["step"] < 20  # saved at the step the interrupt came in, not at an evaluation
    assert "interrupted: checkpointed at step" in (job / "log.txt").read_text()
    assert _run_cli(["finetune", str(cfg), "--executor", "inline"]).wait(timeout=300) == 0
    assert json.loads((job / "result.json").read_text())["steps"] == 40
