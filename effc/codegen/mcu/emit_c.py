"""C emission for the microcontroller artifact: header, runner (following the memory plan), weights, workspace shim.

Everything printed here is C99 that compiles warning-free with ``-std=c99 -Wall -Wextra``. Weights are printed as
exact hexadecimal float literals (C99 §6.4.4.2) so the firmware computes with the very bits onnxruntime uses.
"""

from __future__ import annotations

import math

import numpy as np

from effc.codegen.mcu.relax_plan import Plan, TensorInfo

#: numpy dtype name -> C element type.
C_TYPES = {
    "float32": "float",
    "int8": "int8_t",
    "uint8": "uint8_t",
    "int16": "int16_t",
    "int32": "int32_t",
    "int64": "int64_t",
    "bool": "uint8_t",
}


def c_type(dtype: str) -> str:
    """The C element type of a numpy dtype name (``float32`` -> ``float``)."""
    return C_TYPES[str(dtype)]


def _float_literal(x: float) -> str:
    if math.isnan(x):
        return "NAN"
    if math.isinf(x):
        return "INFINITY" if x > 0 else "-INFINITY"
    if x == 0.0:
        return "-0.0f" if math.copysign(1.0, x) < 0 else "0.0f"
    mant, exp = float(x).hex().split("p")
    return f"{mant.rstrip('0').rstrip('.')}p{exp}f"


def _array_body(arr: np.ndarray, per_line: int = 8) -> str:
    flat = arr.reshape(-1)
    if flat.dtype == np.float32:
        items = [_float_literal(float(v)) for v in flat]
    elif flat.dtype == np.int64:
        items = [f"INT64_C({int(v)})" for v in flat]
    else:
        items = [str(int(v)) for v in flat]
    lines = [", ".join(items[i : i + per_line]) for i in range(0, len(items), per_line)]
    return "  " + ",\n  ".join(lines) if lines else "  0"


def weight_symbol(prefix: str, index: int) -> str:
    return f"{prefix}w{index}"


def emit_weights(plan: Plan, prefix: str, header: str) -> str:
    """``effc_weights.c``: every constant as an aligned ``const`` array (it goes to flash)."""
    out = [f'#include "{header}"', "#include <math.h>", "#include <stdint.h>", ""]
    for i, arr in enumerate(plan.constants):
        n = max(arr.size, 1)
        out.append(
            f"const {c_type(str(arr.dtype))} {weight_symbol(prefix, i)}[{n}] __attribute__((aligned(16))) = {{\n"
            f"{_array_body(arr)}\n}};"
        )
    return "\n".join(out) + "\n"


def _io_params(plan: Plan, input_names: list[str], output_names: list[str]) -> list[str]:
    params = [f"const {c_type(t.dtype)}* {name}" for name, (_, t) in zip(input_names, plan.inputs, strict=True)]
    params += [f"{c_type(t.dtype)}* {name}" for name, t in zip(output_names, plan.outputs, strict=True)]
    return params


def emit_header(
    plan: Plan, prefix: str, macro: str, input_names: list[str], output_names: list[str], sizes: dict[str, int]
) -> str:
    """``effc_model.h``: sizes as macros and the ``run`` prototype.

    Args:
        plan: the memory plan.
        prefix: C symbol prefix (``effc_model_``).
        macro: macro prefix (``EFFC_MODEL_``).
        input_names: C identifiers of the inputs, in graph order.
        output_names: C identifiers of the outputs.
        sizes: extra byte-size macros (``ARENA_BYTES``, ``SCRATCH_BYTES``, ...).
    """
    guard = f"{macro}H"
    lines = [f"#ifndef {guard}", f"#define {guard}", "", "#include <stdint.h>", ""]
    lines.append(f"#define {macro}NUM_INPUTS {len(plan.inputs)}")
    lines.append(f"#define {macro}NUM_OUTPUTS {len(plan.outputs)}")
    for k, (_, t) in enumerate(plan.inputs):
        lines.append(f"#define {macro}INPUT{k}_SIZE {int(np.prod(t.shape))}  /* elements, {c_type(t.dtype)} */")
    for k, t in enumerate(plan.outputs):
        lines.append(f"#define {macro}OUTPUT{k}_SIZE {int(np.prod(t.shape))}  /* elements, {c_type(t.dtype)} */")
    for key, value in sizes.items():
        lines.append(f"#define {macro}{key} {value}")
    lines += [
        "",
        "/* Run one inference. Inputs/outputs are dense row-major arrays in the caller's memory.",
        "   Returns 0 on success, -1 when a kernel failed (workspace exhausted). Not reentrant. */",
        f"int {prefix}run({', '.join(_io_params(plan, input_names, output_names))});",
        "",
        f"#endif  /* {guard} */",
        "",
    ]
    return "\n".join(lines)


