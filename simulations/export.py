"""`python -m simulations.export SCENARIO --out DIR [--set key=value ...] [--format npz|dicom]`.

Writes the procedural echo of a scenario as one folder per hospital, so a deployment
can be tried with realistic per-site data: `DIR/site-K/manifest.csv` (columns `path,
view, patient_id, device`) beside that site's cines (NPZ of uint8 frames, exact, or
multi-frame ultrasound DICOM through pydicom), and `DIR/study.toml`, the scenario as
a deployment study: dataset `echo`, the views by name, the render's normalisation
fixed in `data.mean`/`data.std` (so every site feeds the model what the simulation
did), evaluation at the sites. Each patient belongs to one site: site k is device k
when there are as many devices as sites (a hospital and its scanner), else patients
are dealt to sites at random (seeded). A site receives only the views the scenario's
schedule ever brings it. Start SuperNode k with
`--node-config "data-root='DIR/site-K' site-id=K"`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from fl_ci.config import Config, ConfigError
from fl_ci.data.registry import render_echo_synth
from fl_ci.plan import StudyPlan
from simulations.__main__ import scenario_path

FORMATS = ("npz", "dicom")


def site_of_patient(
    patients: torch.Tensor, devices: torch.Tensor, sites: int, seed: int
) -> torch.Tensor:
    """[N] site of each row: its device when devices and sites are as many, else its
    patient's site, dealt at random (seeded)."""
    if int(devices.max()) + 1 == sites:
        return devices.clone()
    ids = torch.unique(patients)
    order = ids[torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))]
    site = torch.empty(int(ids.max()) + 1, dtype=torch.long)
    for k, chunk in enumerate(torch.tensor_split(order, sites)):
        site[chunk] = k
    return site[patients]


def views_of_site(plan: StudyPlan, site: int) -> set[str]:
    """The view names the scenario's schedule ever brings to `site`."""
    names = plan.class_names
    return {
        names[c]
        for c in range(plan.num_classes)
        if c not in plan.schedule or site in plan.schedule[c]
    }


def write_dicom(path: Path, frames: np.ndarray, patient: str) -> None:
    """A multi-frame 8-bit ultrasound DICOM of `frames` [F, H, W] uint8."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    us_multiframe = "1.2.840.10008.5.1.4.1.1.3.1"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = us_multiframe
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = us_multiframe
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "US"
    ds.PatientID = patient
    ds.NumberOfFrames = int(frames.shape[0])
    ds.Rows, ds.Columns = int(frames.shape[1]), int(frames.shape[2])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(frames, dtype=np.uint8).tobytes()
    ds.save_as(path, enforce_file_format=True)


def export(cfg: Config, out: Path, fmt: str = "npz") -> dict[int, int]:
    """Write the per-site folders and `study.toml`; returns {site: cines written}."""
    if cfg.dataset != "echo-synth":
        raise ConfigError(
            f"config key 'dataset' = {cfg.dataset!r}: the export writes the procedural "
            "echo (echo-synth) only"
        )
    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    plan = StudyPlan.from_config(cfg)
    data = render_echo_synth(cfg)
    out.mkdir(parents=True, exist_ok=True)
    site = site_of_patient(data.patients, data.devices, cfg.sites, cfg.seed)
    written: dict[int, int] = {}
    for k in range(cfg.sites):
        folder = out / f"site-{k}"
        (folder / "cines").mkdir(parents=True, exist_ok=True)
        views = views_of_site(plan, k)
        lines = ["path,view,patient_id,device"]
        for i in torch.nonzero(site == k).flatten().tolist():
            view = data.class_names[int(data.labels[i])]
            if view not in views:
                continue
            patient, device = f"p{int(data.patients[i]):04d}", int(data.devices[i])
            frames = data.frames[i, :, 0].numpy()  # [F, H, W] uint8
            name = f"cines/{patient}-{view}-{i:05d}"
            if fmt == "npz":
                name += ".npz"
                np.savez_compressed(folder / name, frames=frames)
            else:
                name += ".dcm"
                write_dicom(folder / name, frames, patient)
            lines.append(f"{name},{view},{patient},scanner-{device}")
        (folder / "manifest.csv").write_text("\n".join(lines) + "\n")
        written[k] = len(lines) - 1
    (out / "study.toml").write_text(study_toml(cfg, data.mean, data.std))
    return written


def study_toml(cfg: Config, mean, std) -> str:
    """The scenario as a deployment study over the exported folders (flat keys)."""
    flat = cfg.to_flat()
    flat.update(
        {
            "dataset": "echo",
            "classes": ", ".join(StudyPlan.from_config(cfg).dataset_names),
            "data.root": "",
            "data.mean": ", ".join(f"{m:.6f}" for m in mean),
            "data.std": ", ".join(f"{s:.6f}" for s in std),
            "data.skip_bad": True,
            "evaluation": "sites",
        }
    )
    return flat_toml(
        flat,
        "written by python -m simulations.export: the study for the exported sites\n"
        "(flwr run . FEDERATION --run-config study.toml)",
    )


def flat_toml(flat: dict, comment: str = "") -> str:
    """Dotted keys and scalar values as TOML (what `flwr run --run-config` reads)."""
    lines = [f"# {line}" for line in comment.splitlines()]
    lines += [f"{key} = {_toml(value)}" for key, value in flat.items()]
    return "\n".join(lines) + "\n"


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.export", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("scenario", help="name under simulations/scenarios/ or a path")
    parser.add_argument(
        "--out", required=True, help="folder for site-K/ and study.toml"
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--format", default="npz", choices=FORMATS)
    args = parser.parse_args(argv)
    try:
        cfg = Config.from_toml(scenario_path(args.scenario), args.overrides)
        written = export(cfg, Path(args.out), args.format)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for k, n in written.items():
        print(f"site {k}: {n} cines in {Path(args.out) / f'site-{k}'}")
    print(f"study: {Path(args.out) / 'study.toml'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
