"""A compatibility shim for Triton's CPU interpreter (tests only; compiled kernels never see it)."""

from __future__ import annotations


def patch_interpreter_index() -> None:
    """Triton 3.6's interpreter turns a scalar tensor into a Python index with
    ``int(array of shape (1,))`` (``program_id`` and everything computed from it are such arrays),
    which NumPy 2.4 rejects ("only 0-dimensional arrays can be converted to Python scalars"), so
    any ``range`` bounded by a program's position fails. Later Triton squeezes the array first;
    this does the same for the older interpreter. Idempotent; a no-op where the hook is missing."""
    try:
        from triton.runtime import interpreter
    except ImportError:  # pragma: no cover
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_shardsoftmax_index", False):
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_lang_tensor._shardsoftmax_index = True
    interpreter._patch_lang_tensor = patch_lang_tensor
