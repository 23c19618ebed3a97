"""The documentation: README.md and docs/*.md.

Every relative link points to a file in the repository (and, with a
#fragment, to a heading there), the README stays a short front page, and no
file refers to specification documents outside the repository: docs/spec.md
holds the specification.
"""

import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README_MAX_LINES = 250

# The names of documents that live outside the repository, joined at run time
# so that neither this file nor its bytecode names them itself.
OUTSIDE_NAMES = tuple(
    sep.join(parts)
    for sep, parts in (
        ("-", ("ddt-model", "spec")),
        ("-", ("sampling-and-sharing", "spec")),
        (".", ("design", "md")),
        ("/", ("shared", "docs")),
    )
)

_FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
_CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)


def _pages():
    docs = os.path.join(ROOT, "docs")
    names = sorted(f for f in os.listdir(docs) if f.endswith(".md"))
    return ["README.md"] + [os.path.join("docs", f) for f in names]


def _prose(text: str) -> str:
    """The text without fenced code blocks and code spans (links there are not links)."""
    return _CODE_SPAN.sub("", _FENCE.sub("", text))


def links(text: str):
    """Targets of the inline markdown links (and images) in `text`."""
    return [m.group(1) for m in _LINK.finditer(_prose(text))]


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(text: str) -> set:
    """Every heading anchor of a markdown page (repeated headings get -1, -2, ...)."""
    seen, out = {}, set()
    for m in _HEADING.finditer(_FENCE.sub("", text)):
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def _is_external(target: str) -> bool:
    return bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target)) or target.startswith("//")


def broken_links(page: str):
    """(target, why) for every relative link of `page` (relative to ROOT) that does not resolve."""
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        text = f.read()
    bad = []
    for target in links(text):
        if _is_external(target):
            continue
        path, _, fragment = target.partition("#")
        where = os.path.normpath(os.path.join(ROOT, os.path.dirname(page), path)) if path else os.path.join(ROOT, page)
        if not where.startswith(ROOT + os.sep) and where != ROOT:
            bad.append((target, "points outside the repository"))
        elif not os.path.exists(where):
            bad.append((target, "no such file"))
        elif fragment and where.endswith(".md"):
            with open(where, encoding="utf-8") as f:
                if fragment not in anchors(f.read()):
                    bad.append((target, f"no heading #{fragment} in {os.path.relpath(where, ROOT)}"))
    return bad


def test_link_checker_finds_links_and_skips_code():
    text = (
        "See [a](docs/a.md#x), ![img](p.png) and [ext](https://example.org).\n"
        "`[not](a link)` and\n```\n[not](either)\n```\n"
    )
    assert links(text) == ["docs/a.md#x", "p.png", "https://example.org"]
    assert (
        slug("Loading checkpoints (`load_checkpoint`, `ddt-fast convert`)")
        == "loading-checkpoints-load_checkpoint-ddt-fast-convert"
    )
    assert anchors("# A\n## B c\n## B c\n```\n# not\n```\n") == {"a", "b-c", "b-c-1"}


@pytest.mark.parametrize("page", _pages())
def test_relative_links_resolve(page):
    bad = broken_links(page)
    assert not bad, f"{page}: broken links: " + "; ".join(f"{t} ({why})" for t, why in bad)


def test_every_docs_page_is_linked_from_the_readme():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        targets = {t.partition("#")[0] for t in links(f.read())}
    missing = [p for p in _pages()[1:] if p.replace(os.sep, "/") not in targets]
    assert not missing, f"docs pages the README does not link: {missing}"


def test_readme_is_a_short_front_page():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        n = len(f.read().splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines (at most {README_MAX_LINES}); move detail to docs/"


_SKIP_DIRS = {
    ".git",
    ".venv",
    "build",
    "dist",
    "__pycache__",
    ".pytest_cache",
    ".hypothesis",
    "demo_out",
    "demo_out_quick",
    "tmp",
}


def _repository_files():
    """Tracked and untracked-but-not-ignored files (git), else a walk that skips build outputs."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout
        files = [f for f in out.decode().split("\0") if f]
        if files:
            return [f for f in files if os.path.isfile(os.path.join(ROOT, f))]
    except (OSError, subprocess.SubprocessError):
        pass
    files = []
    for top, dirs, names in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS and not d.endswith(".egg-info")]
        files += [os.path.relpath(os.path.join(top, n), ROOT) for n in names]
    return files


@pytest.mark.slow
def test_no_file_names_the_outside_specification_documents():
    hits = []
    for rel in _repository_files():
        path = os.path.join(ROOT, rel)
        if os.path.getsize(path) > 8 << 20:
            continue
        with open(path, "rb") as f:
            data = f.read()
        if b"\0" in data:  # binary
            continue
        text = data.decode("utf-8", errors="replace")
        for lineno, line in enumerate(text.splitlines(), 1):
            for name in OUTSIDE_NAMES:
                if name in line:
                    hits.append(f"{rel}:{lineno}: {name}")
    assert not hits, "files that name documents outside the repository (point at docs/spec.md instead):\n" + "\n".join(
        hits
    )
