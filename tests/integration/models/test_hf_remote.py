"""An export loads anywhere transformers does: after ``import rnnpipe`` without remote code, and
with ``trust_remote_code=True`` in a Python that cannot import rnnpipe (the copy of its model code
bundled in the export), for rnnpipe's own models and for a tiny GPT-2 with added recurrence; the
logits are ``load_pretrained``'s bit for bit. Its config.json is portable (no absolute path, host
or pid: those live in the header, rnnpipe.json), exports from before the header still read, and
it carries a model card. Tiny models built here, no training, no network."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from harness import REPO

from rnnpipe.kernels import cpu_native
from rnnpipe.pipeline.config import to_dict
from rnnpipe.pipeline.models.config import (
    EmbeddingsConfig,
    HFBackboneConfig,
    MixerKind,
    ModelConfig,
    ModelKind,
    RecurrenceConfig,
    RecurrenceKind,
)
from rnnpipe.pipeline.models.exported import (
    backbone_identity,
    export_direction,
    export_meta,
    export_source,
    is_export,
)
from rnnpipe.pipeline.models.lm import LanguageModel
from rnnpipe.pipeline.models.pretrained import load_pretrained, save_pretrained

transformers = pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")

BYTES = {"kind": "bytes", "vocab_size": 256, "model_file": None, "model_sha256": None, "special_ids": {}}
V = 61  # the GPT-2 models' vocabulary
IDS = torch.randint(0, V, (2, 21), generator=torch.Generator().manual_seed(3))  # 2 segments and a part
GPT2_VARIANTS = {
    "gpt2-memory_tokens": ("memory_tokens", {"memory": 3}),
    "gpt2-recurrent_summary": (
        "recurrent_summary",
        {"memory": 2, "cell": "gru", "read_layer": 1, "inject_layer": 1},
    ),
    "gpt2-kv_memory": ("kv_memory", {"memory": 5}),
}
# A Python in which rnnpipe cannot be imported, whatever is installed: a finder refusing it.
NO_RNNPIPE = """import importlib.abc, sys
class _NoRnnpipe(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
        return None
sys.meta_path.insert(0, _NoRnnpipe())
"""


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "hf-modules"))


def _lrn_export(out: Path, **model) -> Path:
    cfg = ModelConfig(n_layers=2, d_model=32, mlp_ratio=2.0, n_heads=4, **model)
    torch.manual_seed(0)
    lm = LanguageModel(cfg, 256)
    return save_pretrained(out, lm.state_dict(), to_dict(cfg), BYTES, {}, {"step": 1})


def _gpt2_export(out: Path, kind: str, extra: dict, arch: str = "gpt2") -> Path:
    """A tiny GPT-2 (or another ``arch``) with added recurrence, as rnnpipe export writes one: the
    backbone's config as the checkpoint records it (the directory it was read from in _name_or_path)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from rnnpipe.pipeline.models.recurrence import AddedRecurrenceLM

    torch.manual_seed(0)
    if arch == "gpt2":
        size = {
            "n_layer": 2,
            "n_embd": 32,
            "n_head": 4,
            "n_positions": 64,
            "bos_token_id": 0,
            "eos_token_id": 0,
        }
    else:  # rotary positions, grouped KV heads
        size = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
        size.update(num_key_value_heads=2, max_position_embeddings=64)
    backbone = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, vocab_size=V, **size))
    rec = RecurrenceConfig(kind=RecurrenceKind(kind), segment_len=8, **extra)
    cfg = ModelConfig(
        kind=ModelKind.huggingface, recurrence=rec, hf=HFBackboneConfig(path=f"/models/{arch}-tiny")
    )
    torch.manual_seed(1)
    model = AddedRecurrenceLM(cfg, V, backbone)
    recorded = {**backbone.config.to_dict(), "_name_or_path": f"/models/{arch}-tiny"}
    tokenizer = {**BYTES, "vocab_size": V}
    return save_pretrained(out, model.state_dict(), to_dict(cfg), tokenizer, {}, {"step": 1}, recorded)


