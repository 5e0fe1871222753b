"""Pictures of a run, as SVG: text that the standard library writes and every browser shows. Every run folder gets

- structure.svg: per layer, the heads and FFN units kept, as bars against the layer's full size (from structure.md);
- training.svg: against the step, the ramped target and the expected sparsity (Eq. 3), and the loss terms on a log
  axis, with the start of stage 2, each change of teacher and every skipped step marked (from log.jsonl), redrawn
  at every checkpoint, so an interrupted run has its picture too;

and lab/experiments.py draws comparison.svg. Redraw finished runs, and overlay the structures of several:

    python -m formats.svg RUN [RUN ...] [--out structures.svg]
"""
import argparse
import json
import math
import re
import sys
from pathlib import Path
from xml.sax.saxutils import escape

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22"]
LOSSES = {"kl": "#d62728", "layer": "#2ca02c", "ce": "#9467bd"}  # log.jsonl's loss terms: Eq. 5, Eq. 6, next-token


def document(width, height, body):
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
            f'font-family="sans-serif" font-size="11">\n<rect width="100%" height="100%" fill="white"/>\n'
            + "\n".join(body) + "\n</svg>\n")


def text(x, y, s, anchor="start", **attrs):
    more = "".join(f' {k.replace("_", "-")}="{v}"' for k, v in attrs.items())
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}"{more}>{escape(str(s))}</text>'


def nice_ticks(lo, hi, n=5):
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    step *= next(m for m in (1, 2, 5, 10) if (hi - lo) / (step * m) <= n)
    return [k * step for k in range(math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9) + 1)]


def limits(values, log=False, unit=5):
    """Axis limits around the values: whole powers of 10 (log), else multiples of unit; never an empty range."""
    if log:
        lo, hi = math.floor(math.log10(min(values))), math.ceil(math.log10(max(values)))
        return lo, max(hi, lo + 1)
    lo, hi = math.floor(min(values) / unit) * unit, math.ceil(max(values) / unit) * unit
    return lo, max(hi, lo + unit)


class Axes:
    """A plot area, top-left at (left, top), w x h pixels, showing xlim x ylim (ylim in powers of 10 when log)."""

    def __init__(self, left, top, w, h, xlim, ylim, log=False):
        self.left, self.top, self.w, self.h, self.xlim, self.ylim, self.log = left, top, w, h, xlim, ylim, log

    def x(self, v):
        return self.left + (v - self.xlim[0]) / (self.xlim[1] - self.xlim[0]) * self.w

    def y(self, v):
        v = math.log10(v) if self.log else v
        return self.top + self.h - (v - self.ylim[0]) / (self.ylim[1] - self.ylim[0]) * self.h

    def frame(self, xlabel, ylabel, xticks=(), xnames=None):
        """The box, ticks with their numbers and the axis labels."""
        out = [f'<rect x="{self.left}" y="{self.top}" width="{self.w}" height="{self.h}" fill="none" stroke="#444"/>']
        yticks = [10 ** k for k in range(math.ceil(self.ylim[0]), math.floor(self.ylim[1]) + 1)] if self.log \
            else nice_ticks(*self.ylim)
        for v in yticks:
            out += [f'<line x1="{self.left - 4}" x2="{self.left + self.w}" y1="{self.y(v):.1f}" y2="{self.y(v):.1f}" '
                    f'stroke="#ddd"/>', text(self.left - 6, self.y(v) + 4, f"{v:g}", "end")]
        for i, v in enumerate(xticks):
            out.append(text(self.x(v), self.top + self.h + 14, xnames[i] if xnames else f"{v:g}", "middle"))
        cx, cy = self.left - 54, self.top + self.h / 2
        return out + [text(self.left + self.w / 2, self.top + self.h + 30, xlabel, "middle"),
                      text(cx, cy, ylabel, "middle", transform=f"rotate(-90 {cx:.1f} {cy:.1f})")]

    def polyline(self, xs, ys, color, name, dash=None):
        points = " ".join(f"{self.x(a):.2f},{self.y(b):.2f}" for a, b in zip(xs, ys))
        return (f'<polyline class="{name}" points="{points}" fill="none" stroke="{color}" stroke-width="1.5"'
                + (f' stroke-dasharray="{dash}"' if dash else "") + "/>")


def legend(x, y, entries):
    """[(color, label)] one under the other, from (x, y)."""
    return [f'<rect x="{x}" y="{y + 16 * i - 9}" width="10" height="10" fill="{c}"/>' + text(x + 15, y + 16 * i, s)
            for i, (c, s) in enumerate(entries)]


# ----------------------------------------------------------------------------------------------------
# structure.svg

