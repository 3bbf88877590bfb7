"""GLUE: the readers on the real files, sentence pairs for every tokenizer, the metrics against
scikit-learn and scipy, the regression head, the GLUE score of the table, and one tiny job per
new kind of task (single sentence with MCC, sentence pairs, regression)."""

from __future__ import annotations

import json
import math
import random
import string
from pathlib import Path

import numpy as np
import pytest
import torch
from harness import data_file
from scipy import stats
from sklearn import metrics as sk
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as FastTokenizer

from rnnpipe.launch.cli import main
from rnnpipe.pipeline.config import to_dict
from rnnpipe.pipeline.data.hf_tokenizer import HuggingFaceTokenizer
from rnnpipe.pipeline.data.tokenizers import (
    ByteTokenizer,
    CharTokenizer,
    SentencePieceTokenizer,
    train_sentencepiece,
)
from rnnpipe.pipeline.errors import ConfigError, PipelineError
from rnnpipe.pipeline.finetune import glue, kinds, metrics, tasks
from rnnpipe.pipeline.finetune.collect import collect, glue_table
from rnnpipe.pipeline.finetune.config import Features, HeadConfig, Pooling, TaskConfig, TaskKind
from rnnpipe.pipeline.finetune.model import FinetuneModel
from rnnpipe.pipeline.models import LanguageModel, MixerKind, ModelConfig
from rnnpipe.pipeline.models.pretrained import save_pretrained

# ------------------------------------------------------------------------------ readers, real files

# task, folder, train rows, dev rows, labels (None: regression), (first train row's text, pair)
COLA_FIRST = "Our friends won't buy this analysis, let alone the next one we propose."
MRPC_FIRST = (
    'Amrozi accused his brother, whom he called "the witness", of deliberately distorting his evidence.'
)
RTE_FIRST = (
    "No Weapons of Mass Destruction Found in Iraq Yet.",
    "Weapons of Mass Destruction Found in Iraq.",
)
READERS = [
    ("cola", "CoLA", 8_551, 1_043, {"0", "1"}, (COLA_FIRST, None)),
    ("mrpc", "MRPC", 3_668, 408, {"0", "1"}, (MRPC_FIRST, "Referring to him")),
    ("rte", "RTE", 2_490, 277, {"entailment", "not_entailment"}, RTE_FIRST),
    ("stsb", "STS-B", 5_749, 1_500, None, ("A plane is taking off.", "An air plane is taking off.")),
]


@pytest.mark.parametrize("name,folder,n_train,n_dev,labels,first", READERS, ids=[r[0] for r in READERS])
def test_glue_readers_count_rows_and_read_labels(name, folder, n_train, n_dev, labels, first):
    spec = glue.GLUE_TASKS[name]
    counts = {}
    for split, n in (("train", n_train), ("dev", n_dev)):
        texts, pairs, gold, lines = glue.read_split(spec, str(data_file(f"glue/{folder}/{split}.tsv")), 0)
        counts[split] = len(texts)
        assert gold is not None and len(gold) == len(lines) == n
        assert (pairs is None) == (name == "cola") and all(texts) and all(pairs or ["-"])
        if labels is not None:
            assert set(gold) == labels
        else:
            scores = [float(g) for g in gold]
            assert min(scores) >= 0.0 and max(scores) <= 5.0 and len(set(scores)) > 50
        if split == "train":
            assert texts[0] == first[0]
            assert first[1] is None or pairs[0].startswith(first[1])
    assert counts == {"train": n_train, "dev": n_dev}


def test_cola_dev_keeps_its_last_row_without_a_final_newline():
    path = data_file("glue/CoLA/dev.tsv")
    assert not path.read_bytes().endswith(b"\n")
    texts, _, gold, lines = glue.read_split(glue.GLUE_TASKS["cola"], str(path), 0)
    last = path.read_text(encoding="utf-8").split("\n")[-1].split("\t")
    assert (texts[-1], gold[-1], lines[-1]) == (last[3], last[1], 1_043)  # no header: row n on line n


def test_mrpc_header_byte_order_mark_is_dropped(tmp_path):
    assert data_file("glue/MRPC/train.tsv").read_bytes().startswith(b"\xef\xbb\xbfQuality\t")
    f = tmp_path / "bom.tsv"
    f.write_bytes("\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\ta\tb\n".encode())
    assert glue.read_split(glue.GLUE_TASKS["mrpc"], str(f), 0)[:3] == (["a"], ["b"], ["1"])


