"""The README and docs/ stay true: the config reference is the real one, the two commands exist, every file
they name or link exists, the README stays a front page, and the package has no import cycle."""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import ROOT

from fed_ddp.config import reference_table

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_config_reference_is_current():
    text = (ROOT / "docs" / "configuration.md").read_text()
    assert reference_table() in text, "docs/configuration.md is stale: paste fed_ddp.config.reference_table()"


def test_compatibility_table_is_current():
    from fed_ddp.compat import table

    assert table() in (ROOT / "docs" / "compatibility.md").read_text(), "docs/compatibility.md is stale: paste " \
        "fed_ddp.compat.table()"


def test_readme_commands_exist():
    readme = (ROOT / "README.md").read_text()
    makefile = (ROOT / "Makefile").read_text()
    for target in ("demo", "test"):
        assert f"make {target}" in readme
        assert re.search(rf"^{target}:", makefile, re.MULTILINE)
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_named_configs_and_links_exist():
    for doc in DOCS:
        text = doc.read_text()
        for name in re.findall(r"configs/[\w/]+\.yaml", text):
            assert (ROOT / name).exists(), f"{doc.name}: {name}"
        for target in re.findall(r"\]\(([^)\s#]+)(?:#[^)]*)?\)", text):
            if not re.match(r"[a-z]+:", target):
                assert (doc.parent / target).exists(), f"{doc.relative_to(ROOT)}: link to {target} goes nowhere"


def test_readme_is_a_front_page():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300


def test_no_import_cycles_among_fed_ddp_modules():
    tool = ROOT.parent / "shared" / "tools" / "import_graph.py"
    if tool.is_file():
        import json

        out = subprocess.run([sys.executable, str(tool), "fed_ddp"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout
        assert json.loads(out.strip().splitlines()[-1])["cycles"] == []
    else:  # a clean clone without the workspace's tools: the same check by hand
        import ast

        files = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
                 for p in (ROOT / "fed_ddp").rglob("*.py")}
        graph = {}
        for mod, p in files.items():
            deps = set()
            for node in ast.walk(ast.parse(p.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fed_ddp"):
                    deps.update(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module
                                for a in node.names)
                elif isinstance(node, ast.Import):
                    deps.update(a.name for a in node.names if a.name.startswith("fed_ddp"))
            # a module's own packages run before it whatever it imports: not an edge
            graph[mod] = {d for d in deps if d in files and d != mod and not mod.startswith(d + ".")}
        seen, stack = set(), []

        def visit(m):
            if m in stack:
                raise AssertionError(f"import cycle: {' -> '.join(stack[stack.index(m):] + [m])}")
            if m in seen:
                return
            stack.append(m)
            for d in graph[m]:
                visit(d)
            stack.pop()
            seen.add(m)

        for m in graph:
            visit(m)
