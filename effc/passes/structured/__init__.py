"""Structured pruning in four pieces (coupling analysis, importance, per-op mechanics, driver), plus shared helpers.

* :mod:`.coupling` — which channel indices must be removed together (networkx graph over tensor channels).
* :mod:`.heads` — attention-head groups (split reshape → per-head ops → merge reshape → output projection).
* :mod:`.importance` — ``importance(group) -> scores`` policies (L2 magnitude).
* :mod:`.mechanics` — per-op-type rules: how a channel flows through a node and how to slice its parameters.
* :mod:`effc.passes.prune_structured` — the driver: plan groups, score, then apply.
* :mod:`.layers` — linear-layer discovery and the sequential calibration driver used by ``prune``/``nm-sparsity``.
* :mod:`.permutation` — input-channel permutation search for N:M.
* :mod:`.sensitivity` — per-layer output sensitivity and a fidelity floor (``min_cosine``) for lossy passes.
"""