def test_glue_readers_name_the_file_and_line_of_bad_input(tmp_path):
    bad = tmp_path / "sts.tsv"
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    bad.write_text(header + "0\tg\tf\ty\t0\tn\tn\ta\tb\t5.0\n1\tg\tf\ty\t0\tn\tn\ta\tb\thigh\n")
    cfg = TaskConfig(kind=TaskKind.regression, train=str(bad), dev=str(bad), glue="stsb")
    with pytest.raises(PipelineError, match=r"sts\.tsv:3: score 'high' is not a finite number"):
        glue.load_sentences(cfg, ByteTokenizer(), 64)
    cola = tmp_path / "cola.tsv"
    cola.write_text("gj04\t1\t\tfine\ngj04\t1\tnot four\n")
    with pytest.raises(PipelineError, match=r"cola\.tsv:2: 3 tab-separated fields, expected 4"):
        glue.read_split(glue.GLUE_TASKS["cola"], str(cola), 0)
    with pytest.raises(PipelineError, match=r"no column '#1 String'.*glue=mrpc reads GLUE's own mrpc files"):
        glue.read_split(glue.GLUE_TASKS["mrpc"], str(bad), 0)
    rte = tmp_path / "rte.tsv"
    rte.write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tb\tneutral\n")
    cfg = TaskConfig(train=str(rte), dev=str(rte), glue="rte")
    with pytest.raises(PipelineError, match=r"label\(s\) \['neutral'\] are not among rte's labels"):
        glue.load_sentences(cfg, ByteTokenizer(), 64)


def test_a_pair_task_of_ones_own_reads_the_columns_it_names(tmp_path):
    train, dev = tmp_path / "train.tsv", tmp_path / "dev.tsv"
    train.write_text("question\tpassage\tanswer\nis it?\tit is.\tyes\nor not?\tno.\tno\n")
    dev.write_text("question\tpassage\tanswer\nwhy?\tbecause.\tmaybe\n")
    cfg = TaskConfig(
        train=str(train),
        dev=str(train),
        text_column="question",
        text_pair_column="passage",
        label_column="answer",
    )
    d = glue.load_sentences(cfg, ByteTokenizer(), 64)
    assert d.labels == ["no", "yes"] and [y for _, y in d.train] == [1, 0]
    assert bytes(d.train[0][0].astype(np.uint8)) == b"is it?\nit is." and d.separator == "newline (id 10)"
    assert (kinds.of(cfg).reported, kinds.of(cfg).primary) == (("accuracy",), "accuracy")
    cfg.dev = str(dev)
    with pytest.raises(PipelineError, match=r"dev\.tsv: label\(s\) \['maybe'\] are not in .*train\.tsv"):
        glue.load_sentences(cfg, ByteTokenizer(), 64)
    regression = TaskConfig(kind=TaskKind.regression, train="a", dev="b")
    task = kinds.of(regression)
    assert (task.reported, task.primary) == (("pearson", "spearman", "mse"), "pearson")


def test_glue_task_configs_are_checked():
    # what a task sets is checked by its kind (Kind.check_task), as a sweep is loaded
    kinds.check_task(TaskConfig(kind=TaskKind.regression, train="a", dev="b", glue="stsb"))
    with pytest.raises(ConfigError, match=r"tasks\.x\.kind must be regression for glue=stsb"):
        kinds.check_task(TaskConfig(train="a", dev="b", glue="stsb"), "tasks.x.")
    with pytest.raises(ConfigError, match="glue must be cola or sst2 or mrpc or rte or stsb"):
        kinds.check_task(TaskConfig(train="a", dev="b", glue="mnli"))
    with pytest.raises(ConfigError, match="text_column='s1': glue=rte reads the columns of GLUE's own file"):
        kinds.check_task(TaskConfig(train="a", dev="b", glue="rte", text_column="s1"))
    with pytest.raises(ConfigError, match="text_pair_column is for classification and regression"):
        kinds.check_task(TaskConfig(kind=TaskKind.tagging, train="a", dev="b", text_pair_column="s2"))
    with pytest.raises(ConfigError, match=r"kind='tagger' is not a task kind: classification, (\w+, )*lm, "):
        kinds.check_task(TaskConfig(kind="tagger", train="a", dev="b"))


