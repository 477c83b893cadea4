"""Model bundles: bundle.json beside model.pt, written from a grown model and loaded
back into the same network; weights that do not match the description are refused
with a message that says what differs. (Bundles of real runs: tests/test_predict.py.)"""

import hashlib
import json
from pathlib import Path

import pytest
import torch

from fl_ci.bundle import (
    BUNDLE_NAME,
    MODEL_NAME,
    BundleError,
    load_bundle,
    write_bundle,
)
from fl_ci.data.echo import ECHO_VIEWS
from fl_ci.models import IncrementalNet, build_model
from fl_ci.results import atomic_torch_save

pytestmark = pytest.mark.usefixtures("one_thread")

PER_TASK = [2, 1, 1, 1]
CONFIG = {
    "method": "class_impression",
    "dataset": "echo-synth",
    "model": "auto",
    "head": "cosine",
    "head_scale": 10.0,
    "seed": 0,
}


def grown_model(head: str = "cosine", per_task=PER_TASK, seed: int = 0):
    """echo_net grown task by task, as a run leaves it (old rows 4, new rows 1)."""
    torch.manual_seed(seed)
    model = build_model("echo_net", per_task[0], 1, head=head, head_scale=10.0)
    for k in per_task[1:]:
        model.grow(k)
    return model.eval()


def write(out: Path, model: IncrementalNet, **changes) -> Path:
    kwargs = dict(
        config_flat=CONFIG,
        class_names=list(ECHO_VIEWS),
        classes_per_task=PER_TASK,
        mean=(0.2,),
        std=(0.1,),
        in_channels=1,
        image_size=32,
        frames=8,
        metrics={"final_accuracy": 61.5, "accuracy_all_classes": [90.0, 61.5]},
    )
    kwargs.update(changes)
    return write_bundle(out, model, **kwargs)


def rewrite_weights(out: Path, state: dict) -> None:
    """Replace model.pt and make bundle.json's hash agree, so that only the shape
    checks stand between these weights and the model."""
    atomic_torch_save(state, out / MODEL_NAME)
    info = json.loads((out / BUNDLE_NAME).read_text())
    info["weights"]["sha256"] = hashlib.sha256(
        (out / MODEL_NAME).read_bytes()
    ).hexdigest()
    (out / BUNDLE_NAME).write_text(json.dumps(info))


def test_bundle_json_describes_the_model_beside_its_weights(tmp_path: Path) -> None:
    path = write(tmp_path, grown_model())
    assert path == tmp_path / BUNDLE_NAME
    info = json.loads(path.read_text())
    assert info["architecture"] == "echo_net"
    assert (info["head"], info["head_scale"]) == ("cosine", 10.0)
    assert info["class_names"] == list(ECHO_VIEWS)
    assert info["classes_per_task"] == PER_TASK
    assert info["input"]["channels"] == 1
    assert info["input"]["image_size"] == 32
    assert info["input"]["frames"] == 8
    assert (info["input"]["mean"], info["input"]["std"]) == ([0.2], [0.1])
    assert (info["method"], info["dataset"]) == ("class_impression", "echo-synth")
    assert info["metrics"]["final_accuracy"] == 61.5
    assert info["fl_ci_version"]
    digest = hashlib.sha256((tmp_path / MODEL_NAME).read_bytes()).hexdigest()
    assert info["weights"]["sha256"] == digest


def test_loaded_bundle_computes_what_the_model_did(tmp_path: Path) -> None:
    model = grown_model()
    write(tmp_path, model)
    x = torch.randn(3, 1, 32, 32)
    for path in (tmp_path, tmp_path / BUNDLE_NAME):
        bundle = load_bundle(path)
        assert bundle.model.head.num_old == 4 and bundle.model.head.num_new == 1
        assert not bundle.model.training
        assert torch.equal(bundle.model(x), model(x))
        assert bundle.class_names == list(ECHO_VIEWS)
        assert (bundle.mean, bundle.std) == ((0.2,), (0.1,))


def test_linear_head_round_trips(tmp_path: Path) -> None:
    model = grown_model("linear")
    write(tmp_path, model, config_flat={**CONFIG, "head": "linear"})
    x = torch.randn(2, 1, 32, 32)
    assert torch.equal(load_bundle(tmp_path).model(x), model(x))


def test_bundle_normalises_uint8_pixels_as_the_run(tmp_path: Path) -> None:
    write(tmp_path, grown_model())
    pixels = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 1, 1, 3)
    out = load_bundle(tmp_path).normalize(pixels)
    assert torch.allclose(out.flatten(), torch.tensor([-2.0, 0.0, 8.0]), atol=1e-5)