def _reference_logits(export: Path) -> torch.Tensor:
    """load_pretrained's logits of IDS, with LRN and oLRN on the PyTorch loop, as the bundle runs
    them (the C forward, where it is built, rounds differently: docs/evaluation.md)."""
    saved, threads = cpu_native.forward, torch.get_num_threads()
    cpu_native.forward = lambda *a: None
    torch.set_num_threads(1)  # as the subprocess computes: a matrix product's rounding depends on it
    try:
        with torch.no_grad():
            return load_pretrained(export)(IDS)[0]
    finally:
        cpu_native.forward = saved
        torch.set_num_threads(threads)


def _strings(value, path="") -> list[tuple[str, str]]:
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in _strings(v, f"{path}.{k}")]
    if isinstance(value, list):
        return [s for i, v in enumerate(value) for s in _strings(v, f"{path}[{i}]")]
    return [(path, value)] if isinstance(value, str) else []


HOST, PID = "gpu-node-0042.cluster.example", 4242421  # a training host and process, made up


def _portable(export: Path) -> None:
    """config.json and generation_config.json hold no absolute path, host name or pid."""
    hosts = [HOST, *([socket.gethostname()] if len(socket.gethostname()) > 3 else [])]
    for name in ("config.json", "generation_config.json"):
        meta = json.loads((export / name).read_text())
        for key, value in _strings(meta):
            assert not os.path.isabs(value) and not value.startswith("~"), (name, key, value)
        text = (export / name).read_text()
        assert "source" not in meta and '"pid"' not in text and str(PID) not in text, name
        assert '"host' not in text and not any(h in text for h in hosts), name


