"""TVM lowering of ``effc.MoEFFN``: kernels that compute (and read the weights of) only the chosen experts.

The converter splits the operator (schema in :mod:`effc.ops.moe`) into:

1. router logits ``X (M, K) · router_w + router_b`` (Relax ops, ``M`` = tokens);
2. :func:`select_kernel`: the chosen experts ``idx (M, k)`` int32, by rank with ties to the lower index (the rule of
   the ONNX body), ``O(E²)`` compares per token;
3. the shared expert as a small dense FFN in Relax ops (the standard GEMM/GEMV schedules take it);
4. :func:`routed_kernel`, pre-scheduled, which for every token ``m`` and slot ``s`` reads expert ``e = idx[m, s]``::

       up[m, s, j]  = Σ_r X[m, r] · W13[e, j // P, r, j % P]             j < He (·2 for a gated unit: [W1_e | W3_e])
       act[m, s, j] = act(up[m, s, j] + b1[e, j]) [· up[m, s, He + j]]
       Y[m, c]      = base[c] + Σ_{s, j} act[m, s, j] · W2[e, c // P2, j, c % P2] − Σ_s fill[e, c]

   with ``base = b2 + Σ_e fill_e``. ``W13`` and ``W2`` are re-laid out at compile time into per-expert column
   panels (``P``, ``P2`` columns, contiguous ``(K, P)`` / ``(He, P2)`` slabs), so a token reads exactly its ``k``
   experts' weights: work and bytes are ``(S + k·He) / H`` of the dense FFN's.

Schedule (decode, ``M = 1``, is a GEMV over the chosen experts' slices): the up stage runs in parallel over
``(token, slot, panel)`` with a ``P``-wide vector accumulator and ``X[m, r]`` broadcast; the down stage runs in
parallel over ``(token, C-panel)`` with the slots and neurons as its reduction. ``M > 1`` (prefill, encoders)
takes the same per-token path: the work drops, but weights are not shared between tokens that chose the same expert.

Sources: the MoE GEMV of llama.cpp's ``ggml_mul_mat_id`` (expert ids read inside the kernel) as the design anchor.
"""

from __future__ import annotations

import logging

import numpy as np
from tvm import relax, s_tir, te, tirx
from tvm.script import tirx as T

from effc.codegen.frontend import constant_input, register_converter
from effc.ops.moe import MoELayout

__all__ = ["MoEFFNConverter", "relayout", "routed_kernel", "schedule_routed", "select_kernel"]

logger = logging.getLogger(__name__)

LOWERING_LOG: list[dict] = []
_OPAQUE = 8  # TIR op pattern kOpaque: FuseOps leaves pre-scheduled kernels alone
MR = 4  # tokens per weight load in the grouped kernel's up stage


def panel(width: int, want: int = 64) -> int:
    """Columns per weight panel: the largest of 64, 32, 16, 8, 4, 2, 1 that is ≤ ``want`` and divides ``width``."""
    return next(p for p in (64, 32, 16, 8, 4, 2, 1) if p <= want and width % p == 0)


def relayout(w1: np.ndarray, w3: np.ndarray | None, w2: np.ndarray, fill: np.ndarray, b2: np.ndarray,
             layout: MoELayout) -> dict[str, np.ndarray]:
    """Kernel layout of the routed experts' weights (contiguous copies, same values).

    Args:
        w1: ``(K, H)``, neurons laid out as in :mod:`effc.ops.moe` (shared first).
        w3: ``(K, H)`` for a gated unit, else None.
        w2: ``(H, C)``.
        fill: ``(E, C)``.
        b2: ``(C,)``.
        layout: the node's expert layout.

    Returns:
        ``W13`` ``(E, G·He/P, K, P)`` (``G`` = 2 for a gated unit, columns ``[W1_e | W3_e]``), ``W2``
        ``(E, C/P2, He, P2)``, ``base`` ``(C,)`` = ``b2 + Σ fill``.
    """
    e, he, s = layout.experts, layout.expert_size, layout.shared
    k, c = w1.shape[0], w2.shape[1]
    routed = [w1[:, s:].reshape(k, e, he)]
    if w3 is not None:
        routed.append(w3[:, s:].reshape(k, e, he))
    up = np.concatenate(routed, axis=2).transpose(1, 0, 2)  # (E, K, G·He)
    p, p2 = panel(up.shape[2]), panel(c)
    w13 = up.reshape(e, k, -1, p).transpose(0, 2, 1, 3)
    w2e = w2[s:].reshape(e, he, c // p2, p2).transpose(0, 2, 1, 3)
    return {"W13": np.ascontiguousarray(w13, np.float32), "W2": np.ascontiguousarray(w2e, np.float32),
            "base": (b2 + fill.sum(0)).astype(np.float32)}


def _act(kind: str, x):
    if kind == "relu":
        return tirx.max(x, tirx.const(0.0, "float32"))
    if kind == "silu":
        return x * tirx.sigmoid(x)
    if kind == "gelu":
        return 0.5 * x * (1.0 + tirx.erf(x * (1.0 / np.sqrt(2.0))))
    return 0.5 * x * (1.0 + tirx.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x * x * x)))  # gelu_tanh


