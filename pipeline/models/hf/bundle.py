"""A copy of rnnpipe's model code inside an export, for ``trust_remote_code=True`` in a Python that
cannot import rnnpipe.

``transformers`` copies (from a directory) or downloads (from the hub) the files that a remote-code
module imports relatively, ``from .name import x``, from beside ``config.json``: one flat folder.
So each module of the import closure of rnnpipe's Hugging Face classes (:data:`ROOTS`) becomes one
file, ``rnnpipe.kernels.ops`` -> ``rnnpipe_kernels_ops.py``: its source as it is, but for what
names rnnpipe's modules, rewritten with :mod:`ast`:

- ``from rnnpipe.a.b import x`` -> ``from .rnnpipe_a_b import x``; a module imported as such
  (``from rnnpipe.kernels import reference``, ``import rnnpipe.a.b as m``) ->
  ``from . import rnnpipe_kernels_reference as reference``; imports inside functions alike;
- ``importlib.import_module("rnnpipe.a.b")`` -> ``importlib.import_module(".rnnpipe_a_b", __package__)``;
- the custom ops' namespace, ``"rnnpipe::op"``, -> one of the module's own (``rnnpipe_`` and a
  digest of its module name), so that the installed rnnpipe and a bundle, or two bundles, register
  their ops side by side in one process.

Whatever else names an rnnpipe module (``import rnnpipe``, a module's name in another string, a
relative import) stops the export with :class:`BundleError` naming the file and line: a bundle
that would import the installed rnnpipe, or fail, is never written.

Two modules are not copied. :data:`STUBS`: the C forward of LRN and oLRN, which is built on first
use from a C file the bundle does not carry (remote code should not compile anything); LRN and
oLRN run rnnpipe's PyTorch loop instead. :data:`LEFT_OUT`: the Triton kernels, reached only
through ``importlib``: transformers would copy them only if imported by name, and its import
check would then demand Triton on every machine; on CUDA the bundle runs the PyTorch reference.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from rnnpipe.pipeline.errors import PipelineError

# The modules the exported shims import; the bundle is their import closure within rnnpipe.
ROOTS = (
    "rnnpipe.pipeline.models.hf.configuration",
    "rnnpipe.pipeline.models.hf.modeling",
    "rnnpipe.pipeline.models.recurrence",  # imported inside a function, for model.kind=huggingface
)
OPS_NAMESPACE = "rnnpipe::"  # kernels/ops.py's torch.library namespace
_OPS_VARIABLE = "_RNNPIPE_OPS"
_MODULE_NAME = re.compile(r"rnnpipe(\.[A-Za-z_]\w*)+")  # (classifies a literal's value, edits nothing)
_DISTRIBUTIONS = {"yaml": "PyYAML"}  # import name -> pip name, where they differ

_NATIVE_STUB = '''"""rnnpipe's C forward of LRN and oLRN (rnnpipe/kernels/cpu_native.py) is not part of
an export's bundled code: it is compiled on first use, and remote code compiles nothing. Here LRN
and oLRN run rnnpipe's PyTorch loop (rnnpipe/kernels/cpu_rnn.py): the same recurrence, its
float32 results within rounding of the C loop's (docs/evaluation.md)."""

from __future__ import annotations

from typing import Any


def library() -> None:
    """No compiled library in a bundle."""
    return None


def forward(*args: Any) -> None:
    """None: the caller runs the PyTorch loop."""
    return None