def test_config_json_is_portable_the_header_keeps_the_provenance_and_old_exports_read(tmp_path):
    source = {
        "checkpoint": "/scratch/runs/x/checkpoints/step00000800",
        "step": 800,
        "data": "/scratch/data/enwik8-head",
        "direction": "backward",
        "fingerprint": "f" * 64,
        "train_steps": 800,
        "world_size": 2,
        "provenance": {"host": HOST, "pid": PID, "hosts": [HOST, HOST]},
        "corpus": {"kind": "enwik8", "files": ["enwik8-head.txt"]},
        "metrics": {
            "train/tokens_seen": {"step": 800, "value": 3276800},
            "valid/bpb": {"step": 800, "value": 2.3456789},
        },
    }
    cfg = ModelConfig(n_layers=1, d_model=16, embeddings=EmbeddingsConfig(init="/home/me/glove.6B.50d.txt"))
    lm = LanguageModel(cfg, 256)
    export = save_pretrained(tmp_path / "e", lm.state_dict(), to_dict(cfg), BYTES, {}, source)
    _portable(export)
    config = json.loads((export / "config.json").read_text())
    assert config["model"]["embeddings"]["init"] == "glove.6B.50d.txt"  # its name, not where it lives
    header = json.loads((export / "rnnpipe.json").read_text())
    assert header["format"] == "rnnpipe-export" and header["model"] == to_dict(cfg)
    assert header["source"]["provenance"]["host"] == HOST and header["source"]["step"] == 800
    # rnnpipe's readers see the header: the provenance, the model as trained, the weights' identity
    assert is_export(export) and export_direction(export) == "backward"
    assert export_source(export)["data"] == "/scratch/data/enwik8-head"
    assert export_meta(str(export))["model"]["embeddings"]["init"] == "/home/me/glove.6B.50d.txt"
    ident = backbone_identity(str(export))
    assert ident["step"] == 800 and ident["sha256"] == header["source"]["weights_sha256"]
    # an export from before the header: source inside config.json, read as before
    old = tmp_path / "old"
    old.mkdir()
    (old / "model.safetensors").write_bytes((export / "model.safetensors").read_bytes())
    (old / "config.json").write_text(
        json.dumps({**config, "source": {**header["source"], "direction": "forward"}})
    )
    assert is_export(old) and export_direction(old) == "forward" and export_source(old)["step"] == 800
    assert backbone_identity(str(old))["sha256"] == ident["sha256"]
    (old / "config.json").write_text(json.dumps(config))  # neither a source nor a header
    assert not is_export(old) and not is_export(tmp_path / "nothing")
    # the model card: Hub metadata and the recorded figures only, no path
    card = (export / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["library_name"] == "transformers" and {"rnnpipe", "recurrent", "lrn"} <= set(front["tags"])
    assert front["datasets"] == ["enwik8"] and "license" not in front  # no license is recorded
    for figure in (
        "3,276,800 (at step 800)",
        "2.3457 (at step 800)",
        "800 of 800, on 2 ranks",
        "enwik8-head.txt",
    ):
        assert figure in card, figure
    assert "test bits per byte" not in card  # not recorded: not shown
    assert "/scratch" not in card and "/home" not in card and HOST not in card and str(PID) not in card
    assert "trust_remote_code=True" in card and "torch" in card and "omegaconf" in card


def test_run_metrics_are_the_latest_up_to_the_exported_step(tmp_path):
    from rnnpipe.pipeline.train.export import run_metrics

    ckpt = tmp_path / "run" / "checkpoints" / "step00000020"
    ckpt.mkdir(parents=True)
    lines = [
        {"step": 10, "train/tokens_seen": 1280, "train/loss": 3.0},
        {"step": 20, "train/tokens_seen": 2560},
        {"step": 20, "valid/bpb": 2.5, "valid/loss": 1.7},
        {"step": 30, "train/tokens_seen": 3840, "valid/bpb": 2.0},  # after the checkpoint
    ]
    (tmp_path / "run" / "metrics.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n{half a line")
    got = run_metrics(ckpt, 20)
    assert got["train/tokens_seen"] == {"step": 20, "value": 2560} and got["valid/bpb"]["value"] == 2.5
    assert "test/bpb" not in got
    assert run_metrics(tmp_path / "elsewhere" / "step1", 20) == {}


def test_an_export_loads_in_transformers_without_remote_code_after_import_rnnpipe(tmp_path):
    """rnnpipe's own model and a GPT-2 (and a Llama) with added recurrence:
    AutoModelForCausalLM.from_pretrained (no trust_remote_code) gives load_pretrained's logits and
    generation; config.json portable."""
    from transformers import AutoModelForCausalLM

    exports = {"lrn": _lrn_export(tmp_path / "lrn", attention_every=2)}
    for name, (kind, extra) in GPT2_VARIANTS.items():
        exports[name] = _gpt2_export(tmp_path / name, kind, extra)
    exports["llama"] = _gpt2_export(tmp_path / "llama", "recurrent_summary", {"memory": 2}, arch="llama")
    for name, export in exports.items():
        _portable(export)
        model = AutoModelForCausalLM.from_pretrained(export).eval()
        assert type(model).__module__ == "rnnpipe.pipeline.models.hf.modeling", name
        ours = load_pretrained(export)
        with torch.no_grad():
            assert torch.equal(model(IDS).logits, ours(IDS)[0]), name
        prompt = IDS[:1, :5]
        greedy = model.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert torch.equal(greedy[:, 5:], ours.generate(prompt, 12, temperature=0)), name
    # re-saved by transformers: the header and the remote code come along (they were not loaded)
    model = AutoModelForCausalLM.from_pretrained(exports["gpt2-kv_memory"])
    model.save_pretrained(tmp_path / "resaved")
    assert {"rnnpipe.json", "modeling_rnnpipe.py", "rnnpipe_kernels_ops.py"} <= {
        p.name for p in (tmp_path / "resaved").iterdir()
    }
    with torch.no_grad():
        again = AutoModelForCausalLM.from_pretrained(tmp_path / "resaved")(IDS).logits
        assert torch.equal(again, load_pretrained(tmp_path / "resaved")(IDS)[0])
        assert torch.equal(again, model(IDS).logits)
    gpt2 = AutoModelForCausalLM.from_pretrained(exports["gpt2-memory_tokens"])
    backbone = gpt2.model.backbone
    assert backbone.lm_head.weight is backbone.transformer.wte.weight  # tied, as trained
    # beam search reorders the recurrence's state (its carry, the segment's KV cache) row by row
    beams = gpt2.generate(
        IDS[:1, :5], max_new_tokens=6, num_beams=3, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    assert beams.shape == (1, 11)
    card = yaml.safe_load((exports["gpt2-memory_tokens"] / "README.md").read_text().split("---\n")[1])
    assert {"rnnpipe", "gpt2", "memory-tokens"} <= set(card["tags"])
    meta = json.loads((exports["gpt2-memory_tokens"] / "config.json").read_text())
    assert meta["model"]["hf"]["path"] == "gpt2-tiny" and "_name_or_path" not in meta["hf_backbone"]
    assert meta["hidden_size"] == 32 and meta["num_hidden_layers"] == 2
    header = export_meta(str(exports["gpt2-memory_tokens"]))
    assert header["model"]["hf"]["path"] == "/models/gpt2-tiny"  # the header keeps the path


def test_remote_code_runs_in_a_python_without_rnnpipe(tmp_path):
    """trust_remote_code=True, in a subprocess where importing rnnpipe fails and from a directory
    outside the repository: the bundled code loads every export (several bundles in one process),
    with load_pretrained's logits bit for bit, its greedy generation, and no module of rnnpipe's."""
    exports = {"lrn": _lrn_export(tmp_path / "lrn", attention_every=2)}
    for name in ("gpt2-memory_tokens", "gpt2-recurrent_summary"):  # (kv_memory: in-process above)
        exports[name] = _gpt2_export(tmp_path / name, *GPT2_VARIANTS[name])
    script = NO_RNNPIPE.replace("BLOCKED", "('rnnpipe',)") + (
        "import json, torch\n"
        "torch.set_num_threads(1)  # as the reference: a matrix product's rounding depends on it\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "ids = torch.load(sys.argv[1])\n"
        "out = {}\n"
        "for export in sys.argv[2:]:\n"
        "    m = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True).eval()\n"
        "    with torch.no_grad():\n"
        "        torch.save(m(ids).logits, export + '.logits.pt')\n"
        "    g = m.generate(ids[:1, :5], max_new_tokens=12, do_sample=False, eos_token_id=None,\n"
        "                   pad_token_id=0)\n"
        "    out[export] = {'class': type(m).__module__, 'generated': g[0, 5:].tolist()}\n"
        "tok = AutoTokenizer.from_pretrained(sys.argv[2], trust_remote_code=True)\n"
        "out['tokens'] = tok('The river')['input_ids']\n"
        "out['rnnpipe_modules'] = sorted(k for k in sys.modules if k.split('.')[0] == 'rnnpipe')\n"
        "print(json.dumps(out))\n"
    )
    torch.save(IDS, tmp_path / "ids.pt")
    outside = tmp_path / "cwd"
    outside.mkdir()
    assert REPO not in outside.parents
    run = subprocess.run(
        [sys.executable, "-P", "-c", script, str(tmp_path / "ids.pt"), *map(str, exports.values())],
        capture_output=True,
        text=True,
        cwd=outside,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "mods")},
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "C forward" not in run.stderr and "Triton" not in run.stderr  # the loop runs, quietly
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["rnnpipe_modules"] == [] and got["tokens"] == list(b"The river")
    for name, export in exports.items():
        assert got[str(export)]["class"].startswith("transformers_modules."), name
        reference = _reference_logits(export)
        assert torch.equal(torch.load(f"{export}.logits.pt"), reference), name
        expected = load_pretrained(export).generate(IDS[:1, :5], 12, temperature=0)[0].tolist()
        assert got[str(export)]["generated"] == expected, name
    # the C forward (installed rnnpipe, a compiler here) against the bundle's PyTorch loop: rounding
    with torch.no_grad():
        native = load_pretrained(exports["lrn"])(IDS)[0]
    torch.testing.assert_close(native, torch.load(f"{exports['lrn']}.logits.pt"), rtol=1e-5, atol=1e-5)


def test_when_neither_code_imports_the_error_names_each_failure(tmp_path):
    export = _lrn_export(tmp_path / "e")
    script = NO_RNNPIPE.replace("BLOCKED", "('rnnpipe', 'omegaconf')") + (
        "from transformers import AutoModelForCausalLM\n"
        "try:\n"
        "    AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    run = subprocess.run(
        [sys.executable, "-P", "-c", script, str(export)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "mods")},
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    message = run.stdout.strip().splitlines()[-1]
    assert "The installed rnnpipe: rnnpipe (ModuleNotFoundError" in message, message
    assert "the copy bundled in the export: omegaconf (ModuleNotFoundError" in message, message
    assert "needs PyYAML, fsspec, omegaconf, torch, transformers" in message, message


def test_the_bundle_and_the_installed_rnnpipe_share_a_process(tmp_path):
    """The bundled classes, imported here beside the installed rnnpipe: their custom ops are
    registered under a namespace of their own, and their logits are the installed ones'."""
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    export = _lrn_export(tmp_path / "e", mixer=MixerKind.sru)
    bundled = get_class_from_dynamic_module(
        "rnnpipe_pipeline_models_hf_modeling.RnnpipeForCausalLM", str(export)
    )
    assert bundled.__module__.startswith("transformers_modules.")
    model = bundled.from_pretrained(export).eval()
    ops = sys.modules[bundled.__module__.rsplit(".", 1)[0] + ".rnnpipe_kernels_ops"]
    assert ops._RNNPIPE_OPS.startswith("rnnpipe_") and hasattr(getattr(torch.ops, ops._RNNPIPE_OPS), "sru")
    assert hasattr(torch.ops.rnnpipe, "sru")  # the installed rnnpipe's, untouched
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, load_pretrained(export)(IDS)[0])


