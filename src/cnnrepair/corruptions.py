"""Common corruptions for distribution-shift repair tasks (MNIST-C, Mu & Gilmer 2019).

``fog`` follows the published ImageNet-C / MNIST-C recipe: a plasma fractal (diamond-square
height map, 256 x 256, the top-left corner cropped to the image) scaled by ``c[0]`` is added to
the image in [0, 1], which is then rescaled by ``max / (max + c[0])`` and clipped. Severity picks
``c = (strength, wibble decay)`` from the recipe's table. Every image gets its own fractal from one
seeded generator, so a corrupted set is reproducible from (images, severity, seed).
"""

from __future__ import annotations

import numpy as np

FOG = [(0.2, 3.0), (0.5, 3.0), (0.75, 2.5), (1.0, 2.0), (1.5, 1.75)]


def plasma_fractal(rng: np.random.Generator, mapsize: int = 256, wibbledecay: float = 3.0) -> np.ndarray:
    """A diamond-square height map in [0, 1] (``mapsize`` a power of two)."""
    if mapsize & (mapsize - 1):
        raise ValueError(f"mapsize must be a power of two, got {mapsize}")
    grid = np.empty((mapsize, mapsize))
    grid[0, 0] = 0.0
    step = mapsize
    wibble = 100.0

    def wibbled(a: np.ndarray) -> np.ndarray:
        return a / 4 + wibble * rng.uniform(-wibble, wibble, a.shape)

    while step >= 2:
        half = step // 2
        corners = grid[0:mapsize:step, 0:mapsize:step]
        square = corners + np.roll(corners, -1, 0)
        square = square + np.roll(square, -1, 1)
        grid[half:mapsize:step, half:mapsize:step] = wibbled(square)
        centres = grid[half:mapsize:step, half:mapsize:step]
        corners = grid[0:mapsize:step, 0:mapsize:step]
        ld = centres + np.roll(centres, 1, 0)
        lu = corners + np.roll(corners, -1, 1)
        grid[0:mapsize:step, half:mapsize:step] = wibbled(ld + lu)
        td = centres + np.roll(centres, 1, 1)
        tu = corners + np.roll(corners, -1, 0)
        grid[half:mapsize:step, 0:mapsize:step] = wibbled(td + tu)
        step //= 2
        wibble /= wibbledecay
    grid -= grid.min()
    return grid / grid.max()


def fog(images: np.ndarray, severity: int = 5, seed: int = 0) -> np.ndarray:
    """Fog-corrupted copies of uint8 images (N x C x H x W), as uint8."""
    if severity not in range(1, len(FOG) + 1):
        raise ValueError(f"severity must be 1..{len(FOG)}, got {severity}")
    strength, decay = FOG[severity - 1]
    rng = np.random.default_rng(seed)
    x = np.asarray(images, np.float64) / 255.0
    out = np.empty_like(x)
    h, w = x.shape[-2:]
    for i in range(len(x)):
        top = x[i].max()
        f = x[i] + strength * plasma_fractal(rng, wibbledecay=decay)[:h, :w]
        out[i] = np.clip(f * top / (top + strength), 0.0, 1.0)
    return np.round(out * 255).astype(np.uint8)
