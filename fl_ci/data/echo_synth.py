"""Procedural echocardiography: five standard views rendered as B-mode ultrasound cines.

Each cine is a painter's-algorithm stack of soft ellipses (pericardium, myocardial
walls, dark blood pools, valve leaflets) in a view-specific layout, beating over a
cardiac cycle, seen through a sector (fan) with the apex at the top, multiplied by
Rayleigh speckle, attenuated with depth and blurred. Patients vary the anatomy (sizes,
pose, wall thickness, heart rate, contraction); devices vary gain, dynamic range,
sector angle, speckle grain and strength, attenuation and resolution, so federated
sites see a domain shift. Everything is drawn from one seeded generator.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from fl_ci.data.base import ImageData
from fl_ci.data.echo import ECHO_VIEWS, pixel_mean_std


def _view_layers() -> dict[str, list[tuple[float, ...]]]:
    """Layers of each view, painted in order (later layers cover earlier ones).

    Columns: kind (1 wall grown by the wall thickness, 2 blood, 3 pericardium grown by
    its thickness, 4 tissue fill, 5 muscle, 6 valve), chamber (0 LV, 1 RV, 2 LA, 3 RA,
    4 aorta, 5 other: indexes per-patient size jitter), motion (0 static, 1 ventricle,
    2 atrium, 3 AV valve seen when closed in systole, 4 aortic valve seen in diastole,
    5 vessel), base (1: moves towards the apex in systole), centre x, y, semi-axes a
    (across) and b (along), angle in degrees. Image coordinates: x, y in [-1, 1], y
    down, transducer apex at (0, -0.95).
    """
    a4c = [
        (3, 5, 0, 0, 0.00, 0.08, 0.62, 0.80, 0),
        (4, 5, 0, 0, 0.00, 0.08, 0.62, 0.80, 0),
        (1, 0, 1, 0, 0.24, -0.20, 0.18, 0.42, -4),
        (1, 1, 1, 0, -0.24, -0.12, 0.16, 0.34, 6),
        (1, 2, 2, 1, 0.22, 0.53, 0.18, 0.19, 0),
        (1, 3, 2, 1, -0.24, 0.53, 0.16, 0.18, 0),
        (2, 0, 1, 0, 0.24, -0.20, 0.18, 0.42, -4),
        (2, 1, 1, 0, -0.24, -0.12, 0.16, 0.34, 6),
        (2, 2, 2, 1, 0.22, 0.53, 0.18, 0.19, 0),
        (2, 3, 2, 1, -0.24, 0.53, 0.16, 0.18, 0),
        (6, 5, 3, 1, 0.22, 0.27, 0.15, 0.02, 0),
        (6, 5, 3, 1, -0.22, 0.29, 0.13, 0.02, 0),
    ]
    a2c = [
        (3, 5, 0, 0, 0.02, 0.08, 0.45, 0.80, 0),
        (4, 5, 0, 0, 0.02, 0.08, 0.45, 0.80, 0),
        (1, 0, 1, 0, 0.02, -0.20, 0.22, 0.44, 0),
        (1, 2, 2, 1, 0.02, 0.54, 0.20, 0.20, 0),
        (2, 0, 1, 0, 0.02, -0.20, 0.22, 0.44, 0),
        (2, 2, 2, 1, 0.02, 0.54, 0.20, 0.20, 0),
        (6, 5, 3, 1, 0.02, 0.28, 0.17, 0.02, 0),
    ]
    a3c = [
        (3, 5, 0, 0, 0.05, 0.08, 0.52, 0.80, 0),
        (4, 5, 0, 0, 0.05, 0.08, 0.52, 0.80, 0),
        (1, 0, 1, 0, -0.05, -0.20, 0.21, 0.44, 3),
        (1, 2, 2, 1, -0.12, 0.55, 0.18, 0.18, 0),
        (1, 4, 5, 1, 0.24, 0.38, 0.10, 0.28, -35),
        (2, 0, 1, 0, -0.05, -0.20, 0.21, 0.44, 3),
        (2, 2, 2, 1, -0.12, 0.55, 0.18, 0.18, 0),
        (2, 4, 5, 1, 0.24, 0.38, 0.10, 0.28, -35),
        (6, 5, 3, 1, -0.08, 0.29, 0.14, 0.02, 0),
        (6, 5, 4, 1, 0.14, 0.20, 0.07, 0.02, -35),
    ]
    plax = [
        (3, 5, 0, 0, 0.00, 0.05, 0.95, 0.58, 0),
        (4, 5, 0, 0, 0.00, 0.05, 0.95, 0.58, 0),
        (1, 1, 1, 0, -0.05, -0.40, 0.45, 0.12, 0),
        (1, 0, 1, 0, -0.22, 0.02, 0.55, 0.19, 0),
        (1, 4, 5, 0, 0.48, -0.10, 0.30, 0.12, 0),
        (1, 2, 2, 0, 0.46, 0.36, 0.24, 0.19, 0),
        (2, 1, 1, 0, -0.05, -0.40, 0.45, 0.12, 0),
        (2, 0, 1, 0, -0.22, 0.02, 0.55, 0.19, 0),
        (2, 4, 5, 0, 0.48, -0.10, 0.30, 0.12, 0),
        (2, 2, 2, 0, 0.46, 0.36, 0.24, 0.19, 0),
        (6, 5, 3, 0, 0.27, 0.18, 0.14, 0.02, 60),
        (6, 5, 4, 0, 0.24, -0.10, 0.10, 0.02, 90),
    ]
    psax = [
        (3, 5, 0, 0, 0.00, 0.08, 0.66, 0.58, 0),
        (4, 5, 0, 0, 0.00, 0.08, 0.66, 0.58, 0),
        (1, 1, 1, 0, -0.14, -0.10, 0.52, 0.30, 25),
        (2, 1, 1, 0, -0.14, -0.10, 0.52, 0.30, 25),
        (1, 0, 1, 0, 0.06, 0.12, 0.27, 0.27, 0),  # wider than the cavity: thick walls
        (2, 0, 1, 0, 0.06, 0.12, 0.24, 0.24, 0),
        (5, 0, 1, 0, -0.05, 0.24, 0.06, 0.06, 0),
        (5, 0, 1, 0, 0.18, 0.25, 0.06, 0.06, 0),
    ]
    return {"A2C": a2c, "A3C": a3c, "A4C": a4c, "PLAX": plax, "PSAX": psax}


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of [..., H, W] with reflect padding.

    Shifted sums, since single-channel conv2d over thousands of images is slow on CPU.
    """
    if sigma <= 0.05:
        return x
    r = max(1, math.ceil(2.5 * sigma))
    w = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float32) / sigma) ** 2)
    w = (w / w.sum()).tolist()
    shape = x.shape
    x = x.reshape(-1, 1, *shape[-2:])
    h, wd = shape[-2:]
    xp = F.pad(x, (r, r, 0, 0), mode="reflect")
    x = sum(wk * xp[..., k : k + wd] for k, wk in enumerate(w))
    xp = F.pad(x, (0, 0, r, r), mode="reflect")
    x = sum(wk * xp[..., k : k + h, :] for k, wk in enumerate(w))
    return x.reshape(shape)


