"""Data integrity and the prepare stage's robustness (issue 12): damaged shards named by the reader,
manifests validated on read, one prepare per output, no orphans, overwrite only of our datasets."""

from __future__ import annotations

import bz2
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import tarfile
import time
from pathlib import Path

import psutil
import pytest
from harness import CLI, REPO, prepare, rnnpipe

from rnnpipe.launch.stages import prepare as prepare_stage
from rnnpipe.pipeline.config import load_config
from rnnpipe.pipeline.data.manifest import inside, read_manifest
from rnnpipe.pipeline.data.prepare import LOCK
from rnnpipe.pipeline.data.reader import SplitReader
from rnnpipe.pipeline.data.tokenizers import tokenizer_from_manifest
from rnnpipe.pipeline.errors import ConfigError, PipelineError

TEXT = REPO / "configs" / "prepare" / "tinyshakespeare.yaml"
WIKI = REPO / "configs" / "prepare" / "wikipedia.yaml"
# 1024-token samples, 4 per shard: a 40 kB corpus gives 9 train shards in well under a second.
SHARDS = ["shards.sample_tokens=1024", "shards.samples_per_shard=4"]


def write_corpus(path: Path, n_bytes: int = 40_000) -> Path:
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    lines, size = [], 0
    while size < n_bytes:
        line = " ".join(rng.choice(words) for _ in range(12)) + "\n"
        lines.append(line)
        size += len(line)
    path.write_text("".join(lines))
    return path


def overrides(corpus: Path, *extra: str) -> list[str]:
    return [f"source.paths=[{corpus}]", *SHARDS, *extra]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    """(corpus, a finished dataset of it); tests damage copies of it."""
    base = tmp_path_factory.mktemp("built")
    corpus = write_corpus(base / "corpus.txt")
    assert prepare(TEXT, base / "d", *overrides(corpus)) == 0
    return corpus, base / "d"


@pytest.fixture
def dataset(built, tmp_path) -> tuple[Path, Path]:
    corpus, root = built
    shutil.copytree(root, tmp_path / "d")
    return corpus, tmp_path / "d"


