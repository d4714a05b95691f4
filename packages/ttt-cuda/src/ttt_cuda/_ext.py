"""The compiled extension ``ttt_cuda._C``, imported once, with an install hint if it is missing."""

from __future__ import annotations

from types import ModuleType

__all__ = ["extension", "extension_error"]

_HINT = (
    "ttt_cuda._C (the compiled extension) could not be imported: {err}. Build it with "
    "`pip install ./packages/ttt-cuda` (TTT_ENABLE_CUDA=OFF for the C++ CPU path only, ON to "
    "require nvcc); see packages/ttt-cuda/README.md."
)


def _import() -> tuple[ModuleType | None, str | None]:
    try:
        from ttt_cuda import _C
    except ImportError as err:  # pragma: no cover - depends on the install
        return None, _HINT.format(err=err)
    return _C, None


# imported once, with this module: plain module globals, which torch.compile reads as constants
# when it traces a backend's supports() (a cached function call would warn there)
_MODULE, _ERROR = _import()


def extension() -> ModuleType:
    """The ``_C`` module; raises ImportError saying how to build it when it is missing."""
    if _MODULE is None:
        raise ImportError(_ERROR)
    return _MODULE


def extension_error() -> str | None:
    """None when the extension imports, else why not (with the install hint)."""
    return _ERROR
