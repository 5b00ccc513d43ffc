"""``effc.MoEFFN``: an FFN whose intermediate neurons are split into a shared expert and ``E`` routed experts.

Schema (domain ``effc``, opset 1; one function overload per activation and expert layout)::

    Y = effc.MoEFFN(X, router_w, router_b, W1, b1, W3, W2, b2, fill, zero_values,
                    activation="gelu", gated=0, experts=E, top_k=k, shared=S, zero_experts="")

* ``X``        ``(..., K)`` float32: the FFN input.
* ``router_w`` ``(K, E + Z)``, ``router_b`` ``(E + Z,)``: router logits ``l = X·router_w + router_b`` over the ``E``
  routed experts then the ``Z`` zero-computation experts; the ``k`` with the largest logits are chosen per token
  (ties: the lower index wins).
* ``W1``       ``(K, H)``, ``b1`` ``(H,)``: the projection into the activation; ``H = S + E·He``. Neurons are laid
  out shared first (``[0, S)``), then expert ``e`` at ``[S + e·He, S + (e+1)·He)``.
* ``W3``       ``(K, H)``: a gated unit's second projection (SwiGLU/GeGLU: ``act(X·W1 + b1) ⊙ X·W3``); with
  ``gated = 0`` the input is left empty.
* ``W2``       ``(H, C)``, ``b2`` ``(C,)``: the down projection.
* ``fill``     ``(E, C)``: what an unchosen expert contributes instead (its mean output on calibration tokens, the
  MoE++ "constant expert"; zeros for plain MoEfication).
* ``zero_values`` ``(Z, C)``: the constant of each zero-computation expert (zeros for ``zero`` / ``copy``); empty
  when ``Z = 0``.
* ``zero_experts``: the kinds of the ``Z`` zero-computation experts (MoE++), comma-separated: ``zero`` adds
  nothing, ``const`` adds its ``zero_values`` row, ``copy`` adds ``X`` (needs ``K = C``). A token that chooses one
  spends a routed slot on no FFN work.
* ``Y``        ``(..., C)`` float32::

      Y = b2 + shared(X) + Σ_{e ∈ topk(l), e < E} expert_e(X) + Σ_{e ∉ topk(l), e < E} fill_e
            + Σ_{z ∈ topk(l), z ≥ E} zero_expert_z(X)
      expert_e(X) = act(X·W1[:, N_e] + b1[N_e]) [⊙ X·W3[:, N_e]] · W2[N_e, :]   (N_e: the neurons of expert e)

  Chosen experts are summed with weight 1 (experts carved from a dense FFN add up to it), so with ``top_k = E`` the
  operator equals the dense FFN up to summation order.

The reference body (:func:`moe_function`, standard ONNX ops, opset ≥ 13) computes every expert and masks the
neurons of unchosen ones; the TVM kernel (:mod:`effc.codegen.ops.moe`) computes only the chosen experts.
MACs (:func:`count_macs`) and weight bytes read per token (:func:`weight_bytes_per_token`) count the router, the
shared expert and ``k`` routed experts only (an upper bound with zero-computation experts: a token that chooses
one computes fewer).

Sources: Zhang et al., "MoEfication: Transformer Feed-forward Layers are Mixtures of Experts" (ACL Findings 2022);
Zhao et al., "FactorLLM" (2024); Jin et al., "MoE++: Accelerating Mixture-of-Experts Methods with Zero-Computation
Experts" (2024, constant experts).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from effc.errors import PassError
from effc.ir.queries import static_shape
from effc.ops.base import EFFC_DOMAIN, OpSpec, add_function, register_op

__all__ = ["ACTIVATIONS", "INPUTS", "OP_TYPE", "MoELayout", "active_fraction", "add_moe_ffn", "count_macs",
           "layout_of", "moe_function", "reference", "select_experts", "weight_bytes_per_token"]

OP_TYPE = "MoEFFN"
MIN_OPSET = 13
INPUTS = ("X", "router_w", "router_b", "W1", "b1", "W3", "W2", "b2", "fill", "zero_values")
ATTRIBUTES = ("activation", "gated", "experts", "top_k", "shared", "zero_experts")
#: MoE++ zero-computation expert kinds and their code in overload names.
ZERO_KINDS = {"zero": "0", "const": "k", "copy": "c"}
_SQRT_2_PI = math.sqrt(2.0 / math.pi)


def _erf(x: np.ndarray) -> np.ndarray:
    from scipy.special import erf

    return erf(x)


ACTIVATIONS = {
    "gelu": lambda x: 0.5 * x * (1.0 + _erf(x / np.sqrt(2.0))),
    "gelu_tanh": lambda x: 0.5 * x * (1.0 + np.tanh(_SQRT_2_PI * (x + 0.044715 * x**3))),
    "relu": lambda x: np.maximum(x, 0),
    "silu": lambda x: x / (1.0 + np.exp(-x)),
}
"""Activations the operator knows, as numpy functions (float32 in, float32 out)."""


@dataclasses.dataclass(frozen=True)
class MoELayout:
    """The expert layout of one ``effc.MoEFFN`` node (attributes plus the shapes of its weights).

    Attributes:
        k: input width ``K``.
        c: output width ``C``.
        shared: always-on neurons ``S``.
        experts: routed experts ``E``.
        expert_size: neurons per routed expert ``He`` (``H = S + E·He``).
        top_k: experts chosen per token.
        gated: True for a gated unit (``W3`` present).
        activation: a key of :data:`ACTIVATIONS`.
        zero: kinds of the zero-computation experts (keys of :data:`ZERO_KINDS`), in router order after the
            routed experts.
    """

    k: int
    c: int
    shared: int
    experts: int
    expert_size: int
    top_k: int
    gated: bool
    activation: str
    zero: tuple[str, ...] = ()

    @property
    def routes(self) -> int:
        """Router outputs ``E + Z``."""
        return self.experts + len(self.zero)

    @property
    def hidden(self) -> int:
        """``H = S + E·He``."""
        return self.shared + self.experts * self.expert_size

    @property
    def active(self) -> int:
        """Neurons computed per token: ``S + k·He``."""
        return self.shared + self.top_k * self.expert_size

    def overload(self) -> str:
        """Function overload of this layout, e.g. ``"gelu_e8x192_k2_s0"`` (``_glu`` for gated units)."""
        glu = "_glu" if self.gated else ""
        zero = f"_z{''.join(ZERO_KINDS[z] for z in self.zero)}" if self.zero else ""
        return f"{self.activation}{glu}_e{self.experts}x{self.expert_size}_k{self.top_k}_s{self.shared}{zero}"

    def check(self) -> None:
        """Check the layout.

        Raises:
            PassError: an unknown activation or zero-expert kind, ``top_k`` outside ``[1, E]``, or a ``copy``
                expert on an FFN whose output width differs from its input width.
        """
        bad = [z for z in self.zero if z not in ZERO_KINDS]
        if bad or ("copy" in self.zero and self.k != self.c):
            raise PassError(f"MoEFFN zero-computation experts {','.join(self.zero)} on a {self.k} -> {self.c} FFN",
                            f"use kinds among {', '.join(ZERO_KINDS)} (copy only when input and output widths match)")
        if self.activation not in ACTIVATIONS:
            raise PassError(f"MoEFFN activation {self.activation!r} unknown",
                            f"use one of {', '.join(ACTIVATIONS)}")
        if not 1 <= self.top_k <= self.experts or self.expert_size < 1:
            raise PassError(f"MoEFFN top_k={self.top_k} with {self.experts} experts of {self.expert_size} neurons",
                            "choose 1 <= top_k <= experts and experts <= the FFN's routed neurons")


def select_experts(logits: np.ndarray, top_k: int) -> np.ndarray:
    """Chosen-expert mask ``(..., E)`` bool of router logits ``(..., E)``: rank < ``top_k``, ties to the lower index.

    ``rank_e = #{f: l_f > l_e} + #{f < e: l_f = l_e}``; the ONNX body and the TVM kernel use the same rule.
    """
    e = logits.shape[-1]
    lu, lf = logits[..., :, None], logits[..., None, :]
    beats = (lf > lu) | ((lf == lu) & np.tri(e, e, -1, dtype=bool))
    return beats.sum(-1) < top_k


def reference(x, router_w, router_b, w1, b1, w3, w2, b2, fill, zero_values=None, *, activation: str, gated: int,
              experts: int, top_k: int, shared: int, zero_experts: str = "") -> np.ndarray:
    """Numpy ``effc.MoEFFN`` (module docstring): every expert computed, unchosen ones replaced by ``fill``.

    Args:
        x: ``(..., K)``.
        router_w: ``(K, E + Z)``.
        router_b: ``(E + Z,)``.
        w1: ``(K, H)``, shared neurons first, then expert by expert.
        b1: ``(H,)``.
        w3: ``(K, H)``, None when ``gated`` is 0.
        w2: ``(H, C)``.
        b2: ``(C,)``.
        fill: ``(E, C)``.
        zero_values: ``(Z, C)``, None when ``Z = 0``.
        activation: a key of :data:`ACTIVATIONS`.
        gated: 1 for a gated unit.
        experts: ``E``.
        top_k: experts chosen per token.
        shared: always-on neurons ``S``.
        zero_experts: comma-separated kinds of the ``Z`` zero-computation experts ("" for none).

    Returns:
        ``(..., C)`` float32.
    """
    he = (w1.shape[1] - shared) // experts
    kinds = [z for z in zero_experts.split(",") if z]
    picked = select_experts(x @ router_w + router_b, top_k).astype(np.float32)
    chosen, zc = picked[..., :experts], picked[..., experts:]
    mask = np.concatenate([np.ones((*x.shape[:-1], shared), np.float32), np.repeat(chosen, he, axis=-1)], -1)
    h = ACTIVATIONS[activation](x @ w1 + b1)
    if gated:
        h = h * (x @ w3)
    y = (h * mask) @ w2 + b2 + (1.0 - chosen) @ fill
    if kinds:
        y = y + zc @ zero_values + zc @ np.array([[k == "copy"] for k in kinds], np.float32) * x
    return y.astype(np.float32)


def _const(nodes: list, name: str, array: np.ndarray) -> str:
    nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(array), name)))
    return name


def _activation_nodes(kind: str, x: str, out: str) -> list:
    """ONNX nodes ``out = act(x)`` (standard ops available at opset 13)."""
    n = helper.make_node
    if kind == "relu":
        return [n("Relu", [x], [out])]
    if kind == "silu":
        return [n("Sigmoid", [x], ["act_sig"]), n("Mul", [x, "act_sig"], [out])]
    nodes: list = []
    half, one = _const(nodes, "act_half", np.float32(0.5)), _const(nodes, "act_one", np.float32(1.0))
    if kind == "gelu":
        inner = _const(nodes, "act_sqrt2", np.float32(np.sqrt(2.0)))
        nodes += [n("Div", [x, inner], ["act_arg"]), n("Erf", ["act_arg"], ["act_t"])]
    else:  # gelu_tanh
        c0, c1 = _const(nodes, "act_c0", np.float32(_SQRT_2_PI)), _const(nodes, "act_c1", np.float32(0.044715))
        nodes += [n("Mul", [x, x], ["act_x2"]), n("Mul", ["act_x2", x], ["act_x3"]),
                  n("Mul", ["act_x3", c1], ["act_cx3"]), n("Add", [x, "act_cx3"], ["act_in"]),
                  n("Mul", ["act_in", c0], ["act_arg"]), n("Tanh", ["act_arg"], ["act_t"])]
    return nodes + [n("Add", ["act_t", one], ["act_t1"]), n("Mul", [x, "act_t1"], ["act_p"]),
                    n("Mul", ["act_p", half], [out])]


def moe_function(layout: MoELayout, opset: int) -> ir.Function:
    """Reference body of ``effc.MoEFFN`` for one layout (overload :meth:`MoELayout.overload`), opset ≥ 13.

    Every expert is computed; neurons of unchosen experts are multiplied by 0 and ``fill`` is added for them; the
    zero-computation experts' rows of the routing mask select their constants (and ``X`` for ``copy``).
    """
    n = helper.make_node
    e, he, z, r = layout.experts, layout.expert_size, len(layout.zero), layout.routes
    nodes: list = []
    tri = _const(nodes, "tri", np.tri(r, r, -1, dtype=bool))  # tri[e, f] = f < e
    k = _const(nodes, "k", np.float32(layout.top_k))
    ax_m1, ax_m2 = _const(nodes, "ax_m1", np.array([-1], np.int64)), _const(nodes, "ax_m2", np.array([-2], np.int64))
    spread = np.zeros((r, layout.hidden), np.float32)  # chosen (.., E+Z) @ spread -> per-neuron mask, routed part
    for i in range(e):
        spread[i, layout.shared + i * he: layout.shared + (i + 1) * he] = 1.0
    always = np.zeros(layout.hidden, np.float32)
    always[: layout.shared] = 1.0
    _const(nodes, "spread", spread)
    _const(nodes, "always", always)
    _const(nodes, "one", np.float32(1.0))
    nodes += [
        n("MatMul", ["X", "router_w"], ["lw"]), n("Add", ["lw", "router_b"], ["logits"]),
        n("Unsqueeze", ["logits", ax_m1], ["l_e"]), n("Unsqueeze", ["logits", ax_m2], ["l_f"]),
        n("Greater", ["l_f", "l_e"], ["gt"]), n("Equal", ["l_f", "l_e"], ["eq"]),
        n("And", ["eq", tri], ["tie"]), n("Or", ["gt", "tie"], ["beats"]),
        n("Cast", ["beats"], ["beats_f"], to=TensorProto.FLOAT),
        n("ReduceSum", ["beats_f", ax_m1], ["rank"], keepdims=0),
        n("Less", ["rank", k], ["chosen_b"]), n("Cast", ["chosen_b"], ["chosen"], to=TensorProto.FLOAT),
        n("MatMul", ["chosen", "spread"], ["routed_mask"]), n("Add", ["routed_mask", "always"], ["mask"]),
        n("MatMul", ["X", "W1"], ["h0"]), n("Add", ["h0", "b1"], ["h1"]),
    ]
    nodes += _activation_nodes(layout.activation, "h1", "a0")
    if layout.gated:
        nodes += [n("MatMul", ["X", "W3"], ["u"]), n("Mul", ["a0", "u"], ["a"])]
    else:
        nodes += [n("Identity", ["a0"], ["a"])]
    fill = "fill"
    if z:  # zero-computation experts: no fill when unchosen, their constant (and X for copy) when chosen
        pad = _const(nodes, "zero_pad", np.zeros((z, layout.c), np.float32))
        head = _const(nodes, "routed_pad", np.zeros((e, layout.c), np.float32))
        copy = _const(nodes, "copy_sel", np.array([[0.0]] * e + [[float(k == "copy")] for k in layout.zero],
                                                  np.float32))
        nodes += [n("Concat", ["fill", pad], ["fill_all"], axis=0), n("Concat", [head, "zero_values"], ["zv_all"],
                                                                       axis=0),
                  n("MatMul", ["chosen", "zv_all"], ["zc_const"]), n("MatMul", ["chosen", copy], ["zc_copy_w"]),
                  n("Mul", ["zc_copy_w", "X"], ["zc_copy"]), n("Add", ["zc_const", "zc_copy"], ["zc_out"])]
        fill = "fill_all"
    nodes += [
        n("Mul", ["a", "mask"], ["am"]), n("MatMul", ["am", "W2"], ["y0"]), n("Add", ["y0", "b2"], ["y1"]),
        n("Sub", ["one", "chosen"], ["unchosen"]), n("MatMul", ["unchosen", fill], ["filled"]),
        n("Add", ["y1", "filled"], ["Y" if not z else "y2"]),
    ]
    if z:
        nodes.append(n("Add", ["y2", "zc_out"], ["Y"]))
    proto = helper.make_function(EFFC_DOMAIN, OP_TYPE, list(INPUTS), ["Y"], nodes, [helper.make_opsetid("", opset)],
                                 attributes=list(ATTRIBUTES))
    proto.overload = layout.overload()
    return ir.serde.deserialize_function(proto)


def add_moe_ffn(model: ir.Model, x: ir.Value, weights: dict[str, ir.Value | None], layout: MoELayout,
                name: str) -> ir.Node:
    """A new (not yet inserted) ``effc.MoEFFN`` node; attaches the overload's function body to ``model``.

    Args:
        model: receives the function body and the ``effc`` opset.
        x: the FFN input ``(..., K)``.
        weights: initializers keyed by :data:`INPUTS` names (except ``X``); ``W3`` None unless ``layout.gated``,
            ``zero_values`` None unless ``layout.zero``.
        layout: the expert layout (attributes).
        name: the node's name.

    Raises:
        PassError: the model's default opset is below 13, or the layout is invalid.
    """
    layout.check()
    opset = model.opset_imports.get("", 0)
    if opset < MIN_OPSET:
        raise PassError(f"model opset {opset} < {MIN_OPSET}", "canonicalize or convert the model to opset >= 13")
    add_function(model, moe_function(layout, opset))
    attrs = [ir.AttrString("activation", layout.activation), ir.AttrInt64("gated", int(layout.gated)),
             ir.AttrInt64("experts", layout.experts), ir.AttrInt64("top_k", layout.top_k),
             ir.AttrInt64("shared", layout.shared), ir.AttrString("zero_experts", ",".join(layout.zero))]
    inputs = [x, *(weights.get(k) for k in INPUTS[1:])]
    if inputs[-1] is None:  # no zero-computation experts: the node keeps the 9 inputs of the first schema
        inputs.pop()
    return ir.Node(EFFC_DOMAIN, OP_TYPE, inputs, attrs, overload=layout.overload(), name=name, num_outputs=1)


def layout_of(node: ir.Node) -> MoELayout | None:
    """The layout of an ``effc.MoEFFN`` node from its attributes and weight shapes; None when malformed."""
    w1, w2 = (static_shape(node.inputs[i]) if len(node.inputs) > i else None for i in (3, 6))
    a = node.attributes
    experts, shared = a.get_int("experts", 0), a.get_int("shared", 0)
    if w1 is None or w2 is None or experts < 1 or (w1[1] - shared) % experts:
        return None
    zero = tuple(k for k in a.get_string("zero_experts", "").split(",") if k)
    return MoELayout(w1[0], w2[1], shared, experts, (w1[1] - shared) // experts, a.get_int("top_k", 1),
                     bool(a.get_int("gated", 0)), a.get_string("activation", "gelu"), zero)


def active_fraction(layout: MoELayout) -> float:
    """Fraction of the FFN's neurons computed per token, ``(S + k·He) / H`` in [0, 1]."""
    return layout.active / layout.hidden


def weight_bytes_per_token(layout: MoELayout) -> int:
    """float32 weight bytes one token reads: router, shared expert, ``k`` routed experts, their fill rows, ``b2``."""
    per_neuron = layout.k * (2 if layout.gated else 1) + 1 + layout.c  # W1 (+W3) column, b1, W2 row
    return 4 * (layout.k * layout.routes + layout.routes + layout.active * per_neuron
                + layout.c * (1 + layout.top_k))


def count_macs(node: ir.Node) -> int | None:
    """MACs of ``effc.MoEFFN``: rows × (K·E router + (S + k·He)·(K·(1 + gated) + C)) — only active experts."""
    x, layout = static_shape(node.inputs[0]), layout_of(node)
    if x is None or layout is None:
        return None
    per_neuron = layout.k * (2 if layout.gated else 1) + layout.c
    return int(np.prod(x[:-1])) * (layout.k * layout.routes + layout.active * per_neuron)


SPEC = register_op(OpSpec(OP_TYPE, INPUTS, ATTRIBUTES, count_macs, reference))
