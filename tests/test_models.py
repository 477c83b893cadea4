import pytest
import torch
from torch import nn

from fl_ci.models import (
    CosineHead,
    LinearHead,
    build_model,
    count_parameters,
    model_for,
)

CIFAR_CASES = [("resnet32", 64, 8), ("resnet18", 512, 4)]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize(("name", "dim", "side"), CIFAR_CASES)
def test_cifar_models_forward_all_shapes(name: str, dim: int, side: int) -> None:
    net = build_model(name, num_classes=5, in_channels=3)
    out = net.forward_all(torch.randn(2, 3, 32, 32))
    assert out.fmap.shape == (2, dim, side, side)  # 32 px / 4 or / 8
    assert out.features.shape == (2, dim)
    assert out.scores.shape == (2, 5)
    assert out.logits.shape == (2, 5)
    assert net.feature_dim == dim


@pytest.mark.parametrize(("size", "side"), [(64, 4), (224, 14)])
def test_echo_net_feature_is_256_at_any_size(size: int, side: int) -> None:
    net = build_model("echo_net", num_classes=3, in_channels=1)
    out = net.forward_all(torch.randn(2, 1, size, size))
    assert out.fmap.shape == (2, 64, side, side)
    assert out.features.shape == (2, 256)
    assert out.logits.shape == (2, 3)


def test_echo_net_feature_is_the_2x2_average_pool() -> None:
    net = build_model("echo_net", num_classes=3, in_channels=1).eval()
    out = net.forward_all(torch.randn(1, 1, 64, 64))
    # 4x4 map -> 2x2 grid of 2x2 blocks; feature index c*4 + 0 is the top-left block.
    expected = out.fmap[0, :, :2, :2].mean(dim=(1, 2))
    torch.testing.assert_close(out.features[0, ::4], expected)


def test_forward_equals_forward_all_logits() -> None:
    net = build_model("resnet32", num_classes=4, in_channels=3).eval()
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(net(x), net.forward_all(x).logits)


@pytest.mark.parametrize("name", ["resnet32", "resnet18", "echo_net"])
def test_every_model_has_batchnorm(name: str) -> None:
    net = build_model(name, num_classes=2, in_channels=3)
    assert any(isinstance(m, nn.BatchNorm2d) for m in net.modules())


def test_no_inplace_relu() -> None:
    # BN forward hooks must see true tensors, never ones overwritten afterwards.
    net = build_model("resnet32", num_classes=2, in_channels=3)
    relus = [m for m in net.modules() if isinstance(m, nn.ReLU)]
    assert relus and not any(m.inplace for m in relus)


def test_build_model_rejects_zero_classes() -> None:
    with pytest.raises(ValueError):
        build_model("resnet32", num_classes=0, in_channels=3)


def test_build_model_rejects_unknown_name() -> None:
    with pytest.raises(ValueError):
        build_model("vgg", num_classes=2, in_channels=3)


def test_model_for() -> None:
    assert model_for("cifar100") == "resnet32"
    assert model_for("echo") == "echo_net"
    assert model_for("echo-synth") == "echo_net"
    assert model_for("cifar100", "resnet18") == "resnet18"


def test_model_for_unknown_dataset_raises() -> None:
    with pytest.raises(ValueError):
        model_for("mnist")


def test_count_parameters_of_linear_head() -> None:
    head = LinearHead(4, 3)  # 3x4 weight + 3 bias
    assert count_parameters(head) == 15
    head.grow(2)
    head.freeze_old(True)
    assert count_parameters(head, trainable_only=True) == 2 * 4 + 2


# ---------------------------------------------------------------- cosine head


def test_cosine_scores_are_in_unit_interval() -> None:
    net = build_model("resnet32", num_classes=6, in_channels=3)
    out = net.forward_all(torch.randn(4, 3, 16, 16))
    assert out.scores.abs().max() <= 1.0 + 1e-6


def test_cosine_head_hand_computed() -> None:
    head = CosineHead(2, 2)
    with torch.no_grad():
        head.new_weight.copy_(torch.tensor([[2.0, 0.0], [1.0, 1.0]]))
        head.eta.fill_(3.0)
    scores, logits = head.forward_scores(torch.tensor([[0.0, 5.0]]))
    # cos with (1, 0) = 0; cos with (1, 1)/sqrt(2) = 1/sqrt(2)
    torch.testing.assert_close(scores, torch.tensor([[0.0, 2**-0.5]]))
    torch.testing.assert_close(logits, 3.0 * scores)


def test_cosine_eta_is_one_learnable_scalar_at_one() -> None:
    head = CosineHead(8, 3)
    assert head.eta.shape == () and head.eta.item() == 1.0
    assert head.eta.requires_grad


def test_linear_head_scores_equal_logits() -> None:
    net = build_model("resnet32", num_classes=3, in_channels=3, head="linear")
    out = net.forward_all(torch.randn(2, 3, 16, 16))
    torch.testing.assert_close(out.scores, out.logits)


