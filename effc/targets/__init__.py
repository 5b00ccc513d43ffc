"""Compilation targets, picked by name through a registry (``get_target``)."""

from effc.targets.base import BuildResult, Runner, Target, get_target, register_target, target_names

__all__ = ["BuildResult", "Runner", "Target", "get_target", "register_target", "target_names"]
