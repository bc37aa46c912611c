"""The user documentation stays a README plus documents that hold together: a README of at
most 1,600 words that opens with the two set-up commands, no commit ids in the README, the
documents or the task files (git history keeps those), and relative links and #anchors
that resolve."""
from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
README_MAX_WORDS = 1600
SETUP_COMMANDS = ["bash scripts/train_mujoco.sh", "bash scripts/test.sh"]

# A commit id: a word of 7-40 hex digits with at least one digit and one letter (so plain
# numbers such as 10000000 and words such as "deadbeef" or "added" do not count).
HEX_WORD = re.compile(r"(?<![0-9A-Za-z_])[0-9a-fA-F]{7,40}(?![0-9A-Za-z_])")
# The one allowed pin: a table caption in these two documents that starts with
# "Measured at commit <id>" or "Runs at commit <id>"; only that id is exempt.
PIN_FILES = {"docs/performance.md", "docs/results.md"}
PIN_LINE = re.compile(r"^[*_]*(?:Measured|Runs) at commit ([0-9a-fA-F]{7,40})(?![0-9A-Za-z_])")

FENCE = re.compile(r"^(```|~~~)")
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, https:, mailto:, ...


def doc_files() -> list[Path]:
    return [README, *sorted((ROOT / "docs").rglob("*.md"))]


def config_files() -> list[Path]:
    return sorted((ROOT / "configs").rglob("*.yaml"))


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def is_commit_id(word: str) -> bool:
    return any(c.isdigit() for c in word) and any(c.isalpha() for c in word)


def commit_ids(path: Path, name: str | None = None) -> list[tuple[int, str]]:
    """(line number, word) of every commit-id-like word in ``path``, less the allowed pin;
    ``name`` is the file's path in the repository (default: from ``path``)."""
    name = rel(path) if name is None else name
    found = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        exempt = None
        pin = PIN_LINE.match(line) if name in PIN_FILES else None
        if pin:
            exempt = pin.start(1)
        for match in HEX_WORD.finditer(line):
            if match.start() != exempt and is_commit_id(match.group()):
                found.append((number, match.group()))
    return found


def prose_lines(text: str, keep_inline_code: bool = False) -> list[str]:
    """The lines of a Markdown text outside fenced code blocks, inline code removed unless
    ``keep_inline_code`` (headings render it as text)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
        elif not fenced:
            lines.append(line if keep_inline_code else re.sub(r"`[^`]*`", "", line))
    return lines


def github_anchor(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text lowercased, punctuation other than
    '-' and '_' dropped, spaces turned into '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links keep their text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").replace("*", "")
    text = text.strip().lower()
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return kept.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor a Markdown file defines: its headings (duplicates numbered -1, -2, ...
    as GitHub does) and explicit <a name=...> / id=... targets."""
    text = path.read_text(encoding="utf-8")
    found: set[str] = set()
    seen: dict[str, int] = {}
    for line in prose_lines(text, keep_inline_code=True):
        heading = re.match(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            base = github_anchor(heading.group(1))
            n = seen.get(base, 0)
            found.add(base if n == 0 else f"{base}-{n}")
            seen[base] = n + 1
    found.update(re.findall(r"<a\s+(?:name|id)=\"([^\"]+)\"", text))
    return found


def broken_link(source: Path, target: str) -> str | None:
    """Why ``target`` (a link in ``source``) does not resolve, or None."""
    if not target or EXTERNAL.match(target):
        return None
    path_part, _, anchor = target.partition("#")
    destination = (source.parent / path_part).resolve() if path_part else source
    if not destination.exists():
        return f"{target}: no such file"
    if anchor:
        if destination.suffix != ".md" or destination.is_dir():
            return f"{target}: an anchor into a file that is not Markdown"
        if anchor not in anchors(destination):
            return f"{target}: no heading with anchor #{anchor} in {rel(destination)}"
    return None


def test_readme_is_short():
    words = len(README.read_text(encoding="utf-8").split())
    assert words <= README_MAX_WORDS, f"README.md has {words} words (at most {README_MAX_WORDS})"


def test_readme_opens_with_the_two_setup_commands():
    """The first code block, before any section, holds the two commands that do all set-up."""
    lines = README.read_text(encoding="utf-8").splitlines()
    start = next((k for k, line in enumerate(lines) if FENCE.match(line.strip())), None)
    assert start is not None, "README.md has no code block"
    assert not any(line.startswith("## ") for line in lines[:start]), \
        "README.md's first code block comes after a section heading"
    commands = []
    for line in lines[start + 1:]:
        if FENCE.match(line.strip()):
            break
        command = line.split(" #", 1)[0].strip()
        if command and not command.startswith("#"):
            commands.append(command)
    assert commands[:2] == SETUP_COMMANDS, f"README.md's first commands are {commands[:2]}"


@pytest.mark.parametrize("path", [*doc_files(), *config_files()], ids=rel)
def test_no_commit_ids(path):
    found = commit_ids(path)
    assert not found, f"{rel(path)}: commit ids {', '.join(f'line {n}: {w}' for n, w in found)}"


def test_only_the_caption_pin_is_exempt(tmp_path):
    """The exemption covers one id right after 'Measured at commit' / 'Runs at commit' at the
    start of a line of docs/performance.md or docs/results.md, and nothing else."""
    doc = tmp_path / "doc.md"
    doc.write_text("Measured at commit 1a2b3c4 on 2026-12-03, idle machine.\n"
                   "Measured at commit 1a2b3c4, next to deadbee1.\n"
                   "We measured at commit 1a2b3c4.\n"
                   "| 10000000 | deadbeef | 2311 |\n")
    assert commit_ids(doc, "docs/performance.md") == [(2, "deadbee1"), (3, "1a2b3c4")]
    assert commit_ids(doc, "docs/results.md") == [(2, "deadbee1"), (3, "1a2b3c4")]
    assert commit_ids(doc, "docs/usage.md") == [(1, "1a2b3c4"), (2, "1a2b3c4"), (2, "deadbee1"), (3, "1a2b3c4")]


@pytest.mark.parametrize("path", doc_files(), ids=rel)
def test_links_resolve(path):
    problems = []
    for number, line in enumerate(prose_lines(path.read_text(encoding="utf-8")), 1):
        for match in LINK.finditer(line):
            problem = broken_link(path, match.group(1))
            if problem:
                problems.append(problem)
    assert not problems, f"{rel(path)}: " + "; ".join(problems)


@pytest.mark.parametrize("path", config_files(), ids=rel)
def test_task_file_links_resolve(path):
    """Task-file headers point at the documents with paths relative to the file (../../docs/...)."""
    problems = []
    for line in path.read_text(encoding="utf-8").splitlines():
        comment = line.partition("#")[2] if not line.startswith("#") else line[1:]
        for target in re.findall(r"(\.\./[^\s,;)]+)", comment):
            problem = broken_link(path, target.rstrip("."))
            if problem:
                problems.append(problem)
    assert not problems, f"{rel(path)}: " + "; ".join(problems)


def test_github_anchor_rules():
    assert github_anchor("Resume, evaluate, render") == "resume-evaluate-render"
    assert github_anchor("The `M` factor & HATRPO's step") == "the-m-factor--hatrpos-step"
    assert github_anchor("Benchmarks and the crash test") == "benchmarks-and-the-crash-test"
    assert github_anchor("snake_case and kebab-case") == "snake_case-and-kebab-case"
