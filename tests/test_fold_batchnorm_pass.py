"""FoldBatchNormPass: eval-mode BatchNorm folded exactly into its producer; the user's model untouched."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

import exfx
from exfx.capture import capture
from exfx.passes import CanonicalizePass, FoldBatchNormPass
from exfx.passes.canonicalize_pass import is_producer
from models import ResNetish, VGGish, randomise_bn


def prepare(model: nn.Module, *inputs: torch.Tensor) -> fx.GraphModule:
    """exfx's own capture (a private copy), shapes, canonical form."""
    gm = capture(model)
    ShapeProp(gm).propagate(*inputs)
    CanonicalizePass()(gm)
    ShapeProp(gm).propagate(*inputs)
    return gm


def fold(model: nn.Module, *inputs: torch.Tensor) -> tuple[fx.GraphModule, bool]:
    gm = prepare(model, *inputs)
    modified = FoldBatchNormPass()(gm).modified
    gm.graph.lint()
    return gm, modified


def batchnorms(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes
            if (n.op == "call_module" and isinstance(gm.get_submodule(str(n.target)), nn.modules.batchnorm._BatchNorm))
            or (n.op == "call_function" and n.target is F.batch_norm)]


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), f"{key} was modified"


class ConvBN(nn.Module):
    def __init__(self, bias: bool, dims: int = 2) -> None:
        super().__init__()
        conv, bn = (nn.Conv2d, nn.BatchNorm2d) if dims == 2 else (nn.Conv1d, nn.BatchNorm1d)
        self.conv = conv(4, 6, 3, padding=1, bias=bias)
        self.bn = bn(6)
        randomise_bn(self, seed=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class LinearBN(nn.Module):
    def __init__(self, affine: bool = True) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 7)
        self.bn = nn.BatchNorm1d(7, affine=affine)
        if affine:
            randomise_bn(self, seed=4)
        else:
            self.bn.running_mean.copy_(torch.randn(7))
            self.bn.running_var.copy_(torch.rand(7) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x))


class FunctionalBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 3, 3, 3))
        self.register_buffer("mean", torch.randn(6))
        self.register_buffer("var", torch.rand(6) + 0.5)
        self.gamma, self.beta = nn.Parameter(torch.rand(6) + 0.5), nn.Parameter(torch.randn(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.conv2d(x, self.w, padding=1)
        return F.batch_norm(h, self.mean, self.var, self.gamma, self.beta, training=False, eps=1e-3)


CASES = {
    "conv2d+bias": (lambda: ConvBN(True), (2, 4, 5, 5)),
    "conv2d-nobias": (lambda: ConvBN(False), (2, 4, 5, 5)),
    "conv1d": (lambda: ConvBN(True, dims=1), (3, 4, 9)),
    "linear": (LinearBN, (6, 5)),
    "linear-no-affine": (lambda: LinearBN(affine=False), (6, 5)),
    "functional": (FunctionalBN, (2, 3, 6, 6)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_batchnorm_folds_exactly(case: str) -> None:
    make, shape = CASES[case]
    model = make().eval()
    x = torch.randn(*shape)
    gm, modified = fold(model, x)
    assert modified
    assert not batchnorms(gm)
    producers = [n for n in gm.graph.nodes if is_producer(n)]
    assert len(producers) == 1 and producers[0].args[2] is not None  # the fold always leaves a bias
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", sorted(CASES))
def test_folding_does_not_modify_the_users_model(case: str) -> None:
    make, shape = CASES[case]
    model = make().eval()
    before = snapshot(model)
    names = [name for name, _ in model.named_parameters()]
    x = torch.randn(*shape)
    fold(model, x)
    exfx.compile(model, (x,), exfx.Config(samples=2))
    assert_same_state(model, before)
    assert [name for name, _ in model.named_parameters()] == names
    if case == "conv2d-nobias":
        assert model.conv.bias is None


def test_bias_free_conv_gets_a_bias_parameter() -> None:
    model = ConvBN(False).eval()
    x = torch.randn(1, 4, 5, 5)
    gm, _ = fold(model, x)
    conv = next(n for n in gm.graph.nodes if is_producer(n))
    bias_node = conv.args[2]
    assert bias_node.op == "get_attr" and bias_node.target == "conv.bias"
    bias = gm.get_parameter("conv.bias")
    scale = model.bn.weight / torch.sqrt(model.bn.running_var + model.bn.eps)
    torch.testing.assert_close(bias, model.bn.bias - model.bn.running_mean * scale)
    torch.testing.assert_close(gm.get_parameter("conv.weight"), model.conv.weight * scale.reshape(-1, 1, 1, 1))


def test_float64_fold_is_exact_to_float64_precision() -> None:
    model = ConvBN(True).double().eval()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    gm, _ = fold(model, x)
    torch.testing.assert_close(gm(x), model(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("model_fn", [VGGish, ResNetish])
def test_example_models_fold_every_batchnorm(model_fn) -> None:
    model = model_fn().eval()
    x = torch.randn(2, 3, 16, 16)
    before = snapshot(model)
    gm, _ = fold(model, x)
    assert not batchnorms(gm)
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)
    assert_same_state(model, before)


# ---------------------------------------------------------------------------
# BatchNorms that must stay
# ---------------------------------------------------------------------------


class BNAfterRelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        randomise_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(F.relu(self.conv(x)))


class ProducerUsedTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        randomise_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        return self.bn(h) + h


class SharedWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4))
        self.bn = nn.BatchNorm1d(4)
        randomise_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(F.linear(x, self.w)) + F.linear(x, self.w)


class BatchStatsBN(nn.Module):
    """track_running_stats=False uses batch statistics even in eval mode: not a fixed affine map."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class LinearBN3d(nn.Module):
    """BatchNorm1d on (N, C, L) normalises axis 1, which is not the linear's output axis."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn = nn.Linear(5, 5), nn.BatchNorm1d(3)
        randomise_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x))


class TrainingFunctionalBN(FunctionalBN):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.conv2d(x, self.w, padding=1)
        return F.batch_norm(h, self.mean.clone(), self.var.clone(), self.gamma, self.beta, training=True)


NOT_FOLDABLE = {
    "after-relu": (BNAfterRelu, (2, 3, 6, 6)),
    "producer-used-twice": (ProducerUsedTwice, (2, 3, 6, 6)),
    "shared-weight": (SharedWeight, (5, 4)),
    "batch-stats": (BatchStatsBN, (2, 3, 6, 6)),
    "linear-3d": (LinearBN3d, (2, 3, 5)),
    "training-functional": (TrainingFunctionalBN, (2, 3, 6, 6)),
}


@pytest.mark.parametrize("case", sorted(NOT_FOLDABLE))
def test_non_foldable_batchnorm_is_left_in_place(case: str) -> None:
    make, shape = NOT_FOLDABLE[case]
    model = make().eval()
    x = torch.randn(*shape)
    before = snapshot(model)
    gm, modified = fold(model, x)
    assert not modified
    assert len(batchnorms(gm)) == 1
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)
    assert_same_state(model, before)


def test_unfolded_batchnorm_before_relu_is_not_a_site() -> None:
    """A BatchNorm left between producer and ReLU hides the producer: no ENP there, output exact."""
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem, self.conv, self.bn = nn.Conv2d(3, 40, 3), nn.Conv2d(40, 40, 3), nn.BatchNorm2d(40)
            randomise_bn(self)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.conv(F.relu(self.stem(x)))
            return F.relu(self.bn(h)) + h.mean()

    model = Net().eval()
    x = torch.randn(2, 3, 8, 8)
    report = exfx.explain(model, (x,), exfx.Config(samples=8))
    assert [s.eligible for s in report.sites] == [False, False]
    assert report.sites[1].reason.startswith("no linear/conv producer")
    gm = exfx.compile(model, (x,), exfx.Config(samples=8))
    torch.testing.assert_close(gm(x), model(x))


def test_fold_is_idempotent() -> None:
    model = ConvBN(True).eval()
    x = torch.randn(2, 4, 5, 5)
    gm, _ = fold(model, x)
    weights = copy.deepcopy(gm.state_dict())
    assert FoldBatchNormPass()(gm).modified is False
    for key, value in weights.items():
        assert torch.equal(gm.state_dict()[key], value)


class TiedModuleBN(nn.Module):
    """One Linear module called twice, BatchNorm after one call only: folding would change the other call."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn = nn.Linear(6, 6), nn.BatchNorm1d(6)
        randomise_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x)) + self.fc(x)


def test_batchnorm_is_not_folded_into_a_module_called_twice() -> None:
    model = TiedModuleBN().eval()
    x = torch.randn(4, 6)
    gm, modified = fold(model, x)
    assert not modified and len(batchnorms(gm)) == 1
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(exfx.compile(model, (x,), exfx.Config(samples=2))(x), model(x), rtol=1e-5, atol=1e-5)
