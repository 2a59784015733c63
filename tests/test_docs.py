"""The documentation's links: every relative markdown link in README.md and docs/*.md points at a file that
exists, and README.md links every docs page. Plain file reads, no project imports: it runs in well under a
second."""
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
