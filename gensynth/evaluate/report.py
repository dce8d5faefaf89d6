"""report.html: one self-contained page (every image a data: URI, no external file or script) that opens
with the verdict (whether the set helps, is neutral or hurts, and what to do about it), then the
metrics, their floors and meanings, sample grids per class, the closest synthetic/training pairs,
matplotlib plots, and the protocol."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gensynth import storage
from gensynth.data.codec import encode_png
from gensynth.evaluate.memorisation import MemorisationResult
from gensynth.evaluate.sets import ImageSet
from gensynth.imaging import image_grid

PER_CLASS = 10  # samples per class row in the grids
STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; } td, th { border: 1px solid #ccc; padding: 4px 8px; }
th { background: #f3f3f3; text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
img.grid { image-rendering: pixelated; border: 1px solid #ccc; } .muted { color: #666; font-size: 90%; }
pre { background: #f7f7f7; padding: 1em; overflow-x: auto; font-size: 85%; }
figure { display: inline-block; margin: 0.5em 1em 0.5em 0; vertical-align: top; }
p.verdict { font-size: 115%; padding: 0.6em 1em; border-left: 6px solid #888; background: #f7f7f7; }
p.helps { border-color: #2a8a2a; } p.hurts { border-color: #c0392b; } p.neutral { border-color: #d4a017; }
"""


def data_uri_png(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def grid_png(images: torch.Tensor, rows: int) -> bytes:
    """uint8 [n, C, H, W] -> PNG bytes of a grid with `rows` rows (grey or RGB)."""
    hwc = images.permute(0, 2, 3, 1).numpy()
    if hwc.shape[-1] not in (1, 3):
        hwc = hwc[..., :3]
    return encode_png(image_grid(np.ascontiguousarray(hwc), rows))


def class_rows(s: ImageSet, per_class: int = PER_CLASS) -> tuple[torch.Tensor, list[int]]:
    """Up to `per_class` images of every class, one row per class (missing ones left black)."""
    classes = sorted(s.histogram())
    h, w = s.images.shape[2:]
    out = torch.zeros((len(classes) * per_class, s.images.shape[1], h, w), dtype=torch.uint8)
    for r, c in enumerate(classes):
        found = s.images[s.labels == c][:per_class]
        out[r * per_class:r * per_class + len(found)] = found
    return out, classes


def img_tag(png: bytes, alt: str, scale: int = 3, width: int | None = None) -> str:
    style = f' style="width:{width}px"' if width else ""
    return (f'<img class="grid" alt="{html.escape(alt)}" src="{data_uri_png(png)}"{style} '
            f'data-scale="{scale}">')


def png_width(png: bytes) -> int:
    return int.from_bytes(png[16:20], "big")


def scaled_img(png: bytes, alt: str, scale: int = 3) -> str:
    return img_tag(png, alt, scale, width=png_width(png) * scale)


def figure_png(draw: Any, size: tuple[float, float] = (5.0, 3.2)) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size, dpi=100)
    try:
        draw(ax)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        return buf.getvalue()
    finally:
        plt.close(fig)


