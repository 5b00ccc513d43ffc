"""Targets: a frozen capability record plus how to build, load and run an artifact; picked by name.

A target module defines a subclass of :class:`Target`, instantiates it (one instance per name, e.g. the
Cortex-M family registers ``cortex-m3``, ``cortex-m4``, ...) and calls :func:`register_target`. Code that needs
a target calls :func:`get_target` — never an if-chain over target names.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from effc.errors import TargetError

if TYPE_CHECKING:
    import onnx_ir as ir


@dataclasses.dataclass
class BuildResult:
    """What :meth:`Target.build` wrote.

    Attributes:
        files: paths relative to the artifact folder of every file the target wrote (hashed in the manifest).
        info: JSON-serializable facts for the manifest and report (tvm target string, kernels and the template
            each took, compile seconds, memory plan, ...).
    """

    files: list[str]
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


class Runner(abc.ABC):
    """A loaded artifact that runs inferences from Python."""

    @abc.abstractmethod
    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run one inference.

        Args:
            feeds: input name -> array with the artifact's static shape and dtype.

        Returns:
            The outputs as numpy arrays, in graph output order.
        """


class Target(abc.ABC):
    """A compilation target. Subclasses are frozen dataclasses holding the capability record.

    Attributes (class level):
        name: the CLI name (``cpu``, ``cuda``, ``cortex-m4``, ...).
        summary: one line for ``effc compile --help``.
    """

    name: str = ""
    summary: str = ""

    @abc.abstractmethod
    def build(self, model: ir.Model, workdir: Path, options: dict[str, Any]) -> BuildResult:
        """Lower ``model`` (canonical, static shapes, passes applied) and write the artifact files.

        Args:
            model: the rewritten model; not modified.
            workdir: an empty folder (the artifact's temporary location) to write into.
            options: target options from the CLI/API (e.g. ``threads``, ``mcpu``, ``flash``, ``ram``).

        Returns:
            The files written and facts about the build.

        Raises:
            TargetError: the toolchain is missing or the build failed (message names the step).
            BudgetError: the model does not fit the target's memory.
            UnsupportedOpError: an operator cannot be lowered for this target.
        """

    @abc.abstractmethod
    def load(self, artifact_dir: Path, manifest: dict[str, Any]) -> Runner:
        """Load a built artifact for running from Python (hashes are already verified by the caller).

        Raises:
            TargetError: the artifact cannot run on this machine (e.g. no GPU for a CUDA artifact).
        """

    def check_options(self, options: dict[str, Any]) -> None:
        """Validate option values before any work (the compiler calls it first); default: no check.

        Raises:
            TargetError: an option value is outside its domain (names it and the valid values).
        """
        return None

    def can_run_here(self) -> bool:
        """Whether this machine can run the target's artifacts.

        When it cannot (a cuda build without a GPU), a compile reports compiled fidelity as not measured instead of
        loading the artifact.
        """
        return True

    def option_names(self) -> Sequence[str]:
        """Names of the options :meth:`build` understands (unknown ones are rejected by the compiler)."""
        return ()


_TARGETS: dict[str, Target] = {}


def register_target(target: Target) -> Target:
    """Make ``target`` available under ``target.name``.

    Raises:
        ValueError: the name is empty or already registered.
    """
    if not target.name or target.name in _TARGETS:
        raise ValueError(f"target name {target.name!r} is empty or registered twice")
    _TARGETS[target.name] = target
    return target


def get_target(name: str) -> Target:
    """The registered target called ``name``.

    Raises:
        TargetError: unknown name (the message lists the known targets).
    """
    _load_builtin_targets()
    if name not in _TARGETS:
        raise TargetError(f"unknown target {name!r}", f"choose one of: {', '.join(sorted(_TARGETS))}")
    return _TARGETS[name]


def target_names() -> list[str]:
    """Names of every registered target, sorted."""
    _load_builtin_targets()
    return sorted(_TARGETS)


def _load_builtin_targets() -> None:
    import importlib

    for module in ("effc.targets.cpu", "effc.targets.cuda", "effc.targets.cortex_m"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:  # a target family not built yet
            if exc.name != module:
                raise
