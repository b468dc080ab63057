"""A fix for inductor's C++ wrapper in torch versions whose size-array cache keys on short-lived objects.

Inductor's C++ wrapper (``CppWrapperCpu.codegen_int_array_var``) declares each size or stride array
(``const int64_t int_array_N[] = {...}``) once and caches its name under a key that includes the identity of the
``writeline`` callable it was written through. In torch 2.11 that identity is ``id(writeline)``. The writeline is a
bound method, made afresh at each call and freed right after, so a later bound method can get the same id. A lookup
in the second code generation pass (buffer reuse and allocation lines) can then hit a name that the first pass
declared further down the file, for a view passed to a custom op in a later block, and g++ refuses the result:
``'int_array_86' was not declared in this scope``. Session 29 met this compiling the full-size SLaT torso with
``RunOptions.slat_cpp_wrapper`` on an H100 (``benchmarks/results/base_vs_official_h100/session29/ab2/``). Upstream
changed the key to ``id(writeline.__self__)``, the long-lived owner of the method, in the torch 2.13 this project
tests with (its comment: "Bound methods have transient IDs, so we use the ID of the bound object instead").

:func:`install_stable_writeline_key` gives the old method the same key: it hands the cached method one bound method
per owner and function, kept alive (with its owner) on the wrapper object for the wrapper's life, so equal ids mean
the same owner. It changes nothing where the installed torch already keys on the owner, which it reads from the
method's source.
"""
from __future__ import annotations

import functools
import inspect
from typing import Callable

#: set on the wrapped method, so that installing twice wraps once
_MARK = "_fs3d_stable_writeline_key"


def keys_on_short_lived_writeline(method: Callable) -> bool:
    """True where ``method`` (a ``codegen_int_array_var``) keys its cache on ``id(writeline)`` rather than on the
    writeline's owner (``writeline.__self__``): the torch 2.11 form. False for an already wrapped method; True where
    the source cannot be read (wrapping a method that keys on the owner changes nothing: one bound method per owner
    has that owner's id)."""
    if getattr(method, _MARK, False):
        return False
    try:
        src = inspect.getsource(method)
    except (OSError, TypeError):  # no source shipped: cannot tell, and the wrapper is harmless on the owner key
        return True
    return "id(writeline)" in src and "__self__" not in src


def stable_writeline_key(method: Callable) -> Callable:
    """``method`` (``codegen_int_array_var(self, int_array, writeline, known_statically=False, graph=None)``) called
    with one bound method per (owner, function) of each wrapper object, instead of whichever short-lived one the
    caller made: so that ``id(writeline)`` in its cache key names the owner for the wrapper's life. A writeline that is
    not a bound method passes unchanged."""

    @functools.wraps(method)
    def codegen_int_array_var(self, int_array, writeline, known_statically=False, graph=None):
        owner = getattr(writeline, "__self__", None)
        func = getattr(writeline, "__func__", None)
        if owner is not None and func is not None:
            # the first bound method seen for this owner, kept with the owner for the wrapper's life: neither id can
            # be reused meanwhile, so the id in the cache key names this owner
            kept = self.__dict__.setdefault("_fs3d_writelines", {})
            writeline = kept.setdefault((id(owner), func), (owner, writeline))[1]
        return method(self, int_array, writeline, known_statically, graph)

    setattr(codegen_int_array_var, _MARK, True)
    return codegen_int_array_var


def install_stable_writeline_key(cls: type | None = None) -> bool:
    """Wrap ``cls.codegen_int_array_var`` (default: inductor's ``CppWrapperCpu``, which the GPU wrapper inherits it
    from) with :func:`stable_writeline_key` where it keys on the short-lived writeline; returns whether it did. Safe
    to call at every compilation: a second call, or a torch that keys on the owner, changes nothing."""
    if cls is None:
        from torch._inductor.codegen.cpp_wrapper_cpu import CppWrapperCpu
        cls = CppWrapperCpu
    method = cls.codegen_int_array_var
    if not keys_on_short_lived_writeline(method):
        return False
    cls.codegen_int_array_var = stable_writeline_key(method)
    return True