def read_structure(run):
    """A run folder's structure.md (masks.structure_table) and target -> the numbers structure.svg draws."""
    md = (Path(run) / "structure.md").read_text()
    found = [re.search(pattern, md) for pattern in (r"Hidden dim: (\d+) of (\d+) .*prunable weights: ([\d.]+)",
                                                    r"\| Head \(of (\d+)\) \|(.*)\|",
                                                    r"\| Intermediate dim \(of (\d+)\) \|(.*)\|")]
    if not all(found):
        raise ValueError(f"{run}/structure.md: not the table nute.py writes")
    (hidden, dim, sparsity), heads, ffn = (m.groups() for m in found)
    settings = json.loads((Path(run) / "settings.json").read_text())
    return {"name": Path(run).name, "target": settings["target"], "sparsity": float(sparsity), "hidden": int(hidden),
            "dim": int(dim), "n_heads": int(heads[0]), "heads": [int(v) for v in heads[1].split("|")],
            "ffn_dim": int(ffn[0]), "ffn": [int(v) for v in ffn[1].split("|")]}


def structure_svg(runs):
    """One or more read_structure results -> SVG: a panel of heads and one of FFN units, layers side by side,
    each run's bar in its colour in front of the layer's full size (grey)."""
    layers, n = len(runs[0]["heads"]), len(runs)
    sizes = {(len(r["heads"]), r["n_heads"], r["ffn_dim"]) for r in runs}
    if len(sizes) > 1:
        raise ValueError(f"the runs prune different models (layers, heads, FFN units: {sorted(sizes)})")
    slot = max(16, 5 * n + 6)  # pixels a layer
    w, h, left = layers * slot, 150, 80
    top = 40 + 16 * n  # under the legend
    body = [text(left, 20, "Kept per layer (bars) of the layer's full size (grey)", font_size=13)]
    body += legend(left, 40, [(COLORS[i % len(COLORS)], f"{r['name']}: target {r['target']:.2f}, sparsity "
                               f"{r['sparsity']:.4f}, hidden dims kept {r['hidden']} of {r['dim']}")
                              for i, r in enumerate(runs)])
    for p, (key, full, label) in enumerate([("heads", "n_heads", "heads"), ("ffn", "ffn_dim", "FFN units")]):
        ax = Axes(left, top + p * (h + 50), w, h, (0, layers), (0, runs[0][full]))
        every = 1 if layers <= 20 else 5  # layer numbers under the bars
        body += ax.frame("layer", f"{label} kept", [i + 0.5 for i in range(0, layers, every)],
                         [str(i) for i in range(0, layers, every)])
        body += [f'<rect x="{ax.x(i) + 1:.2f}" y="{ax.y(runs[0][full]):.2f}" width="{slot - 2}" height="{h}" '
                 f'fill="#eee"/>' for i in range(layers)]
        bar = (slot - 4) / n
        for j, r in enumerate(runs):
            body += [f'<rect class="{key}" data-run="{j}" data-layer="{i}" x="{ax.x(i) + 2 + j * bar:.2f}" '
                     f'y="{ax.y(k):.2f}" width="{bar:.2f}" height="{ax.y(0) - ax.y(k):.2f}" '
                     f'fill="{COLORS[j % len(COLORS)]}"><title>{escape(r["name"])}, layer {i}: {k} of {r[full]} '
                     f'{label}</title></rect>' for i, k in enumerate(r[key])]
    return document(left + w + 20, top + 2 * h + 100, body)


# ----------------------------------------------------------------------------------------------------
# training.svg

def read_log(run):
    """log.jsonl's rows; a torn last line (a crash mid-write) is left out."""
    rows = []
    for line in open(Path(run) / "log.jsonl"):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