def test_existing_model_pt_with_the_same_weights_is_kept(tmp_path: Path) -> None:
    model = grown_model()
    atomic_torch_save(model.state_dict(), tmp_path / MODEL_NAME)
    before = (tmp_path / MODEL_NAME).read_bytes()
    write(tmp_path, model)
    assert (tmp_path / MODEL_NAME).read_bytes() == before
    assert torch.equal(load_bundle(tmp_path).model.head.weight, model.head.weight)


def test_existing_model_pt_with_other_weights_is_refused(tmp_path: Path) -> None:
    atomic_torch_save(grown_model(seed=1).state_dict(), tmp_path / MODEL_NAME)
    with pytest.raises(BundleError, match=r"model\.pt holds other weights"):
        write(tmp_path, grown_model(seed=0))
    assert not (tmp_path / BUNDLE_NAME).exists()


def test_class_names_that_do_not_fit_the_head_are_refused_before_writing(
    tmp_path: Path,
) -> None:
    with pytest.raises(BundleError, match="adds up to 5 classes but class_names has 4"):
        write(tmp_path, grown_model(), class_names=["A2C", "A3C", "A4C", "PLAX"])
    with pytest.raises(BundleError, match="has 5 classes in its head but the bundle"):
        write(
            tmp_path,
            grown_model(),
            class_names=["A2C", "A3C", "A4C", "PLAX", "PSAX", "A5C"],
            classes_per_task=[2, 1, 1, 2],
        )
    assert list(tmp_path.iterdir()) == []


def test_a_task_schedule_other_than_the_models_is_refused(tmp_path: Path) -> None:
    # 5 classes either way, but the head's old/new rows say 4 + 1, not 3 + 2
    with pytest.raises(BundleError, match=r"head\.old_weight: \(4, 256\)"):
        write(tmp_path, grown_model(), classes_per_task=[3, 2])
    assert list(tmp_path.iterdir()) == []


def test_wrong_input_channels_are_named(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=r"takes 1 input channel\(s\).*says 3"):
        write(tmp_path, grown_model(), in_channels=3, mean=(0.2,) * 3, std=(0.1,) * 3)


def test_normalisation_must_have_one_value_per_channel(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=r"'input\.std' must be 1 number"):
        write(tmp_path, grown_model(), std=(0.1, 0.1))
    with pytest.raises(BundleError, match=r"'input\.std' must be positive"):
        write(tmp_path, grown_model(), std=(0.0,))


def test_changed_weights_fail_the_hash_check(tmp_path: Path) -> None:
    write(tmp_path, grown_model())
    atomic_torch_save(grown_model(seed=1).state_dict(), tmp_path / MODEL_NAME)
    with pytest.raises(BundleError, match=r"model\.pt does not match .*SHA-256"):
        load_bundle(tmp_path)


def test_weights_with_another_number_of_classes_are_named(tmp_path: Path) -> None:
    write(tmp_path, grown_model())
    rewrite_weights(tmp_path, grown_model(per_task=[2, 1, 1]).state_dict())
    with pytest.raises(BundleError, match=r"has 4 classes in its head but the bundle"):
        load_bundle(tmp_path)


def test_weights_with_missing_keys_are_named(tmp_path: Path) -> None:
    write(tmp_path, grown_model())
    state = grown_model().state_dict()
    del state["head.eta"]
    rewrite_weights(tmp_path, state)
    with pytest.raises(BundleError, match=r"missing keys \['head\.eta'\]"):
        load_bundle(tmp_path)


def test_missing_weights_file_is_named(tmp_path: Path) -> None:
    write(tmp_path, grown_model())
    (tmp_path / MODEL_NAME).unlink()
    with pytest.raises(BundleError, match=r"weights file .*model\.pt is missing"):
        load_bundle(tmp_path)


def test_a_bad_key_in_bundle_json_is_named(tmp_path: Path) -> None:
    write(tmp_path, grown_model())
    info = json.loads((tmp_path / BUNDLE_NAME).read_text())
    info["architecture"] = "vit"
    (tmp_path / BUNDLE_NAME).write_text(json.dumps(info))
    with pytest.raises(BundleError, match=r"bundle\.json: key 'architecture' is 'vit'"):
        load_bundle(tmp_path)


def test_a_folder_without_a_bundle_is_named(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=r"bundle\.json not found"):
        load_bundle(tmp_path)
