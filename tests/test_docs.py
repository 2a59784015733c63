"""The documentation's facts that can be checked by reading it: every relative markdown link in README.md and
docs/*.md points at a file that exists, README.md links every docs page, the pages describe the product and not
its history (no issue numbers, no dated run logs), the test suite's size is stated in docs/testing.md only, and
the README's architecture table names every module of `tune_upl`. Plain file reads, no project imports: it runs
in well under a second."""
import re
from pathlib import Path
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

# [text](target) or [text](target "title") or [text](<target>); the text may hold one level of brackets.
LINK = re.compile(r'\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+"[^"]*")?\s*\)')
FENCE = re.compile(r"^\s*(```|~~~)")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
EXTERNAL = ("http://", "https://", "mailto:")


def markdown_files():
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def mask_code(text):
    """The text with fenced blocks and inline code spans blanked (same length, same lines): what looks like a
    link inside code is not one."""
    lines, in_fence = [], False
    for line in text.split("\n"):
        if FENCE.match(line):
            in_fence = not in_fence
            lines.append(" " * len(line))
        elif in_fence:
            lines.append(" " * len(line))
        else:
            lines.append(CODE_SPAN.sub(lambda m: "x" * len(m.group(0)), line))
    return "\n".join(lines)


def find_links(text):
    """(line number, target) of every link in markdown text, code excluded."""
    text = mask_code(text)
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in LINK.finditer(text)]


def links(path):
    return find_links(path.read_text(encoding="utf-8"))


def relative_target(path, target):
    """The file a relative link points at, or None for external and same-page (#anchor) links."""
    if not target or target.lower().startswith(EXTERNAL) or target.startswith("#"):
        return None
    return (path.parent / unquote(target.split("#", 1)[0])).resolve()


def test_docs_exist():
    assert (ROOT / "README.md").is_file()
    assert sorted(DOCS.glob("*.md")), "docs/ holds no markdown page"


def test_link_finder():
    """Links are found with their line, also with code in their text; links inside code are not."""
    text = ('see [a](x.md), [`b`](../y.md#z "t"), [c](#anchor), [d](https://e.org), ![img](p.png)\n'
            "`[not](code.md)` and `S[:,p](q)`\n```\n[fenced](no.md)\n```\n[after](w.md)\n")
    found = find_links(text)
    assert found == [(1, "x.md"), (1, "../y.md#z"), (1, "#anchor"), (1, "https://e.org"), (1, "p.png"),
                     (6, "w.md")]
    page = DOCS / "page.md"
    targets = [relative_target(page, target) for _, target in found]
    assert targets[:4] == [(DOCS / "x.md").resolve(), (ROOT / "y.md").resolve(), None, None]


def test_relative_links_point_at_existing_files():
    broken = []
    for path in markdown_files():
        for line, target in links(path):
            resolved = relative_target(path, target)
            if resolved is not None and not resolved.exists():
                broken.append(f"{path.relative_to(ROOT)}:{line}: broken link ({target}): no {resolved}")
    assert not broken, "broken relative links:\n" + "\n".join(broken)


def test_readme_links_every_docs_page():
    readme = ROOT / "README.md"
    linked = {relative_target(readme, target) for _, target in links(readme)}
    missing = [str(page.relative_to(ROOT)) for page in sorted(DOCS.glob("*.md")) if page.resolve() not in linked]
    assert not missing, f"README.md does not link these docs pages: {', '.join(missing)}"


# "issue 12", "PR 7", "#12" (not an anchor such as "(#reports)", not inside a URL) and ISO dates.
HISTORY = re.compile(r"\b(?:issues?|PR|pull request)\s*#?\s*\d+|(?<![\w&/])#\d+\b|\b20\d\d-\d\d-\d\d\b", re.I)
URL = re.compile(r"https?://[^\s)>]+")
SUITE_SIZE = re.compile(r"\b\d[\d,]* (?:tests|passed|failed)\b")
MODULE_ROW = re.compile(r"^\| (`[^|]*`) \|", re.M)


def history_mentions(text):
    """(line number, match) of each issue number or date in markdown text; URLs are left out (a link to an
    upstream bug is a source, not a log)."""
    text = URL.sub(lambda m: "x" * len(m.group(0)), text)
    return [(text.count("\n", 0, m.start()) + 1, m.group(0)) for m in HISTORY.finditer(text)]


def test_history_finder():
    text = ("fixed in issue 26, see #31 and PR #4\nmeasured 2026-12-02\n"
            "[Reports](#reports), (#reports), https://github.com/o/r/issues/30838, `a&#39;b`, 4 tissues 9\n")
    assert history_mentions(text) == [(1, "issue 26"), (1, "#31"), (1, "PR #4"), (2, "2026-12-02")]


def test_docs_mention_no_issue_number_or_run_date():
    found = [f"{path.relative_to(ROOT)}:{line}: {match}" for path in markdown_files()
             for line, match in history_mentions(path.read_text(encoding="utf-8"))]
    assert not found, "the docs describe the product, not its history:\n" + "\n".join(found)


def test_suite_size_is_stated_in_testing_md_only():
    testing = DOCS / "testing.md"
    assert SUITE_SIZE.search(testing.read_text(encoding="utf-8")), "docs/testing.md states no test count"
    elsewhere = [f"{path.relative_to(ROOT)}: {m.group(0)}" for path in markdown_files() if path != testing
                 for m in SUITE_SIZE.finditer(path.read_text(encoding="utf-8"))]
    assert not elsewhere, "the test suite's size lives in docs/testing.md; link it instead:\n" + "\n".join(elsewhere)


def architecture_paths():
    """Every path named in the first column of the README's architecture table."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Architecture", 1)[1].split("\n## ", 1)[0]
    return [path for cell in MODULE_ROW.findall(section) for path in re.findall(r"`([^`]+)`", cell)]


def test_architecture_table_names_every_module():
    named = architecture_paths()
    missing = [path for path in named if not (ROOT / path).exists()]
    assert not missing, f"the README's architecture table names files that do not exist: {missing}"
    modules = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "tune_upl").glob("*.py") if p.name != "__init__.py")
    unnamed = [module for module in modules if module not in named]
    assert not unnamed, f"the README's architecture table has no row for: {unnamed}"
    assert "tune_upl/versions.py" in named and len(named) >= 40
