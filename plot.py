"""Figures as PNG with Pillow only: line plots (loss curves, schedules, Fig. 8), image grids,
and segmentations (the class palette, label PNGs, overlays with a legend).

Deliberately small: enough to look at a curve, a row of masks or a segmentation without matplotlib.
"""
import math

import numpy as np
from PIL import Image, ImageDraw

PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
           (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180),
           (0, 0, 128), (128, 128, 128)]

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def line_plot(path, series, title="", xlabel="", ylabel="", size=(640, 420), logy=False):
    """series: {label: (xs, ys)}. Writes a PNG with axes, ticks and a legend."""
    W, H = size
    left, right, top, bottom = 64, 16, 28, 44
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    xs = np.concatenate([np.asarray(x, dtype=float) for x, _ in series.values()])
    ys = np.concatenate([np.asarray(y, dtype=float) for _, y in series.values()])
    fy = (lambda v: np.log10(np.maximum(v, 1e-12))) if logy else (lambda v: v)
    finite = np.isfinite(fy(ys))
    x0, x1 = float(xs.min()), float(xs.max())
    y0, y1 = (float(fy(ys[finite]).min()), float(fy(ys[finite]).max())) if finite.any() else (0.0, 1.0)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)

    def px(x, y):
        return (left + (x - x0) / (x1 - x0) * (W - left - right),
                H - bottom - (fy(y) - y0) / (y1 - y0) * (H - top - bottom))

    d.rectangle([left, top, W - right, H - bottom], outline="black")
    for i in range(5):
        xv, yv = x0 + (x1 - x0) * i / 4, y0 + (y1 - y0) * i / 4
        gx = left + (W - left - right) * i / 4
        gy = H - bottom - (H - top - bottom) * i / 4
        d.line([gx, H - bottom, gx, H - bottom + 4], fill="black")
        d.text((gx - 12, H - bottom + 6), _fmt(xv), fill="black")
        d.line([left - 4, gy, left, gy], fill="black")
        d.text((4, gy - 5), _fmt(10**yv if logy else yv), fill="black")
    for k, (label, (x, y)) in enumerate(series.items()):
        c = COLOURS[k % len(COLOURS)]
        pts = [px(a, b) for a, b in zip(np.asarray(x, float), np.asarray(y, float)) if np.isfinite(fy(b))]
        if len(pts) > 1:
            d.line(pts, fill=c, width=2)
        for p in pts if len(pts) <= 60 else []:
            d.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=c)
        d.rectangle([left + 8, top + 6 + 14 * k, left + 20, top + 14 + 14 * k], fill=c)
        d.text((left + 24, top + 4 + 14 * k), str(label), fill="black")
    d.text((left, 8), title, fill="black")
    d.text(((W - len(xlabel) * 6) // 2, H - 16), xlabel, fill="black")
    d.text((4, 12), ylabel, fill="black")
    img.save(path)
    return img


def bar_plot(path, groups, series, title="", ylabel="", size=(760, 420)):
    """Grouped bars with whiskers: groups = the bars' labels along x; series = {label: [(mean, low,
    high) per group]} (nan: no bar). One PNG, the legend top left, values written above the bars."""
    W, H = size
    left, right, top, bottom = 56, 16, 40, 64
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    values = [v for bars in series.values() for m, lo, hi in bars for v in (lo, hi) if np.isfinite(v)]
    y0 = min([0.0] + values)
    y1 = 1.0 if not values or max(values) <= 1 else max(values) * 1.08
    py = lambda v: H - bottom - (v - y0) / (y1 - y0) * (H - top - bottom)
    d.rectangle([left, top, W - right, H - bottom], outline="black")
    for i in range(5):
        v = y0 + (y1 - y0) * i / 4
        d.line([left - 4, py(v), left, py(v)], fill="black")
        d.text((4, py(v) - 5), _fmt(v), fill="black")
    slot = (W - left - right) / len(groups)
    bar = slot * 0.8 / len(series)
    for k, (label, bars) in enumerate(series.items()):
        c = COLOURS[k % len(COLOURS)]
        d.rectangle([left + 8 + 150 * k, top - 24, left + 20 + 150 * k, top - 14], fill=c)
        d.text((left + 24 + 150 * k, top - 26), str(label), fill="black")
        for g, (m, lo, hi) in enumerate(bars):
            if not np.isfinite(m):
                continue
            x = left + slot * g + slot * 0.1 + bar * k
            d.rectangle([x, py(m), x + bar - 2, py(y0)], fill=c)
            d.line([x + bar / 2 - 1, py(lo), x + bar / 2 - 1, py(hi)], fill="black", width=1)
            d.text((x, py(hi) - 11), f"{m:.2f}", fill="black")
    for g, name in enumerate(groups):
        for j, line in enumerate(str(name).split("\n")):
            d.text((left + slot * g + 4, H - bottom + 6 + 12 * j), line, fill="black")
    d.text((W // 2 - 3 * len(title), 4), title, fill="black")
    d.text((4, top - 14), ylabel, fill="black")
    img.save(path)
    return img


def image_grid(path, images, labels=None, cols=None, cell=128):
    """images: list of (H, W) or (H, W, 3) arrays, uint8 in [0, 255] or float in [0, 1]. One PNG."""
    n = len(images)
    cols = cols or min(n, 8)
    rows = math.ceil(n / cols)
    grid = Image.new("RGB", (cols * cell, rows * (cell + 14)), "white")
    d = ImageDraw.Draw(grid)
    for i, im in enumerate(images):
        a = np.asarray(im)
        a = a / 255.0 if a.dtype == np.uint8 else a.astype(float)
        a = (np.clip(a, 0, 1) * 255).astype(np.uint8)
        tile = Image.fromarray(a).convert("RGB").resize((cell, cell), Image.NEAREST)
        r, c = divmod(i, cols)
        grid.paste(tile, (c * cell, r * (cell + 14) + 14))
        if labels:
            d.text((c * cell + 2, r * (cell + 14) + 1), str(labels[i]), fill="black")
    grid.save(path)
    return grid


def colour(k):
    """The RGB colour of class k in every segmentation figure."""
    return PALETTE[k % len(PALETTE)]


def label_png(labels, n_classes):
    """labels (H, W) with -1 = background -> palette PNG (P mode), 255 = background."""
    a = np.asarray(labels).astype(np.int64)
    img = Image.fromarray(np.where(a < 0, 255, a).astype(np.uint8), mode="P")
    img.putpalette([v for k in range(256) for v in (colour(k) if k < n_classes else (0, 0, 0))])
    return img


def overlay(image, labels, names, alpha=0.5, min_side=256):
    """The labels (H, W) blended over the image (PIL), with a legend strip on the right naming the
    classes. Images smaller than min_side (the toy world's 64 px) are enlarged by a whole factor,
    nearest. Pixels of no class (-1) and ignored ones (>= len(names)) stay as they are."""
    a = np.asarray(labels)
    zoom = -(-min_side // max(a.shape))              # ceil: 64 px -> x4
    if zoom > 1:
        image = image.resize((image.width * zoom, image.height * zoom), Image.NEAREST)
        a = a.repeat(zoom, axis=0).repeat(zoom, axis=1)
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    col = np.zeros_like(rgb)
    for k in range(len(names)):
        col[a == k] = colour(k)
    fg = ((a >= 0) & (a < len(names)))[..., None]
    out = np.where(fg, (1 - alpha) * rgb + alpha * col, rgb).astype(np.uint8)
    H, W = a.shape
    shown = [k for k in range(len(names)) if (a == k).any()]
    legend_w = 12 + 7 * max([len(names[k]) for k in shown] + [10])
    canvas = Image.new("RGB", (W + legend_w, max(H, 16 * len(shown) + 8)), "white")
    canvas.paste(Image.fromarray(out), (0, 0))
    d = ImageDraw.Draw(canvas)
    for row, k in enumerate(shown):
        d.rectangle([W + 4, 4 + 16 * row, W + 14, 14 + 16 * row], fill=colour(k))
        d.text((W + 18, 3 + 16 * row), names[k], fill="black")
    return canvas


def side_by_side(*images):
    """PIL images pasted left to right on white (prediction | ground truth)."""
    canvas = Image.new("RGB", (sum(im.width for im in images), max(im.height for im in images)), "white")
    x = 0
    for im in images:
        canvas.paste(im, (x, 0))
        x += im.width
    return canvas


def _fmt(v):
    """Tick labels: whole numbers and anything >= 100 as integers (steps: 1125, not 1.12e+03)."""
    return str(int(round(v))) if abs(v) >= 100 or v == int(v) else f"{v:.3g}"