# ------------------------------------------------------------------------------------ metrics

LABELS = [1, 0, 1, 1, 0, 0, 1, 0, 1, 1, 1, 0]
GUESSES = [
    [1, 0, 1, 0, 0, 1, 1, 0, 1, 1, 0, 0],  # mostly right
    [0, 1, 0, 0, 1, 1, 0, 1, 0, 0, 0, 1],  # mostly wrong: negative MCC
    [1] * 12,  # one class only: MCC 0 (its denominator is 0)
    [0] * 12,  # no positive predicted: F1 0
]


@pytest.mark.parametrize("guess", GUESSES)
def test_classification_metrics_match_scikit_learn(guess):
    assert metrics.accuracy(guess, LABELS) == pytest.approx(100 * sk.accuracy_score(LABELS, guess))
    for positive in (0, 1):
        want = 100 * sk.f1_score(LABELS, guess, pos_label=positive, zero_division=0)
        assert metrics.f1(guess, LABELS, positive) == pytest.approx(want)
    assert metrics.matthews(guess, LABELS) == pytest.approx(100 * sk.matthews_corrcoef(LABELS, guess))


def test_matthews_correlation_of_three_classes_matches_scikit_learn():
    rng = np.random.default_rng(0)
    gold = rng.integers(0, 3, 200)
    guess = np.where(rng.random(200) < 0.6, gold, rng.integers(0, 3, 200))
    assert metrics.matthews(guess, gold) == pytest.approx(100 * sk.matthews_corrcoef(gold, guess))
    assert metrics.matthews(gold, gold) == pytest.approx(100.0)
    assert metrics.f1([0, 0], [0, 0], positive=1) == 0.0  # no positive anywhere: 0, as zero_division=0


SCORES = [0.0, 1.2, 3.8, 5.0, 2.5, 2.5, 4.0, 0.8, 3.8, 1.0]
PREDICTIONS = [
    [0.3, 1.0, 3.5, 4.6, 2.0, 3.1, 3.9, 1.5, 3.0, 0.9],  # close
    [5.0, 3.0, 1.0, 0.5, 2.0, 2.0, 1.0, 4.0, 2.0, 4.5],  # inverted, with ties
    [2.0, 2.0, 2.0, 3.0, 3.0, 3.0, 1.0, 1.0, 2.0, 3.0],  # many ties
]


@pytest.mark.parametrize("pred", PREDICTIONS)
def test_correlations_match_scipy(pred):
    assert metrics.pearson(pred, SCORES) == pytest.approx(100 * stats.pearsonr(pred, SCORES)[0])
    assert metrics.spearman(pred, SCORES) == pytest.approx(100 * stats.spearmanr(pred, SCORES)[0])
    np.testing.assert_allclose(metrics.ranks(pred), stats.rankdata(pred))
    assert metrics.mse(pred, SCORES) == pytest.approx(sk.mean_squared_error(SCORES, pred))


def test_a_constant_prediction_correlates_zero_not_nan():
    assert metrics.pearson([2.0] * 4, [1.0, 2.0, 3.0, 4.0]) == 0.0  # scipy: NaN and a warning
    assert metrics.spearman([2.0] * 4, [1.0, 2.0, 3.0, 4.0]) == 0.0


def test_a_glue_task_scores_as_glue_averages_it():
    mrpc, stsb, cola = (glue.GLUE_TASKS[n] for n in ("mrpc", "stsb", "cola"))
    s = glue.score(mrpc, ["0", "1"], np.array(GUESSES[0]), np.array(LABELS))
    assert set(s) == set(mrpc.reported) == {"f1", "accuracy", "mean_f1_accuracy"}
    assert mrpc.primary == "mean_f1_accuracy" and s["mean_f1_accuracy"] == pytest.approx(
        (s["f1"] + s["accuracy"]) / 2
    )
    s = glue.score(stsb, [], np.array(PREDICTIONS[0]), np.array(SCORES))
    assert s["mean_pearson_spearman"] == pytest.approx((s["pearson"] + s["spearman"]) / 2)
    assert set(s) == {"pearson", "spearman", "mse", "mean_pearson_spearman"}
    assert cola.primary == "mcc" and set(cola.reported) == {"mcc", "accuracy"}
    assert glue.GLUE_TASKS["sst2"].reported == ("accuracy",) == glue.GLUE_TASKS["rte"].reported


