"""Element-wise ONNX ops that more than one layer evaluates in torch, and their torch implementations.

:data:`ELEMENTWISE` is the set an FFN block's activation sub-graph may contain (``effc.passes.ffn_blocks``) and the
element-wise part of what :class:`effc.ir.torch_graph.TorchGraph` evaluates; :func:`torch_elementwise` gives each
op's torch function. One table here, so the IR and the passes read the same list (ONNX operator specs, opset 21).
"""

from __future__ import annotations

ELEMENTWISE = ("Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Neg", "Exp", "Erf", "Tanh", "Sigmoid", "Relu", "Gelu",
               "Identity", "Softplus", "HardSigmoid", "HardSwish", "LeakyRelu")


def _gelu(torch, x, node):
    approx = node.attributes.get_string("approximate", "none")
    return torch.nn.functional.gelu(x, approximate="tanh" if approx == "tanh" else "none")


def torch_elementwise(torch) -> dict:
    """Op type -> ``fn(*inputs, node) -> tensor`` for every op of :data:`ELEMENTWISE` (float32 torch tensors).

    Args:
        torch: the imported ``torch`` module (imported by the caller, so importing this module stays cheap).
    """
    f = torch.nn.functional
    return {
        "Add": lambda a, b, nd: a + b, "Sub": lambda a, b, nd: a - b, "Mul": lambda a, b, nd: a * b,
        "Div": lambda a, b, nd: a / b, "Pow": lambda a, b, nd: torch.pow(a, b), "Sqrt": lambda a, nd: torch.sqrt(a),
        "Neg": lambda a, nd: -a, "Exp": lambda a, nd: torch.exp(a), "Erf": lambda a, nd: torch.erf(a),
        "Tanh": lambda a, nd: torch.tanh(a), "Sigmoid": lambda a, nd: torch.sigmoid(a), "Relu": lambda a, nd: f.relu(a),
        "Gelu": lambda a, nd: _gelu(torch, a, nd), "Identity": lambda a, nd: a, "Softplus": lambda a, nd: f.softplus(a),
        "HardSigmoid": lambda a, nd: torch.clamp(nd.attributes.get_float("alpha", 0.2) * a
                                                 + nd.attributes.get_float("beta", 0.5), 0, 1),
        "HardSwish": lambda a, nd: f.hardswish(a),
        "LeakyRelu": lambda a, nd: f.leaky_relu(a, nd.attributes.get_float("alpha", 0.01)),
    }
