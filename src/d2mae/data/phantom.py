"""Synthetic breast-ultrasound phantoms: the embedded data set of the demo and the tests.

Each image is simulated the way a B-mode scanner forms it, vectorised over a batch of images with numpy:

1. **Tissue** (echogenicity = mean backscatter power, and attenuation) on the scanner's beam grid (axial samples ×
   scan lines): bright skin, hypo-echoic subcutaneous fat, a wavy brighter fibroglandular layer, Cooper's
   ligaments (thin bright curves), striated pectoral muscle at depth, and a smooth random texture.
2. **A hypo-echoic lesion** of one of two kinds (the label). *Benign-like*: smooth oval, wider than tall,
   circumscribed, homogeneous, low attenuation → posterior acoustic enhancement. *Malignant-like*: irregular and
   spiculated margin, taller than wide, heterogeneous with an echogenic halo and sometimes microcalcifications,
   high attenuation → posterior acoustic shadowing. The cues overlap between classes (a share of benign lesions
   shows no enhancement, a share of malignant ones no shadow), so the task is learnable but not trivial.
3. **Scatterers → RF → envelope**: random Gaussian scatterers scaled by √echogenicity and by the round-trip
   attenuation accumulated along each beam, plus electronic noise, convolved with a point-spread function that is
   Gaussian laterally and a Gaussian-modulated cosine axially; the envelope is the magnitude of the analytic signal
   (the Hilbert transform, taken in the same FFT as the convolution). This yields fully developed speckle.
4. **Time-gain compensation** (which over- or under-compensates the tissue attenuation slightly), **log
   compression** to the scanner's dynamic range and gain, **scan conversion** for linear (rectangular) and convex
   (sector / fan) probes, and the scanner's own display smoothing.

Several simulated **scanners** (:data:`SCANNERS`) differ in PSF width (blurriness), gain, dynamic range, noise and
geometry: the domain shift that the paper's optimal blurriness search (OBS) adapts to. Everything is deterministic
given the seed. ``generate_phantoms`` writes 8-bit grayscale PNGs and ``labels.csv`` (``path,label,scanner,group``;
the group is the simulated patient, whose 1-``max_views`` images share label, scanner and lesion).

Command line: ``d2mae phantoms --out DIR --n N --size PX --seed S``.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image
from scipy import fft as sfft
from scipy import ndimage

from d2mae.runtime.errors import D2maeError
from d2mae.runtime.files import atomic_write_bytes, atomic_write_text
from d2mae.runtime.locks import output_lock
from d2mae.runtime.options import check_fields, save_config
from d2mae.runtime.outputs import claim_folder

CLASSES = ("benign", "malignant")
AXIAL_OVERSAMPLE = 3     # RF samples per output pixel along the beam (room for the carrier)
CARRIER = 0.2            # centre frequency of the pulse, cycles per RF sample
ATTENUATION_DB = 30.0    # round-trip tissue attenuation over the full imaging depth, dB
SECTOR_R0 = 0.5          # convex probe: radius of the probe face, in units of the imaging depth
SECTOR_HALF_ANGLE = 0.35  # convex probe: half the fan's opening angle, radians (~20°)
REFERENCE_SIZE = 128     # PSF widths below are pixels of a 128-px image; they scale with sqrt(size / 128)


@dataclass(frozen=True)
class Scanner:
    """One simulated ultrasound system. Widths are Gaussian σ in pixels at :data:`REFERENCE_SIZE`."""

    name: str
    geometry: str           # "linear" or "sector"
    psf_lateral: float      # lateral PSF σ (beam width)
    psf_axial: float        # axial PSF σ of the pulse envelope
    gain_db: float          # display gain
    dynamic_range_db: float  # log-compression range mapped to [0, 1]
    noise_db: float         # electronic noise, relative to glandular tissue at the skin
    post_blur: float        # display smoothing σ after scan conversion
    tgc_match: float        # TGC slope / true attenuation slope (1 = perfect compensation)


SCANNERS: dict[str, Scanner] = {s.name: s for s in (
    Scanner("A", "linear", psf_lateral=0.6, psf_axial=0.4, gain_db=0.0, dynamic_range_db=44.0, noise_db=-42.0,
            post_blur=0.0, tgc_match=1.0),
    Scanner("B", "linear", psf_lateral=1.4, psf_axial=0.8, gain_db=-1.0, dynamic_range_db=48.0, noise_db=-36.0,
            post_blur=0.45, tgc_match=0.92),
    Scanner("C", "linear", psf_lateral=2.2, psf_axial=1.2, gain_db=-3.0, dynamic_range_db=52.0, noise_db=-32.0,
            post_blur=0.8, tgc_match=1.06),
    Scanner("D", "sector", psf_lateral=1.7, psf_axial=1.0, gain_db=0.0, dynamic_range_db=46.0, noise_db=-34.0,
            post_blur=0.6, tgc_match=0.95),
)}


@dataclass
class PhantomConfig:
    """Options of ``d2mae phantoms`` (and of :func:`generate_phantoms`)."""

    out: str = field(default="phantoms", metadata={"help": "output folder (images/ and labels.csv go here)"})
    n: int = field(default=200, metadata={"help": "number of images", "min": 1})
    size: int = field(default=96, metadata={"help": "image side in pixels (square)", "min": 16, "max": 1024})
    seed: int = field(default=0, metadata={"help": "random seed; the same seed gives the same images", "min": 0})
    malignant_fraction: float = field(default=0.4, metadata={
        "advanced": True, "help": "share of patients with a malignant lesion", "min": 0.0, "max": 1.0})
    scanners: list[str] = field(default_factory=lambda: list(SCANNERS), metadata={"advanced": True, 
        "help": f"simulated scanners to use ({', '.join(SCANNERS)})"})
    scanner_weights: list[float] | None = field(default=None, metadata={"advanced": True, 
        "help": "relative share of each scanner, in the order of --scanners; unset: equal shares", "min": 0.0})
    max_views: int = field(default=2, metadata={
        "advanced": True, "help": "images per simulated patient: 1 to this many", "min": 1})
    masks: bool = field(default=False, metadata={
        "help": "also write each lesion's mask (masks/, 0/255 PNGs named like the images; a mask column in "
                "labels.csv) for d2mae segment"})
    force: bool = field(default=False, metadata={
        "help": "replace an earlier output of this command in --out (or write beside other files there)"})

    def __post_init__(self) -> None:
        check_fields(self)
        unknown = [s for s in self.scanners if s not in SCANNERS]
        if unknown or not self.scanners:
            raise D2maeError(f"unknown scanner(s) {', '.join(unknown) or '(none given)'}; "
                             f"choose from {', '.join(SCANNERS)}", option="scanners")
        if self.scanner_weights is not None:
            if len(self.scanner_weights) != len(self.scanners):
                raise D2maeError(f"needs one weight per scanner ({len(self.scanners)}), "
                                 f"got {len(self.scanner_weights)}", option="scanner_weights")
            if sum(self.scanner_weights) <= 0:
                raise D2maeError("must not be all 0", option="scanner_weights")


# ---------------------------------------------------------------------------------------------------------------
# per-patient and per-image parameters
# ---------------------------------------------------------------------------------------------------------------

def _plan(cfg: PhantomConfig) -> list[dict[str, Any]]:
    """Patients and their views: one dict of scalar parameters per image (label, scanner, tissue, lesion)."""
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 1]))
    views: list[int] = []
    while sum(views) < cfg.n:
        views.append(int(rng.integers(1, cfg.max_views + 1)))
    views[-1] -= sum(views) - cfg.n
    n_pat = len(views)
    n_mal = int(round(cfg.malignant_fraction * n_pat))
    labels = rng.permutation(np.r_[np.ones(n_mal, int), np.zeros(n_pat - n_mal, int)])
    weights = np.asarray(cfg.scanner_weights if cfg.scanner_weights is not None else [1.0] * len(cfg.scanners))
    scanners = rng.choice(len(cfg.scanners), size=n_pat, p=weights / weights.sum())
    width = len(str(n_pat - 1))
    images: list[dict[str, Any]] = []
    for p in range(n_pat):
        mal = bool(labels[p])
        u = rng.uniform
        patient = {
            "label": int(mal), "scanner": cfg.scanners[scanners[p]], "group": f"patient_{p:0{width}d}",
            # tissue
            "skin": u(0.02, 0.04), "gland_top": u(0.12, 0.3), "gland_thick": u(0.25, 0.45),
            "muscle_top": u(0.8, 0.95), "fat_e": u(0.06, 0.15), "gland_e": u(0.7, 1.3), "muscle_e": u(0.15, 0.35),
            # lesion: size (semi-axes as a fraction of depth), aspect, margin, echo level, attenuation
            "radius": u(0.07, 0.15),
        }
        if mal:
            patient.update(
                aspect=u(0.85, 1.6),                              # height / width: mostly taller than wide
                lobes=u(0.06, 0.14), spikes=int(rng.integers(3, 9)), spike_amp=u(0.25, 0.7),
                edge=u(0.05, 0.1), lesion_e=u(0.004, 0.02), hetero=u(0.6, 1.2),
                halo=u(0.4, 1.2) if u() < 0.7 else 0.0,
                calcs=int(rng.integers(2, 7)) if u() < 0.5 else 0,
                attenuation=u(2.5, 5.0) if u() < 0.8 else u(0.9, 1.5))  # posterior shadow (80%)
        else:
            patient.update(
                aspect=u(0.4, 0.85),                              # wider than tall
                lobes=u(0.0, 0.05), spikes=0, spike_amp=0.0,
                edge=u(0.015, 0.035), lesion_e=u(0.001, 0.008), hetero=u(0.0, 0.3),
                halo=0.0, calcs=0,
                attenuation=u(0.0, 0.4) if u() < 0.75 else u(0.8, 1.3))  # posterior enhancement (75%)
        for v in range(views[p]):  # each view: the same lesion seen from a slightly different place and angle
            image = dict(patient)
            depth = patient["gland_top"] + patient["gland_thick"] * u(0.3, 0.8)
            size = patient["radius"] * u(0.9, 1.1)
            image.update(view=v, seed=int(rng.integers(0, 2**63 - 1)),
                         lesion_x=u(-0.18, 0.18), lesion_z=float(np.clip(depth, 0.25, 0.6)),
                         lesion_a=size / math.sqrt(patient["aspect"]),    # lateral semi-axis
                         lesion_b=size * math.sqrt(patient["aspect"]),    # vertical semi-axis
                         lesion_angle=u(-0.25, 0.25))
            images.append(image)
    return images


# ---------------------------------------------------------------------------------------------------------------
# the simulation, vectorised over a chunk of images
# ---------------------------------------------------------------------------------------------------------------

def _sig(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _beam_coordinates(sector: np.ndarray, na: int, nl: int) -> tuple[np.ndarray, ...]:
    """Cartesian position of every RF sample [B, Na, Nl]: lateral X, depth Z, depth along the beam D, lateral U."""
    d = ((np.arange(na) + 0.5) / na)[None, :, None]                       # [1, Na, 1] depth along the beam
    lin_x = (-0.5 + (np.arange(nl) + 0.5) / nl)[None, None, :]            # [1, 1, Nl]
    theta = (-SECTOR_HALF_ANGLE + (np.arange(nl) + 0.5) / nl * 2 * SECTOR_HALF_ANGLE)[None, None, :]
    r = SECTOR_R0 + d
    s = sector[:, None, None]
    x = np.where(s, r * np.sin(theta), lin_x)                             # [B, Na, Nl]
    z = np.where(s, r * np.cos(theta) - SECTOR_R0, d)
    dd = np.broadcast_to(d, x.shape)
    u = np.where(s, theta * (SECTOR_R0 + 0.5), lin_x)
    return x, z, dd, u


def _frame(geometry: str) -> tuple[float, float, float]:
    """The displayed square in Cartesian units (imaging depth = 1): (left x, top z, side)."""
    if geometry == "linear":
        return -0.5, 0.0, 1.0
    z_top = SECTOR_R0 * math.cos(SECTOR_HALF_ANGLE) - SECTOR_R0   # the fan's top corners lie above the skin centre
    side = max(2 * (SECTOR_R0 + 1) * math.sin(SECTOR_HALF_ANGLE), 1.0 - z_top)
    return -side / 2, z_top, side


def lesion_box(meta: dict[str, Any], size: int) -> tuple[float, float, float, float]:
    """The lesion's ellipse bounding box in output pixels (x0, y0, x1, y1), ignoring lobes, spicules and tilt.

    ``meta`` is one dict of :func:`render_phantoms`; useful for figures and for checking posterior features.
    """
    left, top, side = _frame(SCANNERS[meta["scanner"]].geometry)
    to_px = size / side
    cx, cz = (meta["lesion_x"] - left) * to_px, (meta["lesion_z"] - top) * to_px
    a, b = meta["lesion_a"] * to_px, meta["lesion_b"] * to_px
    return cx - a, cz - b, cx + a, cz + b


def _output_coordinates(sector: np.ndarray, size: int, na: int, nl: int) -> np.ndarray:
    """For each output pixel, where to read the beam grid: [3, B, H, W] (image, axial, lateral indices)."""
    b = sector.shape[0]
    grid = (np.arange(size) + 0.5) / size
    # linear probe: the frame is the beam grid itself
    lin_i = np.broadcast_to(grid[:, None] * na - 0.5, (size, size))
    lin_j = np.broadcast_to(grid[None, :] * nl - 0.5, (size, size))
    # convex probe: a square frame around the fan, apex above the skin
    left, z_top, side = _frame("sector")
    xs = left + grid[None, :] * side
    zs = z_top + grid[:, None] * side
    r = np.sqrt(xs ** 2 + (zs + SECTOR_R0) ** 2)
    theta = np.arctan2(xs, zs + SECTOR_R0)
    sec_i = (r - SECTOR_R0) * na - 0.5
    sec_j = (theta + SECTOR_HALF_ANGLE) / (2 * SECTOR_HALF_ANGLE) * nl - 0.5
    s = sector[:, None, None]
    coords = np.empty((3, b, size, size))
    coords[0] = np.arange(b)[:, None, None]
    coords[1] = np.where(s, sec_i, lin_i)
    coords[2] = np.where(s, sec_j, lin_j)
    return coords


def _texture(rng: np.random.Generator, u: np.ndarray, d: np.ndarray, k: int = 6,
             freq: tuple[float, float] = (1.5, 5.0)) -> np.ndarray:
    """A smooth random field, zero mean and unit variance: a sum of ``k`` random plane cosines.

    ``u`` [1, Nl] and ``d`` [Na, 1] are the lateral and depth coordinates of the beam grid, so each plane wave is
    an outer product, cos(a·u + b·d + φ) = cos(a·u)·cos(b·d + φ) − sin(a·u)·sin(b·d + φ): cheap on big grids.
    """
    f = rng.uniform(*freq, size=k)
    ang = rng.uniform(0, 2 * np.pi, size=k)
    ph = rng.uniform(0, 2 * np.pi, size=k)
    out = np.zeros((d.shape[0], u.shape[1]))
    for i in range(k):
        a = 2 * np.pi * f[i] * np.cos(ang[i]) * u
        b = 2 * np.pi * f[i] * np.sin(ang[i]) * d + ph[i]
        out += np.cos(a) * np.cos(b) - np.sin(a) * np.sin(b)
    return out * math.sqrt(2.0 / k)


def _tissue(p: dict[str, Any], rng: np.random.Generator, x: np.ndarray, z: np.ndarray, d: np.ndarray,
            u: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Echogenicity (mean backscatter power, gland ≈ 1), relative attenuation and the lesion's soft indicator
    (1 inside, 0 outside, a sigmoid across the margin) of one image, [Na, Nl] each.

    Args:
        x, z: Cartesian lateral / depth position of each RF sample [Na, Nl] (used for the lesion).
        d: depth along the beam [Na, 1]; u: lateral position along the probe face [1, Nl] (used for the layers,
            which follow a convex probe's curvature as they do on real scans).
    """
    w = 0.012

    def wave(amp: float, freq: float) -> np.ndarray:  # [1, Nl] a wavy boundary
        return amp * np.sin(2 * np.pi * (freq * u + rng.uniform()))

    top = p["gland_top"] + wave(rng.uniform(0.01, 0.05), rng.uniform(0.5, 2.0))
    bottom = top + p["gland_thick"] + wave(rng.uniform(0.02, 0.08), rng.uniform(0.7, 2.5))
    bottom = np.minimum(bottom, p["muscle_top"] - 0.03)
    muscle = p["muscle_top"] + wave(rng.uniform(0.005, 0.03), rng.uniform(0.3, 1.0))
    m_gland = _sig((d - top) / w) * _sig((bottom - d) / w)                 # [Na, Nl]
    m_muscle = _sig((d - muscle) / w)
    m_skin = _sig((p["skin"] - d) / 0.004)                                  # [Na, 1]
    lobules = _sig(3.0 * _texture(rng, u, d, freq=(4.0, 10.0)))             # fat lobules inside the gland
    e = p["fat_e"] * (0.6 + 0.8 * _sig(2.0 * _texture(rng, u, d, freq=(3.0, 8.0))))
    e = e + (p["gland_e"] * (0.3 + 0.7 * lobules) - e) * m_gland
    slope = rng.uniform(-0.15, 0.15)
    stripes = 0.6 + 0.6 * np.sin(2 * np.pi * rng.uniform(12, 20) * (d + slope * u)) ** 2
    e = e * (1 - m_muscle) + p["muscle_e"] * stripes * m_muscle
    for _ in range(int(rng.integers(2, 6))):                                # Cooper's ligaments: short bright arcs
        line = rng.uniform(0.06, p["muscle_top"] - 0.1) + rng.uniform(-0.3, 0.3) * u + wave(
            rng.uniform(0.01, 0.05), rng.uniform(0.5, 2.0))
        reach = np.exp(-0.5 * ((u - rng.uniform(-0.5, 0.5)) / rng.uniform(0.1, 0.35)) ** 2)
        e = e + rng.uniform(1.0, 3.0) * reach * np.exp(-0.5 * ((d - line) / 0.005) ** 2) * (1 - m_muscle)
    e = e * (1 - m_skin) + 2.5 * m_skin
    e = e * np.exp(0.3 * _texture(rng, u, d))

    # the lesion, in Cartesian coordinates (its shape does not follow a convex probe's fan)
    cx, cz, a, b, psi = p["lesion_x"], p["lesion_z"], p["lesion_a"], p["lesion_b"], p["lesion_angle"]
    dx, dz = x - cx, z - cz
    uu = (math.cos(psi) * dx + math.sin(psi) * dz) / a
    vv = (-math.sin(psi) * dx + math.cos(psi) * dz) / b
    rho = np.sqrt(uu ** 2 + vv ** 2)
    unit = (uu + 1j * vv) / np.maximum(rho, 1e-9)                          # e^{iφ}
    radius = np.ones_like(rho)
    power = unit
    for k in range(2, 9 if p["spikes"] else 4):                            # lobulation: cos(kφ + c) = Re(e^{ikφ}e^{ic})
        power = power * unit
        amp = p["lobes"] / math.sqrt(k - 1) * rng.uniform(0.5, 1.0)
        radius += amp * (power * np.exp(1j * rng.uniform(0, 2 * np.pi))).real
    phi = np.angle(unit)
    for _ in range(p["spikes"]):                                            # spiculation: narrow angular spikes
        dphi = np.mod(phi - rng.uniform(0, 2 * np.pi) + np.pi, 2 * np.pi) - np.pi
        radius += p["spike_amp"] * rng.uniform(0.5, 1.0) * np.exp(-0.5 * (dphi / rng.uniform(0.04, 0.1)) ** 2)
    inside = _sig((radius - rho) / p["edge"])
    interior = p["lesion_e"] * np.exp(p["hetero"] * _texture(rng, u, d, freq=(8.0, 20.0)))
    e = e * (1 - inside) + interior * inside
    if p["halo"]:                                                           # echogenic halo around the margin
        e = e + p["halo"] * np.exp(-0.5 * ((rho - radius - 0.2) / 0.1) ** 2) * (1 - inside)
    for _ in range(p["calcs"]):                                             # microcalcifications: tiny, bright
        r_c, a_c = 0.6 * math.sqrt(rng.uniform()), rng.uniform(0, 2 * np.pi)
        px = cx + a * r_c * math.cos(a_c)
        pz = cz + b * r_c * math.sin(a_c)
        e = e + 40.0 * np.exp(-0.5 * ((x - px) ** 2 + (z - pz) ** 2) / 0.004 ** 2)
    attenuation = 1.0 + (p["attenuation"] - 1.0) * inside
    return e, attenuation, inside