# ---------------------------------------------------------------------- sentence pairs, tokenizers

PAIR = ("A man is playing a flute.", "Un homme joue de la flûte\navec <|endoftext|> et </s>.")
TEXT = "".join(PAIR) + " abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,<>|/"


def _hf(eos: str | None) -> HuggingFaceTokenizer:
    """A tiny GPT-2-style byte-level BPE, with ``<|endoftext|>`` as its eos or none."""
    tk = FastTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tk.train_from_iterator([TEXT] * 20, trainer)
    tk.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
    return HuggingFaceTokenizer(tk.to_str(), eos)


def _sentencepiece() -> SentencePieceTokenizer:
    """A tiny sentencepiece model as rnnpipe trains them (byte fallback, ``</s>`` its eod)."""
    rng = random.Random(0)
    made_up = [
        "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 6))) for _ in range(300)
    ]
    words = TEXT.split() + made_up
    lines = [TEXT] + [" ".join(rng.choice(words) for _ in range(10)) for _ in range(500)]
    model = train_sentencepiece(
        lines, vocab_size=400, model_type="unigram", byte_fallback=True, character_coverage=1.0, threads=1
    )
    return SentencePieceTokenizer(model)


def _word(eod: bool):
    """A word vocabulary of the text's words (``tokenizer.kind=word``), with an ``<eod>`` or not."""
    word = pytest.importorskip("rnnpipe.pipeline.data.word_tokenizer")
    return word.WordTokenizer(sorted(set(" ".join(PAIR).split())), eod=eod)


# kind, the tokenizer, whether its separator is its end-of-document id
TOKENIZERS = {
    "bytes": (ByteTokenizer, False),
    "char-eod": (lambda: CharTokenizer(sorted(set(TEXT)), eod=True), True),
    "char": (lambda: CharTokenizer(sorted(set(TEXT))), False),
    "sentencepiece": (_sentencepiece, True),
    "huggingface-eos": (lambda: _hf("<|endoftext|>"), True),
    "huggingface": (lambda: _hf(None), False),
    "word-eod": (lambda: _word(True), True),
    "word": (lambda: _word(False), False),  # the newline's token: <eos>
}


@pytest.mark.parametrize("kind", list(TOKENIZERS))
def test_a_sentence_pair_is_two_segments_and_one_unambiguous_separator(kind):
    make, eod = TOKENIZERS[kind]
    tok = make()
    sep = tasks.separator(tok)
    a, b = PAIR
    ids = tasks.encode_pair(tok, a, b, 10_000, sep)
    if eod:
        assert sep.ids.tolist() == [tok.eod_id] and not sep.newline_in_text
    else:  # a newline, and none in the segments: the second segment's newline became a space
        assert tok.decode(sep.ids) == b"\n" and sep.newline_in_text
        b = b.replace("\n", " ")
    # exactly one place holds the separator's ids, and the two sides decode to the two segments
    n = len(sep.ids)
    at = [i for i in range(len(ids) - n + 1) if ids[i : i + n].tolist() == sep.ids.tolist()]
    assert len(at) == 1, at
    assert tok.decode(ids[: at[0]]).decode() == a and tok.decode(ids[at[0] + n :]).decode() == b
    np.testing.assert_array_equal(ids, np.concatenate([tok.encode(a), sep.ids, tok.encode(b)]))
    if eod:  # no text encodes to the eod id, not even its name typed in the text
        assert tok.eod_id not in tok.encode(b).tolist()


def test_a_char_vocabulary_without_eod_or_newline_has_no_separator():
    with pytest.raises(PipelineError, match="no separator for sentence pairs"):
        tasks.separator(CharTokenizer(list("abc ")))
    with pytest.raises(PipelineError, match="no separator for sentence pairs"):  # "\n" would be unk
        tasks.separator(CharTokenizer(list("abc "), unk=True))


