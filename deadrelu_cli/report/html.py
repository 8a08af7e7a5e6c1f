"""A self-contained HTML report: inline SVG plots (matplotlib), no network, readable without JavaScript.

JavaScript only adds sorting and filtering to the tables; everything else is static HTML + CSS.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from deadrelu_cli.display import html_text, terminal_text
from deadrelu_cli.report.diff import match_layers
from deadrelu_cli.report.model import Report
from deadrelu_cli.report.table import CRITICAL_FRACTION, DEPTH_MIN_LAYERS, WARN_FRACTION, unit_status
from deadrelu_cli.stats import LayerStats

COLORS = {
    "dead": "#c62828",
    "dying": "#ef6c00",
    "alive": "#2e7d32",
    "old": "#9e9e9e",
    "warn": "#fff3e0",
    "crit": "#ffebee",
}


@dataclass
class GateSummary:
    passed: bool
    failures: list[str]


def _svg(figure) -> str:
    import matplotlib.pyplot as plt

    buffer = io.StringIO()
    # no metadata block: it only carries RDF namespace URIs and a date (reports stay reproducible)
    figure.savefig(
        buffer,
        format="svg",
        bbox_inches="tight",
        metadata={"Creator": None, "Date": None, "Format": None, "Type": None},
    )
    plt.close(figure)
    text = buffer.getvalue()
    return text[text.index("<svg") :]  # drop the XML prologue and DOCTYPE: inline SVG in HTML


def _pyplot():
    from deadrelu_cli.files import require_temp_folder

    require_temp_folder("the HTML report (matplotlib)")
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update(
        {"svg.fonttype": "none", "font.size": 8, "axes.spines.top": False, "axes.spines.right": False}
    )
    return plt


def _dead_fraction(layer: LayerStats) -> float:
    return float(layer.dead_mask().sum()) / layer.units if layer.units and layer.ran else 0.0


def dead_by_layer_svg(report: Report, baseline: Report | None) -> str:
    plt = _pyplot()
    layers = report.layers
    width = max(6.0, min(16.0, 0.22 * len(layers) + 2))
    figure, ax = plt.subplots(figsize=(width, 2.6))
    x = np.arange(len(layers))
    ax.axhspan(
        WARN_FRACTION * 100, CRITICAL_FRACTION * 100, color=COLORS["warn"], zorder=0, label="> 20% dead"
    )
    ax.axhspan(CRITICAL_FRACTION * 100, 100, color=COLORS["crit"], zorder=0, label="≥ 40% dead")
    fractions = np.array([_dead_fraction(layer) * 100 for layer in layers])
    colors = [
        COLORS["dead"]
        if f >= CRITICAL_FRACTION * 100
        else COLORS["dying"]
        if f > WARN_FRACTION * 100
        else COLORS["alive"]
        for f in fractions
    ]
    if baseline is not None:
        # paired as diff and the gate pair them (weight, output tensor, name)
        old = {name: _dead_fraction(layer) * 100 for name, layer in match_layers(baseline, report).items()}
        ax.bar(
            x - 0.2,
            [old.get(layer.name, 0.0) for layer in layers],
            width=0.4,
            color=COLORS["old"],
            label="baseline",
        )
        ax.bar(x + 0.2, fractions, width=0.4, color=colors, label="this report")
    else:
        ax.bar(x, fractions, width=0.8, color=colors)
    ax.set_ylim(0, 100)
    ax.set_ylabel("dead units (%)")
    ax.set_xlim(-0.6, len(layers) - 0.4)
    step = max(1, len(layers) // 40)
    ax.set_xticks(x[::step])
    ax.set_xticklabels([_plain(layer.name) for layer in layers][::step], rotation=60, ha="right", fontsize=6)
    ax.legend(loc="upper right", fontsize=6, frameon=False)
    ax.set_title("Dead fraction by layer, in execution order")
    return _svg(figure)


WIDE_UNITS = 2048  # wider layers are plotted per bin of units, not per unit
UNIT_BINS = 256
MAX_LISTED_UNITS = 200  # per layer in the HTML (the JSON report lists every index)
# more layers than this (that ran): no figure per layer (each costs ~0.3 s of matplotlib and ~60 kB);
# the overview figures carry the per-layer picture instead: dead fraction by layer, firing-frequency map
LAYER_FIGURES_MAX = 16


def firing_frequency_svg(report: Report) -> str:
    """Per layer (rows, in execution order): the share of its units per half-decade of firing frequency
    (columns, log scale), dead units in the first column."""
    from deadrelu_cli.stats import FREQUENCY_EDGES

    plt = _pyplot()
    ran = [layer for layer in report.layers if layer.ran and layer.units]
    grid = np.zeros((len(ran), len(FREQUENCY_EDGES)))
    for row, layer in enumerate(ran):
        dead, counts = layer.firing_histogram()
        grid[row] = np.concatenate([[dead], counts]) / layer.units
    figure, ax = plt.subplots(figsize=(7.2, max(1.6, min(8.0, 0.18 * len(ran) + 1.0))))
    # one raster image (no seams between cells, one element whatever the depth); colours scaled to the
    # largest share, so that a layer whose units spread over many frequencies still shows its shape
    image = ax.imshow(
        grid,
        cmap="viridis",
        vmin=0,
        vmax=max(float(grid.max()), 1e-9),
        aspect="auto",
        interpolation="nearest",
    )
    # column 0: dead; column k: [edge k-1, edge k), its left side at k - 0.5; ticks on whole decades
    # (not the first edge, 1e-7: its label would sit on "dead")
    decades = [j for j, e in enumerate(np.log10(FREQUENCY_EDGES)) if j and float(e).is_integer()]
    ax.set_xticks([0.0] + [j + 0.5 for j in decades])
    ax.set_xticklabels(
        ["dead"]
        + [f"1e{np.log10(FREQUENCY_EDGES[j]):.0f}" if FREQUENCY_EDGES[j] < 1 else "1" for j in decades],
        fontsize=6,
    )
    step = max(1, len(ran) // 32)
    ax.set_yticks(np.arange(len(ran))[::step])
    ax.set_yticklabels([_plain(layer.name) for layer in ran][::step], fontsize=5)
    ax.set_xlabel("firing frequency (fraction of counted positions, log scale)")
    figure.colorbar(image, ax=ax, fraction=0.03, pad=0.01, label="share of units")
    ax.set_title("Per-unit firing frequency by layer")
    return _svg(figure)


def layer_svg(layer: LayerStats, settings) -> str:
    """Histogram of active rates (log counts, dead units as their own bar) and max pre-activation per unit."""
    plt = _pyplot()
    figure, (hist, strip) = plt.subplots(1, 2, figsize=(7.2, 1.9), gridspec_kw={"width_ratios": [1, 1.4]})
    rates = layer.active_rate()
    dead = layer.dead_mask()
    bins = np.linspace(0, 1, 21)
    counts, _ = np.histogram(rates[~dead], bins=bins)
    hist.bar(bins[:-1] + 0.025, counts, width=0.045, color=COLORS["alive"], label="firing")
    hist.bar([-0.05], [int(dead.sum())], width=0.045, color=COLORS["dead"], label="dead")
    if counts.any() or dead.any():
        from matplotlib.ticker import FuncFormatter, NullFormatter

        hist.set_yscale("log")
        hist.yaxis.set_major_formatter(FuncFormatter(lambda value, _pos: f"{value:g}"))
        hist.yaxis.set_minor_formatter(NullFormatter())
    hist.set_xlim(-0.1, 1.02)
    hist.set_xlabel("active rate")
    hist.set_ylabel("units")
    hist.legend(fontsize=6, frameon=False)
    maxima = np.where(np.isfinite(layer.max_preactivation), layer.max_preactivation, np.nan)
    units = np.arange(layer.units)
    status_colors = np.where(
        dead, COLORS["dead"], np.where(layer.dying_mask(settings.dying), COLORS["dying"], COLORS["alive"])
    )
    if layer.units <= WIDE_UNITS:
        strip.scatter(units, maxima, s=12 if layer.units <= 128 else 4, c=list(status_colors), linewidths=0)
    else:  # an LLM's 11,008-unit FFN: the range per bin of units, and where the dead ones are
        parts = np.array_split(np.arange(layer.units), UNIT_BINS)
        starts = np.array([part[0] for part in parts])
        finite = [maxima[part][np.isfinite(maxima[part])] for part in parts]
        low = np.array([f.min() if f.size else np.nan for f in finite])
        high = np.array([f.max() if f.size else np.nan for f in finite])
        strip.fill_between(starts, low, high, step="post", color=COLORS["alive"], linewidth=0, alpha=0.7)
        dead_per_bin = np.array([int(dead[part].sum()) for part in parts])
        hit = dead_per_bin > 0
        strip.scatter(
            starts[hit], low[hit], s=4, c=COLORS["dead"], linewidths=0, label="bins with dead units"
        )
        strip.legend(fontsize=6, frameon=False)
    strip.axhline(settings.threshold, color="#555", linewidth=0.6, linestyle="--")
    strip.set_xlabel("unit")
    strip.set_ylabel("max pre-activation")
    # a fixed gap between the two panels instead of tight_layout (a third layout pass: ~1/3 of the time);
    # savefig's tight bounding box still crops the margins
    figure.subplots_adjust(wspace=0.32)
    return _svg(figure)


CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1100px;padding:12px;color:#212121}
h1{font-size:20px;margin:4px 0}h2{font-size:17px;margin:22px 0 6px}h3{font-size:15px;margin:0}
.meta{color:#555;font-size:12px;word-break:break-all}
.cards{display:flex;flex-wrap:wrap;gap:8px;margin:10px 0}
.card{border:1px solid #ddd;border-radius:6px;padding:6px 12px;min-width:90px}
.card b{display:block;font-size:20px}.card.bad b{color:#c62828}.card.ok b{color:#2e7d32}
.plot svg{max-width:100%;height:auto}
table{border-collapse:collapse;width:100%;font-size:13px}th,td{padding:3px 6px;border-bottom:1px solid #eee;text-align:right}
th{cursor:pointer;background:#fafafa;position:sticky;top:0}td:first-child,th:first-child{text-align:left}
tr.warn{background:#fff3e0}tr.crit{background:#ffebee}tr.notrun{color:#999}
.DEAD{color:#c62828;font-weight:600}.dying{color:#ef6c00}.dormant{color:#8d6e63}.saturated{color:#6a1b9a}
details{border:1px solid #eee;border-radius:6px;margin:8px 0;padding:4px 8px}summary{cursor:pointer}
input[type=search]{width:100%;max-width:360px;padding:4px;margin:4px 0}
.scroll{overflow-x:auto}
@media (max-width:600px){body{padding:6px}.card{min-width:70px}td,th{padding:2px 3px}}
"""

