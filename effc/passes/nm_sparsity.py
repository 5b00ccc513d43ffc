"""``nm-sparsity``: N:M fine-grained structured sparsity stored packed as ``effc.NMSparseMatMul``.

N of every M consecutive weights along the reduction (input) axis are kept (2:4, 1:4, 4:8, ...), chosen by
magnitude, Wanda score, or inside a SparseGPT reconstruction sweep. With ``vector=V`` the kept pattern of a group is
shared by V adjacent output channels (V = SIMD width: the input element becomes a scalar broadcast in the kernel);
``vector=1`` is element-wise N:M (the sparse-tensor-core format).

The packed form (``values`` ``(K/m·n, Cout)`` float32 + absolute ``indices`` ``(K/m·n, Cout/V)`` uint16) and its
reference body are defined in :mod:`effc.ops.nm_sparse`; this pass decides which MatMuls are pruned and packed.
Indices are absolute, so an input-channel permutation found by ``permute=true`` (groups formed over permuted
inputs, as NVIDIA ASP's channel permutation does) costs nothing at run time and changes no other node.

Sources: Mishra et al., "Accelerating Sparse Deep Neural Networks" (2021); Pool & Yu, "Channel Permutations for N:M
Sparsity" (NeurIPS 2021); SparseGPT and Wanda (see :mod:`effc.passes.sparsegpt`).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from effc.ops.base import EFFC_DOMAIN
from effc.ops.nm_sparse import nm_sparse_matmul, pack_nm
from effc.passes import sparsegpt as sg
from effc.passes.base import EffcPass, PassOptions, register_pass
from effc.passes.block_recon import RECONSTRUCT, RECONSTRUCT_HELP, normalize_reconstruct, reconstruct_sequential
from effc.passes.model_recon import check_model_fit, dense_outputs, fit_model
from effc.passes.rewrite import replace_value
from effc.passes.structured.permutation import permutation_search

logger = logging.getLogger(__name__)


def replace_with_packed(model: ir.Model, node: ir.Node, n: int, m: int, vector: int, perm=None) -> dict:
    """Rewrite one ``MatMul(X, W)`` (W constant ``(K, Cout)``, already N:M) into ``effc.NMSparseMatMul``.

    Returns:
        ``{"name", "dense_bytes", "packed_bytes"}``.

    Raises:
        PassError: the weight is not N:M, or the model's default opset is below 13.
    """
    wv = node.inputs[1]
    dense = wv.const_value.numpy()
    values, indices = pack_nm(dense, n, m, vector, perm)
    base = node.name or wv.name
    vals = ir.Value(name=f"{base}.nm_values", const_value=ir.tensor(values, name=f"{base}.nm_values"))
    idx = ir.Value(name=f"{base}.nm_indices", const_value=ir.tensor(indices, name=f"{base}.nm_indices"))
    for v in (vals, idx):
        v.shape, v.type = v.const_value.shape, ir.TensorType(v.const_value.dtype)
        model.graph.register_initializer(v)
    new = nm_sparse_matmul(model, node.inputs[0], vals, idx, n, m, vector, f"{base}/nm")
    new.metadata_props["effc.pass"] = "nm-sparsity"
    out = node.outputs[0]
    new.outputs[0].name, new.outputs[0].shape, new.outputs[0].type = out.name + "_nm", out.shape, out.type
    model.graph.insert_after(node, new)
    name = out.name
    replace_value(model.graph, out, new.outputs[0])
    model.graph.remove(node, safe=True)
    new.outputs[0].name = name
    if wv.name in model.graph.initializers and not wv.uses():
        del model.graph.initializers[wv.name]
    return {"name": base, "dense_bytes": int(dense.nbytes), "packed_bytes": int(values.nbytes + indices.nbytes)}


@dataclasses.dataclass(frozen=True)
class NMSparsityOptions(PassOptions):
    """Options of ``nm-sparsity`` (groups run along the reduction axis of each MatMul weight)."""

    n: int = dataclasses.field(default=2, metadata={"help": "weights kept per group"})
    m: int = dataclasses.field(default=4, metadata={"help": "group length along the reduction axis"})
    vector: int = dataclasses.field(default=1, metadata={"help": "output channels sharing a pattern (1 = element)"})
    method: str = dataclasses.field(default="wanda", metadata={"help": "mask score: magnitude | wanda"})
    layers: str = dataclasses.field(default="all", metadata={"help": "all | ffn | attention | name patterns (a|b)"})
    reconstruct: str = dataclasses.field(default="true", metadata={"help": RECONSTRUCT_HELP, "choices": RECONSTRUCT})
    permute: bool = dataclasses.field(default=False, metadata={"help": "input-channel permutation search"})
    min_cosine: float | None = dataclasses.field(default=None, metadata={"help": "output cosine floor; drops layers"})
    pack: bool = dataclasses.field(default=True, metadata={"help": "store as effc.NMSparseMatMul (values+indices)"})

    def __post_init__(self) -> None:
        normalize_reconstruct(self)  # Python API: reconstruct=True/False mean "true"/"false"
        super().__post_init__()

    @property
    def sparsegpt(self) -> bool:
        """True when the weights are reconstructed (SparseGPT, alone or before the block fit)."""
        return self.reconstruct != "false"

    def validate(self) -> None:
        """Raises: PipelineError: n, m, vector, method or min_cosine out of range."""
        if not 1 <= self.m <= 64:
            self.fail("m", self.m, "an integer in [1, 64]")
        if not 1 <= self.n < self.m:
            self.fail("n", self.n, f"an integer in [1, m) with m={self.m}")
        if self.vector < 1:
            self.fail("vector", self.vector, "a positive integer (1 = element-wise, 16 = AVX-512 lanes)")
        if self.method not in ("magnitude", "wanda"):
            self.fail("method", self.method, "magnitude or wanda")
        if self.min_cosine is not None and not 0.0 < self.min_cosine <= 1.0:
            self.fail("min_cosine", self.min_cosine, "a cosine in (0, 1]")


def _quantized_layers(model: ir.Model) -> list[dict]:
    """``skipped`` records for weights block-quant already replaced (their codes cannot be pruned here), logged."""
    found = [{"name": n.name, "reason": f"already block-quantized ({EFFC_DOMAIN}.{n.op_type}): run nm-sparsity "
              "before block-quant"} for n in model.graph
             if n.domain == EFFC_DOMAIN and n.op_type in ("BlockQuantMatMul", "BlockQuantGather")]
    if found:
        logger.warning("nm-sparsity: %d layer(s) are already block-quantized and stay dense (first: %s); put "
                       "nm-sparsity before block-quant in the pipeline", len(found), found[0]["name"])
    return found


@register_pass
class NMSparsityPass(EffcPass):
    """Prune MatMul weights to N:M along the reduction axis and store them packed as ``effc.NMSparseMatMul``.

    ``reconstruct=block`` (with calibration) runs SparseGPT and then refits every FFN block whose MatMuls were
    pruned (:mod:`effc.passes.block_recon`): the kept weights and biases of both MatMuls, through the activation,
    against the dense model's output after the block's residual add and LayerNorm; masks stay fixed, so the N:M
    pattern and the packed form are those of SparseGPT. ``reconstruct=model`` runs SparseGPT and then fits the kept
    weights and biases of all pruned layers jointly to the dense model's outputs on the calibration feeds
    (:mod:`effc.passes.model_recon`; the graph is evaluated in torch, so only ops that evaluator knows are allowed).

    Stats: ``layers`` (name, shape, kind, kept fraction, bytes dense/packed, permutation gain), ``skipped``
    (name, reason), ``method`` actually used, ``reconstructed`` and ``reconstruct`` (the mode that ran),
    ``weight_bytes_before/after`` (equal with ``pack=false``), with ``reconstruct=block`` a
    ``block_reconstruction`` dict (per block losses before/after, tokens, seconds; layers in no FFN block with the
    reason), with ``reconstruct=model`` a ``model_reconstruction`` dict (losses before/after on training and
    held-out feeds, epoch kept, seconds), and with ``min_cosine`` the per-layer ``sensitivity``
    and the measured ``cosine``.

    Attributes:
        block_config: :class:`effc.passes.block_recon.BlockReconConfig` for ``reconstruct=block`` (Python API
            only; None = defaults).
        model_config: :class:`effc.passes.model_recon.ModelReconConfig` for ``reconstruct=model`` (Python API
            only; None = defaults).

    Raises:
        PassError: ``layers`` matches nothing; ``reconstruct=model`` on a graph with an op the torch evaluator
            lacks (named).
        CalibrationError: ``reconstruct=model`` without calibration data.
    """

    block_config = None
    model_config = None

    name = "nm-sparsity"
    summary = "N:M structured sparsity (2:4, ...) along the reduction axis, packed as effc.NMSparseMatMul"
    Options = NMSparsityOptions
    exact = False
    uses_calibration = True

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Select, prune (sequentially, with calibration taps), optionally pack; see the class docstring."""
        o = self.options
        cands, skipped = [], _quantized_layers(model)
        for lay in sg.select_layers(model, o.layers):
            shape = tuple(lay[1].const_value.shape)
            cout, cin = (shape if lay[2] else shape[::-1])
            if lay[0].op_type != "MatMul":
                skipped.append({"name": lay[0].name, "reason": f"{lay[0].op_type} is not packed (MatMul only)"})
            elif cin % o.m or cout % o.vector:
                skipped.append({"name": lay[0].name, "reason": f"(Cout, Cin)=({cout}, {cin}) does not divide by "
                                f"vector={o.vector}, m={o.m}"})
            else:
                cands.append(lay)
        cal = self.calibration
        method = o.method if cal is not None else "magnitude"
        recon = o.sparsegpt and cal is not None
        if cal is None and (o.method == "wanda" or o.sparsegpt):
            logger.warning("nm-sparsity: no calibration data, falling back to magnitude without reconstruction")
        if o.min_cosine is not None and cal is not None and cands:
            from effc.passes.structured.sensitivity import choose_layers

            # Sensitivity with the pass's own pruning (SparseGPT on one-shot Hessians when reconstructing): the
            # mask-only loss overstates what a reconstructed layer costs and would drop most layers.
            cands, sens, ref = choose_layers(model, cands, cal, o.min_cosine,
                                             self._prune_fn(method, o.sparsegpt))
            self.stats["sensitivity"] = sens
        perms: dict[str, np.ndarray] = {}
        gains: dict[str, float] = {}

        def prune_fn(layer, w, hessian):
            perm = None
            if o.permute:
                scores = sg.importance(w, None if hessian is None else np.diag(hessian), method)
                rounds = self._rounds((w.shape[0] // o.vector, w.shape[1]))
                perm, before, after = permutation_search(scores, o.n, o.m, o.vector, rounds=rounds)
                perms[layer[0].name], gains[layer[0].name] = perm, after / max(before, 1e-30)
            return self._prune_fn(method, o.sparsegpt)(layer, w, hessian, perm)

        targets = None
        if o.reconstruct == "model" and recon and cands:  # the dense model's outputs, before any weight changes
            check_model_fit(model, cal)
            targets = dense_outputs(model, cal)
        if o.reconstruct == "block" and recon:
            records, info = reconstruct_sequential(model, cands, cal, prune_fn, self.block_config)
            self.stats["block_reconstruction"] = info
        else:
            records = sg.prune_sequential(model, cands, cal, prune_fn, sequential=o.sparsegpt)
        if targets is not None:
            self.stats["model_reconstruction"] = fit_model(model, [lay[1] for lay in cands], cal, targets,
                                                           self.model_config)
        before = after = 0
        for lay, rec in zip(sorted(cands, key=lambda c: [*model.graph].index(c[0])), records, strict=True):
            rec["kind"] = sg.layer_kind(lay[0], tuple(rec["shape"]))
            rec["permutation_gain"] = gains.get(lay[0].name)
            if o.pack:
                info = replace_with_packed(model, lay[0], o.n, o.m, o.vector, perms.get(lay[0].name))
                rec.update(dense_bytes=info["dense_bytes"], packed_bytes=info["packed_bytes"])
                before, after = before + info["dense_bytes"], after + info["packed_bytes"]
            else:  # pack=false: the pruned weight stays dense, its bytes unchanged
                nbytes = int(lay[1].const_value.numpy().nbytes)
                rec.update(dense_bytes=nbytes, packed_bytes=None)
                before, after = before + nbytes, after + nbytes
        self.stats.update(layers=records, skipped=skipped, method=method, pattern=f"{o.n}:{o.m}", vector=o.vector,
                          reconstructed=recon, reconstruct=o.reconstruct if recon else "false",
                          weight_bytes_before=before, weight_bytes_after=after)
        if o.min_cosine is not None and cal is not None:
            from effc.passes.structured.sensitivity import output_cosine

            self.stats["cosine"] = output_cosine(model, self.stats["sensitivity"]["feeds"], ref)
            self.stats["sensitivity"].pop("feeds")
        logger.info("nm-sparsity %d:%d v%d: %d layer(s) pruned, %d skipped", o.n, o.m, o.vector, len(records),
                    len(skipped))
        return ir.passes.PassResult(model, modified=bool(records))

    def _prune_fn(self, method: str, reconstruct: bool):
        o = self.options

        def fn(layer, w, hessian, perm=None):
            return sg.prune_weight(w, method=method, n=o.n, m=o.m, vector=o.vector, hessian=hessian,
                                   reconstruct=reconstruct, perm=perm)

        return fn

    @staticmethod
    def _rounds(shape: tuple[int, int], budget: float = 3e8) -> int:
        """Swap rounds that fit a fixed work budget (element-wise search on wide layers is costly)."""
        cout, cin = shape
        return int(min(64, max(4, budget // (cout * cin * 64))))