def _render_chunk(params: list[dict[str, Any]], size: int) -> np.ndarray:
    """Simulate a chunk of images -> uint8 [B, size, size]."""
    b = len(params)
    na, nl = AXIAL_OVERSAMPLE * size, size
    scanners = [SCANNERS[p["scanner"]] for p in params]
    sector = np.array([s.geometry == "sector" for s in scanners])
    rngs = [np.random.default_rng(p["seed"]) for p in params]

    # tissue maps on a grid of one sample per output pixel (the PSF is wider than a pixel), then along each beam
    # the round-trip attenuation accumulated so far: lesions change what lies behind them
    x, z, d, u = _beam_coordinates(sector, size, nl)                      # [B, S, Nl] each
    echo = np.empty((b, size, nl), dtype=np.float32)
    atten = np.empty((b, size, nl), dtype=np.float32)
    for i, p in enumerate(params):
        echo[i], atten[i], _ = _tissue(p, rngs[i], x[i], z[i], d[i, :, :1], u[i, :1, :])
    path_db = ATTENUATION_DB * np.cumsum(atten, axis=1) / size            # [B, S, Nl]
    amplitude = np.repeat(np.sqrt(echo) * 10 ** (-path_db / 20), AXIAL_OVERSAMPLE, axis=1)  # [B, Na, Nl]

    # scatterers (white, real) and electronic noise on the RF grid
    scatter = np.stack([r.standard_normal((na, nl), dtype=np.float32) for r in rngs])  # [B, Na, Nl]
    noise = np.stack([r.standard_normal((na, nl), dtype=np.float32) for r in rngs])
    noise_amp = np.array([10 ** (s.noise_db / 20) for s in scanners], dtype=np.float32)[:, None, None]
    field_ = amplitude * scatter + noise_amp * noise

    # PSF in the frequency domain: Gaussian laterally; axially the pulse g(z)·e^{i2πf₀z}, the analytic form of the
    # Gaussian-modulated cosine g(z)·cos(2πf₀z) (its spectrum is the cosine's positive-frequency lobe). Convolving
    # the real scatterers with it gives the RF's analytic signal, whose magnitude is the envelope (as a Hilbert
    # transform would); the lobe is taken periodic in frequency so that no spectral edge rings along the beam.
    scale = math.sqrt(size / REFERENCE_SIZE)
    sig_ax = np.array([max(0.35, s.psf_axial * scale) * AXIAL_OVERSAMPLE for s in scanners])[:, None, None]
    sig_lat = np.array([max(0.35, s.psf_lateral * scale) for s in scanners])[:, None, None]
    dkz = np.mod(sfft.fftfreq(na) - CARRIER + 0.5, 1.0)[None, :, None] - 0.5  # [1, Na, 1] distance to f₀
    kx = sfft.fftfreq(nl)[None, None, :]
    h_ax = np.exp(-2 * np.pi ** 2 * sig_ax ** 2 * dkz ** 2)              # [B, Na, 1]
    h_lat = np.exp(-2 * np.pi ** 2 * sig_lat ** 2 * kx ** 2)             # [B, 1, Nl]
    # unit power (Parseval): E|envelope|² = echogenicity, whatever the PSF width
    h_ax = h_ax / np.sqrt((h_ax ** 2).mean(axis=1, keepdims=True))
    h_lat = h_lat / np.sqrt((h_lat ** 2).mean(axis=2, keepdims=True))
    spectrum = sfft.fft2(field_, axes=(1, 2), workers=-1)                 # complex64 [B, Na, Nl]
    spectrum *= (h_ax * h_lat).astype(np.float32)
    envelope = np.abs(sfft.ifft2(spectrum, axes=(1, 2), workers=-1, overwrite_x=True))  # [B, Na, Nl]
    d = ((np.arange(na, dtype=np.float32) + 0.5) / na)[None, :, None]     # [1, Na, 1] depth of each RF sample

    # TGC, log compression to the dynamic range, gain
    tgc_db = np.array([s.tgc_match for s in scanners])[:, None, None] * ATTENUATION_DB * d
    level_db = 20 * np.log10(envelope + 1e-9) + tgc_db.astype(np.float32)
    gain = np.array([s.gain_db for s in scanners])[:, None, None]
    dyn = np.array([s.dynamic_range_db for s in scanners])[:, None, None]
    bmode = np.clip((level_db + gain + dyn - 14.0) / dyn, 0.0, 1.0) ** 1.2
    # the receiver's decimation filter: smooth along the beam before taking one sample per pixel
    bmode = ndimage.gaussian_filter1d(bmode, AXIAL_OVERSAMPLE / 2.5, axis=1, mode="nearest")

    # scan conversion (linear: resample the beam grid; convex: polar -> Cartesian, black outside the fan)
    coords = _output_coordinates(sector, size, na, nl)
    image = np.empty((b, size, size), dtype=np.float32)
    for kind, mode in ((sector, "constant"), (~sector, "nearest")):  # fan: black outside; linear: edge rows
        if kind.any():
            sub = coords[:, kind]
            sub[0] = np.arange(int(kind.sum()))[:, None, None]
            image[kind] = ndimage.map_coordinates(bmode[kind], sub, order=1, mode=mode, cval=0.0)
    for i, s in enumerate(scanners):
        if s.post_blur > 0:
            image[i] = ndimage.gaussian_filter(image[i], s.post_blur * scale, mode="nearest")
    return np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)