JS = """
document.querySelectorAll('table.sortable').forEach(function(table){
  table.querySelectorAll('th').forEach(function(th, col){
    th.addEventListener('click', function(){
      var body = table.tBodies[0], rows = Array.from(body.rows), asc = th.dataset.asc !== '1';
      th.dataset.asc = asc ? '1' : '0';
      rows.sort(function(a, b){
        var x = a.cells[col].dataset.v || a.cells[col].textContent, y = b.cells[col].dataset.v || b.cells[col].textContent;
        var nx = parseFloat(x), ny = parseFloat(y);
        var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
        return asc ? c : -c;
      });
      rows.forEach(function(r){ body.appendChild(r); });
    });
  });
});
document.querySelectorAll('input[data-filter]').forEach(function(input){
  input.addEventListener('input', function(){
    var q = input.value.toLowerCase();
    document.querySelectorAll(input.dataset.filter + ' tbody tr').forEach(function(r){
      r.style.display = r.textContent.toLowerCase().indexOf(q) >= 0 ? '' : 'none';
    });
  });
});
"""


def _plain(name: str) -> str:
    """A name for a matplotlib label: controls escaped, `$` not read as mathtext."""
    return terminal_text(name).replace("$", r"\$")


def _e(value) -> str:
    return html_text(value)


