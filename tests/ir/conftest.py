"""Fixtures for effc.ir tests: zoo models loaded and canonicalized once per session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class ZooCache:
    """Original and canonical ir.Model per zoo name, built on first use."""

    def __init__(self):
        self._models = {}

    def get(self, name):
        if name not in self._models:
            from effc import zoo
            from effc.ir.canonicalize import canonicalize
            from effc.ir.model import load

            entry = zoo.get(name)
            original = load(entry.path())
            canonical = canonicalize(original, entry.input_shapes, entry.constant_inputs)
            self._models[name] = (entry, original, canonical)
        return self._models[name]


@pytest.fixture(scope="session")
def zoo_models():
    return ZooCache()
