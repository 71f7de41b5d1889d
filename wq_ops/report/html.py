"""Render `wq_report.html`: one self-contained page (inline SVG and CSS, no scripts, no network). It leads
with what a user checks first (`verdict`: tensor-parallel sizes vLLM loads, size and compression, loaders,
quality, what the error numbers mean), then two heatmaps over block x projection: the relative output error
of each quantized layer, and the largest input activation each layer sees (the LLM.int8 outlier view); the
time each block took, by phase; and the worst layers as a table. Sections have ids (`lead`, `errors`, ...).
"""

from __future__ import annotations

import html
import math
from typing import Any, Callable, Mapping, Sequence

from wq_ops.report.verdict import ERROR_SCALE, loader_verdict, quality_verdict, size_verdict, tensor_parallel_verdict

__all__ = ["render_html"]

_CELL_W, _CELL_H, _LEFT, _TOP = 64, 14, 48, 96
_LEGEND_STEPS, _LEGEND_H = 11, 12            # the colour legend: 11 swatches of 12 px, top to bottom
# Phases of a block's time, in the order they happen, and their colours in the time chart.
_PHASE_COLORS = {"load": "#9ecae1", "forward": "#4292c6", "solve": "#fd8d3c", "pack": "#a1d99b", "write": "#bdbdbd"}


def _color(t: float) -> str:
    """t in [0, 1] -> a perceptually ordered ramp from pale yellow through orange to dark red."""
    stops = [(255, 255, 204), (254, 217, 118), (253, 141, 60), (227, 26, 28), (128, 0, 38)]
    t = min(max(t, 0.0), 1.0) * (len(stops) - 1)
    i = min(int(t), len(stops) - 2)
    f = t - i
    r, g, b = (round(a + (c - a) * f) for a, c in zip(stops[i], stops[i + 1]))
    return f"#{r:02x}{g:02x}{b:02x}"


def _heatmap(title: str, layers: Sequence[Mapping[str, Any]], value: Callable[[Mapping[str, Any]], float | None],
             fmt: Callable[[float], str]) -> str:
    """Rows: blocks; columns: projections (block-local linear names). Log colour scale over the values."""
    projections: list[str] = []
    for layer in layers:
        local = layer["name"].split(f".{layer['block']}.", 1)[-1]
        if local not in projections:
            projections.append(local)
    blocks = sorted({layer["block"] for layer in layers})
    cells = {}
    for layer in layers:
        v = value(layer)
        if v is not None and v > 0:
            cells[(layer["block"], layer["name"].split(f".{layer['block']}.", 1)[-1])] = (v, layer["name"])
    if not cells:
        return f"<h2>{html.escape(title)}</h2><p>no values</p>"
    logs = [math.log10(v) for v, _ in cells.values()]
    lo, hi = min(logs), max(logs)
    width = _LEFT + _CELL_W * len(projections) + 140
    # Tall enough for the legend too: a model of few blocks has fewer rows than the legend has swatches.
    height = _TOP + max(_CELL_H * len(blocks), _LEGEND_STEPS * _LEGEND_H + 8) + 20
    out = [f'<h2>{html.escape(title)}</h2>',
           f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           'font-family="monospace" font-size="10">']
    for j, p in enumerate(projections):
        x = _LEFT + j * _CELL_W + _CELL_W // 2
        out.append(f'<text x="{x}" y="{_TOP - 6}" transform="rotate(-40 {x} {_TOP - 6})">{html.escape(p)}</text>')
    for i, b in enumerate(blocks):
        y = _TOP + i * _CELL_H
        out.append(f'<text x="{_LEFT - 6}" y="{y + 11}" text-anchor="end">{b}</text>')
        for j, p in enumerate(projections):
            x = _LEFT + j * _CELL_W
            cell = cells.get((b, p))
            if cell is None:
                out.append(f'<rect x="{x}" y="{y}" width="{_CELL_W - 1}" height="{_CELL_H - 1}" fill="#eeeeee"/>')
                continue
            v, name = cell
            t = 0.5 if hi == lo else (math.log10(v) - lo) / (hi - lo)
            out.append(f'<rect x="{x}" y="{y}" width="{_CELL_W - 1}" height="{_CELL_H - 1}" fill="{_color(t)}">'
                       f'<title>{html.escape(name)}: {fmt(v)}</title></rect>')
    lx = _LEFT + _CELL_W * len(projections) + 16
    out.append('<g class="legend">')
    for k in range(_LEGEND_STEPS):
        t = 1 - k / (_LEGEND_STEPS - 1)
        out.append(f'<rect x="{lx}" y="{_TOP + k * _LEGEND_H}" width="14" height="{_LEGEND_H}" fill="{_color(t)}"/>')
    out.append(f'<text x="{lx + 18}" y="{_TOP + 10}">{fmt(10 ** hi)}</text>')
    out.append(f'<text x="{lx + 18}" y="{_TOP + _LEGEND_STEPS * _LEGEND_H - 2}">{fmt(10 ** lo)}</text>')
    out.append("</g></svg>")
    return "\n".join(out)