def _fmt(v: Any, pct: bool = False, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "-"
    return f"{100 * v:.2f}%" if pct else f"{v:.{digits}f}"


def _table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f'<td class="num">{c}</td>' if i and i < len(r) - 1 else f"<td>{c}</td>"
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def _class_name(classes: list[str] | None, c: int) -> str:
    return classes[c] if classes and 0 <= c < len(classes) else str(c)


def write_report(path: str | Path, metrics: dict[str, Any], synth: ImageSet, real: ImageSet,
                 generator_train: ImageSet, memorised: MemorisationResult, classes: list[str] | None = None) -> Path:
    f, m, u, p = metrics["fidelity"], metrics["memorisation"], metrics["usefulness"], metrics["protocol"]
    parts: list[str] = []
    add = parts.append
    s = metrics["synthetic"]
    v = metrics.get("verdict") or {}
    add("<h1>Synthetic data report</h1>")
    if v:
        add(f"<p class='verdict {html.escape(v['verdict'])}' id='verdict'><b>{html.escape(v['line'])}</b><br>"
            f"{html.escape(v['advice'])}</p>")
    add(f"<p><b>{html.escape(str(s['url']))}</b>: {s['samples']} samples"
        f"{', family ' + html.escape(str(s['family'])) if s.get('family') else ''}; "
        f"{p['evaluated_samples']} evaluated. Feature extractor: a small CNN trained on "
        f"{html.escape(str(p['extractor']['train']['train']))}, <b>{_fmt(metrics['extractor']['test_accuracy'], True)}"
        "</b> real test accuracy (every feature-space number below depends on it).</p>")

    # -- the headline table
    rows = [
        ["FID (extractor features)", _fmt(f["fid"]), _fmt(f["fid_floor"]), "lower is better; the floor is real "
         "training vs real test images at the same N"],
        ["KID x 1000", f"{_fmt(f['kid_x1000'])} &plusmn; {_fmt(f['kid_x1000_std'])}", _fmt(f["kid_floor_x1000"]),
         "unbiased: ~0 for fresh real data at any N"],
        ["precision", _fmt(f["precision"]), _fmt(f["precision_floor"]), "share of synthetic samples on the real "
         "manifold (fidelity)"],
        ["recall", _fmt(f["recall"]), _fmt(f["recall_floor"]), "share of real samples on the synthetic manifold "
         "(diversity)"],
        ["class consistency", _fmt(f["class_consistency"], True), _fmt(f["real_test_agreement"], True),
         "extractor agrees with the requested label (floor: its accuracy on these real test images)"],
        ["near-copies", _fmt(m["near_copy_fraction"], True), _fmt(m["real_floor_fraction"], True),
         f"closer to a training image than {m['copy_ratio']:.2f} x the typical distance of unseen real images "
         "(floor: real test images under the same rule)"],
    ]
    cas = u.get("cas", {})
    if "cas" in cas:
        rows.append(["CAS (train on synthetic, test on real)", _fmt(cas["cas"], True),
                     _fmt(cas["real_accuracy"], True),
                     f"ratio {cas['ratio']:.3f}; reference: the same classifier on {cas['train_samples']} real "
                     "samples"])
    aug = u.get("augmentation", {})
    if "gain" in aug:
        rows.append([f"augmentation gain, K = {aug['k']}", f"{100 * aug['gain']['mean']:+.2f} &plusmn; "
                     f"{100 * aug['gain']['std']:.2f} pts", _fmt(aug["real_only"]["mean"], True),
                     f"real + synthetic {_fmt(aug['real_plus_synthetic']['mean'], True)} vs real only (the reference "
                     f"column; both with the classic augmentation {html.escape(_augment_spec(aug))}), "
                     f"{len(aug['gain']['runs'])} seeds"])
    add("<h2>Metrics</h2>" + _table(["metric", "synthetic", "floor / reference", "meaning"], rows))
    for key, what in (("cas", "CAS"), ("augmentation", "Augmentation gain")):
        if "skipped" in u.get(key, {}):
            add(f"<p class='muted'>{what} not measured: {html.escape(str(u[key]['skipped']))}</p>")
    rec = metrics.get("reconstruction") or {}
    if "psnr" in rec:
        rrows = [["MSE (pixels in [0, 1])", _fmt(rec["mse_01"], digits=5), ""], ["PSNR (dB)", _fmt(rec["psnr"]), ""],
                 ["SSIM", _fmt(rec["ssim"], digits=4), ""]]
        if "codebook_used_fraction" in rec:
            rrows += [["codebook used", _fmt(rec["codebook_used_fraction"], True), ""],
                      ["codebook perplexity", _fmt(rec["codebook_perplexity"], digits=1),
                       f"of {int(rec['codebook_size'])}"]]
        add(f"<h3>Reconstruction of {int(rec['images'])} real test images</h3>"
            + _table(["metric", "value", ""], rrows))
    if metrics.get("inception"):
        inc = metrics["inception"]
        add("<h3>Standard Inception-v3 FID</h3>" + _table(["metric", "synthetic", "floor", ""], [
            ["FID", _fmt(inc["fid"]), _fmt(inc["fid_floor"]), html.escape(inc["file"])],
            ["KID x 1000", _fmt(inc["kid_x1000"]), _fmt(inc["kid_floor_x1000"]), ""]]))

    # -- per class
    per = f["class_consistency_per_class"]
    names = [_class_name(classes, int(c)) for c in per]
    add("<h2>Per class</h2>")
    add(f"<figure>{scaled_img(figure_png(lambda ax: _consistency_plot(ax, names, per, f)), 'class consistency', 1)}"
        "<figcaption>class consistency per class, synthetic vs real test</figcaption></figure>")
    synth_rows, synth_classes = class_rows(synth)
    real_rows, _ = class_rows(real)
    labels = ", ".join(f"{i + 1}: {html.escape(_class_name(classes, c))}" for i, c in enumerate(synth_classes))
    add(f"<p class='muted'>One row per class ({labels}).</p>")
    add(f"<figure>{scaled_img(grid_png(synth_rows, len(synth_classes)), 'synthetic samples per class')}"
        "<figcaption>synthetic</figcaption></figure>")
    add(f"<figure>{scaled_img(grid_png(real_rows, len(synth_classes)), 'real test samples per class')}"
        "<figcaption>real test</figcaption></figure>")

    # -- memorisation
    add("<h2>Memorisation</h2>")
    add(f"<p>Distances are root-mean-square pixel differences in [0, 1] units (pixel space: a copy is a pixel-level "
        f"event; the extractor maps all images of a class close together). Reference training set: "
        f"{html.escape(str(m['reference']['url']))} ({m['reference']['samples']} images). Near-copy rule: "
        f"d_train &lt; {m['copy_ratio']:.3g} &times; {m['median_real_d_train']:.4f} (the median nearest-training "
        f"distance of real test images) = {m['threshold_rms']:.4f}. Near-copies: {m['near_copies']} of "
        f"{p['evaluated_samples']} ({_fmt(m['near_copy_fraction'], True)}); real test images under the same rule: "
        f"{_fmt(m['real_floor_fraction'], True)}. Synthetic samples closer to the training set than to the test set: "
        f"{_fmt(m['share_closer_to_train_than_test'], True)}.</p>")
    add(f"<figure>{scaled_img(figure_png(lambda ax: _distance_hist(ax, memorised)), 'distance histogram', 1)}"
        "<figcaption>nearest-training-image distance</figcaption></figure>")
    add(f"<figure>{scaled_img(figure_png(lambda ax: _distance_scatter(ax, memorised)), 'train vs test distance', 1)}"
        "<figcaption>each synthetic sample: nearest training vs nearest test image</figcaption></figure>")
    closest = memorised.closest(len(m["closest_pairs"]))
    if len(closest):
        pairs = torch.stack([t for i in closest for t in (synth.images[i],
                                                          generator_train.images[memorised.train_index[i]])])
        cols = 8  # 4 pairs per row
        rows_n = -(-len(pairs) // cols)
        padded = torch.zeros((rows_n * cols, *pairs.shape[1:]), dtype=torch.uint8)
        padded[:len(pairs)] = pairs
        add(f"<p>The {len(closest)} synthetic samples closest to a training image, each followed by that training "
            "image (4 pairs per row), closest first:</p>")
        add(scaled_img(grid_png(padded, rows_n), "closest synthetic / training pairs"))
        add(_table(["#", "synthetic", "training image", "d_train", "d_test"],
                   [[str(i + 1), html.escape(str(c["synthetic"])), html.escape(str(c["train"])),
                     f"{c['d_train']:.4f}", f"{c['d_test']:.4f}"] for i, c in enumerate(m["closest_pairs"][:8])]))

    # -- usefulness
    add("<h2>Usefulness</h2>")
    if "cas" in cas:
        add(_table(["classifier trained on", "samples", "real test accuracy"],
                   [["synthetic only (CAS)", str(cas["train_samples"]), _fmt(cas["cas"], True)],
                    ["real (same size and classes)", str(cas["train_samples"]), _fmt(cas["real_accuracy"], True)]]))
    if "gain" in aug:
        add(_table(["seed", "real only", "real + synthetic", "gain (points)"],
                   [[str(p["classifier"]["seed"] + i), _fmt(a, True), _fmt(b, True), f"{100 * (b - a):+.2f}"]
                    for i, (a, b) in enumerate(zip(aug["real_only"]["runs"], aug["real_plus_synthetic"]["runs"]))]))
        add(f"<figure>{scaled_img(figure_png(lambda ax: _augmentation_plot(ax, aug)), 'augmentation', 1)}"
            "</figure>")
        add(_mix_section(u.get("recommended_mix")))
        add(f"<p class='muted'>K set {html.escape(str(aug['k_set']['url']))} (manifest sha256 "
            f"{html.escape(str(aug['k_set']['manifest_sha256']))[:16]}..., the one the generator was trained on); "
            f"synthetic samples kept: {aug['synthetic_kept']}.</p>")

    add("<h2>Protocol</h2><pre>" + html.escape(json.dumps({k: metrics[k] for k in ("protocol", "synthetic", "seconds")},
                                                        indent=1)) + "</pre>")
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>gensynth eval: {html.escape(str(s['url']))}"
            f"</title><style>{STYLE}</style></head><body>{''.join(parts)}</body></html>\n")
    path = Path(path)
    storage.write_bytes(str(path), page.encode("utf-8"))
    return path


def _augment_spec(aug: dict[str, Any]) -> str:
    return str(aug.get("protocol", {}).get("augment", {}).get("spec", "none"))


def _mix_section(mix: dict[str, Any] | None) -> str:
    """The recommended mix: what was chosen, on what, and every grid point's validation accuracy."""
    if not mix:
        return ""
    out = (f"<h3>Recommended mix</h3><p>{100 * mix['synthetic_fraction']:.0f}% synthetic per batch, loss weight "
           f"{mix['synthetic_weight']:g}, filter {html.escape(str(mix['filter']))}; chosen on "
           f"{html.escape(str(mix['chosen_on']))}. Labels used: {mix['labels']['k_set']} in the K set + "
           f"{mix['labels']['validation']} for validation = {mix['labels']['total']}. The test set played no part "
           "in the choice; the table above is the chosen mix on the test set, with other seeds than the search's. "
           "recommended_mix.json beside this page holds the choice (MixLoader.from_recommendation).</p>")
    search = mix.get("search")
    if not search:
        return out
    real = search["real_only_validation_accuracy"]
    rows = [["real only", "-", "-", "-", _fmt(real["mean"], True) if real else "-", ""]]
    for r in search["grid"]:
        acc = r.get("validation_accuracy")
        spread = f"&plusmn; {100 * acc['std']:.2f} over seeds {search['seeds']}" if acc else ""
        chosen = all(r[k] == mix[k] for k in ("synthetic_fraction", "synthetic_weight", "filter"))
        rows.append([f"{'<b>chosen</b>' if chosen else ''}", f"{r['synthetic_fraction']:g}",
                     f"{r['synthetic_weight']:g}", html.escape(r["filter"]),
                     _fmt(acc["mean"], True) if acc else "-",
                     html.escape(r.get("failed", "")) or spread])
    return out + _table(["", "synthetic fraction", "weight", "filter", "validation accuracy", ""], rows)


def _consistency_plot(ax: Any, names: list[str], per: dict[str, float], f: dict[str, Any]) -> None:
    x = np.arange(len(names))
    real = f.get("real_test_agreement_per_class", {})
    ax.bar(x - 0.2, [per[c] for c in per], 0.4, label="synthetic")
    ax.bar(x + 0.2, [real.get(c, np.nan) for c in per], 0.4, label="real test")
    ax.set_xticks(x, names, rotation=45, ha="right", fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("classifier agrees with label")
    ax.legend(fontsize=7)


def _distance_hist(ax: Any, mem: MemorisationResult) -> None:
    top = float(max(mem.d_train.max(), mem.real_d_train.max()))
    bins = np.linspace(0, top, 60)
    ax.hist(mem.real_d_train, bins, alpha=0.6, density=True, label="real test images")
    ax.hist(mem.d_train, bins, alpha=0.6, density=True, label="synthetic")
    ax.axvline(mem.threshold, color="red", linestyle="--", label="near-copy threshold")
    ax.set_xlabel("RMS distance to the nearest training image")
    ax.legend(fontsize=7)


def _distance_scatter(ax: Any, mem: MemorisationResult) -> None:
    ax.scatter(mem.d_test, mem.d_train, s=3, alpha=0.4)
    top = float(max(mem.d_test.max(), mem.d_train.max()))
    ax.plot([0, top], [0, top], color="grey", linewidth=0.8)
    ax.axhline(mem.threshold, color="red", linestyle="--", linewidth=0.8)
    ax.set_xlabel("nearest real test image")
    ax.set_ylabel("nearest training image")


def _augmentation_plot(ax: Any, aug: dict[str, Any]) -> None:
    a, b = aug["real_only"]["runs"], aug["real_plus_synthetic"]["runs"]
    for i, (x, y) in enumerate(zip(a, b)):
        ax.plot([0, 1], [100 * x, 100 * y], marker="o", label=f"seed {i}")
    ax.set_xticks([0, 1], [f"real only (K={aug['k']})", "real + synthetic"])
    ax.set_ylabel("real test accuracy (%)")
    ax.legend(fontsize=7)
