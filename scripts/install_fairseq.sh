#!/usr/bin/env bash
# Install fairseq for the compemb fairseq plugin (the step pip's extras cannot express).
#
#   bash scripts/install_fairseq.sh PYTHON
#
# Called by ./dev.sh after `pip install -e .[all]`, which has already installed the
# dependencies listed in setup.cfg's `fairseq` extra (hydra-core, omegaconf, numpy,
# cython, cffi, regex, sacrebleu, tqdm, bitarray, packaging, scikit-learn).
#
# Why not `pip install fairseq`: the PyPI fairseq 0.12.2 fails to import on Python 3.11
# (dataclass mutable defaults). fairseq-fixed 0.12.3.1 imports; it is built
#   --no-build-isolation  so that its C++ extensions compile against the torch already in
#                         the environment (build isolation would download another torch),
#   --no-deps             because its own dependency list pulls a torchaudio that does not
#                         load with this torch.
# Building compiles C++ extensions (about 2 minutes on 2 cores). Idempotent: does nothing
# when the right version already imports.
set -euo pipefail

PY=${1:-python}
VERSION=0.12.3.1

have_fairseq() {
  "$PY" - "$VERSION" <<'PYEOF' >/dev/null 2>&1
import sys
from importlib.metadata import version
assert version("fairseq-fixed") == sys.argv[1]
import fairseq  # noqa: F401
import fairseq.models.transformer  # noqa: F401
PYEOF
}

if have_fairseq; then
  echo "fairseq-fixed $VERSION already installed for $PY"
  exit 0
fi

echo "installing fairseq-fixed $VERSION (compiles C++ extensions, about 2 minutes) ..."
# without build isolation the build runs on this environment's own setuptools, Cython,
# numpy and torch (the fairseq extra installs the last three)
if ! "$PY" -c "import setuptools, Cython, numpy, torch" >/dev/null 2>&1; then
  "$PY" -m pip install -q setuptools cython numpy
fi
"$PY" -m pip install -q --no-build-isolation --no-deps "fairseq-fixed==$VERSION"

if ! have_fairseq; then
  echo "error: fairseq-fixed $VERSION was installed but 'import fairseq' fails:" >&2
  "$PY" -c "import fairseq, fairseq.models.transformer" >&2 || true
  exit 1
fi
echo "fairseq-fixed $VERSION installed: $("$PY" -c 'import fairseq; print(fairseq.__file__)')"
