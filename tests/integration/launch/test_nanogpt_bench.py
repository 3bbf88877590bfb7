"""benchmarks/nanogpt.py without nanoGPT: it says why it skipped and exits 0; its data files are
nanoGPT's; its table writer replaces only the text between its markers."""

from __future__ import annotations

import pickle
import subprocess
import sys

import numpy as np
from harness import REPO, benchmark

nanogpt = benchmark("nanogpt")
BEGIN, END, SPEED_BEGIN, SPEED_END = nanogpt.BEGIN, nanogpt.END, nanogpt.SPEED_BEGIN, nanogpt.SPEED_END
missing, write_nanogpt_data, write_tables = nanogpt.missing, nanogpt.write_nanogpt_data, nanogpt.write_tables


def test_without_a_checkout_it_skips_with_the_reason(tmp_path):
    script = str(REPO / "benchmarks/nanogpt.py")
    out = subprocess.run([sys.executable, script], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0
    assert "skipped: no nanoGPT checkout given (--nanogpt PATH" in out.stdout
    (tmp_path / "ng").mkdir()
    (tmp_path / "ng/model.py").write_text("")
    assert (
        missing(str(tmp_path / "ng"))
        == f"{tmp_path / 'ng'} has no train.py, configurator.py: not a nanoGPT checkout"
    )
    doc = tmp_path / "doc.md"
    out = subprocess.run(
        [sys.executable, script, "--nanogpt", str(tmp_path / "ng"), "--write", str(doc)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0 and "not a nanoGPT checkout" in out.stdout
    assert not doc.exists()  # (nothing measured, nothing written)


def test_the_data_files_are_nanogpts(tmp_path):
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 3
    (tmp_path / "input.txt").write_text(text)
    val = write_nanogpt_data(tmp_path / "input.txt", tmp_path / "d")
    chars = sorted(set(text))
    cut = int(len(text) * 0.9)
    train = np.fromfile(tmp_path / "d/train.bin", dtype=np.uint16)
    assert "".join(chars[i] for i in train) == text[:cut]
    assert "".join(chars[i] for i in val) == text[cut:]
    assert np.array_equal(np.fromfile(tmp_path / "d/val.bin", dtype=np.uint16), val)
    meta = pickle.loads((tmp_path / "d/meta.pkl").read_bytes())
    assert meta["vocab_size"] == len(chars) and meta["itos"][3] == chars[3] and meta["stoi"][chars[5]] == 5


def test_the_table_writer_replaces_only_its_markers(tmp_path):
    doc = tmp_path / "benchmarks.md"
    before = "# Benchmarks\n\n<!-- other:begin -->\nkeep me\n<!-- other:end -->\n\n"
    after = "\nText after the table.\n"
    doc.write_text(before + f"{BEGIN}\nold table\n{END}" + after)
    write_tables(doc, {(BEGIN, END): "| new | table |"})
    assert doc.read_text() == before + f"{BEGIN}\n| new | table |\n{END}" + after
    write_tables(doc, {(SPEED_BEGIN, SPEED_END): "speed"})  # absent: appended, the rest unchanged
    text = doc.read_text()
    assert text.startswith(before + f"{BEGIN}\n| new | table |\n{END}" + after.rstrip())
    assert text.endswith(f"{SPEED_BEGIN}\nspeed\n{SPEED_END}\n")