def _card(label: str, value: str, cls: str = "") -> str:
    return f'<div class="card {cls}"><b>{_e(value)}</b>{_e(label)}</div>'


def render_html(report: Report, baseline: Report | None = None, gate: GateSummary | None = None) -> str:
    s = report.summary()
    settings = report.settings
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>deadrelu: {_e(report.model.path)}</title><style>{CSS}</style></head><body>",
        f"<h1>deadrelu report: {_e(report.model.path)}</h1>",
        f'<p class="meta">model <b>{_e(report.model.path)}</b> ({_e(report.model.format)}), sha256 {_e(report.model.sha256)}<br>'
        f"data <b>{_e(report.data.path)}</b>, {_e(report.data.samples_text())} · threshold {settings.threshold:g} · "
        f"dying &lt; {settings.dying:g} · tau {settings.tau:g} · device {_e(settings.device)} · "
        f"deadrelu {_e(report.tool.get('version', ''))}</p>",
        '<section id="summary"><h2>Summary</h2><div class="cards">',
        _card("units", f"{s.units:,}"),
        _card("dead", f"{s.dead:,}", "bad" if s.dead else "ok"),
        _card("dead %", f"{100 * s.dead_fraction:.1f}%", "bad" if s.dead_fraction > WARN_FRACTION else ""),
        _card("dying", f"{s.dying:,}"),
        _card("dormant", f"{s.dormant:,}"),
        _card("layers with dead units", f"{s.layers_with_dead} / {s.layers}"),
    ]
    if s.activation_sparsity is not None:
        parts.append(_card("activation sparsity", f"{100 * s.activation_sparsity:.1f}%"))
    if baseline is not None:
        b = baseline.summary()
        parts.append(
            _card(
                "baseline dead %",
                f"{100 * b.dead_fraction:.1f}% → {100 * s.dead_fraction:.1f}%",
                "bad" if s.dead_fraction > b.dead_fraction else "ok",
            )
        )
    if gate is not None:
        parts.append(_card("gate", "passed" if gate.passed else "FAILED", "ok" if gate.passed else "bad"))
    parts.append("</div>")
    if gate is not None and gate.failures:
        parts.append("<ul>" + "".join(f"<li>{_e(f)}</li>" for f in gate.failures) + "</ul>")
    parts.append("</section>")
    parts.append(
        f'<section id="by-layer"><h2>Dead units by layer</h2><div class="plot">{dead_by_layer_svg(report, baseline)}</div></section>'
    )
    ran = sum(1 for layer in report.layers if layer.ran and layer.units)
    if ran >= DEPTH_MIN_LAYERS:
        parts.append(
            '<section id="firing"><h2>Firing frequency</h2><div class="plot">'
            f"{firing_frequency_svg(report)}</div></section>"
        )
    parts.append(_layers_table(report, baseline))
    parts.append('<section id="layers-detail"><h2>Layer by layer</h2>')
    figures = ran <= LAYER_FIGURES_MAX
    if not figures:
        parts.append(
            f'<p class="meta">{ran} layers: their firing frequencies are the rows of the '
            '<a href="#firing">firing-frequency map</a> (one figure per layer only up to '
            f"{LAYER_FIGURES_MAX} layers).</p>"
        )
    for index, layer in enumerate(report.layers):
        parts.append(_layer_section(report, layer, index, figures))
    parts.append("</section>")
    parts.append(f"<script>{JS}</script></body></html>")
    return "\n".join(parts) + "\n"


