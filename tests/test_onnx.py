"""`fl-ci export`: the bundle's model as ONNX, run by ONNX Runtime on real inputs
(pydicom's ultrasound cine and procedural echo cines, normalised as the bundle says)
gives torch's probabilities within 1e-4 and the same argmax. Skipped without the
`onnx` extra (onnx, onnxscript, onnxruntime)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pydicom.data import get_testdata_file

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

from fl_ci.bundle import Bundle, load_bundle, write_bundle  # noqa: E402
from fl_ci.cli import main  # noqa: E402
from fl_ci.data.echo import ECHO_VIEWS, _decode  # noqa: E402
from fl_ci.data.echo_synth import make_echo_synth  # noqa: E402
from fl_ci.models import build_model  # noqa: E402
from fl_ci.onnx_export import compare_onnx  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

US_CINE = Path(get_testdata_file("examples_ybr_color.dcm"))  # 30 frames
SIZE = 64
PROB_ATOL = 1e-4  # measured: ~1e-7 on CPU


@pytest.fixture(scope="module")
def echo():
    return make_echo_synth(patients=2, frames=4, image_size=SIZE, seed=0)


@pytest.fixture(scope="module")
def bundle(echo, tmp_path_factory) -> Bundle:
    """A grown echo_net (2 + 1 + 1 + 1 classes, cosine head) with the echo data's
    normalisation; an untrained net, but real inputs still spread its scores."""
    torch.manual_seed(0)
    model = build_model("echo_net", 2, 1, head="cosine", head_scale=10.0)
    for k in (1, 1, 1):
        model.grow(k)
    out = tmp_path_factory.mktemp("bundle")
    write_bundle(
        out,
        model.eval(),
        config_flat={"method": "finetune", "dataset": "echo-synth", "head": "cosine"},
        class_names=list(ECHO_VIEWS),
        classes_per_task=[2, 1, 1, 1],
        mean=echo.mean,
        std=echo.std,
        in_channels=1,
        image_size=SIZE,
        frames=4,
        metrics={},
    )
    return load_bundle(out)


@pytest.fixture(scope="module")
def exported(bundle: Bundle, tmp_path_factory) -> tuple[Path, int, str]:
    """`fl-ci export` once for the module: (file, exit code, what it printed)."""
    import contextlib
    import io

    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rc = main(["export", str(bundle.path.parent), "--onnx", str(path)])
    return path, rc, printed.getvalue()


def real_inputs(bundle: Bundle, echo) -> torch.Tensor:
    """Every frame of pydicom's ultrasound cine sampled 30 times (all of them) and
    of the procedural cines, normalised as the bundle says: [B, 1, S, S]."""
    us = torch.from_numpy(_decode(US_CINE, 30, SIZE))[:, None]  # [30, 1, S, S]
    synth = echo.frames.flatten(0, 1)  # [N * F, 1, S, S]
    return bundle.normalize(torch.cat([us, synth]))


def test_export_command_writes_a_checked_onnx_file(exported) -> None:
    path, rc, printed = exported
    assert rc == 0
    onnx.checker.check_model(onnx.load(path))
    assert "argmax identical" in printed


def test_onnx_runtime_matches_torch_on_real_echo_frames(
    bundle: Bundle, echo, exported
) -> None:
    x = real_inputs(bundle, echo)
    agreement = compare_onnx(bundle, exported[0], x)
    print(
        f"{agreement.inputs} frames: max |dp| {agreement.max_abs_probability:.2e}, "
        f"max |dlogit| {agreement.max_abs_logit:.2e}"
    )
    assert agreement.inputs == 30 + len(echo) * 4
    assert agreement.max_abs_probability <= PROB_ATOL
    assert agreement.argmax_equal
    # the inputs are not degenerate: the model tells the frames apart
    with torch.inference_mode():
        predicted = bundle.model(x).argmax(1)
    assert len(predicted.unique()) > 1


def test_batch_axis_is_dynamic(bundle: Bundle, echo, exported) -> None:
    session = ort.InferenceSession(str(exported[0]), providers=["CPUExecutionProvider"])
    x = real_inputs(bundle, echo)
    for n in (1, 7):
        logits, probs = session.run(None, {"image": x[:n].numpy()})
        assert logits.shape == probs.shape == (n, len(ECHO_VIEWS))
        assert np.allclose(probs.sum(1), 1.0, atol=1e-5)


def test_onnx_metadata_describes_the_bundle(bundle: Bundle, exported) -> None:
    meta = {p.key: p.value for p in onnx.load(exported[0]).metadata_props}
    assert json.loads(meta["class_names"]) == list(ECHO_VIEWS)
    assert tuple(json.loads(meta["mean"])) == bundle.mean
    assert tuple(json.loads(meta["std"])) == bundle.std
    assert (meta["image_size"], meta["in_channels"], meta["frames"]) == ("64", "1", "4")
    assert meta["weights_sha256"] == bundle.info["weights"]["sha256"]
