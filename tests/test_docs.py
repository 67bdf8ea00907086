"""The README stays true: its config reference is the real one and its two commands exist."""

from __future__ import annotations

import re

from conftest import ROOT

from fed_ddp.config import reference_table


def test_readme_config_reference_is_current():
    readme = (ROOT / "README.md").read_text()
    assert reference_table() in readme, "README's config reference is stale: paste fed_ddp.config.reference_table()"


def test_readme_commands_exist():
    readme = (ROOT / "README.md").read_text()
    makefile = (ROOT / "Makefile").read_text()
    for target in ("demo", "test"):
        assert f"make {target}" in readme
        assert re.search(rf"^{target}:", makefile, re.MULTILINE)
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    for name in re.findall(r"configs/[\w/]+\.yaml", readme):
        assert (ROOT / name).exists(), name