def _layers_table(report: Report, baseline: Report | None) -> str:
    settings = report.settings
    old = match_layers(baseline, report) if baseline is not None else {}
    head = (
        ["Layer", "Op", "Units", "Dead", "Dead %"]
        + (["Baseline dead %"] if baseline is not None else [])
        + ["Dying", "Dormant", "Median active %"]
    )
    certified = any(layer.upper_bound is not None or layer.certify_note for layer in report.layers)
    if certified:
        head.append("Provably dead")
    rows = []
    for layer in report.layers:
        if not layer.ran:
            rows.append(
                f'<tr class="notrun" data-layer="{_e(layer.name)}"><td>{_e(layer.name)}</td><td>{_e(layer.op)}</td>'
                + "<td>–</td>" * (len(head) - 2)
                + "</tr>"
            )
            continue
        dead = int(layer.dead_mask().sum())
        fraction = dead / layer.units if layer.units else 0.0
        cls = "crit" if fraction >= CRITICAL_FRACTION else "warn" if fraction > WARN_FRACTION else ""
        cells = [
            f'<td><a href="#layer-{report.layers.index(layer)}">{_e(layer.name)}</a></td>',
            f"<td>{_e(layer.op)}</td>",
            f"<td>{layer.units}</td>",
            f"<td>{dead}</td>",
            f'<td data-v="{fraction:.6f}">{100 * fraction:.1f}%</td>',
        ]
        if baseline is not None:
            before = old.get(layer.name)
            cells.append(
                f"<td>{100 * _dead_fraction(before):.1f}%</td>" if before is not None else "<td>(new)</td>"
            )
        cells += [
            f"<td>{int(layer.dying_mask(settings.dying).sum())}</td>",
            f"<td>{int(layer.dormant_mask(settings.tau).sum())}</td>",
            f"<td>{100 * float(np.median(layer.active_rate())):.1f}%</td>",
        ]
        if certified:
            cells.append(
                f"<td>{len(layer.certified_dead)}</td>"
                if layer.certified_dead is not None
                else f'<td title="{_e(layer.certify_note or "")}">not certified</td>'
            )
        rows.append(f'<tr class="{cls}" data-layer="{_e(layer.name)}">' + "".join(cells) + "</tr>")
    return (
        '<section id="layers"><h2>Layers</h2><input type="search" placeholder="filter layers" data-filter="#layer-table">'
        '<div class="scroll"><table id="layer-table" class="sortable"><thead><tr>'
        + "".join(f"<th>{_e(h)}</th>" for h in head)
        + "</tr></thead><tbody>"
        + "\n".join(rows)
        + "</tbody></table></div></section>"
    )