def render_masks(params: list[dict[str, Any]], size: int) -> np.ndarray:
    """The lesion masks of images ``params`` (one dict of :func:`render_phantoms` each): uint8 [B, S, S], 1 inside.

    The lesion's indicator of :func:`_tissue` (its margin at one half), recomputed from each image's own seed (the
    same draws as the image's, which it is the first to use) and scan-converted as the image is; nothing is blurred
    (the display smoothing does not move the lesion's edge)."""
    b = len(params)
    sector = np.array([SCANNERS[p["scanner"]].geometry == "sector" for p in params])
    x, z, d, u = _beam_coordinates(sector, size, size)  # the tissue grid: one sample per output pixel
    inside = np.empty((b, size, size), dtype=np.float32)
    for i, p in enumerate(params):
        _, _, inside[i] = _tissue(p, np.random.default_rng(p["seed"]), x[i], z[i], d[i, :, :1], u[i, :1, :])
    coords = _output_coordinates(sector, size, AXIAL_OVERSAMPLE * size, size)
    coords[1] = (coords[1] + 0.5) / AXIAL_OVERSAMPLE - 0.5  # RF samples → tissue-grid rows
    out = np.empty((b, size, size), dtype=np.float32)
    for kind, mode in ((sector, "constant"), (~sector, "nearest")):
        if kind.any():
            sub = coords[:, kind]
            sub[0] = np.arange(int(kind.sum()))[:, None, None]
            out[kind] = ndimage.map_coordinates(inside[kind], sub, order=1, mode=mode, cval=0.0)
    return (out > 0.5).astype(np.uint8)


