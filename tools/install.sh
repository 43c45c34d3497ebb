#!/usr/bin/env bash
# Set up HQOD-D2 on a fresh machine: a Python 3.11 virtual environment in $VENV (default .venv)
# with the pinned dependencies, detectron2, and the hqod package in editable mode.
#
# detectron2 comes from the PyPI sdist pb1-detectron2==0.6 (the official v0.6 Python code without
# its C++ sources), built without the C++ extension, plus a detectron2._C stand-in that raises a
# clear error for the C++-only ops. A detectron2 that is already installed in the venv is kept:
# an official one (with its real _C) as it is, ours with the current stand-in copied in.
# Idempotent: a second run with nothing changed takes a second.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-python3.11}
# From the package indexes pip is configured with (tools/fetch_sdist.py), checked against the pin.
D2_SDIST="pb1-detectron2-0.6.tar.gz"
D2_SDIST_SHA256="5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"

stamp_inputs=(requirements.txt setup.py tools/install.sh tools/fetch_sdist.py projects/HQOD/hqod/compat/d2_c_standin.py)
want=$(cat "${stamp_inputs[@]}" | sha256sum | cut -d' ' -f1)
stamp=$VENV/.hqod-install-stamp
if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then
  exit 0
fi

start=$SECONDS
if [[ ! -x $VENV/bin/python ]]; then
  command -v "$PYTHON" >/dev/null || { echo "error: $PYTHON not found; set PYTHON=/path/to/python3.11" >&2; exit 1; }
  echo "[install] creating $VENV with $("$PYTHON" --version)"
  "$PYTHON" -m venv "$VENV"
fi
PY=$VENV/bin/python
PIP=("$PY" -m pip --disable-pip-version-check)
echo "[install] pinned dependencies (torch alone is ~5 GB on a first run)"
"${PIP[@]}" install -q --upgrade pip wheel "setuptools<81"
"${PIP[@]}" install -q -r requirements.txt

if "$PY" -c "import detectron2" 2>/dev/null; then
  echo "[install] detectron2 already installed: $("$PY" -c 'import detectron2, os; print(detectron2.__version__, os.path.dirname(detectron2.__file__))')"
  # The stand-in that an earlier run installed takes this checkout's changes (a real _C stays).
  standin=$("$PY" -c 'from detectron2 import _C; print(_C.__file__ if getattr(_C, "IS_STANDIN", False) else "")' 2>/dev/null || true)
  [[ -z $standin ]] || cp projects/HQOD/hqod/compat/d2_c_standin.py "$standin"
else
  echo "[install] building detectron2 (pb1-detectron2==0.6) without its C++ extension"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  # not `pip download`: it refuses pb1-detectron2, whose metadata has a direct-URL dependency
  "$PY" tools/fetch_sdist.py pb1-detectron2 "$D2_SDIST" "$D2_SDIST_SHA256" "$work/d2.tar.gz"
  tar xzf "$work/d2.tar.gz" -C "$work"
  src=$work/pb1-detectron2-0.6
  # No C++ extension; no black pin; the model-zoo configs where setup.py expects them.
  "$PY" - "$src/setup.py" <<'PYEOF'
import sys
p = sys.argv[1]
s = open(p).read()
for old, new in [("ext_modules=get_extensions(),", "ext_modules=[],"), ('"black==21.4b2",', "")]:
    assert old in s, f"unexpected pb1-detectron2 setup.py: {old!r} not found"
    s = s.replace(old, new)
open(p, "w").write(s)
PYEOF
  [[ -d $src/detectron2/model_zoo/configs && ! -L $src/detectron2/model_zoo/configs ]] && mv "$src/detectron2/model_zoo/configs" "$src/configs"
  cp projects/HQOD/hqod/compat/d2_c_standin.py "$src/detectron2/_C.py"
  "${PIP[@]}" install -q --no-build-isolation "$src" "pillow<10"
fi

echo "[install] hqod (editable)"
"${PIP[@]}" install -q --no-build-isolation --no-deps -e .
"$PY" -c "import hqod, detectron2.modeling" || { echo "error: detectron2/hqod do not import; see above" >&2; exit 1; }
echo "$want" > "$stamp"
echo "[install] done in $((SECONDS - start)) s: $VENV"
