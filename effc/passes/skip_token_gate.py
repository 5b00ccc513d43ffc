"""Per-token FFN skipping in a decoder: a gate per token, an ONNX ``If`` per FFN, thresholds calibrated per layer.

For an FFN sub-block ``y = x + FFN(x)`` of a decoder layer whose attention sub-block has input ``h`` and output
``a = x``, the gate is FFN-SkipLLM's signal (Jaiswal et al. 2024, "FFN-SkipLLM: A Hidden Gem for Autoregressive
Decoding with Adaptive Feed Forward Skipping"), per token ``t``:

    s[t] = cos(h[t], a[t])        (how little the attention sub-block changed the token's hidden state)

and the token's FFN runs only when ``s[t] < τ``. In the token-generic graph (``(T, d)`` hidden states):

    run[t] = Cast(s[t] < τ)                       (T, 1) float, 1 = run
    y      = If(max_t run[t] = 1,
                then: x + FFN(x) · run,           some token of the chunk runs the FFN: masked per token
                else: x)                          no token does: the FFN is not computed at all

The first ``sinks`` positions of a sequence always run every FFN (``run[t] = 1`` for ``positions[t] < sinks``): on
SmolLM2 the first token's signal is ~1 in every layer, yet its FFNs make the attention-sink state that every later
token attends to (skipping them raised perplexity from 36 to over 2,000); StreamingLLM (Xiao et al. 2024) keeps 4
such tokens. A decode step is never at such a position unless the prompt is shorter.

So a prefill chunk (``T = P``) computes the FFN when any of its tokens needs it and masks it per token (the same
numbers as running the FFN for exactly the tokens whose gate says run), and the decode step (``T = 1``) branches
on its one token: a skipped FFN reads no weight and runs no kernel (TVM's Relax ``If``,
:mod:`effc.codegen.branch_sink`). Both use the same signal and threshold, so the perplexity of the prefill graph is
the perplexity of token-by-token decoding with these gates (a skipped token's later layers and its KV cache see
the skipped output in both).

Every gate's decision is also a graph output, :data:`GATES_OUTPUT` ``(T, G)`` float32 (1 = ran, gates in graph
order), from which the runtime counts the FFN calls skipped (:class:`effc.runtime.decoder.DecoderSession`); the
decoder metadata names it (``info["ffn_gates"]``).

Calibration (:func:`calibrate`): the gates are calibrated in graph order, each on the calibration windows run with
the gates before it in place (the states it will see), ``τ`` midway between two measured signals so that a
``ratio`` fraction of the calibration tokens skip it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from effc.errors import PassError
from effc.ir import decoder as decoder_ir
from effc.ir.calibration import Calibration
from effc.ir.residual import ResidualBlock
from effc.passes.skip_gate import GATE_TAG, branch_block, const, row_cosine_nodes

logger = logging.getLogger(__name__)

#: The graph output holding every gate's decision per token, ``(T, G)`` float32 (1 = the FFN ran).
GATES_OUTPUT = "ffn_gates"


@dataclasses.dataclass
class TokenGate:
    """One gated FFN of a decoder.

    Attributes:
        name: the FFN's readable name (``layers.3.ffn``).
        attention: the attention sub-block before it (its input and output give the signal).
        ffn: the FFN sub-block put under ``If``.
        threshold: the initializer holding ``τ`` (float32 scalar; the FFN runs for tokens with ``s < τ``).
        signal: the per-token signal value ``s`` ``(T, 1)``.
        run: the per-token decision ``(T, 1)`` float32, 1 = run.
    """

    name: str
    attention: ResidualBlock
    ffn: ResidualBlock
    threshold: ir.Value | None = None
    signal: ir.Value | None = None
    run: ir.Value | None = None

    @property
    def tau(self) -> float:
        """The threshold's value."""
        return float(self.threshold.const_value.numpy())


