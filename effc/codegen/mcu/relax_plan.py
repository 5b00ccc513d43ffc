"""Relax lowering up to a static memory plan, then the plan read back as plain data for the C runner.

Relax passes (TVM 0.27): ``DecomposeOpsForInference`` → ``LegalizeOps`` → ``AnnotateTIROpPattern`` → ``FoldConstant``
→ ``FuseOps`` → ``FuseTIR`` → ``DeadCodeElimination`` → ``RewriteDataflowReshape`` → ``ToNonDataflow`` →
``RemovePurityChecking`` → ``CallTIRRewrite`` → ``StaticPlanBlockMemory``; we stop before the VM-specific passes.
``main`` is then straight-line code: ``alloc_storage(bytes)``, ``alloc_tensor(storage, offset, shape)``,
destination-passing kernel calls, reshapes (views) and output allocations, which :func:`read_plan` turns into a
:class:`Plan`.

Source: ``../shared/notes/mcu.md`` (recipe measured here); TVM ``python/tvm/relax/pipeline.py``.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import tvm
from tvm import relax, tirx

from effc.errors import TargetError

logger = logging.getLogger(__name__)

#: Bytes every arena region is aligned to.
ALIGN = 16


#: Relax constants (weights) in TVM 0.27.
_CONST = tvm.ir.expr.GenericConst


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclasses.dataclass(frozen=True)
class Loc:
    """Where a tensor lives.

    Attributes:
        kind: ``"arena"`` (byte offset into the static arena), ``"input"`` / ``"output"`` (caller pointer number
            ``index``), ``"const"`` (weight array number ``index``).
        index: pointer or constant number (0 for the arena).
        offset: byte offset from the start of that storage.
    """

    kind: str
    index: int
    offset: int = 0


@dataclasses.dataclass
class TensorInfo:
    """A value of ``main``: where it lives (``base_loc``, or the tensor it is a view of), its dtype and shape."""

    base_loc: Loc | None
    dtype: str
    shape: tuple[int, ...]
    alias: TensorInfo | None = None

    @property
    def loc(self) -> Loc:
        """The storage of this value (a view resolves to the tensor it views)."""
        return self.alias.loc if self.alias is not None else self.base_loc

    def root(self) -> TensorInfo:
        """The tensor this value is a view of (itself when it is not a view)."""
        return self.alias.root() if self.alias is not None else self

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


@dataclasses.dataclass
class KernelCall:
    """One destination-passing call ``kernel(args...)`` in ``main`` (inputs first, outputs last)."""

    kernel: str
    args: list[TensorInfo]


@dataclasses.dataclass
class Plan:
    """The static plan of ``main``.

    Attributes:
        inputs: graph inputs in order (``loc.kind == "input"``), with their names.
        outputs: graph outputs (where the value was computed; the runner copies when it is not the caller's buffer).
        constants: weight arrays in first-use order (numpy, dtype kept).
        arena_bytes: size of the activation arena in bytes (planned storages plus unplanned allocations).
        calls: kernel calls in program order.
        storages: byte size of each planned storage block (for the report).
    """

    inputs: list[tuple[str, TensorInfo]]
    outputs: list[TensorInfo]
    constants: list[np.ndarray]
    arena_bytes: int
    calls: list[KernelCall]
    storages: list[int]


def relax_to_planned(mod: tvm.IRModule) -> tvm.IRModule:
    """Run the Relax passes up to ``StaticPlanBlockMemory`` (module must hold ``main``, weights as constants).

    Raises:
        TargetError: a Relax pass failed (names the pass stage, never a raw TVM traceback).
    """
    passes = [
        relax.transform.DecomposeOpsForInference(),
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        relax.transform.DeadCodeElimination(),
        relax.transform.RewriteDataflowReshape(),
        relax.transform.ToNonDataflow(),
        relax.transform.RemovePurityChecking(),
        relax.transform.CallTIRRewrite(),
        relax.transform.StaticPlanBlockMemory(),
    ]
    try:
        return tvm.ir.transform.Sequential(passes)(mod)
    except Exception as exc:  # noqa: BLE001  (never let a TVM traceback escape)
        raise TargetError(
            f"Relax lowering for the microcontroller failed: {type(exc).__name__}: {str(exc)[:400]}",
            "canonicalize the model (static shapes) and check that every op is supported",
        ) from exc


def _ints(shape_expr) -> tuple[int, ...]:
    return tuple(int(v) for v in shape_expr.values)


def _op_name(call: relax.Call) -> str | None:
    return call.op.name if isinstance(call.op, tvm.ir.Op) else None


def _tensor_sinfo(expr) -> tuple[str, tuple[int, ...]]:
    sinfo = expr.ty
    if not isinstance(sinfo, relax.TensorType) or sinfo.shape is None:
        raise TargetError(f"value {expr} has no static tensor shape", "canonicalize the model to static shapes")
    return str(sinfo.dtype), _ints(sinfo.shape)


class _PlanReader:
    """Walks the planned ``main`` binding by binding."""

    def __init__(self, func: relax.Function) -> None:
        self.func = func
        self.values: dict[tvm.ir.Var, TensorInfo | list] = {}
        self.storage_offsets: dict[tvm.ir.Var, int] = {}
        self.storages: list[int] = []
        self.arena_top = 0
        self.constants: list[np.ndarray] = []
        self.const_index: dict[int, int] = {}
        self.calls: list[KernelCall] = []
        self.unplanned: list[tvm.ir.Var] = []

    def _arg(self, expr) -> TensorInfo:
        if isinstance(expr, _CONST):
            key = expr.__hash__()
            if key not in self.const_index:
                self.const_index[key] = len(self.constants)
                self.constants.append(expr.value.numpy())
            arr = self.constants[self.const_index[key]]
            return TensorInfo(Loc("const", self.const_index[key]), str(arr.dtype), tuple(arr.shape))
        if isinstance(expr, tvm.ir.Var) and isinstance(self.values.get(expr), TensorInfo):
            return self.values[expr]
        raise TargetError(f"the microcontroller runner cannot pass {type(expr).__name__} {expr} to a kernel")

    def _alloc_arena(self, nbytes: int) -> int:
        offset = self.arena_top
        self.arena_top += _align(max(nbytes, 1))
        return offset

    def read(self) -> Plan:
        inputs = []
        for i, param in enumerate(self.func.params):
            dtype, shape = _tensor_sinfo(param)
            info = TensorInfo(Loc("input", i), dtype, shape)
            self.values[param] = info
            inputs.append((param.name, info))
        body = self.func.body
        for block in body.blocks:
            for binding in block.bindings:
                self._binding(binding.var, binding.value)
        outputs = self._outputs(body.body)
        return Plan(inputs, outputs, self.constants, self.arena_top, self.calls, self.storages)

    def _binding(self, var: relax.Var, value) -> None:
        if isinstance(value, tvm.ir.Var | _CONST):
            self.values[var] = self.values[value] if isinstance(value, tvm.ir.Var) else self._arg(value)
            return
        if isinstance(value, relax.Tuple):
            self.values[var] = [self._arg(f) for f in value.fields]
            return
        if isinstance(value, relax.TupleGetItem):
            self.values[var] = self.values[value.tuple_value][value.index]
            return
        if not isinstance(value, relax.Call):
            raise TargetError(f"unexpected {type(value).__name__} in the planned main: {var.name} = {value}")
        name = _op_name(value)
        if isinstance(value.op, tvm.ir.GlobalVar):
            args = [self._arg(a) for a in value.args]
            self.calls.append(KernelCall(value.op.name_hint, args))
            return
        if name == "relax.memory.alloc_storage":
            nbytes = int(value.args[0].values[0])
            self.storage_offsets[var] = self._alloc_arena(nbytes)
            self.storages.append(nbytes)
            return
        if name == "relax.memory.alloc_tensor":
            base = self.storage_offsets[value.args[0]]
            offset = int(value.args[1].value if hasattr(value.args[1], "value") else value.args[1])
            dtype, shape = _tensor_sinfo(var)
            self.values[var] = TensorInfo(Loc("arena", 0, base + offset), dtype, shape)
            return
        if name == "relax.builtin.alloc_tensor":
            dtype, shape = _tensor_sinfo(var)
            info = TensorInfo(None, dtype, shape)  # placed in _outputs (caller buffer or arena)
            self.values[var] = info
            self.unplanned.append(var)
            return
        if name in ("relax.reshape", "relax.memory.view") or (
            name in ("relax.call_pure_packed", "relax.call_packed") and "reshape" in str(value.args[0])
        ):
            src = value.args[1] if name.startswith("relax.call_") else value.args[0]
            dtype, shape = _tensor_sinfo(var)
            self.values[var] = TensorInfo(None, dtype, shape, alias=self._arg(src))
            return
        if name in ("relax.memory.kill_storage", "relax.memory.kill_tensor"):
            return
        raise TargetError(
            f"the microcontroller runner does not handle {name or value.op} in the planned main",
            "open an issue with the model attached",
        )

    def _outputs(self, result) -> list[TensorInfo]:
        if isinstance(result, relax.Tuple):
            infos = [self._arg(e) for e in result.fields]
        elif isinstance(result, tvm.ir.Var) and isinstance(self.values.get(result), list):
            infos = list(self.values[result])
        else:
            infos = [self._arg(result)]
        # An unplanned allocation that is (a view of) an output is written straight into the caller's buffer.
        taken: set[int] = set()
        for var in self.unplanned:
            info = self.values[var]
            k = next((k for k, out in enumerate(infos) if out.root() is info and k not in taken), None)
            if k is not None:
                taken.add(k)
                info.base_loc = Loc("output", k)
            else:
                info.base_loc = Loc("arena", 0, self._alloc_arena(info.nbytes))
        return infos


def read_plan(mod: tvm.IRModule) -> Plan:
    """Read the memory plan of the planned ``main`` (see :func:`relax_to_planned`).

    Raises:
        TargetError: ``main`` contains something a static C runner cannot follow.
    """
    return _PlanReader(mod["main"]).read()


def called_kernels(mod: tvm.IRModule, plan: Plan) -> dict[str, tirx.PrimFunc]:
    """The PrimFuncs ``main`` calls (dead ones such as the reshape left by ``RewriteDataflowReshape`` dropped)."""
    used = {call.kernel for call in plan.calls}
    return {
        gv.name_hint: func
        for gv, func in mod.functions.items()
        if isinstance(func, tirx.PrimFunc) and gv.name_hint in used
    }