def test_linear_head_hand_computed() -> None:
    head = LinearHead(2, 1)
    with torch.no_grad():
        head.new_weight.copy_(torch.tensor([[1.0, 2.0]]))
        head.new_bias.fill_(0.5)
    assert head(torch.tensor([[3.0, 4.0]])).item() == 3.0 + 8.0 + 0.5


# ---------------------------------------------------------------- growing


@pytest.mark.parametrize("head", ["cosine", "linear"])
def test_grow_keeps_old_scores(head: str) -> None:
    net = build_model("echo_net", num_classes=3, in_channels=1, head=head).eval()
    x = torch.randn(2, 1, 64, 64)
    before = net.forward_all(x)
    before_w = net.head.weight.detach().clone()
    net.grow(2)
    after = net.forward_all(x)
    assert net.num_classes == 5 and net.num_old_classes == 3
    assert after.scores.shape == (2, 5)
    # Rows are copied exactly; a matmul over more rows may round differently.
    torch.testing.assert_close(after.scores[:, :3], before.scores)
    torch.testing.assert_close(after.logits[:, :3], before.logits)
    torch.testing.assert_close(net.head.old_weight, before_w, rtol=0, atol=0)


def test_grow_merges_new_rows_into_old() -> None:
    head = CosineHead(4, 2)
    first = head.weight.detach().clone()
    head.grow(3)
    assert head.old_weight.shape == (2, 4) and head.new_weight.shape == (3, 4)
    head.grow(1)
    assert head.old_weight.shape == (5, 4) and head.new_weight.shape == (1, 4)
    torch.testing.assert_close(head.weight[:2], first, rtol=0, atol=0)


@pytest.mark.parametrize("head", ["cosine", "linear"])
def test_state_dict_keys_unchanged_by_grow(head: str) -> None:
    net = build_model("resnet32", num_classes=3, in_channels=3, head=head)
    keys = list(net.state_dict())
    net.grow(4)
    assert list(net.state_dict()) == keys


def test_grow_with_weights_imprints_rows() -> None:
    head = LinearHead(3, 2)
    rows = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    head.grow(2, rows)
    torch.testing.assert_close(head.new_weight, rows)
    torch.testing.assert_close(head.weight[2:], rows)
    torch.testing.assert_close(head.new_bias, torch.zeros(2))


def test_net_grow_with_weights_imprints_rows() -> None:
    net = build_model("echo_net", num_classes=2, in_channels=1)
    rows = torch.randn(3, 256)
    net.grow(3, rows)
    torch.testing.assert_close(net.head.weight[2:], rows)


def test_grow_rejects_wrong_weight_shape() -> None:
    head = CosineHead(3, 2)
    with pytest.raises(ValueError):
        head.grow(2, torch.zeros(2, 4))


def test_load_state_dict_adopts_grown_shapes() -> None:
    server = build_model("resnet32", num_classes=2, in_channels=3)
    server.grow(3)
    client = build_model("resnet32", num_classes=2, in_channels=3)
    client.load_state_dict(server.state_dict())
    assert client.num_classes == 5 and client.num_old_classes == 2
    torch.testing.assert_close(client.head.weight, server.head.weight)


# ---------------------------------------------------------------- freezing


@pytest.mark.parametrize("head_cls", [CosineHead, LinearHead])
def test_frozen_old_rows_do_not_move_under_sgd(head_cls: type) -> None:
    head = head_cls(4, 2)
    head.grow(2)
    head.freeze_old(True)
    old_before = head.old_weight.detach().clone()
    new_before = head.new_weight.detach().clone()
    opt = torch.optim.SGD(head.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)
    for _ in range(2):  # the second step exercises the momentum buffer
        opt.zero_grad()
        loss = nn.functional.cross_entropy(
            head(torch.randn(3, 4)), torch.tensor([0, 2, 3])
        )
        loss.backward()
        opt.step()
    torch.testing.assert_close(head.old_weight, old_before, rtol=0, atol=0)
    assert not torch.allclose(head.new_weight, new_before)


def test_freeze_persists_across_grow() -> None:
    head = LinearHead(4, 2)
    head.freeze_old(True)
    head.grow(2)
    assert not head.old_weight.requires_grad and not head.old_bias.requires_grad
    assert head.new_weight.requires_grad and head.new_bias.requires_grad


def test_unfreeze_restores_grad() -> None:
    net = build_model("resnet32", num_classes=2, in_channels=3)
    net.grow(1)
    net.freeze_old_classes(True)
    net.freeze_old_classes(False)
    assert net.head.old_weight.requires_grad


def test_batchnorm_hook_tensors_are_not_modified_later() -> None:
    # DeepInversion-style hooks keep BN inputs/outputs; later in-place ops would
    # silently change what they saw.
    net = build_model("resnet32", num_classes=2, in_channels=3)
    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def hook(_m: nn.Module, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
        x = inputs[0]
        seen.append((x, x.clone(), output, output.clone()))

    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.register_forward_hook(hook)
    net(torch.randn(2, 3, 16, 16))
    assert seen
    for x, x_copy, y, y_copy in seen:
        assert torch.equal(x, x_copy) and torch.equal(y, y_copy)
