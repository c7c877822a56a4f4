"""MkDocs hooks for the eqxjd docs (referenced from `mkdocs.yml`).

The maths renderer, MathJax 3, is shipped with the site from the `django-static-mathjax`
Python package (it installs the import package `mathjax`, with MathJax's build under
`mathjax/static/mathjax/`). Copying it at build time keeps the site self-contained: it
loads no script from a CDN and no web font (MathJax's SVG output needs no fonts), so it
renders offline, including from `mkdocs serve`.
"""

import pathlib

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files


_MATHJAX_FILES = ("es5/tex-svg-full.js", "LICENSE")


def _mathjax_root() -> pathlib.Path:
    try:
        import mathjax  # from the `django-static-mathjax` package
    except ImportError as e:
        raise PluginError(
            "The docs need MathJax from the `django-static-mathjax` package: "
            "pip install -e '.[docs]' (or pip install django-static-mathjax)."
        ) from e
    root = pathlib.Path(mathjax.__file__).parent / "static" / "mathjax"
    for name in _MATHJAX_FILES:
        if not (root / name).is_file():
            raise PluginError(f"MathJax file {root / name} not found.")
    return root


def on_files(files: Files, config) -> Files:
    root = _mathjax_root()
    for name in _MATHJAX_FILES:
        uri = "_static/mathjax/" + name.split("/")[-1]
        files.append(File.generated(config, uri, abs_src_path=str(root / name)))
    return files
