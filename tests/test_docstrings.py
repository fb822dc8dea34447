"""Runs every ``Example::`` block (doctest lines) in the package's docstrings."""

import doctest
import importlib
import pkgutil

import pytest

import umilayers

# Modules whose import needs an optional extra are skipped when the extra is missing.
MODULES = sorted(
    m.name for m in pkgutil.walk_packages(umilayers.__path__, prefix="umilayers.")
    if m.name != "umilayers.__main__"
)


@pytest.mark.parametrize("module_name", MODULES)
def test_docstring_examples(module_name):
    module = importlib.import_module(module_name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(module, module_name, globs=dict(vars(module))):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {module_name}"


def _is_public(module_name):
    return not any(part.startswith("_") for part in module_name.split("."))


def test_every_public_class_has_an_example():
    """Public classes of public modules; exceptions are documented by the functions that raise them."""
    missing = []
    for module_name in filter(_is_public, MODULES):
        module = importlib.import_module(module_name)
        for name in getattr(module, "__all__", []):
            obj = getattr(module, name)
            if (isinstance(obj, type) and obj.__module__ == module_name
                    and not issubclass(obj, BaseException)):
                if ">>>" not in (obj.__doc__ or ""):
                    missing.append(f"{module_name}.{name}")
    assert not missing, f"public classes without a runnable Example: {missing}"


def test_every_module_has_all():
    missing = [m for m in MODULES if not hasattr(importlib.import_module(m), "__all__")]
    assert not missing, f"modules without __all__: {missing}"
