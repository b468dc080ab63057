"""The size-array key fix for inductor's C++ wrapper (``fs3d_accel.stages.inductor_compat``): it wraps only a method
that keys on the short-lived writeline, hands it one live bound method per owner, and leaves this project's torch
(which keys on the owner) alone."""
from __future__ import annotations

import gc
import inspect

from fs3d_accel.stages.inductor_compat import (install_stable_writeline_key, keys_on_short_lived_writeline,
                                               stable_writeline_key)


class Lines:
    """A code buffer: what a writeline writes into."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def writeline(self, line: str) -> None:
        self.lines.append(line)


class OldKeyWrapper:
    """A stand-in for torch 2.11's wrapper: the array's name cached under ``id(writeline)``, declared through the
    writeline on a miss only."""

    def __init__(self) -> None:
        self.codegen_int_array_var_cache: dict = {}
        self.declared = 0

    def codegen_int_array_var(self, int_array, writeline, known_statically=False, graph=None):
        cache_key = (int_array, id(writeline), known_statically, id(graph) if graph else None)
        if cache_key not in self.codegen_int_array_var_cache:
            name = f"int_array_{self.declared}"
            self.declared += 1
            writeline(f"const int64_t {name}[] = {int_array};")
            self.codegen_int_array_var_cache[cache_key] = name
        return self.codegen_int_array_var_cache[cache_key]


def test_the_gate_reads_which_key_a_method_uses():
    assert keys_on_short_lived_writeline(OldKeyWrapper.codegen_int_array_var)
    assert not keys_on_short_lived_writeline(stable_writeline_key(OldKeyWrapper.codegen_int_array_var))

    class OwnerKeyWrapper(OldKeyWrapper):
        def codegen_int_array_var(self, int_array, writeline, known_statically=False, graph=None):
            writeline_id = id(writeline.__self__) if hasattr(writeline, "__self__") else id(writeline)
            return f"{int_array}{writeline_id}"

    assert not keys_on_short_lived_writeline(OwnerKeyWrapper.codegen_int_array_var)
    exec_ns: dict = {}
    exec("def codegen_int_array_var(self, int_array, writeline):\n    return int_array\n", exec_ns)
    assert keys_on_short_lived_writeline(exec_ns["codegen_int_array_var"])  # no readable source: wrapped, harmless


def test_the_installed_torch_keys_on_the_owner_and_is_left_unchanged():
    from torch._inductor.codegen.cpp_wrapper_cpu import CppWrapperCpu
    before = CppWrapperCpu.codegen_int_array_var
    assert "__self__" in inspect.getsource(before)  # torch 2.13: "Bound methods have transient IDs"
    assert install_stable_writeline_key() is False
    assert CppWrapperCpu.codegen_int_array_var is before


def _names_and_lines(wrapper) -> tuple[list[str], list[str], list[str]]:
    """Ask ``wrapper`` for one array through two buffers, twice each, each time through a fresh bound method freed
    right after (its address free for the next one, as in inductor's two code generation passes)."""
    first, second, names = Lines(), Lines(), []
    for buffer in (first, second, first, second):
        names.append(wrapper.codegen_int_array_var("{2L, 4L}", buffer.writeline))
        gc.collect()
    return names, first.lines, second.lines


def test_the_old_key_gives_no_owner_a_stable_name():
    """The stand-in unpatched: a later bound method either hits an earlier owner's name (its id reused: that
    buffer never declares it, the g++ error of session 29) or misses its own and declares the array again."""
    names, first, second = _names_and_lines(OldKeyWrapper())
    assert names != ["int_array_0", "int_array_1", "int_array_0", "int_array_1"]


def test_each_owner_declares_its_own_arrays_and_reuses_them_through_new_bound_methods():
    class Patched(OldKeyWrapper):
        pass

    assert install_stable_writeline_key(Patched) is True
    assert install_stable_writeline_key(Patched) is False  # a second install wraps nothing
    wrapper = Patched()
    names, first, second = _names_and_lines(wrapper)
    # each buffer holds its own declaration, written once, and later calls through new bound methods reuse its name
    assert first == ["const int64_t int_array_0[] = {2L, 4L};"]
    assert second == ["const int64_t int_array_1[] = {2L, 4L};"]
    assert names == ["int_array_0", "int_array_1", "int_array_0", "int_array_1"]
    # the bound methods the cache keys on are kept with their owners for the wrapper's life
    kept = wrapper.__dict__["_fs3d_writelines"]
    assert len(kept) == 2 and all(method.__self__ is owner for owner, method in kept.values())
    # other arguments pass through; a callable without __func__ (here a builtin's method) is used as given
    plain = []
    assert wrapper.codegen_int_array_var("{8L}", plain.append, True) == "int_array_2"
    assert plain == ["const int64_t int_array_2[] = {8L};"]
