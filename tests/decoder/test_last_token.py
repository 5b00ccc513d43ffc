"""The last-token prefill (``prefill_last``) on a tiny random Llama under onnxruntime: structure and numbers."""

from __future__ import annotations

import numpy as np
import pytest

from tests.decoder.tiny import assert_prefill_last_matches

CHUNK = 16  # the chunk of the shared ``tiny`` fixture (tests/decoder/conftest.py)


@pytest.fixture(scope="module")
def generic(tiny):
    return tiny[1]


def _session(graphs):
    from effc.ir.decoder import decoder_info
    from effc.runtime.decoder import DecoderSession, OrtBackend

    info = {**decoder_info(next(iter(graphs.values()))), "chunk": CHUNK}
    return DecoderSession(OrtBackend(graphs), info)


def test_graph_gathers_one_row_before_the_lm_head(generic):
    from effc.decoder.last_token import entry_graph, lm_head
    from effc.ir.decoder import LAST_INDEX

    graph = entry_graph(generic, CHUNK)
    head = lm_head(graph)
    gather = head.inputs[0].producer()
    assert head.op_type == "MatMul" and gather.op_type == "Gather"
    assert gather.inputs[1].name == LAST_INDEX and graph.graph.inputs[-1].name == LAST_INDEX
    assert list(head.outputs[0].shape) == [1, 49152]
    assert list(graph.graph.outputs[0].shape) == [1, 1, 49152]
    assert [list(v.shape) for v in graph.graph.outputs[1:]] == [[2, 16, CHUNK], [2, CHUNK, 16]] * 2
    assert LAST_INDEX not in [v.name for v in generic.graph.inputs]  # the source graph is not changed


@pytest.mark.parametrize("tokens", [5, CHUNK, CHUNK + 5])
def test_last_token_logits_equal_the_last_row_of_prefill(generic, tokens):
    from effc.decoder.last_token import entry_graph
    from effc.ir.decoder import PREFILL_LAST, specialize

    session = _session({"prefill": specialize(generic, CHUNK), PREFILL_LAST: entry_graph(generic, CHUNK)})
    assert session.has_prefill_last
    ids = list(range(300, 300 + tokens))
    whole = assert_prefill_last_matches(session, ids)
    assert whole.shape == (tokens, 49152)
    fallback = _session({"prefill": specialize(generic, CHUNK)})  # an artifact without the entry point
    assert not fallback.has_prefill_last
    np.testing.assert_array_equal(fallback.prefill_last(ids), whole[-1])


def test_errors(generic):
    import onnx_ir as ir

    from effc.decoder.last_token import with_last_index
    from effc.errors import DataError, ShapeError
    from effc.ir.decoder import specialize

    with pytest.raises(DataError, match="no tokens"):
        _session({"prefill": specialize(generic, CHUNK)}).prefill_last([])
    bent = ir.from_proto(ir.to_proto(generic))
    head = next(n for n in bent.graph if n.op_type == "Unsqueeze" and n.outputs[0].name == "logits")
    relu = ir.node("Relu", [head.inputs[0]])
    bent.graph.insert_before(head, relu)
    head.replace_input_with(0, relu.outputs[0])
    with pytest.raises(ShapeError, match="Relu"):
        with_last_index(bent)