def members(shard: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(shard) as tar:
        return tar.getmembers()


def patch(path: Path, offset: int, data: bytes, keep_mtime: bool = False) -> None:
    """Overwrite bytes in place (size unchanged); with ``keep_mtime`` as silent bit rot would."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def edit_manifest(root: Path, change) -> None:
    m = json.loads((root / "manifest.json").read_text())
    change(m)
    (root / "manifest.json").write_text(json.dumps(m))


def prepare_cmd(corpus: Path, out: Path, *extra: str) -> list[str]:
    return [*CLI, "prepare", str(TEXT), f"output={out}", *overrides(corpus), *extra]


# --- 1. the training reader checks every shard against the manifest ------------------------------


def _truncate(shard: Path) -> None:
    os.truncate(shard, shard.stat().st_size // 2)


def _break_tar_header(shard: Path) -> None:  # the third member's header: tarfile stops there silently
    patch(shard, members(shard)[2].offset, b"\xff" * 100)


def _break_npy_magic(shard: Path) -> None:
    patch(shard, members(shard)[3].offset_data, b"NOTNPY")


def _break_npy_header(shard: Path) -> None:
    patch(shard, members(shard)[3].offset_data + 10, b"}}}}garbage")


@pytest.mark.parametrize(
    "damage, says",
    [
        (_truncate, "(truncated)"),
        (_break_tar_header, "its tar index lists 1 samples"),
        (_break_npy_magic, "truncated or corrupt"),
        (_break_npy_header, "truncated or corrupt"),
    ],
)
def test_the_reader_names_a_damaged_shard_and_the_way_out(dataset, damage, says):
    _, root = dataset
    shard = root / "train" / "train-000002.tar"
    damage(shard)
    with pytest.raises(PipelineError) as e:
        SplitReader(str(root), "train")
    msg = str(e.value)
    assert msg.startswith(f"{shard}: ") and says in msg, msg
    assert f"rnnpipe verify {root}" in msg and "rnnpipe prepare" in msg


def test_the_reader_checks_sha256_with_verify_full(dataset):
    _, root = dataset
    shard = root / "train" / "train-000001.tar"
    npy = members(shard)[1]
    patch(shard, npy.offset_data + npy.size - 1, b"\x00")  # a token flipped: every size unchanged
    assert SplitReader(str(root), "train", verify="sizes").sample_count() == 36
    with pytest.raises(PipelineError, match=rf"^{shard}: sha256 .* differs from the manifest's"):
        SplitReader(str(root), "train", verify="full")
    with pytest.raises(ConfigError, match=r"data\.verify=.quick.: expected one of sizes, read, full"):
        SplitReader(str(root), "train", verify="quick")


def test_a_shard_truncated_after_indexing_fails_the_read(dataset):
    _, root = dataset
    reader = SplitReader(str(root), "train")
    shard = root / "train" / "train-000003.tar"
    os.truncate(shard, members(shard)[1].offset_data + 600)  # inside sample 12's data
    assert len(reader.read(0, 5000)) == 5000  # shards 0-1: intact
    with pytest.raises(PipelineError, match=rf"^{shard}: sample 12: read \d+ of 1024 bytes .*truncated"):
        reader.read(12 * 1024, 12 * 1024 + 10)


# --- 1c. prepare's completeness hashes: a re-run rewrites exactly the damaged shards -------------


def test_rerunning_prepare_rewrites_exactly_the_shard_with_a_flipped_byte(dataset, capsys):
    corpus, root = dataset
    damaged = root / "train" / "train-000004.tar"
    original = damaged.read_bytes()
    npy = members(damaged)[1]
    patch(damaged, npy.offset_data + 500, b"\x01", keep_mtime=True)  # older than the manifest
    job = load_config(prepare_stage.PrepareJob, str(TEXT), [f"output={root}", *overrides(corpus)])
    decision = prepare_stage.plan(job)
    assert decision.run and f"rebuilds 1 damaged shard(s): {damaged}: sha256" in decision.reason
    assert not prepare_stage.is_complete(job)
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in root.glob("*/*.tar")}
    assert prepare(TEXT, root, *overrides(corpus)) == 0
    after = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in root.glob("*/*.tar")}
    assert [p for p in before if before[p] != after[p]] == [damaged]  # the others untouched
    assert damaged.read_bytes() == original
    capsys.readouterr()
    assert rnnpipe("verify", root) == 0
    assert prepare_stage.is_complete(job) and not prepare_stage.plan(job).run


# --- 2. manifests are validated on read ---------------------------------------------------------


@pytest.mark.parametrize(
    "change, says",
    [
        (lambda m: m.pop("splits"), "splits is missing"),
        (lambda m: m.pop("tokenizer"), "tokenizer is missing"),
        (lambda m: m["tokenizer"].pop("vocab_size"), "tokenizer.vocab_size is missing"),
        (
            lambda m: m["splits"]["train"]["shards"][1].pop("sha256"),
            "splits.train.shards[1].sha256 is missing",
        ),
        (lambda m: m.update(sample_tokens="many"), "sample_tokens is str 'many', expected an integer"),
        (lambda m: m["splits"]["valid"].update(shards={}), "splits.valid.shards is dict {}, expected a list"),
    ],
)
def test_verify_on_a_manifest_missing_a_key_names_it_in_one_line(dataset, capsys, change, says):
    _, root = dataset
    edit_manifest(root, change)
    assert rnnpipe("verify", root) == 1
    err = capsys.readouterr().err
    assert f"{root}/manifest.json: {says}" in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "path, says",
    [
        ("/etc/passwd", "is absolute"),
        ("../outside.tar", "has a '..' component"),
        ("train/../../outside.tar", "has a '..' component"),
        ("train//train-000000.tar", "is not normalised"),
        ("./train/train-000000.tar", "is not normalised"),
        ("file:///etc/passwd", "is absolute (or a URL)"),
    ],
)
def test_a_manifest_path_outside_the_dataset_is_refused(dataset, path, says):
    _, root = dataset
    edit_manifest(root, lambda m: m["splits"]["train"]["shards"][0].update(path=path))
    with pytest.raises(PipelineError) as e:
        read_manifest(str(root))
    msg = str(e.value)
    assert msg.startswith(f"{root}/manifest.json: splits.train.shards[0].path={path!r} {says}"), msg
    edit_manifest(root, lambda m: m["splits"]["train"]["shards"][0].update(path="train/train-000000.tar"))
    edit_manifest(root, lambda m: m["tokenizer"].update(model_file=path))
    with pytest.raises(PipelineError, match=rf"tokenizer\.model_file={path!r} "):
        read_manifest(str(root))


def test_a_symlink_out_of_the_dataset_is_refused(dataset, tmp_path):
    _, root = dataset
    shard = root / "train" / "train-000000.tar"
    outside = tmp_path / "elsewhere.tar"
    shard.rename(outside)
    shard.symlink_to(outside)
    with pytest.raises(PipelineError, match=rf"resolves to {outside}, outside the dataset root {root}"):
        read_manifest(str(root))
    assert inside(str(root), "valid/valid-000000.tar", "k") == f"{root}/valid/valid-000000.tar"
    with pytest.raises(PipelineError, match=r"k='\.\./x' has a '\.\.' component"):
        inside(str(root), "../x", "k")


def test_tokenizer_loading_refuses_a_model_file_outside_before_reading_it():
    read = []
    for bad in ("/etc/passwd", "../../vocab.json", "tokenizer/../../x"):
        manifest = {"tokenizer": {"kind": "char", "vocab_size": 3, "model_file": bad}}
        with pytest.raises(PipelineError, match=rf"tokenizer\.model_file={bad!r}"):
            tokenizer_from_manifest(manifest, lambda rel: read.append(rel) or b"")
    assert read == []


# --- 3. one prepare per output -------------------------------------------------------------------


def test_a_second_prepare_on_the_same_output_fails_at_once_naming_the_holder(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    out = tmp_path / "d"
    # The first holds its lock for 15 s: time for a second interpreter to start and be refused.
    env = {**os.environ, "RNNPIPE_PROGRESS": "0", "RNNPIPE_TEST_PREPARE_DELAY": "15"}
    first = subprocess.Popen(
        prepare_cmd(corpus, out, "--executor", "inline"),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 30
        while not (out / ".work" / "plan.json").exists():
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.05)
        t0 = time.time()
        second = subprocess.run(
            prepare_cmd(corpus, out, "--executor", "inline"),
            env={**env, "RNNPIPE_TEST_PREPARE_DELAY": "0"},
            capture_output=True,
            text=True,
        )
        took = time.time() - t0
        assert first.poll() is None  # the first was still running throughout
        assert second.returncode == 1, second.stderr
        assert f"{out} is in use by prepare pid {first.pid} on {socket.gethostname()}" in second.stderr
        assert "Traceback" not in second.stderr and took < 10
        _, err = first.communicate(timeout=60)
        assert first.returncode == 0, err  # undisturbed
    finally:
        if first.poll() is None:
            first.kill()
    assert rnnpipe("verify", out) == 0


# --- 4. pool workers die with their parent -------------------------------------------------------


def test_kill_9_of_prepare_leaves_no_worker_or_tracker_behind(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    out = tmp_path / "d"
    env = {**os.environ, "RNNPIPE_PROGRESS": "0", "RNNPIPE_TEST_PREPARE_DELAY": "60"}
    proc = subprocess.Popen(
        prepare_cmd(corpus, out, "--executor", "local", "executor.workers=2"),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    children: list[psutil.Process] = []
    try:
        deadline = time.time() + 30
        while not (out / ".work" / "plan.json").exists():  # planning ran on a pool worker
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.05)
        children = psutil.Process(proc.pid).children(recursive=True)
        names = [" ".join(c.cmdline()) for c in children]
        assert any("multiprocessing" in n for n in names), names  # worker(s) and the resource tracker
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        _, alive = psutil.wait_procs(children, timeout=5)
        assert alive == [], [" ".join(c.cmdline()) for c in alive]
    finally:
        for c in children:
            if c.is_running():
                c.kill()
        if proc.poll() is None:
            proc.kill()


# --- 5 and 6. what is ours: overwrite removes only our datasets, a .work killed early is ours --


def test_overwrite_refuses_a_directory_that_never_held_a_dataset(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus.txt")
    out = tmp_path / "mine"
    (out / "train").mkdir(parents=True)
    (out / "train" / "run.log").write_text("a user's training")
    (out / "config.yaml").write_text("lr: 3")
    (out / "notes.txt").write_text("precious")
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert prepare(TEXT, out, *overrides(corpus), "overwrite=true") == 1
    err = capsys.readouterr().err
    assert f"output {out} is not empty and holds no rnnpipe dataset (config.yaml, notes.txt, train" in err
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before  # not even a lock file
    assert (out / "notes.txt").read_text() == "precious" and (out / "config.yaml").read_text() == "lr: 3"
    job = load_config(
        prepare_stage.PrepareJob, str(TEXT), [f"output={out}", *overrides(corpus), "overwrite=true"]
    )
    with pytest.raises(ConfigError, match="holds no rnnpipe dataset"):
        prepare_stage.plan(job)


@pytest.mark.parametrize("left", [[], ["state.json.partial"], ["state.json.partial", "../" + LOCK]])
def test_a_work_dir_killed_before_state_json_is_ours(tmp_path, left):
    corpus = write_corpus(tmp_path / "corpus.txt")
    out = tmp_path / "d"
    (out / ".work").mkdir(parents=True)
    for name in left:
        (out / ".work" / name).write_text("{")
    job = load_config(prepare_stage.PrepareJob, str(TEXT), [f"output={out}", *overrides(corpus)])
    assert prepare_stage.plan(job).run
    assert prepare(TEXT, out, *overrides(corpus)) == 0
    assert rnnpipe("verify", out) == 0 and not (out / ".work").exists()


def test_the_lock_file_is_ours_and_survives_overwrite(dataset):
    corpus, root = dataset
    lock = root / LOCK
    assert lock.exists()  # written by the prepare that made the dataset
    inode = lock.stat().st_ino
    assert prepare(TEXT, root, *overrides(corpus), "tokenizer.kind=bytes", "overwrite=true") == 0
    assert read_manifest(str(root))["tokenizer"]["kind"] == "bytes"
    assert lock.stat().st_ino == inode


# --- 7. a truncated bz2 input: one line --------------------------------------------------------


def write_dump(path: Path, pages: int, streams: int) -> None:
    """A MediaWiki dump of ``pages`` pages as one bz2 stream, or two (multistream), split in half."""
    rng = random.Random(1)
    head = b'<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/"><siteinfo><namespaces>'
    head += b'<namespace key="0" /></namespaces></siteinfo>\n'
    body = [
        f"<page><title>Page {i}</title><ns>0</ns><id>{i}</id><revision><text>"
        + " ".join(f"w{rng.randrange(10**6)}" for _ in range(200))
        + "</text></revision></page>\n"
        for i in range(pages)
    ]
    parts = [
        head + "".join(body[: pages // 2]).encode(),
        "".join(body[pages // 2 :]).encode() + b"</mediawiki>",
    ]
    if streams == 1:
        parts = [b"".join(parts)]
    path.write_bytes(b"".join(bz2.compress(p) for p in parts))


@pytest.mark.parametrize("streams", [1, 2])
def test_a_truncated_bz2_dump_gives_one_line_naming_it(tmp_path, capsys, streams):
    dump = tmp_path / "dump.xml.bz2"
    # Two streams: the first holds over 1 MiB of XML, so planning reads only it and the cut
    # second stream is found while extracting.
    write_dump(dump, pages=300 if streams == 1 else 1400, streams=streams)
    data = dump.read_bytes()
    dump.write_bytes(data[: len(data) - 5000])
    assert prepare(WIKI, tmp_path / "d", f"source.paths=[{dump}]", "tokenizer.kind=bytes") == 1
    err = capsys.readouterr().err
    assert f"{dump}: truncated/corrupt bz2 stream" in err, err
    assert "Traceback" not in err and 'File "' not in err
