"""The C++ core, ``t2i_fast._C`` (``from t2i_fast.native import _C``); where it is missing or
does not load, an ImportError that says how to get one instead of "cannot import name '_C'".
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent

# The project's in-place build (what CI does for its sanitizer build), for work on a checkout.
_IN_PLACE_BUILD = (
    'pip install pybind11 && cmake -S . -B build/dev -DPython_EXECUTABLE="$(command -v python)"'
    ' -Dpybind11_DIR="$(python -m pybind11 --cmakedir)" && cmake --build build/dev'
    " && cp build/dev/_C*.so t2i_fast/"
)


def _explain(exc: ImportError) -> str:
    if isinstance(exc, ModuleNotFoundError) and exc.name == "t2i_fast._C":
        problem = (f"t2i_fast._C, the C++ loader, is not built in {_PACKAGE}: Python imported "
                   "the source tree of a checkout (as it does when run from the checkout's "
                   "root) instead of an installed t2i-fast.")
    else:
        built = ", ".join(path.name for path in sorted(_PACKAGE.glob("_C.*"))) or "_C"
        problem = (f"t2i_fast._C, the C++ loader ({built} in {_PACKAGE}), does not load: "
                   f"{exc}. It was built for another Python or its libraries are missing.")
    return (f"{problem} Install t2i-fast with `bash scripts/setup.sh` (or `pip install .`) "
            "and run `.venv/bin/t2i-fast`, or Python from outside the checkout; or, to work "
            f"on the checkout itself, build the extension in place from its root: "
            f"{_IN_PLACE_BUILD}")


try:
    # Not "from t2i_fast import _C": that reports a missing module as a missing name.
    import t2i_fast._C as _C
except ImportError as exc:
    raise ImportError(_explain(exc)) from exc

__all__ = ["_C"]
