"""`fl-ci`: use a trained model outside the study.

fl-ci bundle RUN_DIR [--mean M --std S]     describe a finished run's model
fl-ci predict BUNDLE INPUT --out predictions.csv [--frames N] [--device ...]
fl-ci export BUNDLE --onnx model.onnx
"""

from __future__ import annotations

import argparse
import sys

from fl_ci.bundle import BundleError
from fl_ci.data.base import DataError
from fl_ci.onnx_export import ExportError
from fl_ci.predict import PredictError


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fl-ci", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("bundle", help="write bundle.json for a finished run folder")
    b.add_argument("run_dir", help="a run's output folder (summary.json, model.pt)")
    b.add_argument(
        "--mean",
        type=_floats,
        help="the run's pixel mean per channel on the 0..1 scale (e.g. 0.18); "
        "default: recomputed by loading the run's data again",
    )
    b.add_argument("--std", type=_floats, help="the run's pixel std per channel")

    p = sub.add_parser("predict", help="score cines or images, write a CSV")
    p.add_argument("bundle", help="bundle folder (or its bundle.json)")
    p.add_argument("input", help="manifest folder, folder of cines/images, or a file")
    p.add_argument("--out", default="predictions.csv", help="CSV to write")
    p.add_argument(
        "--frames",
        type=int,
        help="frames sampled per cine, softmax averaged (default: the bundle's); "
        "1 = the middle frame only, as the run's evaluation",
    )
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--batch-size", type=int, default=64, help="frames per forward")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    e = sub.add_parser("export", help="export the bundle's model to ONNX")
    e.add_argument("bundle", help="bundle folder (or its bundle.json)")
    e.add_argument("--onnx", required=True, help="ONNX file to write")
    e.add_argument("--opset", type=int, default=None, help="ONNX opset (default 20)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "bundle":
            return _bundle(args)
        if args.command == "predict":
            return _predict(args)
        return _export(args)
    except (BundleError, DataError, ExportError, PredictError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _bundle(args: argparse.Namespace) -> int:
    from fl_ci.bundle import bundle_from_run, load_bundle

    path = bundle_from_run(args.run_dir, mean=args.mean, std=args.std)
    b = load_bundle(path)  # proves it loads
    print(
        f"{path}: {b.info['architecture']}, {len(b.class_names)} classes "
        f"({', '.join(b.class_names)}), input {b.in_channels}x{b.image_size}x"
        f"{b.image_size}, {b.frames} frames; normalisation "
        f"{b.info['input']['normalisation_source']}"
    )
    return 0


def _predict(args: argparse.Namespace) -> int:
    from fl_ci.predict import predict

    result = predict(
        args.bundle,
        args.input,
        args.out,
        frames=args.frames,
        device=args.device,
        batch_size=args.batch_size,
        progress=not args.quiet,
    )
    print(f"{result.written} prediction(s) in {result.out}")
    if result.ignored:
        print(f"{result.ignored} file(s) neither cine nor image left alone")
    if result.skipped:
        print(
            f"{len(result.skipped)} skipped (listed in {result.skipped_file}):",
            file=sys.stderr,
        )
        for name, reason in result.skipped[:20]:
            print(f"  {name}: {reason}", file=sys.stderr)
        if len(result.skipped) > 20:
            print(f"  ... and {len(result.skipped) - 20} more", file=sys.stderr)
    if result.unknown_views:
        shown = ", ".join(f"{v} ({n})" for v, n in sorted(result.unknown_views.items()))
        print(f"views the model does not know, left out of accuracy: {shown}")
    if result.accuracy is not None:
        print(
            f"accuracy {result.accuracy:.2f}% ({result.correct}/{result.labelled} "
            "labelled)"
        )
    return 0


def _export(args: argparse.Namespace) -> int:
    from fl_ci.bundle import load_bundle
    from fl_ci.onnx_export import (
        DEFAULT_OPSET,
        compare_onnx,
        export_onnx,
        random_inputs,
    )

    bundle = load_bundle(args.bundle)
    path = export_onnx(bundle, args.onnx, opset=args.opset or DEFAULT_OPSET)
    print(f"wrote {path}")
    try:
        check = compare_onnx(bundle, path, random_inputs(bundle))
    except ExportError as err:  # onnxruntime absent: the file is still good
        print(f"not checked: {err}", file=sys.stderr)
        return 0
    same = "identical" if check.argmax_equal else "DIFFERENT"
    print(
        f"ONNX Runtime vs torch on {check.inputs} random images: max |dp| = "
        f"{check.max_abs_probability:.1e}, max |dlogit| = {check.max_abs_logit:.1e}, "
        f"argmax {same}"
    )
    return 0 if check.argmax_equal else 1


if __name__ == "__main__":
    sys.exit(main())