def test_a_long_pair_is_cut_longer_segment_first():
    tok = ByteTokenizer()
    sep = tasks.separator(tok)
    assert sep.ids.tolist() == [10]
    long, short = "x" * 100, "yyyyy"
    assert (
        bytes(tasks.encode_pair(tok, long, short, 21, sep).astype(np.uint8)) == b"x" * 15 + b"\n" + b"yyyyy"
    )
    assert bytes(tasks.encode_pair(tok, short, long, 21, sep).astype(np.uint8)) == b"yyyyy\n" + b"x" * 15
    assert (
        bytes(tasks.encode_pair(tok, long, long, 21, sep).astype(np.uint8)) == b"x" * 10 + b"\n" + b"x" * 10
    )
    assert len(tasks.encode_pair(tok, "", "", 8, sep)) == 3  # an empty segment is one space


# ------------------------------------------------------------------------------ regression head


def _tiny_lm(seed: int = 0) -> LanguageModel:
    torch.manual_seed(seed)
    return LanguageModel(
        ModelConfig(mixer=MixerKind.lrn, n_layers=2, d_model=32, mlp_ratio=2.0, n_heads=4), 256
    )


@pytest.mark.parametrize("pooling", list(Pooling))
def test_the_regression_head_gives_one_score_per_example_and_ignores_padding(pooling):
    model = FinetuneModel(_tiny_lm(), TaskKind.regression, 1, HeadConfig(pooling, Features.last, 0.0)).eval()
    seqs = [np.array([5, 6, 10, 8, 9]), np.array([11, 10, 12])]
    ids, lengths = tasks.pad(seqs, value=99)
    out = model(torch.from_numpy(ids), torch.from_numpy(lengths))
    assert out.shape == (2,)
    for i, s in enumerate(seqs):
        torch.testing.assert_close(out[i], model(torch.from_numpy(s)[None], torch.tensor([len(s)]))[0])


# --------------------------------------------------------------------------------- the GLUE score


def _result(
    task: str, seed: int, dev: dict, metric: str, init: str = "pretrained", glue_task: str | None = ""
) -> dict:
    return {
        "task": task,
        "glue": task if glue_task == "" else glue_task,
        "init": init,
        "seed": seed,
        "metric": metric,
        "hparams": {"task": task, "init": init, "seed": seed},
        "dev": dev,
        "test": None,
        "steps": 10,
        "wall_s": 1.0,
        "backbone": {"sha256": "a" * 64, "step": 100},
        "fingerprint": f"{task}{seed}{init}",
    }


def test_collect_adds_the_glue_score_over_the_glue_tasks_run(tmp_path):
    results = []
    for seed, shift in ((0, 0.0), (1, 2.0)):
        mrpc = {"f1": 80.0, "accuracy": 70.0, "mean_f1_accuracy": 75.0 + shift}
        stsb = {"pearson": 60.0, "spearman": 58.0, "mean_pearson_spearman": 59.0 + shift}
        results += [
            _result("cola", seed, {"mcc": 20.0 + shift, "accuracy": 70.0}, "mcc"),
            _result("sst2", seed, {"accuracy": 80.0 + shift}, "accuracy"),
            _result("mrpc", seed, mrpc, "mean_f1_accuracy"),
            _result("rte", seed, {"accuracy": 55.0 + shift}, "accuracy"),
            _result("stsb", seed, stsb, "mean_pearson_spearman"),
            _result("conll", seed, {"f1": 70.0}, "f1", glue_task=None),  # not a GLUE task
        ]
    results += [_result(t, 0, {"accuracy": 50.0}, "accuracy", init="scratch") for t in ("sst2", "rte")]
    for i, r in enumerate(results):
        d = tmp_path / "jobs" / f"job{i}"
        d.mkdir(parents=True)
        (d / "result.json").write_text(json.dumps(r))
    md, rows = collect(str(tmp_path))
    glue_rows = {r["init"]: r for r in glue_table(results)}
    pre = glue_rows["pretrained"]
    seed0 = (20.0 + 80.0 + 75.0 + 55.0 + 59.0) / 5
    assert pre["tasks"] == "cola, mrpc, rte, sst2, stsb" and pre["n_tasks"] == 5 and pre["seeds"] == 2
    assert pre["dev_mean"] == pytest.approx(seed0 + 1.0) and pre["test"] == "—"
    assert pre["dev"] == f"{seed0 + 1.0:.2f} ± {math.sqrt(2.0):.2f}"  # seeds 0 and 1: seed0, seed0 + 2
    assert glue_rows["scratch"]["tasks"] == "rte, sst2" and glue_rows["scratch"]["dev"] == "50.00"
    assert "| pretrained | — | cola, mrpc, rte, sst2, stsb (5 of GLUE's 9) | 2 | 58.80 ± 1.41 | — |" in md
    assert "GLUE score: the mean of the task scores over the GLUE tasks run" in md
    assert len(rows) == 8  # the task table itself is as it was
    assert json.loads((tmp_path / "results.json").read_text())["glue"][0]["task_dev"]["cola"] == 21.0
    md_conll, _ = collect(
        str(tmp_path), [r | {"dir": str(tmp_path)} for r in results if r["task"] == "conll"]
    )
    assert "GLUE score" not in md_conll