def _layer_section(report: Report, layer: LayerStats, index: int, figure: bool = True) -> str:
    settings = report.settings
    if not layer.ran:
        return f'<details id="layer-{index}"><summary><h3>{_e(layer.name)}</h3> — not run on this data</summary></details>'
    dead = int(layer.dead_mask().sum())
    fraction = dead / layer.units if layer.units else 0.0
    dormant = layer.dormant_mask(settings.tau)
    # every unit unit_status calls anything but alive (dead, saturated, dying), and the dormant ones
    flagged = layer.dead_mask() | layer.saturated_mask() | layer.dying_mask(settings.dying) | dormant
    interesting = np.flatnonzero(flagged).tolist()
    rates = layer.active_rate()
    mean_abs = layer.mean_abs()
    rows = []
    for i in interesting[:MAX_LISTED_UNITS]:
        status = unit_status(layer, i, settings.dying)
        status = "dormant" if status == "alive" and dormant[i] else status
        bias = "–" if layer.bias is None else f"{layer.bias[i]:.4g}"
        maximum = layer.max_preactivation[i]
        rows.append(
            f'<tr><td>{i}</td><td>{bias}</td><td data-v="{rates[i]:.8f}">{100 * rates[i]:.2f}%</td>'
            f'<td>{maximum:.4g}</td><td>{mean_abs[i]:.4g}</td><td class="{status}">{status}</td></tr>'
        )
    omitted = layer.units - len(interesting)
    unlisted = max(0, len(interesting) - MAX_LISTED_UNITS)
    table = (
        '<div class="scroll"><table class="sortable units"><thead><tr><th>Unit</th><th>Bias'
        + (f" ({_e(layer.producer)})" if layer.producer else "")
        + "</th><th>Active %</th><th>Max pre-act</th>"
        "<th>Mean |act|</th><th>Status</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table></div>"
    )
    note = f'<p class="meta">{omitted} alive units not listed.</p>' if omitted else ""
    if unlisted:
        note += (
            f'<p class="meta">{unlisted} more dead, dying or dormant units not listed here '
            "(the JSON report lists every index).</p>"
        )
    open_attr = " open" if fraction > WARN_FRACTION else ""
    return (
        f'<details id="layer-{index}" data-layer="{_e(layer.name)}"{open_attr}><summary><h3 style="display:inline">{_e(layer.name)}</h3> — '
        f"{_e(layer.op)}, {dead}/{layer.units} dead ({100 * fraction:.1f}%), unit axis {layer.channel_dim}</summary>"
        + (f'<div class="plot">{layer_svg(layer, settings)}</div>' if figure else "")
        + f"{table}{note}</details>"
    )


