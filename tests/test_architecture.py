"""The house rules, checked: the floors import only downward, and every document the code or the docs cite
is in the repository (docs/architecture.md).

Imports are read statically (every `import` statement, also those inside functions, under TYPE_CHECKING or
lazy), so a lazy import cannot slip an upward dependency past the test; a runtime check adds that importing
the store pulls in no torch.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# package -> module prefixes it must never import (the floors: eas and model_store at the bottom, the service
# on both, the tools on top of everything).
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "eas": ("service", "model_store", "eas_tools"),
    "model_store": ("torch", "transformers", "eas.model", "eas.conversion", "eas.evaluation", "eas.zoo", "service",
                    "eas_tools"),
    "service": ("eas_tools",),
}


def imported_modules(source: str, module: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in `source`, the source of module `module`."""
    found = []
    package = module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing package
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            found.append((node.lineno, name))
            found.extend((node.lineno, f"{name}.{alias.name}") for alias in node.names)
    return found


def violations(source: str, module: str, forbidden: tuple[str, ...]) -> list[str]:
    return sorted({f"{module}:{line} imports {name}" for line, name in imported_modules(source, module)
                   if any(name == f or name.startswith(f + ".") for f in forbidden)})


def _modules(package: str) -> list[tuple[str, Path]]:
    # Only importable modules: a .py file in a folder that is no package (the modeling_eas.py a converted model
    # directory ships, model_store/embedded/*) is an artefact's data, run by transformers, not this floor's code.
    root = REPO / package
    return [(".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"), path)
            for path in sorted(root.rglob("*.py"))
            if all((d / "__init__.py").is_file() for d in path.parents if d == root or root in d.parents)]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_floors_import_only_downward(package: str) -> None:
    found = [v for module, path in _modules(package)
             for v in violations(path.read_text(), module, FORBIDDEN[package])]
    assert found == [], "\n".join(found)


def test_the_import_check_catches_lazy_relative_and_from_imports() -> None:
    """Negative control: the forms an upward import can take are all seen."""
    source = ("def f():\n    from model_store import ModelStore\n"
              "if TYPE_CHECKING:\n    import service.app\n"
              "from . import pipeline\n")
    found = violations(source, "eas.conversion.pipeline", FORBIDDEN["eas"])
    assert [v.split(" imports ")[1] for v in found] == ["model_store", "model_store.ModelStore", "service.app"]
    relative = imported_modules("from ..zoo import llava\n", "eas.conversion.pipeline")
    assert (1, "eas.zoo.llava") in relative  # relative imports resolve to absolute names
    assert violations("import torch\n", "model_store.store", FORBIDDEN["model_store"]) != []
    assert violations("import eas.manifest\n", "model_store.store", FORBIDDEN["model_store"]) == []


def test_importing_the_store_loads_no_torch() -> None:
    code = ("import sys, model_store, model_store.store; "
            "print([m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers') or m == 'eas.model'])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# --- documents ------------------------------------------------------------------------------------------

DOCS = REPO / "docs"
_DOC_PATH = re.compile(r"(?<![\w/.-])((?:docs|deploy)/[\w./-]+?\.md)(#[\w-]+)?")
# `name.md §N`, or `name §N` where `name` is one of the docs (a bare `§N` refers to the text it stands in).
_SECTION = re.compile(r"(?<![\w/-])([a-z][\w-]*?)(\.md)? ?§ ?(\d+)(?:\.(\d+))?")
_MD_LINK = re.compile(r"\]\(([^)\s]+)\)")


def _tracked(*patterns: str) -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", *patterns], capture_output=True,
                         text=True, cwd=REPO, check=True).stdout.split()
    return [REPO / p for p in out if (REPO / p).is_file()]


def _slug(heading: str) -> str:
    text = re.sub(r"[^\w\s-]", "", heading.strip().lower())
    return re.sub(r"\s", "-", text)