def training_svg(rows, name=""):
    """log.jsonl rows -> SVG: the sparsity panel (ramped target dashed, Eq. 3's expected sparsity), the loss panel
    (log axis); stage 2's start a vertical line, a change of teacher a tick on top, a skipped step a red cross."""
    w, h, left = 640, 180, 80
    last = max([r["step"] for r in rows] + [1])
    body = [text(left, 20, f"{name}: {len(rows)} steps" if name else f"{len(rows)} steps", font_size=13)]
    top = max([r["target"] for r in rows] + [r["expected_sparsity"] for r in rows] + [0.1])
    ax = Axes(left, 40, w, h, (0, last), (0, math.ceil(top * 11) / 10))
    steps = [r["step"] for r in rows]
    body += ax.frame("step", "sparsity", nice_ticks(0, last) if last > 1 else [0, 1])
    body += [ax.polyline(steps, [r["expected_sparsity"] for r in rows], COLORS[0], "expected_sparsity"),
             ax.polyline(steps, [r["target"] for r in rows], "#888", "target", dash="5,3"),
             text(left + w + 10, 48, "teacher changes")] + legend(left + w + 10, 70, [("#888", "target"), (COLORS[0], "expected")])
    vline = lambda step, y2, name, more: (f'<line class="{name}" x1="{ax.x(step):.2f}" x2="{ax.x(step):.2f}" y1="40" '
                                          f'y2="{y2}" stroke="#444"{more}')
    for prev, r in zip([{}] + rows, rows):
        if "teacher" in prev and r["teacher"] != prev["teacher"]:
            body.append(vline(r["step"], 48, "teacher", f'><title>step {r["step"]}: teacher {r["teacher"]}</title></line>'))
        if r.get("stage2") and not prev.get("stage2"):
            body += [vline(r["step"], 40 + 2 * h + 50, "stage2", ' stroke-dasharray="2,2"/>'), text(ax.x(r["step"]) + 3, 58, "stage 2")]
    good = [r for r in rows if not r["skipped"]]
    values = [r[k] for r in good for k in LOSSES if r.get(k) and math.isfinite(r[k]) and r[k] > 0]
    ax2 = Axes(left, 40 + h + 50, w, h, (0, last), limits(values, log=True) if values else (0, 1), log=True)
    body += ax2.frame("step", "loss (log)", nice_ticks(0, last) if last > 1 else [0, 1])
    for k, color in LOSSES.items():
        kept = [r for r in good if r.get(k) and math.isfinite(r[k]) and r[k] > 0]
        body += [ax2.polyline([r["step"] for r in kept], [r[k] for r in kept], color, k)] if kept else []
    body += legend(left + w + 10, 40 + h + 60, [(c, k) for k, c in LOSSES.items()])
    body += [text(ax2.x(r["step"]), ax2.top + h - 2, "x", "middle", fill="red", **{"class": "skipped"})
             for r in rows if r["skipped"]]
    return document(left + w + 90, 40 + 2 * h + 100, body)


def draw(run):
    """(Re)draws a run folder's pictures: training.svg from its log, structure.svg once structure.md is there."""
    run = Path(run)
    if (run / "log.jsonl").exists():
        (run / "training.svg").write_text(training_svg(read_log(run), run.name))
    if (run / "structure.md").exists():
        (run / "structure.svg").write_text(structure_svg([read_structure(run)]))


# ----------------------------------------------------------------------------------------------------
# comparison.svg (lab/experiments.py)

def comparison_svg(points, dense):
    """points: [(method, ratio in [0, 1], held-out perplexity, 7-task average or None)], one a run (seed); dense:
    (perplexity, average or None) -> SVG: perplexity (log axis) and the average against the ratio, dense a line."""
    methods = list(dict.fromkeys(m for m, *_ in points))
    ratios = sorted({r for _, r, *_ in points})
    w, h, left = 300, 260, 80
    body = [text(left, 20, "Held-out perplexity and 7-task average against the ratio pruned", font_size=13)]
    for col, label in enumerate(["held-out perplexity", "7-task average accuracy"]):
        values = [p[2 + col] for p in points if p[2 + col] is not None] + [dense[col]] * (dense[col] is not None)
        if not values:  # no tasks scored (--tasks none)
            continue
        ax = Axes(left + col * (w + left + 20), 40, w, h, (0, max(ratios, default=0.8) * 1.25), limits(values, log=col == 0), col == 0)
        body += ax.frame("ratio pruned", label, [0] + ratios, ["0"] + [f"{r:.0%}" for r in ratios])
        body += [ax.polyline(ax.xlim, [dense[col]] * 2, "#000", "dense", dash="5,3")] if dense[col] is not None else []
        for m, ratio, *v in points:
            i = methods.index(m)
            if v[col] is not None:  # the methods side by side around their ratio
                x = ax.x(ratio) + (i - (len(methods) - 1) / 2) * 6
                body.append(f'<circle class="point" cx="{x:.2f}" cy="{ax.y(v[col]):.2f}" r="3" '
                            f'fill="{COLORS[i % len(COLORS)]}"><title>{escape(m)}, {ratio:.0%}: {v[col]:.2f}</title></circle>')
    body += legend(left, h + 100, [("#000", "dense")] + [(COLORS[i % len(COLORS)], m) for i, m in enumerate(methods)])
    return document(3 * left + 2 * w + 40, h + 110 + 16 * (len(methods) + 1), body)


def main(argv=None):
    p = argparse.ArgumentParser(description="Draws structure.svg and training.svg in each run folder; with "
                                "several runs, also their structures overlaid in --out.")
    p.add_argument("runs", nargs="+", help="run folders (python nute.py --out)")
    p.add_argument("--out", default="structures.svg", help="the overlay, with two or more runs")
    args = p.parse_args(argv)
    for run in args.runs:
        if not (Path(run) / "log.jsonl").exists():
            raise ValueError(f"{run}: not a run folder (no log.jsonl)")
        draw(run)
    if len(args.runs) > 1:
        Path(args.out).write_text(structure_svg([read_structure(r) for r in args.runs]))
    print("drew", ", ".join(args.runs) + (f"; overlay: {args.out}" if len(args.runs) > 1 else ""))


if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError, KeyError, AttributeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
