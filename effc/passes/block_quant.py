"""Block quantization (OCP MX / int blocks): ``block-quant(format=mxfp4,mode=weight,gptq=true,lorc_rank=8)``.

What is quantized (blocks of ``block_size`` along the reduction axis, formats in
:mod:`effc.ops.block_formats`):

* ``mode=weight`` (default): constant weights of MatMul ``(K, N)`` and Gemm (``transA=0``, ``alpha=beta=1``),
  blocked along K, and embedding tables of Gather (axis 0) ``(V, D)``, blocked along D. A decoder's tied
  embedding, stored once as the output projection ``(D, V)`` and gathered along axis 1, is quantized once: the
  lookup (``effc.BlockQuantGather`` + Transpose) and the projection read the same codes and scales.
  ``embedding_format`` gives the tables (a tied projection included) a format of their own, e.g.
  ``block-quant(format=int4_asym,embedding_format=int8)``: the layout of a GGUF Q4_1 model (Q4_1 linears, Q8_0
  token embedding), which both formats reproduce exactly when the weights are on those grids.
* ``mode=weight_act``: the same weights, plus a dynamic per-block quantize-dequantize of every quantized layer's
  input activation along K (``act_format``, default the weight format; an MX format, or ``int8``: symmetric codes
  with a float32 scale ``amax / 127`` per block, as llama.cpp's Q8_1 activations, e.g.
  ``block-quant(format=int4_asym,embedding_format=int8,mode=weight_act,act_format=int8)``; on AVX-512 VNNI CPUs the
  decode step then runs integer dot products, :mod:`effc.codegen.ops.block_quant_vnni`).
* ``mode=kv``: only the attention keys and values (the KV cache): the outputs of the K and V projections, found
  as the weight layers feeding the second input of an activation × activation MatMul, blocked along the hidden
  axis (head-major, so a block of 32 stays inside one head of MiniLM); on a decoder, the cache entries themselves
  (post-RoPE keys and values, blocked along head_dim: :mod:`effc.passes.quant.decoder_kv`), stored as MX rows
  (uint8 codes + E8M0 scales) for the 8-bit MX formats, as float32 values on the MX grid for the others.

Representation in ``model.onnx`` (onnxruntime runs it unchanged): a MatMul becomes ``effc.BlockQuantMatMul``
(packed codes + scales initializers, + minimums for ``int4_asym``) and a Gather ``effc.BlockQuantGather``; both
carry an ONNX function body that decodes bit-exactly (:mod:`effc.ops.block_quant`). int8/int4 weights use a
standard ``DequantizeLinear(block_size=...)`` when the model imports opset >= 21 (the first opset with blocked
quantization), else the same effc operators with float scales; ``int4_asym`` always uses the effc operators (its
float minimum is no integer zero point).

Compensation for low-bit formats (needs calibration): ``gptq=true`` (sequential column update with the input
Hessian, GPTQ) and ``lorc_rank=r`` (ZeroQuant-FP LoRC: ``Y += (X @ U) @ V`` with the rank-r SVD of the error).
Sources: OCP Microscaling Formats (MX) v1.0; "Accurate Block Quantization in LLMs with Outliers" (Trukhanov &
Soloveychik, 2024); GPTQ (Frantar et al. 2023); ZeroQuant-FP (Wu et al. 2023).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging

import ml_dtypes
import numpy as np
import onnx_ir as ir

from effc.errors import CalibrationError, PassError, PipelineError
from effc.ir.decoder import decoder_info, is_decoder
from effc.ops import block_quant as bq_ops
from effc.ops import kv_blocks
from effc.ops.base import effc_nodes
from effc.ops.bitpack import pack_blocks
from effc.ops.block_formats import FORMATS, dequantize, get_format, quantize, sqnr_db
from effc.ops.moe import OP_TYPE as MOE
from effc.ops.nm_sparse import packed_layers
from effc.passes.base import EffcPass, PassOptions, register_pass
from effc.passes.quant.compensation import gptq_quantize, hessian, lorc
from effc.passes.quant.decoder_kv import quantize_decoder_kv, rearrange_values, store_decoder_kv
from effc.passes.quant.graph import QuantTarget, find_kv_values, find_targets
from effc.passes.rewrite import replace_value

__all__ = ["BlockQuantOptions", "BlockQuantPass"]

logger = logging.getLogger(__name__)

MODES = ("weight", "weight_act", "kv")
INT_ACT_FORMATS = ("int8",)  # activation blocks with a float32 scale amax / 127 (GGUF Q8_1 style), weight_act only
HELD_OUT = 0.25  # fraction of the calibration feeds that check GPTQ against rounding (never fitted)
SPARSE_ZEROS = 0.01  # fraction of exact zeros from which a weight counts as pruned (no LoRC, see _lorc_rank)
ROW_BLOCKED = ("Gather", "Conv")  # weights in the (rows, blocked axis) layout, blocks along axis 1


@dataclasses.dataclass(frozen=True)
class BlockQuantOptions(PassOptions):
    """Options of ``block-quant``; see the module docstring."""

    format: str = dataclasses.field(default="mxint8", metadata={"help": "element format", "choices": tuple(FORMATS)})
    embedding_format: str | None = dataclasses.field(
        default=None, metadata={"help": "format of embedding tables, a tied output projection included (default: "
                                        "format)", "choices": tuple(FORMATS)}
    )
    block_size: int = dataclasses.field(default=32, metadata={"help": "elements per block along the reduction axis"})
    mode: str = dataclasses.field(default="weight", metadata={"help": "weight | weight_act | kv", "choices": MODES})
    act_format: str | None = dataclasses.field(
        default=None, metadata={"help": "MX format (or int8, mode=weight_act) of activations/KV (default: the weight "
                                    "format, mxint8 for int)"}
    )
    ops: tuple[str, ...] = dataclasses.field(
        default=("MatMul", "Gemm", "Gather", "Conv"), metadata={"help": "op types whose weights are quantized"}
    )
    include: tuple[str, ...] = dataclasses.field(default=(), metadata={"help": "fnmatch patterns on node/weight"})
    exclude: tuple[str, ...] = dataclasses.field(default=(), metadata={"help": "fnmatch patterns to leave fp32"})
    gptq: bool = dataclasses.field(default=False, metadata={"help": "GPTQ-style error feedback (calibration)"})
    gptq_damp: float = dataclasses.field(default=0.1, metadata={"help": "GPTQ dampening (fraction of mean diag H)"})
    gptq_sequential: bool = dataclasses.field(
        default=False, metadata={"help": "GPTQ Hessians from the inputs of the already quantized layers (in order)"}
    )
    lorc_rank: int = dataclasses.field(default=0, metadata={"help": "rank of the LoRC correction (0: none)"})
    scale_dtype: str = dataclasses.field(
        default="float16", metadata={"help": "scale type of int8/int4", "choices": ("float16", "float32")}
    )
    min_params: int = dataclasses.field(default=1024, metadata={"help": "skip smaller weights"})
    kv_rearrange: bool = dataclasses.field(
        default=False, metadata={"help": "mode=kv on a decoder: group each KV head's value channels by magnitude"})

    def validate(self) -> None:
        """Check the options.

        Raises:
            PipelineError: unknown format/mode, a bad block size or rank, an activation format that is neither MX
                nor int8 with mode=weight_act, or GPTQ with an asymmetric format.
        """
        get_format(self.format)
        if self.embedding_format is not None and self.embedding_format not in FORMATS:
            self.fail("embedding_format", self.embedding_format, f"one of {', '.join(FORMATS)}")
        if self.gptq and get_format(self.format).has_minimum:
            self.fail("gptq", self.gptq, f"false with {self.format} (GPTQ rounds to symmetric and MX formats only)")
        if self.block_size < 2 or self.block_size & (self.block_size - 1):
            self.fail("block_size", self.block_size, "a power of two >= 2 (32 in OCP MX)")
        if self.mode not in MODES:
            self.fail("mode", self.mode, " | ".join(MODES))
        if self.act_format is not None and self.mode == "weight":
            self.fail("act_format", self.act_format, "set only with mode=weight_act (activations) or mode=kv (the KV "
                      "cache); mode=weight quantizes weights only, e.g. block-quant(mode=weight_act,act_format=...)")
        act_mx = self.act_format in FORMATS and get_format(self.act_format).is_mx
        if self.act_format is not None and not act_mx and (
                self.act_format not in INT_ACT_FORMATS or self.mode != "weight_act"):
            mx = ", ".join(f for f in FORMATS if get_format(f).is_mx)
            self.fail("act_format", self.act_format, f"an MX format ({mx}; activation scales are computed at run "
                      f"time), or {' | '.join(INT_ACT_FORMATS)} with mode=weight_act")
        if not 0.0 <= self.gptq_damp <= 10.0:
            self.fail("gptq_damp", self.gptq_damp, "a fraction of the mean Hessian diagonal in [0, 10]")
        if self.lorc_rank < 0:
            self.fail("lorc_rank", self.lorc_rank, "a non-negative rank")
        if self.min_params < 0:
            self.fail("min_params", self.min_params, "a non-negative element count")


def _initializer(graph: ir.Graph, name: str, array: np.ndarray, dtype: ir.DataType | None = None) -> ir.Value:
    value = ir.Value(name=name, const_value=ir.Tensor(array, dtype=dtype, name=name))
    graph.register_initializer(value)
    return value


def _output_error(w_kn: np.ndarray, approx_kn: np.ndarray, h: np.ndarray) -> float:
    """``tr(Dᵀ H D)``, ``D = W - Ŵ`` ``(K, N)``: mean squared output error of ``X @ Ŵ`` for ``H = 2XᵀX / tokens``."""
    d = np.asarray(w_kn, np.float64) - np.asarray(approx_kn, np.float64)
    return float(np.sum(d * (h @ d)))


def _real_tokens(act: np.ndarray, mask: np.ndarray | None, k: int) -> np.ndarray:
    """Rows ``(tokens, K)`` of an activation, without padding tokens when the feed has a matching attention mask.

    Padding positions of a padded batch are computed but never used downstream; fitting GPTQ to them wastes its
    budget (measured on MiniLM: the MXFP4 cosine drops below plain rounding when they are kept).
    """
    rows = np.asarray(act, np.float32).reshape(-1, k)
    if mask is not None and mask.size == rows.shape[0]:
        return rows[np.asarray(mask).reshape(-1) != 0]
    return rows


@register_pass
class BlockQuantPass(EffcPass):
    """Quantize weights (and optionally activations or K/V) into MX / int blocks.

    Stats: ``layers`` (weight name -> node, kind, shape, sqnr_db, bits_per_weight, bytes), ``params``,
    ``weight_bytes`` (packed codes + scales + LoRC factors), ``bits_per_weight`` (over quantized params),
    ``fp32_bytes``, ``kv_values`` (kv mode), ``skipped`` (node, weight, reason), ``lorc_skipped`` (weight, reason),
    ``gptq_rejected`` (node, reason: fewer fit tokens than input channels, or GPTQ lost to rounding on the
    held-out calibration feeds; those layers are rounded, see ``_gptq``).

    After a sparsifying pass the zeros of a weight stay zeros: rounding maps 0 to the zero code, GPTQ keeps them
    fixed (:func:`effc.passes.quant.compensation.gptq_quantize`), and LoRC, whose dense low-rank branch would refill
    them, is not applied to a pruned weight (>= 1% exact zeros; listed in ``lorc_skipped``, logged).

    Raises:
        CalibrationError: ``gptq=true`` without calibration data.
        PassError: a selected MatMul is N:M-packed (``effc.NMSparseMatMul``); the message names it and the fixes
            (``nm-sparsity(pack=false)`` first, or ``exclude`` it).
    """

    name = "block-quant"
    summary = "MX / int block quantization of weights, activations or K/V (OCP MX v1.0; GPTQ, LoRC)"
    Options = BlockQuantOptions
    exact = False
    uses_calibration = True
    unchanged_hint = ("a blocked axis must be a multiple of block_size: after prune-structured, keep channel counts "
                      "blockable with prune-structured(round_to=32); lower min_params for small weights")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Rewrite the selected layers; see the class docstring for the stats."""
        opts = self.options
        fmt = get_format(opts.format)
        act_fmt = get_format(opts.act_format or (opts.format if fmt.is_mx else "mxint8"))
        table_fmt = get_format(opts.embedding_format or opts.format)
        self.stats = {"format": fmt.name, "embedding_format": table_fmt.name, "mode": opts.mode, "layers": {},
                      "skipped": [], "kv_values": [], "lorc_skipped": [], "gptq_rejected": []}
        if opts.mode == "kv":
            count = self._quantize_kv(model, act_fmt)
            return ir.passes.PassResult(model, modified=count > 0)
        self._refuse_packed(model)
        self._refuse_moe(model)
        if find_targets(model, opts.ops, []):
            _upgrade_opset(model)  # before selecting: the converter replaces the nodes
        targets = self._select(find_targets(model, opts.ops, self.stats["skipped"]))
        hessians = self._hessians(model, targets) if opts.gptq and not opts.gptq_sequential else {}
        cache: dict[int, tuple[ir.Value, ir.Value, ir.Value | None, np.ndarray]] = {}
        self._act_qdq: dict[int, ir.Value] = {}  # id(layer input) -> its quantize-dequantized value (weight_act)
        tables = {id(t.weight) for t in targets if t.kind == "Gather"}  # a tied projection reads the same weight
        for t in targets:
            if opts.gptq and opts.gptq_sequential and t.node.name not in hessians:
                # inputs as the partly quantized model computes them: one tap per distinct layer input
                hessians.update(self._hessians(model, [u for u in targets if u.node.inputs[0] is t.node.inputs[0]]))
            self._rewrite(model, t, table_fmt if id(t.weight) in tables else fmt, act_fmt, hessians.get(t.node.name),
                          cache)
        for t in targets:  # drop fp32 weights nobody reads any more
            if not t.weight.uses() and t.weight.name in model.graph.initializers:
                model.graph.initializers.pop(t.weight.name)
        layers = self.stats["layers"].values()
        params = sum(v["params"] for v in layers)
        nbytes = sum(v["bytes"] for v in layers)
        self.stats.update(params=params, weight_bytes=nbytes, fp32_bytes=4 * params,
                          bits_per_weight=8.0 * nbytes / params if params else 0.0)
        logger.info("block-quant(%s): %d layer(s), %.3f bits/weight, %d skipped", fmt.name, len(targets),
                    self.stats["bits_per_weight"], len(self.stats["skipped"]))
        return ir.passes.PassResult(model, modified=bool(targets))

    def _unselected(self, names: list[str]) -> str | None:
        """Why ``include`` / ``exclude`` leave a node (named by its node and weight names) out; None if selected."""
        opts = self.options
        if opts.include and not any(fnmatch.fnmatchcase(n, p) for p in opts.include for n in names):
            return "not matched by include"
        if any(fnmatch.fnmatchcase(n, p) for p in opts.exclude for n in names):
            return "excluded by pattern"
        return None

    def _refuse_packed(self, model: ir.Model) -> None:
        """Raise for N:M-packed MatMuls the options select: their packed values are not quantized (yet).

        Raises:
            PassError: a selected ``effc.NMSparseMatMul`` (named, with both ways out).
        """
        if "MatMul" not in self.options.ops:
            return
        names = [n.name or "" for n in packed_layers(model)
                 if self._unselected([n.name or "", n.inputs[1].name or ""]) is None]
        if not names:
            return
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        pattern = "*/nm" if all(n.endswith("/nm") for n in names) else ",".join(names)
        raise PassError(
            f"block-quant: {len(names)} selected layer(s) are N:M-packed (effc.NMSparseMatMul): {shown}; block "
            "quantization of packed values is not supported",
            "run nm-sparsity(pack=false) before block-quant to quantize the pruned weights (their zeros stay "
            f"zeros), or leave the packed layers fp32 with block-quant(exclude=[{pattern}])",
        )

    def _refuse_moe(self, model: ir.Model) -> None:
        """Raise for ``effc.MoEFFN`` nodes the options select: the MoE kernel reads float32 expert weights.

        Raises:
            PassError: a selected MoE FFN (named, with the way out): quantizing the other layers and silently
                leaving the experts in float32 would not be what ``moe(...),block-quant(...)`` asks for.
        """
        if "MatMul" not in self.options.ops:
            return
        names = [n.name or "" for n in effc_nodes(model, MOE) if self._unselected([n.name or ""]) is None]
        if not names:
            return
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        raise PassError(
            f"block-quant: {len(names)} selected layer(s) are mixtures of experts (effc.MoEFFN): {shown}; block "
            "quantization of MoE expert weights is not supported (the MoE kernel reads float32 experts)",
            "leave the experts float32 and quantize the other layers with block-quant(exclude=[*/moe]), or drop "
            "one of moe / block-quant",
        )

    def _lorc_rank(self, t: QuantTarget) -> int:
        """The LoRC rank ``t`` gets: 0 for a pruned weight (recorded in ``lorc_skipped``, logged once).

        A weight counts as pruned when at least ``SPARSE_ZEROS`` (1%) of it is exactly zero: a sparsifying pass
        leaves a pattern (N:M: 50%, unstructured: its sparsity), a dense trained weight only a few stray zeros,
        which LoRC may change like any other weight. Re-zeroing pruned positions is not possible: the branch
        ``(X @ U) @ V`` is dense, so LoRC and a pruned pattern exclude each other.
        """
        zeros = int(np.count_nonzero(t.array == 0))
        if not self.options.lorc_rank or zeros < SPARSE_ZEROS * t.array.size:
            return self.options.lorc_rank
        entry = {"weight": t.weight.name or t.node.name or "", "reason": f"weight has {zeros} zeros "
                 f"({100.0 * zeros / t.array.size:.1f}%) that a low-rank correction would refill"}
        if entry not in self.stats["lorc_skipped"]:
            self.stats["lorc_skipped"].append(entry)
            logger.warning("block-quant: no LoRC on %s: %s", entry["weight"], entry["reason"])
        return 0

    def _select(self, targets: list[QuantTarget]) -> list[QuantTarget]:
        opts, chosen = self.options, []
        for t in targets:
            names = [t.node.name or "", t.weight.name or ""]
            entry = {"node": names[0], "weight": names[1]}
            k = t.array.shape[1] if t.kind in ROW_BLOCKED else t.array.shape[0]
            reason = self._unselected(names)
            if reason is not None:
                self.stats["skipped"].append({**entry, "reason": reason})
            elif t.array.size < opts.min_params:
                self.stats["skipped"].append({**entry, "reason": f"{t.array.size} elements < min_params"})
            elif k % opts.block_size:
                self.stats["skipped"].append({**entry, "reason": f"blocked axis {k} not a multiple of block_size"})
            elif t.gather_axis == 1 and t.node.inputs[1].shape is None:
                self.stats["skipped"].append({**entry, "reason": "Gather along axis 1 with indices of unknown rank"})
            else:
                chosen.append(t)
        return chosen

    def _hessians(self, model: ir.Model, targets: list[QuantTarget]) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
        """``{node name: (fit Hessian, held-out Hessian or None)}`` of the linear layers among ``targets``.

        The first ``1 - HELD_OUT`` of the calibration feeds fit GPTQ, the rest check it (:meth:`_gptq`); with a
        single feed there is nothing to hold out.

        Raises:
            CalibrationError: no calibration data.
        """
        if self.calibration is None:
            raise CalibrationError(
                "block-quant(gptq=true) needs the inputs of every layer but got no calibration data",
                "give calibration inputs (--data FILE.npz, or a zoo: model), or drop gptq=true",
            )
        linear = [t for t in targets if t.kind not in ROW_BLOCKED and len(t.weight.uses()) == 1]
        taps = self.calibration.tap(model, sorted({t.node.inputs[0].name for t in linear}), progress=False)
        masks = [feed.get("attention_mask") for feed in self.calibration]
        out = {}
        for t in linear:
            k = t.array.shape[0]
            acts = [_real_tokens(a, m, k) for a, m in zip(taps[t.node.inputs[0].name], masks, strict=True)]
            fit = len(acts) - int(len(acts) * HELD_OUT) if len(acts) > 1 else len(acts)
            tokens = sum(a.shape[0] for a in acts[:fit])
            out[t.node.name] = hessian(acts[:fit], k), hessian(acts[fit:], k) if acts[fit:] else None, tokens
        return out

    def _gptq(self, t: QuantTarget, fmt, h_fit: np.ndarray, h_val: np.ndarray | None, tokens: int):
        """GPTQ codes of ``t`` fitted on ``h_fit``, or round-to-nearest when that does better on held-out tokens.

        GPTQ fits the layer's calibration inputs exactly; with fewer tokens than input channels (MiniLM's default
        32 sentences give ~300 tokens for K = 384 / 1536) its Hessian is rank-deficient and the corrections grow
        in directions the calibration never saw (measured: FFN down-projection error on calibration 280 -> 1.2,
        embedding cosine 0.41 vs 0.96 for rounding). The held-out output error ``tr(Dᵀ H_val D)`` (``D = W - Ŵ``)
        decides. Fewer fit tokens than input channels K (a Hessian of rank < K) is rejected before fitting. A
        rejected layer is rounded and listed in ``stats["gptq_rejected"]`` (logged).
        """
        opts, bs, k = self.options, self.options.block_size, t.array.shape[0]
        rtn = quantize(t.array, fmt, axis=0, block_size=bs, scale_dtype=opts.scale_dtype)
        if tokens < k:
            return self._reject_gptq(t, rtn, f"{tokens} calibration tokens for K={k} input channels (rank-deficient "
                                     "Hessian); give more calibration samples (--calibration-samples)")
        q = gptq_quantize(t.array.T, h_fit, fmt, bs, damp=opts.gptq_damp, scale_dtype=opts.scale_dtype)
        if h_val is None:
            return q
        if _output_error(t.array, dequantize(q), h_val) <= _output_error(t.array, dequantize(rtn), h_val):
            return q
        return self._reject_gptq(t, rtn, "GPTQ's output error on the held-out calibration feeds is above rounding's")

    def _reject_gptq(self, t: QuantTarget, rtn, reason: str):
        """Record that ``t`` is rounded instead of GPTQ-quantized (``stats["gptq_rejected"]``, logged) -> ``rtn``."""
        self.stats["gptq_rejected"].append({"node": t.node.name, "reason": reason})
        logger.warning("block-quant: %s rounded instead of GPTQ: %s", t.node.name, reason)
        return rtn

    def _rewrite(self, model, t: QuantTarget, fmt, act_fmt, h, cache) -> None:
        opts, graph, bs = self.options, model.graph, self.options.block_size
        base = (t.weight.name or t.node.name or "w").replace("/", "_")
        use_dq = fmt.kind == "int" and model.opset_imports.get("", 0) >= 21
        entry = cache.get(id(t.weight))
        if entry is None:
            # Blocks along the reduction axis: (K, N) axis 0 for MatMul/Gemm, axis 1 of Gather (V, D) / Conv rows.
            axis = 1 if t.kind in ROW_BLOCKED else 0
            if h is not None:
                q = self._gptq(t, fmt, *h)
            else:
                q = quantize(t.array, fmt, axis=axis, block_size=bs, scale_dtype=opts.scale_dtype)
            deq = dequantize(q)
            if use_dq:
                signed = np.where(q.codes >= 2 ** (fmt.bits - 1), q.codes.astype(np.int16) - 2**fmt.bits, q.codes)
                elem = ml_dtypes.int4 if fmt.bits == 4 else np.int8
                codes = signed.reshape(q.codes.shape[0], -1).astype(elem)
                codes, scales = (codes, q.scales) if axis == 1 else (codes.T.copy(), q.scales.T.copy())
            else:
                codes, scales = pack_blocks(q.codes, q.scales, fmt.bits)
            wq = _initializer(graph, f"{base}_q{fmt.name}", codes)
            sv = _initializer(graph, f"{base}_scale", scales)
            mv = None if q.minimums is None else _initializer(graph, f"{base}_min", np.ascontiguousarray(q.minimums))
            entry = cache[id(t.weight)] = (wq, sv, mv, deq)
        wq, sv, mv, deq = entry
        deq = deq if deq.shape == t.array.shape else deq.T  # a tied table: (K, N) projection, (V, D) lookup
        nbytes = sum(v.const_value.nbytes for v in (wq, sv, mv) if v is not None)
        new_nodes: list[ir.Node] = []
        name = t.node.name or base
        if t.kind == "Conv":
            new_nodes.extend(_decoded_conv(model, t, (wq, sv, mv), fmt, bs, use_dq, name))
        elif t.kind == "Gather":
            if use_dq:
                out = _dequantize_linear(new_nodes, wq, sv, 1, bs, name)
                new_nodes.append(ir.node("Gather", [out, t.node.inputs[1]], {"axis": 0}, name=f"{name}/gather"))
            else:
                new_nodes.append(bq_ops.add_block_quant_gather(model, wq, sv, t.node.inputs[1], fmt, bs, name, mv))
            if t.gather_axis == 1:  # rows (*I, D) back to the (D, *I) of a Gather along axis 1 of a (D, V) table
                rank = len(t.node.inputs[1].shape)
                new_nodes.append(ir.node("Transpose", [new_nodes[-1].outputs[0]], {"perm": [rank, *range(rank)]},
                                         name=f"{name}/rows_to_columns"))
        else:
            x = t.node.inputs[0]
            if opts.mode == "weight_act":
                x = self._quantized_input(model, x, act_fmt, f"{name}/act_qdq")
            if use_dq:
                w = _dequantize_linear(new_nodes, wq, sv, 0, bs, name)
                new_nodes.append(ir.node("MatMul", [x, w], name=f"{name}/matmul"))
            else:
                new_nodes.append(bq_ops.add_block_quant_matmul(model, x, wq, sv, fmt, bs, name, mv))
            y = new_nodes[-1].outputs[0]
            if self._lorc_rank(t) > 0:
                u, v = lorc(t.array - deq, opts.lorc_rank)
                deq = deq + u @ v
                uv = _initializer(graph, f"{base}_lorc_u", u), _initializer(graph, f"{base}_lorc_v", v)
                nbytes += u.nbytes + v.nbytes
                new_nodes.append(ir.node("MatMul", [x, uv[0]], name=f"{name}/lorc_u"))
                new_nodes.append(ir.node("MatMul", [new_nodes[-1].outputs[0], uv[1]], name=f"{name}/lorc_v"))
                new_nodes.append(ir.node("Add", [y, new_nodes[-1].outputs[0]], name=f"{name}/lorc_add"))
                y = new_nodes[-1].outputs[0]
            if t.bias is not None:
                new_nodes.append(ir.node("Add", [y, t.bias], name=f"{name}/bias"))
        for node in new_nodes:
            node.metadata_props["effc.pass"] = self.name
        graph.insert_before(t.node, new_nodes)
        replace_value(graph, t.node.outputs[0], new_nodes[-1].outputs[0])
        graph.remove(t.node, safe=True)
        self.stats["layers"][t.weight.name or name] = {
            "node": name, "kind": t.kind, "shape": list(t.array.shape), "params": int(t.array.size),
            "sqnr_db": round(sqnr_db(t.array, deq), 3), "bytes": int(nbytes),
            "bits_per_weight": 8.0 * nbytes / t.array.size,
            "gptq": h is not None and t.node.name not in {r["node"] for r in self.stats["gptq_rejected"]},
            "lorc_rank": self._lorc_rank(t) if t.kind not in ROW_BLOCKED else opts.lorc_rank,
        }

    def _quantized_input(self, model: ir.Model, x: ir.Value, act_fmt, name: str) -> ir.Value:
        """The output of the one ``effc.BlockQDQ`` of layer input ``x``, made on first use (``mode=weight_act``).

        Layers reading the same input (a decoder's q/k/v and gate/up projections) share it: one quantization per
        input in ``model.onnx``, and one activation quantizer per input in the compiled step. It is inserted
        right after ``x``'s producer (first in the graph for a graph input), so it precedes every reader.
        """
        out = self._act_qdq.get(id(x))
        if out is None:
            node = bq_ops.add_block_qdq(model, x, act_fmt, self.options.block_size, name)
            node.metadata_props["effc.pass"] = self.name
            producer = x.producer()
            if producer is not None and producer.graph is model.graph:
                model.graph.insert_after(producer, [node])
            else:
                model.graph.insert_before(next(iter(model.graph)), [node])
            out = self._act_qdq[id(x)] = node.outputs[0]
        return out

    def _quantize_kv(self, model: ir.Model, act_fmt) -> int:
        if is_decoder(model):  # the cache entries themselves, blocked along head_dim
            if self.options.kv_rearrange and decoder_info(model).get("kv_format") is None:
                rearrange_values(model, self.stats)
            store = store_decoder_kv if kv_blocks.stores(act_fmt) else quantize_decoder_kv
            return store(model, act_fmt, self.options.block_size, self.name, self.stats)
        count = 0
        for role, value in find_kv_values(model):
            last = value.shape[-1] if value.shape is not None and len(value.shape) else None
            if not isinstance(last, int) or last % self.options.block_size:
                self.stats["skipped"].append({"node": value.name, "weight": "", "reason": f"last dim {last}"})
                continue
            if any(u.node.domain == "effc" and u.node.op_type == "BlockQDQ" for u in value.uses()):
                continue  # already quantized (second run)
            users = list(value.uses())
            node = bq_ops.add_block_qdq(model, value, act_fmt, self.options.block_size, f"{value.name}/kv_qdq")
            node.metadata_props["effc.pass"] = self.name
            node.outputs[0].shape, node.outputs[0].type = value.shape, value.type
            model.graph.insert_after(value.producer(), [node])
            for use in users:
                use.node.replace_input_with(use.idx, node.outputs[0])
            if value.is_graph_output():
                raise PipelineError(f"block-quant(mode=kv): {value.name} is a graph output", "exclude it")
            self.stats["kv_values"].append({"value": value.name, "role": role})
            count += 1
        return count