# ------------------------------------------------------------------------------- tiny jobs, end to end

GLUE_JOBS = {  # task: kind, folder, what the result's dev holds, its main metric
    "cola": ("classification", "CoLA", {"mcc", "accuracy"}, "mcc"),
    "mrpc": ("classification", "MRPC", {"f1", "accuracy", "mean_f1_accuracy"}, "mean_f1_accuracy"),
    "rte": ("classification", "RTE", {"accuracy"}, "accuracy"),
    "stsb": (
        "regression",
        "STS-B",
        {"pearson", "spearman", "mse", "mean_pearson_spearman"},
        "mean_pearson_spearman",
    ),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("task", list(GLUE_JOBS))
def test_a_tiny_glue_job_runs_and_reports_the_tasks_metrics(tmp_path, capsys, task):
    kind, folder, names, metric = GLUE_JOBS[task]
    root = data_file(f"glue/{folder}")
    lm = _tiny_lm()
    export = save_pretrained(
        tmp_path / "model", lm.state_dict(), to_dict(lm.cfg), {"kind": "bytes", "vocab_size": 256}
    )
    files = {"train": f"{root}/train.tsv", "dev": f"{root}/dev.tsv", "max_train": 24, "max_dev": 16}
    cfg = {
        "out_dir": str(tmp_path / "sweep"),
        "pretrained": str(export),
        "tasks": {task: {"kind": kind, "glue": task, **files}},
        "job": {
            "max_steps": 4,
            "eval_every": 2,
            "batch_size": 8,
            "max_len": 48,
            "optim": {"warmup_steps": 1},
        },
        "grid": {"task": [task]},
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(json.dumps(cfg))
    assert main(["-q", "finetune", str(path), "--executor", "inline"]) == 0
    job = Path(cfg["out_dir"]) / "jobs" / task
    r = json.loads((job / "result.json").read_text())
    assert (r["kind"], r["glue"], r["metric"], r["steps"]) == (kind, task, metric, 4)
    assert set(r["dev"]) == names and all(math.isfinite(v) for v in r["dev"].values())
    assert r["train_examples"] == 24 and r["test"] is None
    if task != "cola":
        assert (
            "sentence pairs: the segments are joined by the newline (id 10)" in (job / "log.txt").read_text()
        )
    md = (Path(cfg["out_dir"]) / "results.md").read_text()
    assert f"| {task} | pretrained | — | 1 | {metric} |" in md
    assert f"| {task} (1 of GLUE's 9) | 1 | {r['dev'][metric]:.2f} | — |" in md
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(job / "tensorboard"))
    ea.Reload()
    assert {f"dev/{m}" for m in names} | {f"final/dev_{m}" for m in names} <= set(ea.Tags()["scalars"])


def test_the_new_task_keys_at_their_defaults_leave_existing_results_complete():
    """text_pair_column and glue were added after results were recorded: at their defaults they
    are not part of a job's identity, so an SST-2 result made before them is still complete."""
    from rnnpipe.pipeline.finetune.config import JobConfig
    from rnnpipe.pipeline.finetune.identity import ADDED_KEYS, job_identity

    backbone = {"sha256": "0" * 64, "step": 1, "model": {}, "tokenizer": {}}
    identity = job_identity(JobConfig(out_dir="o", pretrained="p"), backbone)
    assert not set(ADDED_KEYS) & set(identity)
    cfg = JobConfig(out_dir="o", pretrained="p")
    cfg.task_config.glue = "sst2"
    assert job_identity(cfg, backbone)["task_config.glue"] == "sst2"
