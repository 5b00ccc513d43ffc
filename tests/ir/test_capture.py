import numpy as np
import pytest
import torch

from effc.errors import LoadError
from effc.ir.capture import capture_torch
from effc.ir.reference import Reference


class SmallNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8 * 6 * 6, 5)

    def forward(self, image, scale):
        h = torch.nn.functional.gelu(self.conv(image))
        return self.fc(h.flatten(1)) * scale, h.mean(dim=(2, 3))


class DataDependent(torch.nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent Python branch: torch.export refuses it
            return x
        return -x


def test_capture_matches_torch():
    torch.manual_seed(0)
    net = SmallNet()
    image, scale = torch.randn(2, 3, 6, 6), torch.tensor([1.5])
    model = capture_torch(net, (image, scale), input_names=["image", "scale"], output_names=["logits", "pooled"])
    assert [v.name for v in model.graph.inputs] == ["image", "scale"]
    assert [tuple(v.shape) for v in model.graph.inputs] == [(2, 3, 6, 6), (1,)]
    assert [v.name for v in model.graph.outputs] == ["logits", "pooled"]
    assert all(v.const_value is not None for v in model.graph.initializers.values())
    got = Reference(model).run({"image": image.numpy(), "scale": scale.numpy()})
    with torch.no_grad():
        expected = [t.numpy() for t in net(image, scale)]
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e, atol=1e-5, rtol=1e-5)
    assert net.training  # train/eval mode restored


def test_capture_failure_names_the_module():
    with pytest.raises(LoadError, match="module DataDependent") as info:
        capture_torch(DataDependent(), (torch.randn(3),))
    assert "\x1b[" not in str(info.value) and info.value.hint


def test_capture_rejects_non_module():
    with pytest.raises(LoadError, match="needs a torch.nn.Module"):
        capture_torch(lambda x: x, (torch.randn(3),))