def _dequantize_linear(nodes: list[ir.Node], wq: ir.Value, scales: ir.Value, axis: int, block_size: int,
                       name: str) -> ir.Value:
    """Append a blocked ``DequantizeLinear`` (blocks along ``axis``) plus a Cast to fp32 for fp16 scales.

    Returns:
        The fp32 weight value.
    """
    nodes.append(ir.node("DequantizeLinear", [wq, scales], {"axis": axis, "block_size": block_size},
                         name=f"{name}/dq"))
    if scales.dtype != ir.DataType.FLOAT:
        nodes.append(ir.node("Cast", [nodes[-1].outputs[0]], {"to": ir.DataType.FLOAT}, name=f"{name}/cast"))
    return nodes[-1].outputs[0]


def _upgrade_opset(model: ir.Model) -> bool:
    """Convert a model older than opset 13 (the effc operators' function bodies need it) to opset 13.

    Returns:
        True when the model was converted.

    Raises:
        PipelineError: the ONNX version converter cannot convert one of the model's operators.
    """
    opset = model.opset_imports.get("", 13)
    if opset >= 13:
        return False
    from onnxscript.version_converter import convert_version

    try:
        convert_version(model, 13, fallback=True)
    except Exception as exc:  # noqa: BLE001  (the converter raises many types)
        raise PipelineError(f"block-quant: converting the model from opset {opset} to 13 failed: {exc}",
                            "export the model at opset >= 13") from exc
    logger.info("block-quant: model converted from opset %d to 13 for the effc operators", opset)
    return True