def _i64(*dims: int) -> list:
    return [tirx.IntImm("int64", d) for d in dims]


def select_kernel(rows: int, experts: int, top_k: int, mask: bool = False) -> tirx.PrimFunc:
    """``main(logits (M, E) float32, idx (M, k) int32)``: the ``k`` experts of largest logit per row, by rank.

    With ``mask=True`` the output is ``chosen (M, E)`` int32 (1 for the ``k`` chosen experts) instead.
    """
    logits = te.placeholder(_i64(rows, experts), "float32", "logits")
    f = te.reduce_axis(_i64(0, experts), "f")

    def beats(m, e, g):
        lg, le = logits[m, g], logits[m, e]
        return tirx.Select(tirx.Or(lg > le, tirx.And(lg == le, g < e)), 1, 0)

    rank = te.compute(_i64(rows, experts), lambda m, e: te.sum(beats(m, e, f), axis=f), name="moe_rank")
    if mask:
        chosen = te.compute(_i64(rows, experts), lambda m, e: tirx.Select(rank[m, e] < top_k, 1, 0),
                            name="moe_chosen")
        return te.create_prim_func([logits, chosen]).with_attr("global_symbol", "main")
    q = te.reduce_axis(_i64(0, experts), "q")
    idx = te.compute(_i64(rows, top_k),
                     lambda m, s: te.sum(tirx.Select(rank[m, q] == s.astype("int32"), q.astype("int32"), 0), axis=q),
                     name="moe_select")
    return te.create_prim_func([logits, idx]).with_attr("global_symbol", "main")


