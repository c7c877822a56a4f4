"""The docs cannot rot: their Python snippets run, and they document every public name.

Runs in the plain `test` extra (no mkdocs needed):

- every fenced ```` ```python ```` block of `docs/**/*.md` and `README.md` is executed
  on its own, in a fresh namespace, so that a reader can copy any block and run it: it
  imports what it uses and defines its data. A block preceded by the line
  `<!-- continue -->` is the explicit exception: it runs in the namespace of the block
  above it (for tutorials built step by step; the prose says so). A block preceded by
  `<!-- skip -->` is an illustrative fragment and is not run (keep these rare). Blocks
  that embed a file with `--8<--` are not run here: the examples have their own tests.
  The blocks run with JAX's default promotion rules (`standard` dtype promotion, rank
  promotion allowed), as a user's script would; float64 stays enabled by `conftest.py`.
- every public name of `eqxjd` (`eqxjd.__all__`, or the public names of `dir(eqxjd)`)
  and of its public sub-packages appears in an API page as a `::: eqxjd.<name>`
  directive, and every directive names an object that exists;
- every page is in the `nav` of `mkdocs.yml`, every `--8<--` path exists, and every
  method page has a display formula and a paper;
- the user-facing text (the docs, `README.md`, `benchmarks/*.md`,
  `tests/reference/README.md` and `tests/reference/generate.py`) holds no project
  history or machine-specific detail: no session narration, no issue numbers, no
  planning files, no paths of the development machine. History goes in the changelog.
"""

import contextlib
import inspect
import io
import pathlib
import re
import textwrap

import eqxjd
import jax
import pytest


ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.md") if "_static" not in p.parts)
SKIP_MARKER = "<!-- skip -->"
CONTINUE_MARKER = "<!-- continue -->"
_FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,})\s*(?P<lang>[\w+-]*)")
_DIRECTIVE = re.compile(r"^\s*:::\s*(eqxjd(?:\.\w+)+)\s*$", re.MULTILINE)
_SNIPPET = re.compile(r"""--8<--\s+["']([^"':]+)(?::[-\d:]*)?["']""")


def python_blocks(text: str) -> list[tuple[int, str, bool]]:
    """The `(line number, code, continues)` of the fenced Python blocks to run in
    `text`; `continues` says that the block runs in the namespace of the one before."""
    lines = text.splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        indent, fence, lang = match["indent"], match["fence"], match["lang"]
        start = i
        body = []
        i += 1
        while i < len(lines) and lines[i].strip() != fence:
            body.append(lines[i][len(indent) :] if lines[i].startswith(indent) else "")
            i += 1
        i += 1  # closing fence
        previous = next(
            (line.strip() for line in reversed(lines[:start]) if line.strip()), ""
        )
        code = textwrap.dedent("\n".join(body))
        if (
            lang in ("python", "py")
            and previous != SKIP_MARKER
            and "--8<--" not in code
        ):
            blocks.append((start + 1, code, previous == CONTINUE_MARKER))
    return blocks


def test_python_blocks_found():
    # Guards the parser: the quick start has blocks to run; a skipped block is skipped;
    # a continuation is marked as such.
    assert len(python_blocks((DOCS / "quickstart.md").read_text())) >= 3
    text = "a\n\n<!-- skip -->\n```python\nraise\n```\n\n```python\nx = 1\n```\n"
    assert python_blocks(text) == [(8, "x = 1", False)]
    text += "\n<!-- continue -->\n```python\ny = x\n```\n"
    assert python_blocks(text)[1] == (13, "y = x", True)


PAGES_WITH_CODE = [
    p for p in PAGES + [ROOT / "README.md"] if python_blocks(p.read_text())
]


@pytest.mark.parametrize(
    "page", PAGES_WITH_CODE, ids=[str(p.relative_to(ROOT)) for p in PAGES_WITH_CODE]
)
def test_python_blocks_run(page):
    blocks = python_blocks(page.read_text())
    assert not blocks[0][2], (
        f"{page.relative_to(ROOT)}: the first block cannot be a continuation"
    )
    namespace: dict = {}
    for line, code, continues in blocks:
        if not continues:
            namespace = {"__name__": f"docs_{page.stem}_{line}"}
        try:
            compiled = compile(code, f"{page.relative_to(ROOT)}:{line}", "exec")
            with (
                contextlib.redirect_stdout(io.StringIO()),
                jax.numpy_dtype_promotion("standard"),
                jax.numpy_rank_promotion("allow"),
            ):
                exec(compiled, namespace)
        except Exception as e:
            raise AssertionError(
                f"The Python block at {page.relative_to(ROOT)}:{line} failed: {e!r}"
            ) from e


