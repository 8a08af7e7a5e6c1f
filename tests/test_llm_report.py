"""LLM-sized reports: activation sparsity, log-scale firing frequencies, dead fraction by depth, and
an HTML page that stays small for 11,008-wide layers."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
from rich.console import Console

from deadrelu_cli.report.html import render_html
from deadrelu_cli.report.model import report_to_dict
from deadrelu_cli.report.table import print_report

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
try:  # the same synthetic LLaMA-7B-shaped report that scripts/bench.py times the HTML of
    from bench import llm_sized_report as _wide_report
finally:
    sys.path.pop(0)


def test_sparsity_and_histogram_from_counts():
    report = _wide_report(4, units=3000)
    data = report_to_dict(report)
    total_pos = total = 0
    for layer, d in zip(report.layers, data["layers"], strict=True):
        rates = layer.positive_counts / layer.elements_per_unit
        assert np.isclose(d["activation_sparsity"], np.mean(1 - rates))  # mean inactive share per position
        hist = d["firing_histogram"]
        edges = np.array(hist["log10_edges"])
        alive = rates[rates > 0]
        expected = [
            int(((np.log10(alive) >= lo if k else True) & (np.log10(alive) < hi if hi < 0 else True)).sum())
            for k, (lo, hi) in enumerate(zip(edges[:-1], edges[1:], strict=True))
        ]
        assert hist["counts"] == expected and hist["dead"] == int((rates == 0).sum())
        total_pos += layer.positive_counts.sum()
        total += layer.units * layer.elements_per_unit
    assert np.isclose(data["summary"]["activation_sparsity"], 1 - total_pos / total)


def test_terminal_shows_dead_fraction_by_depth():
    report = _wide_report(6, units=500)
    for i, layer in enumerate(report.layers):  # dead fraction 0, 0.2, …, 1.0 by depth
        layer.positive_counts[:] = 7
        layer.positive_counts[: 100 * i] = 0
    console = Console(width=120, file=io.StringIO(), record=True, color_system=None)
    print_report(report, console)
    text = console.export_text()
    line = next(line for line in text.splitlines() if line.startswith("Dead by depth"))
    spark = line.split("|")[1]
    assert spark[0] == " " and spark[-1] == "█" and list(spark) == sorted(spark, key=" ▁▂▃▄▅▆▇█".index)
    assert len(spark) == 6 and "100.0% in model.layers.5.mlp.act_fn" in line
    assert "Activation sparsity:" in text


def test_html_of_wide_layers_stays_small():
    """Budget: under 5 MB for 32 layers of 11,008 units, so each layer gets 5 MB / 32 (measured on 6)."""
    report = _wide_report(6)
    text = render_html(report)
    assert len(text.encode()) < 6 * 5_000_000 / 32
    assert 'id="firing"' in text and "more dead, dying or dormant units not listed" in text


def test_html_of_an_llm_sized_report_is_one_picture_not_32():
    """32 layers of 11,008 units (the issue's case): under 5 MB, no figure per layer (each cost ~1 s of
    matplotlib), and the firing-frequency map's pixels are the shares numpy computes from the counts."""
    import base64
    import re

    from matplotlib import colormaps
    from matplotlib.image import imread

    from deadrelu_cli.stats import FREQUENCY_EDGES  # the bin edges: a definition, not a result

    report = _wide_report(32)
    text = render_html(report)
    assert len(text.encode()) < 5_000_000
    assert text.count("<svg") == 2  # dead fraction by layer, the firing-frequency map
    for index, layer in enumerate(report.layers):
        assert f'<details id="layer-{index}" data-layer="{layer.name}"' in text
    firing = text[text.index('<section id="firing">') :]
    firing = firing[: firing.index("</section>")]
    assert all(layer.name in firing for layer in report.layers)  # a labelled row per layer
    tag = re.search(r'<image xlink:href="data:image/png;base64,([^"]*)"([^>]*)>', firing)
    assert "scale(1 -1)" in tag.group(2)  # the SVG draws the PNG's rows bottom-up
    pixels = imread(io.BytesIO(base64.b64decode(tag.group(1))))[::-1, :, :3]
    truth = []
    for layer in report.layers:
        rates = layer.positive_counts / layer.elements_per_unit
        alive = np.clip(rates[rates > 0], FREQUENCY_EDGES[0], 1.0)
        shares = np.concatenate([[np.sum(rates == 0)], np.histogram(alive, FREQUENCY_EDGES)[0]]) / layer.units
        truth.append(shares)
    truth = np.array(truth) / np.max(truth)  # the colour scale ends at the largest share
    lut = colormaps["viridis"](np.linspace(0, 1, 256))[:, :3]
    rows, cols = truth.shape
    height, width = pixels.shape[:2]
    shown = np.array(
        [
            [
                np.argmin(
                    ((lut - pixels[int((i + 0.5) * height / rows), int((j + 0.5) * width / cols)]) ** 2).sum(
                        1
                    )
                )
                / 255
                for j in range(cols)
            ]
            for i in range(rows)
        ]
    )
    assert np.abs(shown - truth).max() < 0.01
