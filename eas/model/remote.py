"""`modeling_eas.py`: the EAS runtime as one self-contained module, shipped in every converted directory.

transformers imports a directory's remote code as a lone file, so it cannot import `eas`. Rather than
keep a second copy of the runtime, the file is *bundled* from this package's own modules when a model
is saved: starting from eas.model.artefact (the classes `auto_map` names), every `eas` module it needs
is followed through its imports, ordered so that each module comes after the ones it imports at module
level, and concatenated with its `eas` imports removed (their names are then the bundle's own globals).
A lazy import inside a function body becomes `pass`. The bundle refuses to build — it never writes a
half-working file — when two modules define the same top-level name differently, or when an `eas` name
is not defined by a bundled module. Third-party imports stay (torch, transformers, pydantic,
safetensors): transformers checks them when it imports the file.

Inside the bundle, `remote_source()` returns the running file itself, so a model loaded with
`trust_remote_code=True` and saved again ships the same code.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

ROOT = "eas.model.artefact"
SELF = "eas.model.remote"  # the bundler: never bundled; the bundle defines its own remote_source()

_HEADER = '''# ruff: noqa
"""EAS runtime for this converted model, bundled from the eas-serve package by eas.model.remote.

Load with `AutoModelForImageTextToText.from_pretrained(<this directory>, trust_remote_code=True)` (or
AutoModel / AutoModelForCausalLM / AutoConfig). The result is the stock transformers class of the base
model with the EAS conversion applied exactly, and its `generate` is exact (see the eas-serve
documentation, docs/eas-core.md, "Loading a converted directory").
"""

from __future__ import annotations
'''

_TAIL = '''

# ---- bundle ----


def remote_source() -> str:
    """This bundle's own source: a converted model saved again ships the code it was loaded with."""
    return Path(__file__).read_text()
'''


class BundleError(RuntimeError):
    """The EAS runtime cannot be bundled into one module (a name clash or an unresolved import)."""


@dataclass
class _Module:
    name: str
    source: str
    tree: ast.Module
    top_deps: set[str]  # eas modules imported at module level
    lazy_deps: set[str]  # eas modules imported inside functions
    eas_names: set[str]  # names imported from eas modules
    defined: dict[str, str]  # top-level name -> its source segment


def _is_eas(module: str | None) -> bool:
    return module is not None and (module == "eas" or module.startswith("eas."))


def _load(name: str) -> _Module:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise BundleError(f"cannot find module {name}")
    source = Path(spec.origin).read_text()
    tree = ast.parse(source)
    top_deps, lazy_deps, eas_names = set(), set(), set()
    top_level = set(map(id, tree.body))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(_is_eas(a.name) for a in node.names):
            raise BundleError(f"{name}: `import eas...` cannot be bundled; use `from eas.x import name`")
        if isinstance(node, ast.ImportFrom) and node.level == 0 and _is_eas(node.module):
            (top_deps if id(node) in top_level else lazy_deps).add(node.module)
            for alias in node.names:
                if alias.asname not in (None, alias.name):
                    raise BundleError(f"{name}: `from {node.module} import {alias.name} as {alias.asname}` "
                                      "cannot be bundled (the bundle has one namespace)")
                eas_names.add(alias.name)
    defined: dict[str, str] = {}
    for node in tree.body:
        segment = ast.get_source_segment(source, node) or ""
        targets: list[str] = []
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            targets = [node.name]
        elif isinstance(node, ast.Assign):
            targets = [t.id for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            targets = [node.target.id]
        for target in targets:
            defined[target] = segment
    return _Module(name, source, tree, top_deps, lazy_deps, eas_names, defined)


def _strip(module: _Module) -> str:
    """The module's source without its `from __future__` and `eas` imports (lazy ones become `pass`)."""
    lines = module.source.splitlines()
    top_level = set(map(id, module.tree.body))
    for node in ast.walk(module.tree):
        if not isinstance(node, ast.ImportFrom) or node.level != 0:
            continue
        if node.module == "__future__" or _is_eas(node.module):
            first, last = node.lineno - 1, node.end_lineno or node.lineno
            replacement = "" if id(node) in top_level else " " * node.col_offset + "pass"
            lines[first:last] = [replacement] + [""] * (last - first - 1)
    return "\n".join(lines).strip("\n") + "\n"


@functools.cache
def remote_source() -> str:
    """The bundled `modeling_eas.py` text (built once per process)."""
    modules: dict[str, _Module] = {}
    pending = [ROOT]
    while pending:
        name = pending.pop()
        if name in modules or name == SELF:
            continue
        modules[name] = module = _load(name)
        pending.extend(module.top_deps | module.lazy_deps)

    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order:
            return
        if name in visiting:
            raise BundleError(f"module-level import cycle through {name}")
        visiting.add(name)
        for dep in sorted(modules[name].top_deps):
            if dep != SELF:
                visit(dep)
        visiting.discard(name)
        order.append(name)

    for name in sorted(modules):
        visit(name)

    owner: dict[str, str] = {}
    for name in order:
        for symbol, segment in modules[name].defined.items():
            if symbol in owner and modules[owner[symbol]].defined[symbol] != segment:
                raise BundleError(f"`{symbol}` is defined differently in {owner[symbol]} and {name}; "
                                  "rename one so the runtime can be bundled into one module")
            owner.setdefault(symbol, name)
    owner["remote_source"] = SELF
    for name in order:
        unresolved = sorted(s for s in modules[name].eas_names if s not in owner)
        if unresolved:
            raise BundleError(f"{name} imports {unresolved} from eas modules that define no such top-level name")

    parts = [_HEADER]
    for name in order:
        parts.append(f"\n\n# ---- {name} ----\n\n{_strip(modules[name])}")
    parts.append(_TAIL)
    text = "".join(parts)
    compile(text, "modeling_eas.py", "exec")
    return text