def render_trend_html(result) -> str:
    """`deadrelu trend --html`: dead fraction per layer across checkpoints, and when units died."""
    plt = _pyplot()
    steps = [c.step if c.step is not None else i for i, c in enumerate(result.checkpoints)]
    figure, ax = plt.subplots(figsize=(7.5, 3.2))
    for layer in result.layers:
        values = [np.nan if v is None else 100 * v for v in layer.dead_fraction]
        ax.plot(steps, values, marker="o", markersize=3, linewidth=1.2, label=_plain(layer.name))
    ax.axhspan(WARN_FRACTION * 100, CRITICAL_FRACTION * 100, color=COLORS["warn"], zorder=0)
    ax.axhspan(CRITICAL_FRACTION * 100, 100, color=COLORS["crit"], zorder=0)
    ax.set_ylim(0, 100)
    ax.set_xlabel("step" if any(c.source == "checkpoint" for c in result.checkpoints) else "checkpoint")
    ax.set_ylabel("dead units (%)")
    if len(result.layers) <= 20:
        ax.legend(fontsize=6, frameon=False, loc="upper left")
    ax.set_title("Dead fraction by layer across checkpoints")
    rows = []
    for layer in result.layers:
        first = min(layer.died_at.values(), default=None)
        cells = "".join(
            "<td>–</td>" if v is None else f"<td>{100 * v:.1f}%</td>" for v in layer.dead_fraction
        )
        rows.append(
            f'<tr data-layer="{_e(layer.name)}"><td>{_e(layer.name)}</td>{cells}<td>{len(layer.died_at)}</td>'
            f"<td>{'–' if first is None else steps[first]}</td><td>{len(layer.revived)}</td></tr>"
        )
    head = "".join(f"<th>{_e(s)}</th>" for s in steps)
    return (
        "\n".join(
            [
                "<!DOCTYPE html>",
                '<html lang="en"><head><meta charset="utf-8">',
                '<meta name="viewport" content="width=device-width, initial-scale=1">',
                f"<title>deadrelu trend</title><style>{CSS}</style></head><body>",
                f"<h1>deadrelu trend: {len(steps)} checkpoints</h1>",
                f'<p class="meta">ordered by {_e(result.order)} · {result.samples} samples</p>',
                f'<section id="trend"><div class="plot">{_svg(figure)}</div></section>',
                '<section id="layers"><div class="scroll"><table class="sortable"><thead><tr><th>Layer</th>'
                f"{head}<th>Died</th><th>First died at</th><th>Revived</th></tr></thead><tbody>"
                + "\n".join(rows)
                + "</tbody></table></div></section>",
                f"<script>{JS}</script></body></html>",
            ]
        )
        + "\n"
    )