def sink_tokens(model: ir.Model, sinks: int) -> ir.Value | None:
    """``positions < sinks`` as a ``(T, 1)`` bool (nodes put first in the graph); None for ``sinks = 0``.

    Raises:
        PassError: the graph has no ``positions`` input (not an effc decoder graph).
    """
    if sinks == 0:
        return None
    graph = model.graph
    positions = next((v for v in graph.inputs if v.name == "positions"), None)
    if positions is None:
        raise PassError("layer-skip(mode=adaptive,sinks=...) needs the decoder's positions input",
                        "give sinks=0, or compile a decoder exported by effc (e.g. zoo:smollm2-135m)")
    column = const(graph, f"{GATE_TAG}_column", np.asarray([-1, 1], dtype=np.int64))
    limit = const(graph, f"{GATE_TAG}_sinks", np.asarray(sinks, dtype=np.int64))
    rows = ir.node("Reshape", [positions, column], name=f"{GATE_TAG}_positions")
    first = ir.node("Less", [rows.outputs[0], limit], name=f"{GATE_TAG}_sink")
    first.outputs[0].name = f"{GATE_TAG}_sink"
    graph.insert_before(graph[0], [rows, first])
    return first.outputs[0]


def insert_gate(model: ir.Model, gate: TokenGate, index: int, sink: ir.Value | None = None) -> ir.Node:
    """Put ``gate.ffn`` under its per-token gate (see the module docstring, ``τ = +inf``: every token runs it).

    Args:
        model: the decoder graph (changed in place).
        gate: the gate; its ``threshold``, ``signal`` and ``run`` are set here.
        index: the gate's number (names its nodes).
        sink: ``(T, 1)`` bool, tokens that always run the FFN (:func:`sink_tokens`), or None.

    Returns:
        The ``If`` node.
    """
    graph, tag = model.graph, f"{GATE_TAG}_{index}"
    cos_nodes, cos = row_cosine_nodes(graph, gate.attention.skip, gate.attention.output, tag)
    gate.threshold = const(graph, f"{tag}_threshold", np.asarray(np.inf, dtype=np.float32))
    runs = [ir.node("Less", [cos, gate.threshold], name=f"{tag}_runs")]
    if sink is not None:
        runs.append(ir.node("Or", [runs[0].outputs[0], sink], name=f"{tag}_runs_or_sink"))
    mask = ir.node("Cast", [runs[-1].outputs[0]], attributes={"to": ir.DataType.FLOAT}, name=f"{tag}_mask_f")
    anyone = ir.node("ReduceMax", [mask.outputs[0]], attributes={"keepdims": 0}, name=f"{tag}_any")
    run = ir.node("Cast", [anyone.outputs[0]], attributes={"to": ir.DataType.BOOL}, name=f"{tag}_run")
    for node, name in ((cos.producer(), "signal"), (mask, "token_run"), (run, "run")):
        node.outputs[0].name = f"{tag}_{name}"
    graph.insert_before(gate.ffn.nodes[0], [*cos_nodes, *runs, mask, anyone, run])
    gate.signal, gate.run = cos, mask.outputs[0]
    h = gate.attention.skip
    for value in (cos, gate.run):  # typed: they are tapped in calibration and concatenated into a graph output
        value.type = ir.TensorType(ir.DataType.FLOAT)
        value.shape = ir.Shape([*h.shape[:-1], 1]) if h.shape is not None else None
    return branch_block(model, gate.ffn, run.outputs[0], tag, mask=gate.run)


def add_gates_output(model: ir.Model, gates: Sequence[TokenGate]) -> None:
    """Append :data:`GATES_OUTPUT` (every gate's decision, ``(T, G)``) to the graph outputs.

    The decoder metadata records it (``info["ffn_gates"]``: output name, gate names, thresholds).
    """
    concat = ir.node("Concat", [g.run for g in gates], attributes={"axis": -1}, name=f"{GATE_TAG}_all")
    out = concat.outputs[0]
    out.name, out.type = GATES_OUTPUT, ir.TensorType(ir.DataType.FLOAT)
    model.graph.append(concat)
    model.graph.outputs.append(out)
    info = decoder_ir.decoder_info(model)
    info["ffn_gates"] = {"output": GATES_OUTPUT, "names": [g.name for g in gates],
                         "thresholds": [g.tau for g in gates]}
    model.metadata_props[decoder_ir.METADATA_KEY] = json.dumps(info, sort_keys=True)