def render_phantoms(cfg: PhantomConfig, chunk: int = 32) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Simulate ``cfg.n`` phantoms in memory -> (uint8 images [N, S, S], one metadata dict per image).

    Metadata: ``label`` (0 benign, 1 malignant), ``scanner``, ``group`` (patient) and the simulation parameters,
    among them the lesion's centre ``lesion_x``/``lesion_z`` and semi-axes ``lesion_a``/``lesion_b`` in units of the
    imaging depth (:func:`lesion_box` converts them to pixels).
    """
    plan = _plan(cfg)
    out = np.empty((cfg.n, cfg.size, cfg.size), dtype=np.uint8)
    for start in range(0, cfg.n, chunk):
        out[start:start + chunk] = _render_chunk(plan[start:start + chunk], cfg.size)
    return out, plan


def generate_phantoms(out_dir: str | Path, n: int = 200, size: int = 96, seed: int = 0,
                      malignant_fraction: float = 0.4, scanners: Sequence[str] | None = None,
                      scanner_weights: Sequence[float] | None = None, max_views: int = 2,
                      force: bool = False, masks: bool = False) -> Path:
    """Write ``n`` phantom PNGs (8-bit grayscale) under ``out_dir/images`` and ``out_dir/labels.csv``.

    Args:
        out_dir: output folder (created).
        n: number of images.
        size: side in pixels.
        seed: the same seed (and options) gives byte-identical files.
        malignant_fraction: share of patients with a malignant-like lesion (the class balance).
        scanners: simulated scanners to draw from (default: all of :data:`SCANNERS`).
        scanner_weights: relative share of each scanner (default: equal).
        max_views: each patient has 1 to ``max_views`` images (same label, scanner and lesion).
        force: replace an earlier set of phantoms in ``out_dir``.
        masks: also write the lesion masks (``masks/``, 0/255, named like the images; a ``mask`` column).

    Returns:
        The path of ``labels.csv`` (columns ``path,label,scanner,group``; ``path`` relative to ``out_dir``).
        The resolved options are saved beside it as ``phantoms.yaml``.
    """
    cfg = PhantomConfig(out=str(out_dir), n=n, size=size, seed=seed, malignant_fraction=malignant_fraction,
                        scanners=list(scanners) if scanners is not None else list(SCANNERS),
                        scanner_weights=list(scanner_weights) if scanner_weights is not None else None,
                        max_views=max_views, force=force, masks=masks)
    return write_phantoms(cfg)


def write_phantoms(cfg: PhantomConfig) -> Path:
    """:func:`generate_phantoms` from a :class:`PhantomConfig`."""
    claim_folder(cfg.out, "phantoms", force=cfg.force)
    with output_lock(cfg.out, "phantoms"):
        return _write_phantoms(cfg)


def _png(img: np.ndarray) -> bytes:
    """uint8 [S, S] → 8-bit grayscale PNG bytes (mode L)."""
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _write_phantoms(cfg: PhantomConfig) -> Path:
    out = Path(cfg.out)
    images, plan = render_phantoms(cfg)
    width = len(str(cfg.n - 1))
    masks = render_masks(plan, cfg.size) if cfg.masks else None
    rows = []
    for i, (img, meta) in enumerate(zip(images, plan)):
        rel = f"images/phantom_{i:0{width}d}.png"
        atomic_write_bytes(out / rel, _png(img))
        rows.append((rel, CLASSES[meta["label"]], meta["scanner"], meta["group"]))
        if masks is not None:
            mask_rel = f"masks/phantom_{i:0{width}d}.png"
            atomic_write_bytes(out / mask_rel, _png(masks[i] * 255))
            rows[-1] += (mask_rel,)
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["path", "label", "scanner", "group"] + (["mask"] if masks is not None else []))
    writer.writerows(rows)
    atomic_write_text(out / "labels.csv", text.getvalue())
    save_config(cfg, out / "phantoms.yaml")
    return out / "labels.csv"