'''
STUBS = {"rnnpipe.kernels.cpu_native": _NATIVE_STUB}  # module -> the source the bundle has instead
LEFT_OUT = ("rnnpipe.kernels.triton_scan", "rnnpipe.kernels.triton_rnn")


class BundleError(PipelineError):
    """rnnpipe's model code holds something the bundle cannot rewrite (the file and line say what)."""


def flat_name(module: str) -> str:
    """The bundle's module for an rnnpipe module: ``rnnpipe.kernels.ops`` -> ``rnnpipe_kernels_ops``."""
    return module.replace(".", "_")


def module_source(module: str) -> Path | None:
    """The source file of an rnnpipe module (``rnnpipe.pipeline...`` or ``rnnpipe.kernels...``),
    found without importing it, or None where ``module`` is no such module."""
    parts = module.split(".")
    if len(parts) < 2 or parts[0] != "rnnpipe" or not all(p.isidentifier() for p in parts):
        return None
    try:
        spec = importlib.util.find_spec(".".join(parts[:2]))  # imports rnnpipe itself only: cheap
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    base = Path(next(iter(spec.submodule_search_locations))).joinpath(*parts[2:])
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if len(parts) > 2 and base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def _is_module(module: str) -> bool:
    return module in STUBS or module in LEFT_OUT or module_source(module) is not None


@dataclass(frozen=True)
class Bundle:
    """The bundled code: ``files`` (file name -> content), ``modules`` (rnnpipe module -> its
    bundle module), and ``requirements``: the packages it imports (pip names), torch and
    transformers among them."""

    files: dict[str, bytes]
    modules: dict[str, str]
    requirements: tuple[str, ...]


class _Rewrite:
    """One module's source with its rnnpipe names rewritten to the bundle's (see the module doc)."""

    def __init__(self, module: str, source: str, where: str):
        self.module, self.where = module, where
        self.data = source.encode()
        try:
            self.tree = ast.parse(source, where)
        except SyntaxError as e:
            raise BundleError(f"{where}: not valid Python ({e})") from e
        starts = [0]
        for line in self.data.splitlines(keepends=True):
            starts.append(starts[-1] + len(line))
        self._starts = starts
        self.parents = {c: p for p in ast.walk(self.tree) for c in ast.iter_child_nodes(p)}
        self.edits: list[tuple[int, int, str]] = []
        self.needs: set[str] = set()  # the rnnpipe modules this one imports
        self.as_modules: set[str] = set()  # the bundle modules it imports as modules (from . import m)

    def fail(self, node: ast.AST, why: str) -> BundleError:
        return BundleError(f"{self.where}:{getattr(node, 'lineno', '?')}: {why}: the export cannot bundle it")

    def _span(self, node: ast.AST) -> tuple[int, int]:
        # (ast's columns count UTF-8 bytes, as self.data does)
        return (
            self._starts[node.lineno - 1] + node.col_offset,
            self._starts[node.end_lineno - 1] + node.end_col_offset,
        )

    def replace(self, node: ast.AST, text: str) -> None:
        self.edits.append((*self._span(node), text))

    def run(self) -> str:
        """The rewritten source; BundleError naming the line of anything it cannot rewrite."""
        handled: set[int] = set()
        for node in ast.walk(self.tree):
            if isinstance(node, ast.ImportFrom):
                self._from_import(node)
            elif isinstance(node, ast.Import):
                self._import(node)
            elif isinstance(node, ast.Call):
                self._import_call(node, handled)
        ops = False
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in handled:
                ops |= self._string(node)
        if ops:
            self._define_ops_namespace()
        if self.as_modules:
            self._name_modules()
        out = self.data
        end = len(out) + 1
        for start, stop, text in sorted(self.edits, key=lambda e: (e[0], e[1]), reverse=True):
            if stop > end:
                raise BundleError(f"{self.where}: two rewrites overlap near byte {start}")
            out, end = out[:start] + text.encode() + out[stop:], start
        return out.decode()

    def _from_import(self, node: ast.ImportFrom) -> None:
        if node.level:
            raise self.fail(node, "a relative import")
        base = node.module or ""
        if base != "rnnpipe" and not base.startswith("rnnpipe."):
            return
        if not _is_module(base) or base in LEFT_OUT:
            raise self.fail(node, f"from {base} import ...: {base} is not a module of rnnpipe's model code")
        names, modules = [], []
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            if alias.name != "*" and _is_module(sub):  # a module imported as such
                modules.append(f"{flat_name(sub)} as {alias.asname or alias.name}")
                self.needs.add(sub)
                self.as_modules.add(flat_name(sub))
            else:
                names.append(alias.name + (f" as {alias.asname}" if alias.asname else ""))
        statements = [f"from . import {', '.join(modules)}"] if modules else []
        if names:
            statements.insert(0, f"from .{flat_name(base)} import {', '.join(names)}")
            self.needs.add(base)
        self.replace(node, "; ".join(statements))

    def _import(self, node: ast.Import) -> None:
        if not any(a.name == "rnnpipe" or a.name.startswith("rnnpipe.") for a in node.names):
            return
        statements = []
        for alias in node.names:
            if alias.name != "rnnpipe" and not alias.name.startswith("rnnpipe."):
                statements.append(f"import {alias.name}" + (f" as {alias.asname}" if alias.asname else ""))
            elif alias.asname and _is_module(alias.name) and alias.name not in LEFT_OUT:
                statements.append(f"from . import {flat_name(alias.name)} as {alias.asname}")
                self.needs.add(alias.name)
                self.as_modules.add(flat_name(alias.name))
            else:  # `import rnnpipe.x` binds the name rnnpipe, which the bundle has no package for
                raise self.fail(node, f"import {alias.name} (write from {alias.name} import ...)")
        self.replace(node, "; ".join(statements))

    def _import_call(self, node: ast.Call, handled: set[int]) -> None:
        """``importlib.import_module("rnnpipe.x")``: the bundle's module, relative to its package."""
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if name != "import_module" or not node.args:
            return
        arg = node.args[0]
        if not (isinstance(arg, ast.Constant) and isinstance(arg.value, str)):
            return
        if not arg.value.startswith("rnnpipe"):
            return
        if len(node.args) != 1 or node.keywords or not _is_module(arg.value):
            raise self.fail(node, f"import_module({arg.value!r}, ...)")
        self.replace(arg, f'".{flat_name(arg.value)}", __package__')
        handled.add(id(arg))
        if arg.value not in LEFT_OUT:
            self.needs.add(arg.value)

    def _string(self, node: ast.Constant) -> bool:
        """A custom op's name gets the bundle's namespace (True); another string naming an rnnpipe
        module is refused, but for a logger's name."""
        value = node.value
        if value.startswith(OPS_NAMESPACE):
            self.replace(node, f"{_OPS_VARIABLE} + {('::' + value[len(OPS_NAMESPACE) :])!r}")
            return True
        if not _MODULE_NAME.fullmatch(value) or not _is_module(value):
            return False  # ("rnnpipe" alone is a word: model_type, a kind; an import of it is refused above)
        parent = self.parents.get(node)
        func = parent.func if isinstance(parent, ast.Call) else None
        if getattr(func, "attr", getattr(func, "id", "")) == "getLogger":
            return False  # a logger's name, not an import
        raise self.fail(node, f"the string {value!r} names an rnnpipe module")

    def _name_modules(self) -> None:
        """A function at the end, never called, importing each module this one imports as such
        (``from . import m``) in the form transformers looks for (``from .m import x``): it copies
        (or downloads) a remote-code module's relative imports of that form only."""
        lines = [f"    from .{m} import __name__  # noqa: F401" for m in sorted(self.as_modules)]
        end = len(self.data)
        text = (
            ("" if self.data.endswith(b"\n") else "\n")
            + "\n\ndef _rnnpipe_bundle_imports() -> None:\n"
            + '    """Never called (added by rnnpipe\'s bundler): names the modules imported above as\n'
            + '    modules, in imports transformers sees, so that it copies them with this file."""\n'
            + "\n".join(lines)
            + "\n"
        )
        self.edits.append((end, end, text))

    def _define_ops_namespace(self) -> None:
        """``_RNNPIPE_OPS``, after the module's leading imports: a namespace of this module's own."""
        body = self.tree.body
        last = None
        for stmt in body[1:] if body and isinstance(body[0], ast.Expr) else body:
            if not isinstance(stmt, ast.Import | ast.ImportFrom):
                break
            last = stmt
        if last is None:
            raise self.fail(self.tree.body[0], "custom ops in a module without leading imports")
        at = self._span(last)[1]
        self.edits.append(
            (
                at,
                at,
                "\nimport hashlib as _rnnpipe_hashlib\n\n"
                "# The bundle registers its custom ops under a namespace of its own (this module's name's\n"
                "# digest): the installed rnnpipe's are under 'rnnpipe', another bundle's under its own.\n"
                f'{_OPS_VARIABLE} = "rnnpipe_" + _rnnpipe_hashlib.sha256(__name__.encode()).hexdigest()[:16]',
            )
        )


def _origin(module: str, path: Path) -> str:
    """Where a module's source lives in rnnpipe, as a relative path (rnnpipe/kernels/ops.py)."""
    return module.replace(".", "/") + ("/__init__.py" if path.name == "__init__.py" else ".py")


def _header(origin: str, version: str) -> str:
    return (
        f"# rnnpipe {version}: {origin}, bundled with this export for transformers' trust_remote_code in a\n"
        "# Python without rnnpipe (rnnpipe's imports point at this directory's rnnpipe_*.py files).\n"
        "# Generated by rnnpipe export (rnnpipe/pipeline/models/hf/bundle.py): do not edit.\n"
    )


def _check(name: str, text: str, modules: set[str]) -> None:
    """The rewritten file parses, imports nothing of rnnpipe's and only bundle modules relatively."""
    try:
        tree = ast.parse(text, name)
    except SyntaxError as e:
        raise BundleError(f"{name}: the rewritten source does not parse ({e})") from e
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            targets = [node.module] if node.module else [a.name for a in node.names]
            if node.level != 1 or any(t not in modules for t in targets):
                raise BundleError(f"{name}:{node.lineno}: imports {targets}, not all in the bundle")
        elif isinstance(node, ast.ImportFrom | ast.Import):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            if any(n == "rnnpipe" or n.startswith("rnnpipe.") for n in names):
                raise BundleError(f"{name}:{node.lineno}: still imports {names}")


def _requirements(sources: list[str]) -> tuple[str, ...]:
    """The packages outside the standard library the sources import (outside try blocks, as
    transformers' own check reads them), by their pip names."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.Try):
            return
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.split(".")[0])
        for child in ast.iter_child_nodes(node):
            visit(child)

    for text in sources:
        visit(ast.parse(text))
    third_party = found - set(sys.stdlib_module_names) - {"__future__"}
    return tuple(sorted(_DISTRIBUTIONS.get(n, n) for n in third_party))


def _check_stubs(rewrites: dict[str, _Rewrite]) -> None:
    """Every attribute the bundle reads from a stub module, the stub defines."""
    for stub, text in STUBS.items():
        defined = {n.name for n in ast.parse(text).body if isinstance(n, ast.FunctionDef)}
        for rw in rewrites.values():
            bound = set()  # the names the stub module is bound to in this module
            for n in ast.walk(rw.tree):
                if isinstance(n, ast.ImportFrom):
                    bound |= {a.asname or a.name for a in n.names if f"{n.module}.{a.name}" == stub}
                elif isinstance(n, ast.Import):
                    bound |= {a.asname for a in n.names if a.name == stub and a.asname}
            for n in ast.walk(rw.tree):
                used = isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in bound
                if used and n.attr not in defined:
                    raise BundleError(
                        f"{rw.where}:{n.lineno}: uses {stub}.{n.attr}, which the bundle stubs out"
                    )


@functools.cache
def bundle() -> Bundle:
    """The bundle of this rnnpipe's model code (computed once per process: the sources do not
    change under it). BundleError naming the file and line of anything it cannot rewrite."""
    from rnnpipe import __version__

    rewrites: dict[str, _Rewrite] = {}
    texts: dict[str, str] = {}
    origins = {m: f"{m.replace('.', '/')}.py (a stub)" for m in STUBS}
    todo = list(ROOTS)
    while todo:
        module = todo.pop()
        if module in texts:
            continue
        if module in STUBS:
            texts[module] = STUBS[module]
            continue
        path = module_source(module)
        if path is None:
            raise BundleError(f"{module}: no such module of rnnpipe's to bundle")
        origins[module] = _origin(module, path)
        rw = _Rewrite(module, path.read_text(encoding="utf-8"), origins[module])
        texts[module] = rw.run()
        rewrites[module] = rw
        todo.extend(sorted(rw.needs))
    _check_stubs(rewrites)
    modules = {m: flat_name(m) for m in sorted(texts)}
    if len(set(modules.values())) != len(modules):
        raise BundleError(f"two rnnpipe modules have one bundle name: {sorted(modules)}")
    files = {}
    for module, text in texts.items():
        name = f"{modules[module]}.py"
        _check(name, text, set(modules.values()))
        files[name] = (_header(origins[module], __version__) + text).encode()
    return Bundle(files, modules, _requirements(list(texts.values())))