def threshold_for(signals: np.ndarray, ratio: float) -> float:
    """``τ`` that skips a ``ratio`` fraction of ``signals`` (those with ``s >= τ``); ``+inf`` for ratio 0.

    It lies midway between two signals, so that a rounding difference between runtimes flips no calibration token.
    """
    skipped = int(round(ratio * signals.size))
    if not skipped:
        return float("inf")
    ranked = np.sort(signals.astype(np.float64).ravel())[::-1]
    below = ranked[skipped] if skipped < ranked.size else ranked[-1] - 1e-3
    return float((ranked[skipped - 1] + below) / 2)


#: ``allocate=global``: rounds of (measure every signal, set the one pooled threshold).
GLOBAL_ROUNDS = 3


def calibrate(model: ir.Model, gates: Sequence[TokenGate], calibration: Calibration, ratio: float,
              allocate: str = "uniform", sinks: int = 0, threads: int = 2) -> list[float]:
    """Set the gates' thresholds so that ``ratio`` of the calibration FFN calls are skipped.

    ``allocate="uniform"``: each gate, in graph order, skips ``ratio`` of the calibration tokens, measured with the
    gates before it at their calibrated thresholds and the later ones at ``+inf`` (running). ``"global"``: one
    threshold for every gate, the ``ratio`` quantile of all signals pooled (FFNs after attention sub-blocks that
    change the state less skip more), re-measured :data:`GLOBAL_ROUNDS` times with the gates in place.

    Tokens at positions below ``sinks`` always run their FFNs and do not count. One onnxruntime session serves all
    the runs: a copy of ``model`` takes the thresholds as inputs and outputs the signals.

    Returns:
        The measured skip rate per gate (on the calibration tokens, with every gate in place).
    """
    from effc.ir.reference import Reference, with_taps

    names = [g.threshold.name for g in gates]
    copy = with_taps(model, [g.signal.name for g in gates])
    for name in names:
        value = copy.graph.initializers.pop(name)
        value.const_value = None
        value.shape, value.type = ir.Shape([]), ir.TensorType(ir.DataType.FLOAT)
        copy.graph.inputs.append(value)
    session = Reference(copy, threads=threads)
    taps = [session.output_names.index(g.signal.name) for g in gates]
    feeds = list(calibration)
    taus = np.full(len(gates), np.inf, dtype=np.float32)

    def signals() -> list[np.ndarray]:  # every gate's signal over all feeds, under the current thresholds
        inputs = {n: np.asarray(t, dtype=np.float32) for n, t in zip(names, taus, strict=True)}
        outs = [session.run({**feed, **inputs}) for feed in feeds]
        counted = [np.asarray(feed["positions"]).ravel() >= sinks for feed in feeds]
        return [np.concatenate([out[tap].ravel()[keep] for out, keep in zip(outs, counted, strict=True)])
                for tap in taps]

    if allocate == "global":
        for _ in range(GLOBAL_ROUNDS):
            taus[:] = threshold_for(np.concatenate(signals()), ratio)
    else:
        for k in range(len(gates)):
            taus[k] = threshold_for(signals()[k], ratio)
    for gate, tau in zip(gates, taus, strict=True):
        gate.threshold.const_value = ir.tensor(np.asarray(tau, dtype=np.float32))
        logger.debug("layer-skip: gate %s threshold %.6f", gate.name, tau)
    return [float(np.mean(s >= tau)) for s, tau in zip(signals(), taus, strict=True)]