def render_html(report: Mapping[str, Any]) -> str:
    layers = report["layers"]
    job, totals, source = report["job"], report["totals"], report["source"]
    worst = sorted((x for x in layers if x["quantized"]), key=lambda x: -x["output_error"])[:12]
    rows = "\n".join(
        f"<tr><td>{html.escape(x['name'])}</td><td>{x['output_error']:.3e}</td>"
        f"<td>{x['outliers']['absmax']:.3g}</td><td>{x['outliers']['n_outlier_channels']}</td>"
        f"<td>{'' if x['damp_frac'] is None else x['damp_frac']}</td></tr>" for x in worst)
    phases = ", ".join(f"{k} {v:.2f} s" for k, v in totals["phase_seconds"].items())
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>wq report: {html.escape(str(source.get('model')))}</title>
<style>body{{font-family:sans-serif;margin:24px;color:#222}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 8px;font-family:monospace;font-size:12px}} h2{{margin-top:28px}}
#lead th{{text-align:left;font-family:sans-serif;background:#f4f4f4}} #lead td{{font-family:sans-serif;font-size:14px}}
</style>
</head><body>
<h1>wq quantization report</h1>
<p><b>model</b> {html.escape(str(source.get('model')))} ({html.escape(str(source.get('architecture')))},
{source.get('n_blocks')} blocks) &middot; <b>method</b> {html.escape(str(job.get('method')))}
w{job.get('bits')} g{job.get('group_size') or 'channel'} {'sym' if job.get('sym') else 'asym'} &middot;
<b>calibration</b> {job.get('samples')} x {job.get('seq_len')} tokens from
{html.escape(str(job.get('calib') or 'bundled text'))}</p>
{_lead(report)}
<p><b>wall time</b> {totals['wall_seconds']:.1f} s ({html.escape(phases)}) &middot; <b>layers</b>
{totals['layers_quantized']} quantized, {totals['layers_kept']} kept &middot; <b>mean output error</b>
{totals['mean_output_error']:.3e}</p>
<section id="errors">
{_heatmap("Relative output error ||(W-Q)X||^2 / ||WX||^2 per layer (log scale)", layers,
          lambda x: x["output_error"] if x["quantized"] else None, lambda v: f"{v:.2e}")}
</section>
<section id="outliers">
{_heatmap("Input activation max |x| per layer (LLM.int8 outliers: >= 6; log scale)", layers,
          lambda x: x["outliers"]["absmax"], lambda v: f"{v:.3g}")}
</section>
<section id="experts">{_experts(layers)}</section>
<section id="time">{_time_chart(report.get("blocks", []))}</section>
<section id="worst">
<h2>Layers with the largest output error</h2>
<table><tr><th>layer</th><th>output error</th><th>input max |x|</th><th>channels with |x| &ge; 6</th><th>damp</th></tr>
{rows}
</table>
</section>
</body></html>
"""


def _lead(report: Mapping[str, Any]) -> str:
    """What a user checks first, as a two-column table."""
    compat = report.get("compatibility")
    rows = [("vLLM tensor parallel", tensor_parallel_verdict(compat) or "not checked"),
            ("size", size_verdict(report)),
            ("read by", loader_verdict(compat) or "unknown"),
            ("quality", quality_verdict(report.get("eval")) or "not evaluated (run with --eval TEXT)"),
            ("mean output error", f"{report['totals']['mean_output_error']:.3e}: {ERROR_SCALE}")]
    body = "\n".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f'<section id="lead"><h2>At a glance</h2><table>\n{body}\n</table></section>'


def _time_chart(blocks: Sequence[Mapping[str, Any]]) -> str:
    """One bar per block, its seconds stacked by phase (a resumed block took none: staged by an earlier run)."""
    if not blocks:
        return ""
    longest = max(sum(b["seconds"].values()) for b in blocks) or 1.0
    bar_w, row_h, left, top = 480, 14, 48, 24
    height = top + max(row_h * len(blocks), 14 * len(_PHASE_COLORS) + 8) + 20     # the legend fits too
    out = ['<h2>Time per block, by phase</h2>',
           f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + bar_w + 200}" height="{height}" '
           'font-family="monospace" font-size="10">']
    for i, b in enumerate(blocks):
        y, x = top + i * row_h, float(left)
        out.append(f'<text x="{left - 6}" y="{y + 11}" text-anchor="end">{b["block"]}</text>')
        for phase, seconds in b["seconds"].items():
            w = bar_w * seconds / longest
            color = _PHASE_COLORS.get(phase, "#756bb1")
            out.append(f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{row_h - 2}" fill="{color}">'
                       f'<title>block {b["block"]} {html.escape(phase)}: {seconds:.3f} s</title></rect>')
            x += w
        label = "resumed" if b.get("resumed") else f"{sum(b['seconds'].values()):.2f} s"
        out.append(f'<text x="{x + 4:.1f}" y="{y + 11}">{label}</text>')
    lx = left + bar_w + 60
    out.append('<g class="legend">')
    for k, (phase, color) in enumerate(_PHASE_COLORS.items()):
        out.append(f'<rect x="{lx}" y="{top + k * 14}" width="12" height="12" fill="{color}"/>'
                   f'<text x="{lx + 16}" y="{top + k * 14 + 10}">{phase}</text>')
    out.append("</g></svg>")
    return "\n".join(out)


def _experts(layers: Sequence[Mapping[str, Any]]) -> str:
    """Mixture-of-experts models: the tokens routed to each expert (its gate/w1 linear's), per block, and the
    experts that starved (fewer tokens than --moe-min-tokens: quantized with RTN). Empty for a dense model."""
    gates = [x for x in layers if ".experts." in x["name"] and x["name"].endswith((".gate_proj", ".w1"))]
    if not gates:
        return ""
    starved = [x["name"] for x in layers if x.get("starved")]
    listed = ", ".join(html.escape(n) for n in starved[:200]) + (" ..." if len(starved) > 200 else "")
    return (_heatmap("Calibration tokens routed to each expert (its gate projection; log scale)", gates,
                     lambda x: x.get("tokens") or None, lambda v: f"{v:.0f}")
            + f"<p><b>starved expert linears</b> (quantized with RTN): {len(starved)}"
            + (f": {listed}" if starved else "") + "</p>")