def _public_names() -> list[str]:
    names = []
    top = getattr(eqxjd, "__all__", None)
    if top is None:
        top = [n for n in dir(eqxjd) if not n.startswith("_")]
    for name in top:
        obj = getattr(eqxjd, name)
        if inspect.ismodule(obj):
            if not obj.__name__.startswith("eqxjd."):
                continue  # e.g. `importlib`, imported for `__version__`
            sub = getattr(obj, "__all__", None)
            if sub is None:
                sub = [
                    n
                    for n in dir(obj)
                    if not n.startswith("_")
                    and getattr(getattr(obj, n), "__module__", "").startswith("eqxjd")
                ]
            names += [f"{name}.{n}" for n in sub]
        else:
            names.append(name)
    return sorted(names)


def _directives() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for page in PAGES:
        for path in _DIRECTIVE.findall(page.read_text()):
            found.setdefault(path, []).append(str(page.relative_to(DOCS)))
    return found


def test_every_public_name_is_documented():
    documented = _directives()
    missing = [n for n in _public_names() if f"eqxjd.{n}" not in documented]
    assert not missing, (
        f"Public names without a `::: eqxjd.<name>` directive in docs/api: {missing}"
    )


def test_directives_are_unique_and_exist():
    for path, pages in _directives().items():
        assert len(pages) == 1, f"{path} is documented twice: {pages}"
        obj = eqxjd
        for piece in path.split(".")[1:]:
            assert hasattr(obj, piece), f"`::: {path}` in {pages[0]}: no such object"
            obj = getattr(obj, piece)


def test_every_page_is_in_the_nav():
    nav = set(re.findall(r"'([\w/.-]+\.md)'", (ROOT / "mkdocs.yml").read_text()))
    pages = {str(p.relative_to(DOCS)) for p in PAGES}
    assert pages - nav == set(), "pages missing from the nav of mkdocs.yml"
    assert nav - pages == set(), "nav entries without a page"


def test_snippet_paths_exist():
    for page in PAGES:
        for path in _SNIPPET.findall(page.read_text()):
            assert (ROOT / path).is_file() or (DOCS / path).is_file(), (
                f"{page.relative_to(DOCS)} embeds missing file {path}"
            )


METHOD_PAGES = sorted((DOCS / "api" / "methods").glob("*.md"))


@pytest.mark.parametrize("page", METHOD_PAGES, ids=[p.stem for p in METHOD_PAGES])
def test_method_pages_have_formula_and_paper(page):
    text = page.read_text()
    assert "$$" in text, f"{page.name} has no display formula"
    assert re.search(r"^\*\*Papers?[:.]?\*\*", text, re.MULTILINE), (
        f"{page.name} cites no paper (a line starting with **Paper:**)"
    )


# History belongs in the changelog; the rest of the user-facing text states what is,
# how it was measured and on what machine (in words).
_HISTORY = re.compile(
    r"this session|earlier sessions?|previous sessions?|same session|previous run"
    r"|\bissue \d+|methods\.md|solver-notes|/work/",
    re.IGNORECASE,
)
USER_TEXT = (
    [p for p in PAGES if p.name != "changelog.md"]
    + [ROOT / "README.md", ROOT / "tests" / "reference" / "README.md"]
    + [ROOT / "tests" / "reference" / "generate.py"]
    + sorted((ROOT / "benchmarks").glob("*.md"))
)


@pytest.mark.parametrize(
    "path", USER_TEXT, ids=[str(p.relative_to(ROOT)) for p in USER_TEXT]
)
def test_no_history_in_user_text(path):
    hits = [
        f"{path.relative_to(ROOT)}:{i}: {line.strip()}"
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if _HISTORY.search(line)
    ]
    assert not hits, "History or machine paths outside the changelog:\n" + "\n".join(
        hits
    )
