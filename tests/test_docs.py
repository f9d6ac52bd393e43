"""Every docs file and section the code, the tests and the Markdown cite exists in docs/.

Citations look like ``docs/hosts.md 3.3``, ``docs/dpm_solver_v3.md sections 3 and 6.2-6.3``, ``(docs/dpm_solver_v3.md,
sec. 2)``, ``hosts.md 4`` or a bare ``section 3.1`` / ``docs section 7``, which means that section of the first docs
file the same file names (its module docstring's, before the bare citation).  "spec 6.2" names no file and is
reported.  A section is a numbered Markdown heading
("## 3. ...", "### 3.1 ...").
"""
import os
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SKIP_DIRS = {".git", ".venv", "venv", "node_modules", "__pycache__", "build", "dist"}

NUMBER = r"\d+(?:\.\d+)*"
RANGE = rf"{NUMBER}(?:\s*[-–]\s*{NUMBER})?"
LIST = rf"{RANGE}(?:(?:\s*,\s*|\s+and\s+){RANGE})*"
# docs/<name>.md with optional sections; a bare <name>.md counts only when a section number follows
FILE_CITATION = re.compile(rf"(?<![\w/.-])(?P<prefix>docs/)?(?P<name>[A-Za-z0-9_-]+)\.md\b"
                           rf"(?:,?\s*(?:sections?|sec\.|§)\s*|\s+)?(?P<sections>{LIST})?")
BARE_CITATION = re.compile(rf"(?<![\w.])(?:docs\s+)?sections?\s+(?P<sections>{LIST})")
SPEC_CITATION = re.compile(r"\bspec(?:'s\b|\s+§?\d)")
HEADING = re.compile(r"^#{1,6}\s+(\d+(?:\.\d+)*)\.?\s", re.MULTILINE)


def doc_sections(name, docs=DOCS):
    """The numbered sections of docs/<name>.md, or None when the file does not exist."""
    path = docs / f"{name}.md"
    if not path.is_file():
        return None
    return set(HEADING.findall(path.read_text(encoding="utf-8")))


def section_numbers(text):
    numbers = []
    for part in re.split(r"\s*,\s*|\s+and\s+", text.strip()):
        numbers += [n.strip() for n in re.split(r"[-–]", part) if n.strip()]
    return numbers


def citation_problems(text, where, docs=DOCS):
    """(problems, citations) of one file's text: each problem names the place and the missing file or section."""
    problems, citations = [], 0
    found = []  # (position, name, sections text or None, explicit file)
    spans = []
    for match in FILE_CITATION.finditer(text):
        if match.group("prefix") or match.group("sections"):
            found.append((match.start(), match.group("name"), match.group("sections"), True))
            spans.append(match.span())
    for match in BARE_CITATION.finditer(text):
        if not any(start <= match.start() < end for start, end in spans):  # "<file> sections 3" is one citation
            found.append((match.start(), None, match.group("sections"), False))
    first_file = None
    for position, name, sections, explicit in sorted(found, key=lambda item: item[0]):
        line = text.count("\n", 0, position) + 1
        place = f"{where}:{line}"
        if explicit:
            first_file = first_file or name
        elif first_file is None:
            problems.append(f"{place}: 'section {sections}' names no docs file (cite docs/<file>.md {sections})")
            continue
        else:
            name = first_file
        citations += 1
        available = doc_sections(name, docs)
        if available is None:
            problems.append(f"{place}: docs/{name}.md does not exist")
            continue
        for number in section_numbers(sections or ""):
            if number not in available:
                problems.append(f"{place}: docs/{name}.md has no section {number}")
    for match in SPEC_CITATION.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        problems.append(f"{where}:{line}: 'spec' names no file; cite docs/dpm_solver_v3.md <section>")
    return problems, citations


def repository_files():
    for folder, subfolders, names in os.walk(ROOT):
        subfolders[:] = sorted(name for name in subfolders if name not in SKIP_DIRS)  # never walk into .venv
        for name in sorted(names):
            path = pathlib.Path(folder) / name
            relative = path.relative_to(ROOT)
            if path.suffix not in (".py", ".md"):
                continue
            if relative.parts[0] == "bench" and "results" in path.stem:  # generated tables
                continue
            yield path, relative


def test_every_cited_docs_file_and_section_exists():
    problems, citations = [], 0
    for path, relative in repository_files():
        if path == pathlib.Path(__file__).resolve():
            continue  # this file's docstring shows citation forms, not citations
        found, count = citation_problems(path.read_text(encoding="utf-8"), str(relative))
        problems += found
        citations += count
    assert not problems, "\n".join(problems)
    assert citations >= 30, citations  # the code does cite the docs: the scan found them


MISSING = "docs/" + "absent.md"  # a citation of a file that does not exist, built so no reader takes it for one


@pytest.mark.parametrize("text, expected", [
    ("see docs/hosts.md 1.3 and docs/hosts.md 9.9", ["docs/hosts.md has no section 9.9"]),
    ("(docs/dpm_solver_v3.md sections 3 and 6.2-6.7)", ["docs/dpm_solver_v3.md has no section 6.7"]),
    (MISSING, [f"{MISSING} does not exist"]),
    ("hosts.md 3.9", ["docs/hosts.md has no section 3.9"]),
    ("the cache (section 3.2)", ["names no docs file"]),
    ("docs/dpm_solver_v3.md 3.1, docs/hosts.md 1.6, later section 8", []),
    ("docs/dpm_solver_v3.md 3.1, docs/hosts.md 1.6, later section 9", ["docs/dpm_solver_v3.md has no section 9"]),
    ("# ---- degenerate EMS (spec 6.1)", ["'spec' names no file"]),
    ("bench/results_v3_study.md and README.md", []),
    ("docs/hosts.md 1.6, dpm_solver_v3.md 3 and (docs/dpm_solver_v3.md, sec. 2)", []),
])
def test_the_checker_finds_bad_citations(text, expected):
    problems, _ = citation_problems(text, "x.py")
    assert len(problems) == len(expected), problems
    for problem, wanted in zip(problems, expected):
        assert wanted in problem, problems