def _decoded_conv(model: ir.Model, t: QuantTarget, stored: tuple, fmt, block_size: int, use_dq: bool,
                  name: str) -> list[ir.Node]:
    """Nodes that decode a block-quantized Conv weight ``(Cout, R)``, reshape it to the kernel and convolve.

    Same attributes and bias as the original Conv; weights only (activations stay fp32).

    The decode is ``DequantizeLinear(axis=1, block_size)`` for int formats at opset >= 21, else
    ``effc.BlockQuantGather`` of all ``Cout`` rows (its ONNX body decodes bit-exactly).
    """
    wq, sv, mv = stored  # codes, scales, minimums (None unless asymmetric)
    nodes: list[ir.Node] = []
    cout = t.array.shape[0]
    if use_dq:
        flat = _dequantize_linear(nodes, wq, sv, 1, block_size, name)
    else:
        rows = _initializer(model.graph, f"{wq.name}_rows", np.arange(cout, dtype=np.int64))
        nodes.append(bq_ops.add_block_quant_gather(model, wq, sv, rows, fmt, block_size, f"{name}/decode", mv))
        flat = nodes[-1].outputs[0]
    shape = _initializer(model.graph, f"{wq.name}_shape", np.array(t.weight.const_value.shape, np.int64))
    nodes.append(ir.node("Reshape", [flat, shape], name=f"{name}/kernel"))
    nodes[-1].outputs[0].shape = ir.Shape(t.weight.const_value.shape)  # static: MAC counting, shape inference
    nodes[-1].outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    inputs = [t.node.inputs[0], nodes[-1].outputs[0], *([t.bias] if t.bias is not None else [])]
    nodes.append(ir.node("Conv", inputs, {a.name: a for a in t.node.attributes.values()}, name=f"{name}/conv"))
    return nodes