def test_the_bundle_rewrites_rnnpipe_names_and_refuses_what_it_cannot(tmp_path):
    from rnnpipe.pipeline.models.hf.bundle import BundleError, _Rewrite, bundle

    source = (
        '"""doc naming rnnpipe.kernels.ops in prose"""\n'
        "import importlib\n"
        "import logging\n"
        "import rnnpipe.kernels.ops as ops\n"
        "from rnnpipe.kernels import reference, linear_scan\n"
        "import torch\n"
        "log = logging.getLogger('rnnpipe.kernels')\n"
        "@torch.library.custom_op('rnnpipe::twice', mutates_args=())\n"
        "def twice(x: torch.Tensor) -> torch.Tensor:\n"
        "    return 2 * x\n"
        "def f():\n"
        "    s = 'é'; from rnnpipe.pipeline.errors import ConfigError as E  # (ast's columns count bytes)\n"
        "    return importlib.import_module('rnnpipe.kernels.triton_scan'), E\n"
    )
    out = _Rewrite("m", source, "m.py").run()
    assert "from . import rnnpipe_kernels_ops as ops\n" in out
    assert (
        "from .rnnpipe_kernels import linear_scan; from . import rnnpipe_kernels_reference as reference"
        in out
    )
    assert "    s = 'é'; from .rnnpipe_pipeline_errors import ConfigError as E  #" in out
    assert 'importlib.import_module(".rnnpipe_kernels_triton_scan", __package__)' in out
    assert "custom_op(_RNNPIPE_OPS + '::twice'" in out and "getLogger('rnnpipe.kernels')" in out
    compile(out, "m.py", "exec")
    for bad, why in [
        ("import rnnpipe.pipeline.errors\n", "import rnnpipe.pipeline.errors"),
        ("from rnnpipe import __version__\n", "from rnnpipe import"),
        ("from .x import y\n", "a relative import"),
        ("NAME = 'rnnpipe.pipeline.errors'\n", "names an rnnpipe module"),
        ("import importlib\nimportlib.import_module('rnnpipe.nothing')\n", "import_module"),
    ]:
        with pytest.raises(BundleError, match=rf"^m\.py:\d+: .*{why}"):
            _Rewrite("m", bad, "m.py").run()
    # the bundle of this rnnpipe: transformers' own search for a remote module's files finds every
    # bundled module from either shim (what it copies from a directory, or downloads from the hub)
    from transformers.dynamic_module_utils import get_relative_import_files

    b = bundle()
    assert {"torch", "transformers", "omegaconf"} <= set(b.requirements)
    assert b.modules["rnnpipe.kernels.cpu_native"] == "rnnpipe_kernels_cpu_native"  # the stub
    export = _lrn_export(tmp_path / "e")
    closure = {Path(f).name for f in get_relative_import_files(export / "modeling_rnnpipe.py")}
    assert closure == {"configuration_rnnpipe.py", *(f"{m}.py" for m in b.modules.values())}
    found = {Path(f).name for f in get_relative_import_files(export / "configuration_rnnpipe.py")}
    assert "rnnpipe_pipeline_models_hf_configuration.py" in found
    # and what transformers' import check (run on each file fetched from the hub) asks for: never
    # rnnpipe (its imports sit in try blocks), only the packages the model card names
    from transformers.dynamic_module_utils import get_imports

    for name in closure | {"modeling_rnnpipe.py"}:
        needed = set(get_imports(export / name)) - set(sys.stdlib_module_names) - {"__future__"}
        assert needed <= {"torch", "transformers", "omegaconf", "yaml", "fsspec"}, (name, needed)
