"""Compile a PyTorch module with effc from Python, then load and run the artifact.

Run: python examples/compile_torch_module.py [out_dir]
"""

from __future__ import annotations

import sys

import torch

import effc
import effc.runtime


class TinyClassifier(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(),
            torch.nn.Linear(8 * 16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def main(out_dir: str = "out-torch") -> None:
    torch.manual_seed(0)
    net = TinyClassifier().eval()
    example = torch.randn(1, 1, 28, 28)
    result = effc.compile(net, (example,), passes="prune(sparsity=0.5),cleanup", out_dir=out_dir, force=True)
    print(f"artifact: {result.out_dir}")
    print("fidelity vs original:", result.report["fidelity"]["vs_original"]["summary"])
    compiled = effc.runtime.load(result.out_dir)
    (logits,) = compiled.run({compiled.inputs[0]["name"]: example.numpy()})
    with torch.no_grad():
        print("compiled argmax", logits.argmax(), "torch argmax", net(example).argmax().item())


if __name__ == "__main__":
    main(*sys.argv[1:])
