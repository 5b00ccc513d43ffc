"""Graph passes: the contract, the registry, pipeline text, the pass manager and every built-in pass.

Importing this package registers the built-in passes: one ``import effc.passes.<file>`` line per pass file below,
kept sorted.
"""

import effc.passes.block_quant  # noqa: F401
import effc.passes.channel_reorder  # noqa: F401
import effc.passes.cleanup  # noqa: F401
import effc.passes.moe  # noqa: F401
import effc.passes.nm_sparsity  # noqa: F401
import effc.passes.prune  # noqa: F401
import effc.passes.prune_structured  # noqa: F401
from effc.passes.base import EffcPass, PassOptions, register_pass, registered_passes
from effc.passes.manager import PassManager, PassRecord, PipelineResult
from effc.passes.pipeline import Pipeline, describe_passes, format_pass, parse_pipeline

__all__ = [
    "EffcPass",
    "PassManager",
    "PassOptions",
    "PassRecord",
    "Pipeline",
    "PipelineResult",
    "describe_passes",
    "format_pass",
    "parse_pipeline",
    "register_pass",
    "registered_passes",
]
