"""In-place KV-cache writers for decoder artifacts whose cache lives on the device (the cuda target).

A decoder entry point (``prefill``, ``decode``: :mod:`effc.ir.decoder`) returns the chunk's new keys and values;
the CPU runtime writes them into host arrays it shares with the compiled code. On a GPU the cache stays in device
memory, so the artifact carries one more function per entry, ``<entry>_kv_write``::

    <entry>_kv_write(past_key.0, past_value.0, ..., key.0, value.0, ..., positions) -> (past_key.0, ...)

which writes each layer's new entries (``T`` tokens along the slot's ``seq_axis``) into its cache at slots
``positions[0, 0] + t`` **in place** (``call_tir_inplace``: the returned tensors are the caches given) and drops
tokens that would land outside the cache's ``S`` slots. Padding tokens of a short prefill chunk are written too: they
sit past the context, where the causal mask and ``effc.DecodeAttention``'s valid prefix ignore them, and the next
call overwrites them (the runtime does the same on the host).

Each writer is a plain spatial TIR loop nest over the new entries (``Hkv · D · T`` per layer), left unscheduled so
the target's schedule rules bind it to threads (DLight's ``Fallback`` on cuda).
"""

from __future__ import annotations

import onnx_ir as ir
import tvm
from tvm import relax
from tvm.script import tirx as T

from effc.ir.decoder import decoder_info, kv_layout

__all__ = ["add_kv_writer", "kv_write_module", "write_kernel"]


def write_kernel(cache_shape: tuple[int, ...], seq_axis: int, tokens: int, dtype: str = "float32") -> tvm.tirx.PrimFunc:
    """``main(cache, new, positions)``: ``cache[.., p + t, ..] = new[.., t, ..]`` along ``seq_axis``.

    Only where ``0 <= p`` and ``p + t < S`` (``p = positions[0, 0]``, ``S`` the cache's slots).

    Args:
        cache_shape: the cache ``(A, B, C)``, slots along ``seq_axis`` (1 or 2).
        seq_axis: 1 (values ``(Hkv, S, D)``) or 2 (keys ``(Hkv, D, S)``).
        tokens: ``T``, the new entries per call.
        dtype: the stored element type (``float32``; ``uint8`` for a cache stored as MX rows).
    """
    a, b, c = (int(d) for d in cache_shape)
    new_shape = [a, b, c]
    new_shape[seq_axis] = tokens
    nb, nc = new_shape[1:]
    slots = cache_shape[seq_axis]
    keys = seq_axis == 2  # a Python bool: TVMScript keeps only the branch it selects

    @T.prim_func(s_tir=True)
    def write(cache_h: T.handle, new_h: T.handle, positions_h: T.handle):
        T.func_attr({"global_symbol": "main", "tir.noalias": True})
        cache = T.match_buffer(cache_h, (a, b, c), dtype)
        new = T.match_buffer(new_h, (a, nb, nc), dtype)
        positions = T.match_buffer(positions_h, (1, tokens), "int64")
        for i, j, k in T.grid(a, nb, nc):  # the new entries' own order: the innermost axis is contiguous
            with T.sblock("write"):
                vi, vj, vk = T.axis.remap("SSS", [i, j, k])
                if keys:
                    if T.int64(0) <= positions[0, 0] and positions[0, 0] + T.int64(vk) < T.int64(slots):
                        cache[vi, vj, T.Cast("int32", positions[0, 0]) + vk] = new[vi, vj, vk]
                else:
                    if T.int64(0) <= positions[0, 0] and positions[0, 0] + T.int64(vj) < T.int64(slots):
                        cache[vi, T.Cast("int32", positions[0, 0]) + vj, vk] = new[vi, vj, vk]

    return write


def _static(value: ir.Value) -> tuple[int, ...]:
    return tuple(int(d) for d in value.shape)


def add_kv_writer(builder: relax.BlockBuilder, entry: str,
                  slots: list[tuple[str, str, int, tuple[int, ...], str]], tokens: int) -> None:
    """Add ``<entry>_kv_write`` and its kernels to ``builder`` (module docstring).

    Args:
        builder: the block builder of the module being assembled.
        entry: the entry point's name.
        slots: per cache tensor in graph order: ``(cache input name, new-entries output name, seq_axis, cache
            shape, dtype)``.
        tokens: ``T``, the entry's tokens per call.
    """
    caches, news = [], []
    for cache_name, new_name, axis, shape, dtype in slots:
        new_shape = list(shape)
        new_shape[axis] = tokens
        caches.append(relax.Var(cache_name, relax.TensorType(tuple(shape), dtype)))
        news.append(relax.Var(new_name, relax.TensorType(tuple(new_shape), dtype)))
    positions = relax.Var("positions", relax.TensorType((1, tokens), "int64"))
    name = f"{entry}_kv_write"
    kernels: dict[tuple, tvm.ir.GlobalVar] = {}
    for _, _, axis, shape, dtype in slots:
        if (tuple(shape), axis, dtype) not in kernels:
            kernel = write_kernel(tuple(shape), axis, tokens, dtype).without_attr("global_symbol")
            kernels[tuple(shape), axis, dtype] = builder.add_func(kernel, f"{entry}_kv_write_axis{axis}")
    with builder.function(name, [*caches, *news, positions], attrs={"global_symbol": name}, pure=False):
        written = [builder.emit(relax.call_tir_inplace(kernels[tuple(shape), axis, dtype], [cache, new, positions],
                                                       [0], cache.ty))
                   for (_, _, axis, shape, dtype), cache, new in zip(slots, caches, news, strict=True)]
        builder.emit_func_output(relax.Tuple(written))


def kv_write_module(entries: dict[str, ir.Model]) -> tvm.IRModule:
    """A module with ``<entry>_kv_write`` (and its kernels) for each decoder entry graph (module docstring).

    Args:
        entries: entry-point name → its decoder graph (static shapes; cache inputs/outputs of
            :func:`effc.ir.decoder.kv_layout`).
    """
    builder = relax.BlockBuilder()
    for entry, model in entries.items():
        inputs = {v.name: v for v in model.graph.inputs}
        slots = [(slot.input, slot.output, slot.seq_axis, _static(inputs[slot.input]), slot.dtype)
                 for slot in kv_layout(decoder_info(model))]
        add_kv_writer(builder, entry, slots, _static(inputs["positions"])[1])
    return builder.get()