def routed_kernel(rows: int, layout: MoELayout) -> tirx.PrimFunc:
    """Unscheduled ``main(X (M, K), idx (M, k) int32, W13, b1 (E, He), W2, fill (E, C), base (C,), Y (M, C))``.

    Weight layouts as returned by :func:`relayout`; see the module docstring for the computation.
    """
    e, he, k, c, kk = layout.experts, layout.expert_size, layout.k, layout.c, layout.top_k
    g = 2 if layout.gated else 1
    p, p2 = panel(g * he), panel(c)
    x = te.placeholder(_i64(rows, k), "float32", "X")
    idx = te.placeholder(_i64(rows, kk), "int32", "idx")
    w13 = te.placeholder(_i64(e, g * he // p, k, p), "float32", "W13")
    b1 = te.placeholder(_i64(e, he), "float32", "b1")
    w2 = te.placeholder(_i64(e, c // p2, he, p2), "float32", "W2")
    fill = te.placeholder(_i64(e, c), "float32", "fill")
    base = te.placeholder(_i64(c), "float32", "base")
    r = te.reduce_axis(_i64(0, k), "r")
    up = te.compute(_i64(rows, kk, g * he),
                    lambda m, s, j: te.sum(x[m, r] * w13[idx[m, s], j // p, r, j % p], axis=r), name="moe_up")

    def activation(m, s, j):
        a = _act(layout.activation, up[m, s, j] + b1[idx[m, s], j])
        return a * up[m, s, j + he] if layout.gated else a

    act = te.compute(_i64(rows, kk, he), activation, name="moe_act")
    rs, rj = te.reduce_axis(_i64(0, kk), "rs"), te.reduce_axis(_i64(0, he), "rj")
    down = te.compute(_i64(rows, c), lambda m, j: te.sum(act[m, rs, rj] * w2[idx[m, rs], j // p2, rj, j % p2],
                                                         axis=[rs, rj]), name="moe_down")

    def out(m, j):
        y = down[m, j] + base[j]
        for s in range(kk):  # the constant experts of the chosen slots are not added (base holds all of them)
            y = y - fill[idx[m, s], j]
        return y

    y = te.compute(_i64(rows, c), out, name="moe_out")
    return te.create_prim_func([x, idx, w13, b1, w2, fill, base, y]).with_attr("global_symbol", "main")


def grouped_kernel(rows: int, layout: MoELayout) -> tirx.PrimFunc:
    """Pre-scheduled ``main(X (M, K), chosen (M, E) int32, W13, b1, W2, fill, base, Y (M, C))`` for ``M > 1``.

    Tokens grouped by expert: the up stage runs in parallel over ``(expert, panel)``; each task lists the tokens
    that chose the expert and walks them ``MR`` at a time, each weight vector of its ``(K, P)`` panel loaded once
    for ``MR`` tokens (register block of ``MR × P`` accumulators). The down stage runs in parallel over
    ``C``-panels and, per expert, adds its ``(He, P2)`` slab times the activations of its tokens, ``MR`` tokens per
    weight load. Work: ``(M·k) · He · (G·K + C)`` MACs, as in :func:`routed_kernel`, with weight reuse across
    tokens. Layouts as :func:`relayout` returns them.
    """
    e_n, he, k, c = layout.experts, layout.expert_size, layout.k, layout.c
    g = 2 if layout.gated else 1
    p, p2 = panel(g * he), panel(c)
    npan, cpan = g * he // p, c // p2

    def act_value(u, b1, e, m, j):
        a = _act(layout.activation, u[e, m, j] + b1[e, j])
        return a * u[e, m, j + he] if layout.gated else a

    @T.prim_func(s_tir=False)
    def main(x_h: T.handle, ch_h: T.handle, w13_h: T.handle, b1_h: T.handle, w2_h: T.handle, fill_h: T.handle,
             base_h: T.handle, y_h: T.handle):
        T.func_attr({"global_symbol": "main", "tir.noalias": True, "tir.is_scheduled": True})
        X = T.match_buffer(x_h, (rows, k), "float32")
        CH = T.match_buffer(ch_h, (rows, e_n), "int32")
        W13 = T.match_buffer(w13_h, (e_n, npan, k, p), "float32")
        B1 = T.match_buffer(b1_h, (e_n, he), "float32")
        W2 = T.match_buffer(w2_h, (e_n, cpan, he, p2), "float32")
        FILL = T.match_buffer(fill_h, (e_n, c), "float32")
        BASE = T.match_buffer(base_h, (c,), "float32")
        Y = T.match_buffer(y_h, (rows, c), "float32")
        U = T.alloc_buffer((e_n, rows, g * he), "float32")
        A = T.alloc_buffer((e_n, rows, he), "float32")
        for t in T.parallel(e_n * npan):
            # the tokens that chose this expert, then MR of them per weight load (register block)
            lst = T.alloc_buffer((rows,), "int32", scope="global")
            cnt = T.alloc_buffer((1,), "int32", scope="global")
            cnt[0] = 0
            for m in range(rows):
                if CH[m, t // npan] != 0:
                    lst[cnt[0]] = m
                    cnt[0] = cnt[0] + 1
            for q in range(cnt[0] // MR):
                acc = T.alloc_buffer((MR * p,), "float32", scope="global")
                for u in T.unroll(MR):
                    acc[T.ramp(u * p, 1, p)] = T.broadcast(T.float32(0), p)
                for r in range(k):
                    for u in T.unroll(MR):
                        acc[T.ramp(u * p, 1, p)] = acc[T.ramp(u * p, 1, p)] + T.broadcast(
                            X[lst[q * MR + u], r], p) * W13[t // npan, t % npan, r, T.ramp(0, 1, p)]
                for u in T.unroll(MR):
                    U[t // npan, lst[q * MR + u], T.ramp(t % npan * p, 1, p)] = acc[T.ramp(u * p, 1, p)]
            for q in range(cnt[0] // MR * MR, cnt[0]):
                acc1 = T.alloc_buffer((p,), "float32", scope="global")
                acc1[T.ramp(0, 1, p)] = T.broadcast(T.float32(0), p)
                for r in range(k):
                    acc1[T.ramp(0, 1, p)] = acc1[T.ramp(0, 1, p)] + T.broadcast(X[lst[q], r], p) * W13[
                        t // npan, t % npan, r, T.ramp(0, 1, p)]
                U[t // npan, lst[q], T.ramp(t % npan * p, 1, p)] = acc1[T.ramp(0, 1, p)]
        for t in T.parallel(e_n * rows):
            if CH[t % rows, t // rows] != 0:
                for j in range(he):
                    A[t // rows, t % rows, j] = act_value(U, B1, t // rows, t % rows, j)
        for co in T.parallel(cpan):
            for m in range(rows):
                Y[m, T.ramp(co * p2, 1, p2)] = BASE[T.ramp(co * p2, 1, p2)]
            lst2 = T.alloc_buffer((rows,), "int32", scope="global")
            cnt2 = T.alloc_buffer((1,), "int32", scope="global")
            for e in range(e_n):  # per expert, its tokens MR at a time: each (He, P2) weight vector loaded once
                cnt2[0] = 0
                for m in range(rows):
                    if CH[m, e] != 0:
                        lst2[cnt2[0]] = m
                        cnt2[0] = cnt2[0] + 1
                for q in range(cnt2[0] // MR):
                    acc2 = T.alloc_buffer((MR * p2,), "float32", scope="global")
                    for u in T.unroll(MR):
                        acc2[T.ramp(u * p2, 1, p2)] = T.broadcast(T.float32(0), p2) - FILL[e, T.ramp(co * p2, 1, p2)]
                    for j in range(he):
                        for u in T.unroll(MR):
                            acc2[T.ramp(u * p2, 1, p2)] = acc2[T.ramp(u * p2, 1, p2)] + T.broadcast(
                                A[e, lst2[q * MR + u], j], p2) * W2[e, co, j, T.ramp(0, 1, p2)]
                    for u in T.unroll(MR):
                        Y[lst2[q * MR + u], T.ramp(co * p2, 1, p2)] = Y[lst2[q * MR + u], T.ramp(
                            co * p2, 1, p2)] + acc2[T.ramp(u * p2, 1, p2)]
                for q in range(cnt2[0] // MR * MR, cnt2[0]):
                    acc3 = T.alloc_buffer((p2,), "float32", scope="global")
                    acc3[T.ramp(0, 1, p2)] = T.broadcast(T.float32(0), p2) - FILL[e, T.ramp(co * p2, 1, p2)]
                    for j in range(he):
                        acc3[T.ramp(0, 1, p2)] = acc3[T.ramp(0, 1, p2)] + T.broadcast(A[e, lst2[q], j], p2) * W2[
                            e, co, j, T.ramp(0, 1, p2)]
                    Y[lst2[q], T.ramp(co * p2, 1, p2)] = Y[lst2[q], T.ramp(co * p2, 1, p2)] + acc3[T.ramp(0, 1, p2)]

    return main


def schedule_routed(func: tirx.PrimFunc, layout: MoELayout) -> tirx.PrimFunc:
    """Parallel, vectorized schedule of :func:`routed_kernel` (module docstring); marks ``tir.is_scheduled``."""
    g = 2 if layout.gated else 1
    p, p2 = panel(g * layout.expert_size), panel(layout.c)
    sch = s_tir.Schedule(func)
    up = sch.get_sblock("moe_up")
    m, s, j, r = sch.get_loops(up)
    jo, ji = sch.split(j, [None, p])
    sch.reorder(m, s, jo, r, ji)
    acc = sch.cache_write(up, 0, "global")  # a P-wide accumulator per panel (registers after LLVM)
    sch.reverse_compute_at(acc, jo)
    sch.vectorize(sch.get_loops(acc)[-1])
    sch.parallel(sch.fuse(m, s, jo))
    sch.vectorize(ji)
    sch.decompose_reduction(up, r)
    act = sch.get_sblock("moe_act")
    am, as_, aj = sch.get_loops(act)
    sch.parallel(sch.fuse(am, as_))
    down, out = sch.get_sblock("moe_down"), sch.get_sblock("moe_out")
    m, c, rs, rj = sch.get_loops(down)
    co, ci = sch.split(c, [None, p2])
    sch.reorder(m, co, rs, rj, ci)
    sch.reverse_compute_at(out, co)
    sch.vectorize(sch.get_loops(out)[-1])
    sch.parallel(sch.fuse(m, co))
    sch.vectorize(ci)
    sch.decompose_reduction(down, rs)
    return sch.mod["main"].with_attr("tir.is_scheduled", True)



def _shared_expert(x, w1, b1, w3, w2, layout: MoELayout):
    """The always-on neurons as a dense FFN in Relax ops (None when ``S = 0``)."""
    s = layout.shared
    if not s:
        return None
    h = relax.op.add(relax.op.matmul(x, relax.const(w1[:, :s])), relax.const(b1[:s]))
    act = {"relu": relax.op.nn.relu, "silu": relax.op.nn.silu, "gelu": relax.op.nn.gelu,
           "gelu_tanh": relax.op.nn.gelu_tanh}[layout.activation]
    a = act(h)
    if w3 is not None:
        a = relax.op.multiply(a, relax.op.matmul(x, relax.const(w3[:, :s])))
    return relax.op.matmul(a, relax.const(w2[:s]))


def _zero_experts(x, picked, values: np.ndarray, layout: MoELayout):
    """What the chosen zero-computation experts add: ``zc · zero_values + (zc · is_copy) ⊙ X`` (Relax, tiny)."""
    zc = relax.op.astype(relax.op.strided_slice(picked, [1], [layout.experts], [layout.routes]), "float32")
    out = relax.op.matmul(zc, relax.const(values.astype(np.float32)))
    if "copy" in layout.zero:
        sel = np.array([[float(k == "copy")] for k in layout.zero], np.float32)
        out = relax.op.add(out, relax.op.multiply(relax.op.matmul(zc, relax.const(sel)), x))
    return out


@register_converter("MoEFFN")
class MoEFFNConverter:
    """``effc.MoEFFN`` → router (Relax) → :func:`select_kernel` → :func:`routed_kernel` (+ shared expert)."""

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        x, wr, br, w1, b1, w3, w2, b2, fill, zv = (list(inputs) + [None] * 10)[:10]
        wr, br, w1, b1, w2, b2, fill = (constant_input(v, params, "MoEFFN weights").astype(np.float32)
                                        for v in (wr, br, w1, b1, w2, b2, fill))
        gated = bool(int(attr.get("gated", 0)))
        w3 = constant_input(w3, params, "MoEFFN weights").astype(np.float32) if gated else None
        act = attr.get("activation", "gelu")
        act = act.decode() if isinstance(act, bytes) else str(act)
        experts, shared = int(attr["experts"]), int(attr.get("shared", 0))
        zero = attr.get("zero_experts", "")
        zero = tuple(k for k in (zero.decode() if isinstance(zero, bytes) else str(zero)).split(",") if k)
        layout = MoELayout(w1.shape[0], w2.shape[1], shared, experts, (w1.shape[1] - shared) // experts,
                           int(attr["top_k"]), gated, act, zero)
        x = bb.normalize(x)
        shape = [int(d) for d in x.ty.shape.values]
        rows = int(np.prod(shape[:-1]))
        x2 = bb.normalize(relax.op.reshape(x, [rows, layout.k]))
        logits = relax.op.add(relax.op.matmul(x2, relax.const(wr)), relax.const(br))
        # tokens grouped by expert (prefill), and always with zero-computation experts: the (M, E + Z) mask's
        # routed columns drive the kernel, so a slot spent on a zero-computation expert computes nothing
        grouped = rows > 1 or bool(zero)
        routes = layout.routes
        sel = bb.add_func(select_kernel(rows, routes, layout.top_k, mask=grouped).without_attr("global_symbol")
                          .with_attr("tir.is_scheduled", True).with_attr("op_pattern", _OPAQUE), "effc_moe_select")
        idx = relax.call_tir(sel, [logits], out_ty=relax.TensorType(
            [rows, routes if grouped else layout.top_k], "int32"))
        picked = idx
        if zero:
            idx = bb.normalize(relax.op.strided_slice(picked, [1], [0], [experts]))
        packed = relayout(w1, w3, w2, fill, b2, layout)
        if grouped:  # tokens grouped by expert: weight panels reused across the tokens that chose them
            kernel, name = grouped_kernel(rows, layout), "effc_moe_grouped"
        else:  # decode: a GEMV over the chosen experts' slices
            kernel, name = schedule_routed(routed_kernel(rows, layout), layout), "effc_moe_routed"
        gv = bb.add_func(kernel.without_attr("global_symbol").with_attr("op_pattern", _OPAQUE), name)
        b1e = np.ascontiguousarray(b1[shared:].reshape(experts, layout.expert_size))
        y = relax.call_tir(gv, [x2, idx, relax.const(packed["W13"]), relax.const(b1e), relax.const(packed["W2"]),
                                relax.const(fill), relax.const(packed["base"])],
                           out_ty=relax.TensorType([rows, layout.c], "float32"))
        shared_out = _shared_expert(x2, w1, b1, w3, w2, layout)
        if shared_out is not None:
            y = relax.op.add(y, shared_out)
        if zero:
            y = relax.op.add(y, _zero_experts(x2, picked, constant_input(zv, params, "MoEFFN weights"), layout))
        LOWERING_LOG.append({"rows": rows, "layout": layout.overload(), "kernel": name})
        return relax.op.reshape(y, [*shape[:-1], layout.c])
