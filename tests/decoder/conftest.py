"""Fixtures of the decoder tests: the tiny random Llamas of :mod:`tests.decoder.tiny`, exported once per module."""

from __future__ import annotations

import pytest

from tests.decoder.tiny import tiny_llama


def _tiny_fixture(layers: int, max_cache: int, chunk: int):
    """A module fixture: ``(transformers model, effc graph, tokenizer, tmp folder)`` of :func:`tiny_llama`."""

    @pytest.fixture(scope="module")
    def fixture(tmp_path_factory):
        return (*tiny_llama(layers, max_cache=max_cache, chunk=chunk), tmp_path_factory.mktemp(f"tiny{layers}"))

    return fixture


#: 2 layers, a cache of 96 slots, prefill chunks of 16 tokens.
tiny = _tiny_fixture(2, max_cache=96, chunk=16)
#: 4 layers (room to skip some), a cache of 64 slots, chunks of 8.
tiny4 = _tiny_fixture(4, max_cache=64, chunk=8)