def _anchors(doc: Path) -> set[str]:
    return {_slug(line.lstrip("#")) for line in doc.read_text().splitlines() if line.startswith("#")}


def _has_section(doc: Path, number: str, sub: str | None) -> bool:
    pattern = rf"^###? {number}\.{sub}\b" if sub else rf"^## {number}\."
    return re.search(pattern, doc.read_text(), re.MULTILINE) is not None


def broken_references(text: str, where: str) -> list[str]:
    broken = []
    for path, anchor in _DOC_PATH.findall(text):
        target = REPO / path
        if not target.is_file():
            broken.append(f"{where}: {path} does not exist")
        elif anchor and anchor[1:] not in _anchors(target):
            broken.append(f"{where}: {path} has no section {anchor}")
    for name, md, number, sub in _SECTION.findall(text):
        doc = DOCS / f"{name}.md"
        if not md and not doc.is_file():
            continue  # "the §8", "of §5": prose, not a document name
        if not doc.is_file():
            broken.append(f"{where}: cites {name} §{number}, but docs/{name}.md does not exist")
        elif not _has_section(doc, number, sub or None):
            broken.append(f"{where}: cites {name} §{number}{'.' + sub if sub else ''}, which docs/{name}.md lacks")
    return broken


def test_every_document_the_code_cites_is_in_the_repository() -> None:
    files = [p for p in _tracked("*.py", "*.yml", "*.yaml", "Dockerfile", "Makefile", ".ci/run")
             if p != Path(__file__)]  # this file's negative controls cite missing documents on purpose
    broken = [b for path in files for b in broken_references(path.read_text(), str(path.relative_to(REPO)))]
    assert broken == [], "\n".join(broken)


def test_every_link_in_the_docs_resolves() -> None:
    broken = []
    for doc in _tracked("*.md"):
        if ".venv" in doc.parts:
            continue
        text = doc.read_text()
        broken += broken_references(text, str(doc.relative_to(REPO)))
        for link in _MD_LINK.findall(text):
            if re.match(r"[a-z]+:", link):  # http:, https:, mailto:
                continue
            path, _, anchor = link.partition("#")
            target = (doc.parent / path).resolve() if path else doc
            if not target.exists():
                broken.append(f"{doc.relative_to(REPO)}: link {link} points nowhere")
            elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
                broken.append(f"{doc.relative_to(REPO)}: link {link} names a missing section")
    assert broken == [], "\n".join(broken)


def test_the_reference_check_fails_on_what_it_should() -> None:
    """Negative control for the two document checks."""
    assert broken_references("see docs/no-such-doc.md", "x") != []
    assert broken_references("as eas-method.md §99 says", "x") != []
    assert broken_references("serving-conventions §4", "x") == []
    assert broken_references("eas-method.md §8.3", "x") == []
    assert broken_references("docs/eas-method.md#no-such-heading", "x") != []


_REPO_PATH = re.compile(r"`((?:eas|eas_tools|service|model_store|tests|examples|deploy)/[\w/.-]*)`")


def test_the_layout_docs_match_the_tree() -> None:
    """README's layout table and docs/architecture.md name only paths that exist, and between them name every
    package of the four floors."""
    texts = {name: (REPO / name).read_text() for name in ("README.md", "docs/architecture.md")}
    missing = [f"{name}: {path}" for name, text in texts.items() for path in _REPO_PATH.findall(text)
               if not (REPO / path).exists()]
    assert missing == []
    both = "\n".join(texts.values())
    packages = sorted({p.parent.relative_to(REPO).as_posix() for floor in FORBIDDEN | {"eas_tools": ()}
                       for p in (REPO / floor).rglob("__init__.py")})
    def named(package: str) -> bool:  # by its path, or by its folder name inside its parent's row
        return f"`{package}/" in both or f"`{package.rsplit('/', 1)[-1]}/`" in both

    assert [p for p in packages if not named(p)] == []
    assert not named("eas/no_such_package")  # negative control
