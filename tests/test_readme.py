"""The README is a landing page: small, its two fresh-machine commands in order, and every relative link in it and
in docs/*.md pointing at a file (and heading) that exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
# The two commands (.ci/run runs the second) and the CPU-torch line that must come before them.
VENV = "python -m venv .venv"
CPU_TORCH = "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
MAIN = "python -m pip install -e . && diffusers-attn compare"
TESTS = 'python -m pip install -e ".[dev,triton]" && python -m pytest -q'


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (hyphens and underscores kept), spaces to -."""
    s = heading.strip().lower()
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def _anchors(md: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", md.read_text(), flags=re.DOTALL)
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, flags=re.MULTILINE)}


def _links(md: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", md.read_text(), flags=re.DOTALL)  # code blocks hold code, not links
    return [m.group(1) for m in LINK.finditer(text)]


def test_readme_is_a_landing_page_under_15_kb():
    size = len(README.read_bytes())
    assert size < 15 * 1024, f"README.md is {size} bytes; move reference material into docs/"


def test_readme_commands_venv_and_cpu_torch_first():
    text = README.read_text()
    positions = [text.find(s) for s in (VENV, CPU_TORCH, MAIN, TESTS)]
    assert -1 not in positions, dict(zip(("venv", "cpu torch", "main", "tests"), positions))
    assert positions == sorted(positions), "order must be: venv, CPU torch, main command, test command"


def test_readme_test_command_is_what_ci_runs():
    # .ci/run adds only pip's -q
    assert TESTS.replace("pip install", "pip install -q") in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("md", [README, *DOCS], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(md: Path):
    broken = []
    for target in _links(md):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (md.parent / path).resolve() if path else md
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target} (no heading #{anchor})")
    assert not broken, f"{md.name}: " + "; ".join(broken)


def test_docs_are_linked_from_the_readme():
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in _links(README)}
    missing = [p.name for p in DOCS if p.resolve() not in linked]
    assert not missing, f"docs not linked from README.md: {missing}"