def _pointer(t: TensorInfo, prefix: str, input_names: list[str], output_names: list[str]) -> str:
    loc = t.loc
    ctype = c_type(t.dtype)
    if loc.kind == "arena":
        return f"({ctype}*)({prefix}arena + {loc.offset})"
    if loc.kind == "const":
        return f"({ctype}*){weight_symbol(prefix, loc.index)}"
    name = input_names[loc.index] if loc.kind == "input" else output_names[loc.index]
    return f"({ctype}*){name}" if loc.offset == 0 else f"({ctype}*)((uint8_t*){name} + {loc.offset})"


def emit_runner(
    plan: Plan,
    kernels_c: str,
    symbols: dict[str, str],
    prefix: str,
    macro: str,
    header: str,
    input_names: list[str],
    output_names: list[str],
) -> str:
    """``effc_model.c``: the kernels, the static arena and ``<prefix>run`` following the plan."""
    out = [f'#include "{header}"', "#include <string.h>", kernels_c, ""]
    for i, arr in enumerate(plan.constants):
        out.append(f"extern const {c_type(str(arr.dtype))} {weight_symbol(prefix, i)}[{max(arr.size, 1)}];")
    out.append(f"static uint8_t {prefix}arena[{macro}ARENA_BYTES] __attribute__((aligned(16), unused));")
    out.append("")
    out.append(f"int {prefix}run({', '.join(_io_params(plan, input_names, output_names))}) {{")
    for call in plan.calls:
        args = ", ".join(_pointer(a, prefix, input_names, output_names) for a in call.args)
        out.append(f"  if ({symbols[call.kernel]}({args}) != 0) return -1;")
    for k, t in enumerate(plan.outputs):
        if t.loc.kind != "output" or t.loc.index != k or t.loc.offset != 0:
            src = _pointer(t, prefix, input_names, output_names)
            out.append(f"  memcpy({output_names[k]}, {src}, {t.nbytes});")
    out.append("  return 0;")
    out.append("}")
    return "\n".join(out) + "\n"


def emit_workspace(header: str, macro: str) -> str:
    """``effc_workspace.c``: the last-in-first-out allocator behind ``TVMBackendAllocWorkspace``."""
    return f"""/* Workspace shim: the kernels' only runtime dependency. Requests nest (LIFO), so a bump pointer over one
   static pool of {macro}SCRATCH_BYTES bytes (computed from the TIR at compile time) is enough. */
#include "{header}"
#include <stddef.h>
#include <stdint.h>

static uint8_t effc_ws_pool[{macro}SCRATCH_BYTES] __attribute__((aligned(16)));
static size_t effc_ws_top;

void* TVMBackendAllocWorkspace(int device_type, int device_id, uint64_t nbytes, int dtype_code, int dtype_bits) {{
  size_t size = (size_t)((nbytes + 15u) & ~(uint64_t)15u);
  void* ptr;
  (void)device_type; (void)device_id; (void)dtype_code; (void)dtype_bits;
  if (size > sizeof(effc_ws_pool) - effc_ws_top) return NULL;
  ptr = effc_ws_pool + effc_ws_top;
  effc_ws_top += size;
  return ptr;
}}

int TVMBackendFreeWorkspace(int device_type, int device_id, void* ptr) {{
  (void)device_type; (void)device_id;
  effc_ws_top = (size_t)((uint8_t*)ptr - effc_ws_pool);
  return 0;
}}
"""
