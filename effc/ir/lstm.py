"""Unroll ONNX ``LSTM`` nodes into per-step MatMul/Sigmoid/Tanh arithmetic (TVM 0.27 has no LSTM converter).

Source: ONNX operator spec, ``LSTM`` (opset 7/14/22), default activations ``f=Sigmoid, g=Tanh, h=Tanh``, gate order
``iofc``, layout 0 (``X: (seq, batch, input)``, ``Y: (seq, num_directions, batch, hidden)``)::

    it = f(Xt Wi^T + Ht-1 Ri^T + Pi . Ct-1 + Wbi + Rbi)
    ft = f(Xt Wf^T + Ht-1 Rf^T + Pf . Ct-1 + Wbf + Rbf)
    ct = g(Xt Wc^T + Ht-1 Rc^T + Wbc + Rbc)
    Ct = ft . Ct-1 + it . ct
    ot = f(Xt Wo^T + Ht-1 Ro^T + Po . Ct + Wbo + Rbo)
    Ht = ot . h(Ct)

Only what real exports use is unrolled: forward direction, default activations, no ``clip``, no
``input_forget``, layout 0 or 1, a static sequence length and batch, ``sequence_lens`` absent (or empty). Any other
LSTM is left in place (logged) so the frontend's unsupported-op check names it.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

logger = logging.getLogger(__name__)

_DEFAULT_ACTIVATIONS = ("Sigmoid", "Tanh", "Tanh")


def _why_not(node: ir.Node) -> str | None:
    """Reason the node cannot be unrolled, or None when it can."""
    attrs = node.attributes
    direction = attrs.get_string("direction", "forward")
    if direction != "forward":
        return f"direction={direction!r}"
    acts = attrs.get_strings("activations", None)
    if acts is not None and tuple(acts) != _DEFAULT_ACTIVATIONS:
        return f"activations={list(acts)}"
    if attrs.get("clip") is not None:
        return "clip is set"
    if attrs.get_int("input_forget", 0):
        return "input_forget=1"
    x = node.inputs[0]
    if x is None or x.shape is None or not x.shape.is_static() or len(x.shape) != 3:
        return f"input X has no static 3-D shape ({None if x is None else x.shape})"
    if len(node.inputs) > 4 and node.inputs[4] is not None:
        return "sequence_lens is given"
    return None


def _const(tape: ir.tape.Tape, array: np.ndarray) -> ir.Value:
    return tape.op("Constant", [], {"value": ir.tensor(np.asarray(array))})


def _unroll(graph: ir.Graph, node: ir.Node) -> None:
    """Replace one LSTM node of ``graph`` by its unrolled steps (outputs keep their names)."""
    hidden = node.attributes.get_int("hidden_size")
    layout = node.attributes.get_int("layout", 0)
    inputs = list(node.inputs) + [None] * (8 - len(node.inputs))
    x, w, r, b, _, h0, c0, p = inputs
    tape = ir.tape.Tape(graph)
    if layout == 1:  # (batch, seq, input) -> (seq, batch, input)
        x_seq = tape.op("Transpose", [x], {"perm": [1, 0, 2]})
        batch, seq = x.shape[0], x.shape[1]
    else:
        x_seq = x
        seq, batch = x.shape[0], x.shape[1]
    zero = _const(tape, np.array(0, dtype=np.int64))
    w_t = tape.op("Transpose", [tape.op("Gather", [w, zero], {"axis": 0})], {"perm": [1, 0]})  # (I, 4H)
    r_t = tape.op("Transpose", [tape.op("Gather", [r, zero], {"axis": 0})], {"perm": [1, 0]})  # (H, 4H)
    gates_x = tape.op("MatMul", [x_seq, w_t])  # (S, B, 4H)
    if b is not None:
        b0 = tape.op("Gather", [b, zero], {"axis": 0})  # (8H,)
        wb = tape.op("Slice", [b0, _const(tape, np.array([0])), _const(tape, np.array([4 * hidden]))])
        rb = tape.op("Slice", [b0, _const(tape, np.array([4 * hidden])), _const(tape, np.array([8 * hidden]))])
        gates_x = tape.op("Add", [gates_x, tape.op("Add", [wb, rb])])
    dtype = x.dtype.numpy() if x.dtype is not None else np.float32
    zeros = _const(tape, np.zeros((batch, hidden), dtype=dtype))
    state_axis = 0 if layout == 0 else 1  # initial_h/initial_c: (dirs, B, H) or (B, dirs, H)
    h = tape.op("Gather", [h0, zero], {"axis": state_axis}) if h0 is not None else zeros
    c = tape.op("Gather", [c0, zero], {"axis": state_axis}) if c0 is not None else zeros
    peep = None
    if p is not None:
        p0 = tape.op("Gather", [p, zero], {"axis": 0})  # (3H,) order i, o, f
        peep = [
            tape.op("Slice", [p0, _const(tape, np.array([k * hidden])), _const(tape, np.array([(k + 1) * hidden]))])
            for k in range(3)
        ]
    bounds = [(_const(tape, np.array([k * hidden])), _const(tape, np.array([(k + 1) * hidden]))) for k in range(4)]
    last_axis = _const(tape, np.array([-1]))
    step_shape = _const(tape, np.array([1, 1, batch, hidden], dtype=np.int64))
    steps = []
    for t in range(seq):
        g = tape.op("Add", [tape.op("Gather", [gates_x, _const(tape, np.array(t, dtype=np.int64))], {"axis": 0}),
                            tape.op("MatMul", [h, r_t])])  # (B, 4H)
        gi, go, gf, gc = (tape.op("Slice", [g, lo, hi, last_axis]) for lo, hi in bounds)
        if peep is not None:
            gi = tape.op("Add", [gi, tape.op("Mul", [peep[0], c])])
            gf = tape.op("Add", [gf, tape.op("Mul", [peep[2], c])])
        i_t, f_t = tape.op("Sigmoid", [gi]), tape.op("Sigmoid", [gf])
        c = tape.op("Add", [tape.op("Mul", [f_t, c]), tape.op("Mul", [i_t, tape.op("Tanh", [gc])])])
        if peep is not None:
            go = tape.op("Add", [go, tape.op("Mul", [peep[1], c])])
        h = tape.op("Mul", [tape.op("Sigmoid", [go]), tape.op("Tanh", [c])])
        steps.append(tape.op("Reshape", [h, step_shape]))
    y = tape.op("Concat", steps, {"axis": 0}) if len(steps) > 1 else tape.op("Identity", steps)  # (S, 1, B, H)
    if layout == 1:
        y = tape.op("Transpose", [y], {"perm": [2, 0, 1, 3]})  # (B, S, 1, H)
    state_shape = _const(tape, np.array([1, batch, hidden] if layout == 0 else [batch, 1, hidden], dtype=np.int64))
    new_outputs = [y, tape.op("Reshape", [h, state_shape]), tape.op("Reshape", [c, state_shape])]
    graph.insert_before(node, tape.nodes)
    for old, new in zip(node.outputs, new_outputs, strict=False):
        if not old.name and not old.uses() and not old.is_graph_output():
            continue
        if old.dtype is not None:
            new.dtype = old.dtype
        if old.shape is not None:
            new.shape = old.shape
        old_name = old.name
        ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
        old.name = None
        new.name = old_name
    graph.remove(node, safe=True)


def unroll_lstms(model: ir.Model) -> int:
    """Unroll every supported LSTM node of ``model`` in place, subgraphs (``If``/``Loop`` bodies) included.

    Args:
        model: a model whose LSTM inputs have static shapes (run after fixing input dims and shape inference).

    Returns:
        How many LSTM nodes were unrolled; unsupported ones stay and are logged with the reason.
    """
    count = 0
    for graph in list(model.graphs()):
        for node in [n for n in graph if n.op_type == "LSTM" and n.domain in ("", "ai.onnx")]:
            reason = _why_not(node)
            if reason is not None:
                logger.warning("LSTM node %r left as is: %s", node.name, reason)
                continue
            _unroll(graph, node)
            count += 1
    return count