def _speckle(noise: torch.Tensor, sigma: float) -> torch.Tensor:
    """[B, F, R, R] Rayleigh envelope (mean 1) from complex noise [B, F, 2, R, R].

    The noise is taken as white in the Fourier domain (the FFT of white noise is white
    noise), so a Gaussian transfer function and one inverse FFT blur it. Lateral grain
    is 1.6x the axial, as on real scanners.
    """
    res = noise.shape[-1]
    f = torch.fft.fftfreq(res)
    transfer = torch.exp(
        -2 * math.pi**2 * sigma**2 * (f[:, None] ** 2 + 1.6**2 * f[None, :] ** 2)
    )
    spectrum = torch.complex(noise[:, :, 0], noise[:, :, 1]) * transfer
    envelope = torch.fft.ifft2(spectrum).abs()
    # mean of a Rayleigh envelope: sqrt(pi)/2 * rms, rms known from the transfer
    rms = float((transfer**2).mean().sqrt()) * math.sqrt(2) / res
    return envelope / (rms * math.sqrt(math.pi) / 2)


def _device_params(devices: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Per-device settings: each property spread evenly over its range, shuffled.

    Spreading (rather than drawing) guarantees devices differ on every property;
    independent shuffles keep the properties from moving together.
    """
    ranges = {
        "gain": (0.8, 1.3),
        "gamma": (0.6, 1.0),  # display compression: lower is flatter
        "half_angle": (32.0, 45.0),  # sector half-angle, degrees
        "speckle_sigma": (0.6, 1.3),  # speckle grain (axial), display pixels
        "speckle_strength": (0.8, 1.0),
        "resolution": (0.55, 1.0),  # render size / image size
        "attenuation": (0.15, 0.6),  # per unit depth, after imperfect TGC
        "noise": (0.01, 0.06),  # additive electronic noise
    }
    spread = np.linspace(0.0, 1.0, devices) if devices > 1 else np.array([0.5])
    return {
        k: lo + (hi - lo) * spread[rng.permutation(devices)]
        for k, (lo, hi) in ranges.items()
    }


def make_echo_synth(
    *,
    patients: int = 60,
    devices: int = 3,
    cines_per_view: int = 1,
    frames: int = 8,
    image_size: int = 64,
    seed: int = 0,
    cohort: int = 0,
) -> ImageData:
    """Procedural echo cines of the five `ECHO_VIEWS`, fully determined by `seed`.

    `patients` per device (ids unique across devices: device d holds patients
    d*patients .. (d+1)*patients-1), each with `cines_per_view` cines of every view.
    Rows are ordered device, patient, view, cine. mean/std come from the render.
    `cohort` k >= 1 draws other patients, seen on the same `seed`'s devices (a
    validation cohort); cohort 0 is the study's own.
    """
    if min(patients, devices, cines_per_view, frames) < 1 or image_size < 8:
        raise ValueError(
            "need patients, devices, cines_per_view, frames >= 1 and image_size >= 8; "
            f"got {patients}, {devices}, {cines_per_view}, {frames}, {image_size}"
        )
    rng = np.random.default_rng(seed)
    patient_seed = int(rng.integers(2**62))
    dev = _device_params(devices, rng)  # after the draw above: cohorts share devices
    if cohort:
        patient_seed = int(np.random.default_rng([seed, cohort]).integers(2**62))
    gen = torch.Generator().manual_seed(patient_seed)
    views = len(ECHO_VIEWS)
    per_device = patients * views * cines_per_view
    n = devices * per_device
    labels = (
        torch.arange(views).repeat_interleave(cines_per_view).repeat(devices * patients)
    )
    patient_ids = torch.arange(devices * patients).repeat_interleave(
        views * cines_per_view
    )
    device_ids = torch.arange(devices).repeat_interleave(per_device)
    out = torch.empty(n, frames, 1, image_size, image_size, dtype=torch.uint8)
    for d in range(devices):
        rows = slice(d * per_device, (d + 1) * per_device)
        out[rows, :, 0] = _render(
            labels[rows],
            patient_ids[rows] - d * patients,
            patients,
            {k: float(v[d]) for k, v in dev.items()},
            frames,
            image_size,
            gen,
        )
    mean, std = pixel_mean_std(out)
    return ImageData(
        frames=out,
        labels=labels,
        patients=patient_ids,
        devices=device_ids,
        mean=mean,
        std=std,
        class_names=list(ECHO_VIEWS),
    )


def _uniform(gen: torch.Generator, shape, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(shape, generator=gen)


def _draw_anatomy(
    patient: torch.Tensor, patients: int, frames: int, gen: torch.Generator
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per-cine anatomy and pose ({name: [B] or [B, 6]}) and contraction c [B, F].

    Patient draws are shared by all of a patient's cines; the probe placement of each
    cine adds its own jitter.
    """
    b = patient.shape[0]

    def per_patient(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return _uniform(gen, (patients, *shape), lo, hi)[patient]

    def per_cine(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return _uniform(gen, (b, *shape), lo, hi)

    q = {
        "scale": per_patient(0.85, 1.15) * per_cine(0.95, 1.05),
        "rot": torch.deg2rad(per_patient(-12.0, 12.0) + per_cine(-6.0, 6.0)),
        "dx": per_patient(-0.10, 0.10) + per_cine(-0.05, 0.05),
        "dy": per_patient(-0.08, 0.08) + per_cine(-0.05, 0.05),
        "wall": per_patient(0.06, 0.11),
        "size_a": per_patient(0.88, 1.12, 6) * per_cine(0.85, 1.1, 6),
        "size_b": per_patient(0.88, 1.12, 6) * per_cine(0.85, 1.1, 6),
        "contract": per_patient(0.2, 0.4),
        "wall_echo": per_patient(0.45, 0.70),
        "tissue_echo": per_patient(0.12, 0.22),
        "blood_echo": per_patient(0.01, 0.06),
    }
    # off-axis cuts: a chamber the plane only grazes looks small (a foreshortened RV
    # makes an A4C look like an A2C, a missed outflow tract an A3C like an A2C); not
    # the LV, which the sonographer always centres, nor the pericardium
    grazed = torch.rand(b, 6, generator=gen) < 0.25
    grazed[:, 0] = grazed[:, 5] = False
    cut = torch.where(grazed, per_cine(0.3, 0.7, 6), torch.ones(b, 6))
    q["size_a"], q["size_b"] = q["size_a"] * cut, q["size_b"] * cut
    # poor acoustic windows: walls fade into the tissue and blood fills with haze
    window = per_cine(0.45, 1.0)
    tissue = q["tissue_echo"]
    q["wall_echo"] = tissue + (q["wall_echo"] - tissue) * window
    q["blood_echo"] = q["blood_echo"] + 0.6 * (tissue - q["blood_echo"]) * (1 - window)
    cycles = per_patient(0.7, 1.5)  # heartbeats per cine
    phase0 = per_cine(0.0, 2 * math.pi)
    t = torch.arange(frames, dtype=torch.float32) / frames
    # contraction in [0, 1]: 0 at end-diastole, 1 at end-systole
    c = 0.5 * (1 - torch.cos(phase0[:, None] + 2 * math.pi * cycles[:, None] * t))
    return q, c


def _paint(
    layers: list[tuple[float, ...]],
    q: dict[str, torch.Tensor],
    c: torch.Tensor,
    res: int,
) -> torch.Tensor:
    """[n, F, R, R] reflectivity of n cines of one view (painter's algorithm)."""
    n, frames = c.shape
    pivot_x, pivot_y = 0.0, 0.08  # the heart rotates and scales about this point
    coords = (torch.arange(res, dtype=torch.float32) + 0.5) / res * 2 - 1
    xs, ys = coords.view(1, 1, 1, res), coords.view(1, 1, res, 1)
    img = q["tissue_echo"].view(n, 1, 1, 1).expand(n, frames, res, res).clone()
    shrink = q["contract"][:, None] * c  # [n, F]
    scale, cos_r, sin_r = q["scale"][:, None], q["rot"].cos(), q["rot"].sin()
    wall = q["wall"][:, None]
    values = {
        1: q["wall_echo"],
        2: q["blood_echo"],
        3: (1.1 * q["wall_echo"]).clamp(max=1.0),
        4: 1.2 * q["tissue_echo"],
        5: q["wall_echo"],
        6: torch.full((n,), 0.8),
    }
    edge = 1.4 / res  # soft edge: about 0.7 render pixels
    for kind, chamber, motion, base, cx0, cy0, a0, b0, ang0 in layers:
        ch = int(chamber)
        a = a0 * q["size_a"][:, ch : ch + 1] * torch.ones_like(shrink)
        b = b0 * q["size_b"][:, ch : ch + 1] * torch.ones_like(shrink)
        if motion == 1:  # ventricles shorten across more than along
            a, b = a * (1 - shrink), b * (1 - 0.5 * shrink)
        elif motion == 2:  # atria fill while the ventricles contract
            a, b = a * (1 + 0.5 * shrink), b * (1 + 0.5 * shrink)
        elif motion == 5:
            a = a * (1 + 0.3 * shrink)
        if kind == 1:  # walls thicken in systole
            grow = wall * (1 + 0.6 * shrink)
            a, b = a + grow, b + grow
        elif kind == 3:
            a, b = a + 0.5 * wall, b + 0.5 * wall
        a, b = a * scale, b * scale
        # the valve plane descends towards the apex in systole
        ux = cx0 - pivot_x
        uy = cy0 - 0.2 * base * shrink - pivot_y
        ccx = pivot_x + scale * (cos_r[:, None] * ux - sin_r[:, None] * uy)
        ccy = pivot_y + scale * (sin_r[:, None] * ux + cos_r[:, None] * uy)
        ccx, ccy = ccx + q["dx"][:, None], ccy + q["dy"][:, None]
        th = q["rot"] + math.radians(ang0)
        ct, st = th.cos()[:, None], th.sin()[:, None]
        ia, ib = 1 / a**2, 1 / b**2
        ca, cb, cc = (
            ct**2 * ia + st**2 * ib,
            st**2 * ia + ct**2 * ib,
            2 * ct * st * (ia - ib),
        )
        # the mask is a linear ramp across the boundary: clamp(k + 1/2 - k q^2) with
        # q^2 = u^2/a^2 + v^2/b^2 = cb py^2 + ca px^2 + cc px py, a sum of row (py) and
        # column (px) terms plus one outer product: two full-size operations per layer
        k = (torch.minimum(a, b) / (2 * edge))[..., None, None]
        px = xs - ccx[..., None, None]  # [n, F, 1, R] column offsets
        py = ys - ccy[..., None, None]  # [n, F, R, 1] row offsets
        row = k * (1 - cb[..., None, None] * py**2) + 0.5  # [n, F, R, 1]
        col = -k * ca[..., None, None] * px**2  # [n, F, 1, R]
        m = torch.addcmul(row + col, -k * cc[..., None, None] * py, px).clamp_(0, 1)
        if motion == 3:  # AV valves show when closed (systole)
            m = m * (c**2)[..., None, None]
        elif motion == 4:  # the aortic valve shows when closed (diastole)
            m = m * ((1 - c) ** 2)[..., None, None]
        img.lerp_(values[int(kind)].view(n, 1, 1, 1).expand_as(img), m)
    return img


def _render(
    view: torch.Tensor,
    patient: torch.Tensor,
    patients: int,
    dev: dict[str, float],
    frames: int,
    image_size: int,
    gen: torch.Generator,
) -> torch.Tensor:
    """uint8 [B, frames, image_size, image_size] cines of one device."""
    b = view.shape[0]
    res = max(8, round(image_size * dev["resolution"]))
    q, c = _draw_anatomy(patient, patients, frames, gen)
    # every random draw happens here, up front, so the stream order is fixed
    acq = {
        "field": torch.rand(b, 1, 5, 5, generator=gen),
        "shadow_on": (torch.rand(b, generator=gen) < 0.3).float(),
        "shadow_at": _uniform(gen, b, -0.6, 0.6),
        "shadow_w": _uniform(gen, b, 0.05, 0.15),
        # complex speckle noise: a part fixed to the cine (speckle sticks to tissue)
        # plus a part that decorrelates from frame to frame
        "speckle": 0.85 * torch.randn(b, 1, 2, res, res, generator=gen)
        + 0.5 * torch.randn(b, frames, 2, res, res, generator=gen),
        "noise": torch.randn(b, frames, res, res, generator=gen).abs(),
    }
    layers = _view_layers()
    out = torch.empty(b, frames, image_size, image_size, dtype=torch.uint8)
    for v, name in enumerate(ECHO_VIEWS):
        # small chunks keep the per-layer temporaries in cache, which matters more
        # than vectorising wider on a memory-bound CPU
        for idx in (view == v).nonzero()[:, 0].split(64):
            img = _paint(layers[name], {k: t[idx] for k, t in q.items()}, c[idx], res)
            chunk = {k: t[idx] for k, t in acq.items()}
            out[idx] = _acquire(img, chunk, dev, image_size)
    return out


def _acquire(
    img: torch.Tensor, acq: dict[str, torch.Tensor], dev: dict[str, float], size: int
) -> torch.Tensor:
    """Reflectivity [n, F, R, R] -> uint8 B-mode frames [n, F, size, size]."""
    n, frames, res, _ = img.shape
    apex_y = -0.95
    coords = (torch.arange(res, dtype=torch.float32) + 0.5) / res * 2 - 1
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    depth = torch.sqrt(xx**2 + (yy - apex_y) ** 2)
    theta = torch.atan2(xx, yy - apex_y)  # 0 straight down from the apex
    # smooth echogenicity field: dropout and patchy gain, fixed over the cine
    field = F.interpolate(acq["field"], size=(res, res), mode="bicubic")
    gain = 0.55 + 0.9 * field.clamp(0, 1)  # [n, 1, R, R]
    # rib shadow in some cines: a dark wedge from the apex
    off = (theta - acq["shadow_at"][:, None, None]).abs()
    wedge = torch.sigmoid((acq["shadow_w"][:, None, None] - off) / 0.02)
    gain = gain * (1 - 0.7 * acq["shadow_on"][:, None, None, None] * wedge[:, None])
    # near-field clutter, then the depth attenuation left after time-gain control
    img = (img * gain + 0.25 * torch.exp(-depth / 0.12)) * torch.exp(
        -dev["attenuation"] * depth
    )
    # speckle grain is set in display pixels, so rescale it to the render grid
    speckle = _speckle(acq["speckle"], dev["speckle_sigma"] * res / size)
    k = dev["speckle_strength"]
    img = img * (1 - k + k * speckle) + dev["noise"] * acq["noise"]
    img = (dev["gain"] * img).clamp(0, 1) ** dev["gamma"]
    img = _blur(img, 0.5)
    if res != size:
        img = F.interpolate(
            img.reshape(n * frames, 1, res, res), size=(size, size), mode="bilinear"
        ).reshape(n, frames, size, size)
    # the sector's edges are sharp on screen, so cut it at display resolution
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    depth = torch.sqrt(xx**2 + (yy - apex_y) ** 2)
    theta = torch.atan2(xx, yy - apex_y)
    half = math.radians(dev["half_angle"])
    fan = torch.sigmoid((1.88 - depth) * size) * torch.sigmoid(
        (half - theta.abs()) * depth * size
    )
    return (img * fan * 255).round_().clamp_(0, 255).to(torch.uint8)
