"""Structured pruning in four pieces (coupling analysis, importance, per-op mechanics, driver) plus layer sensitivity.

* :mod:`.coupling` — which channel indices must be removed together (networkx graph over tensor channels).
* :mod:`.importance` — ``importance(group) -> scores`` policies (L2 magnitude, activation-aware).
* :mod:`.mechanics` — per-op-type rules: how a channel flows through a node and how to slice its parameters.
* :mod:`effc.passes.prune_structured` — the driver: plan groups, score, then apply.
* :mod:`.sensitivity` — per-layer output sensitivity and a fidelity floor (``min_cosine``) for lossy passes.
"""
