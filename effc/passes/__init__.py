"""Graph passes: the contract, the registry, pipeline text, the pass manager and every built-in pass.

Importing this package registers the built-in passes.
"""

from effc.passes.base import EffcPass, PassOptions, register_pass, registered_passes

__all__ = ["EffcPass", "PassOptions", "register_pass", "registered_passes"]
