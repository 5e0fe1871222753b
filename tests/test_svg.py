"""formats/svg.py: the pictures every run draws, checked against the run's own records (adapter, log.jsonl)."""
import json
import math
import subprocess
import sys
import xml.etree.ElementTree as ET

import torch
from safetensors.torch import load_file

import nute
from conftest import ROOT
from formats import svg
from test_nute import run, tiny  # noqa: F401 (tiny is the fixture)

NS = "{http://www.w3.org/2000/svg}"


def parse(path):
    return ET.parse(path).getroot()  # fails unless it is well-formed XML


def texts(root):
    return [t.text for t in root.iter(NS + "text")]


def points(root, name):
    """The (x, y) pairs of the polyline of class `name`."""
    line = next(p for p in root.iter(NS + "polyline") if p.get("class") == name)
    return [tuple(map(float, xy.split(","))) for xy in line.get("points").split()]


def check_affine(pts, xs, ys):
    """Every point is (a + b x, c + d y) for one a, b > 0, c, d < 0: the values, scaled, and up means more."""
    assert len(pts) == len(xs) == len(ys) and len(pts) >= 2
    b = (pts[-1][0] - pts[0][0]) / (xs[-1] - xs[0])
    d = (pts[-1][1] - pts[0][1]) / (ys[-1] - ys[0]) if ys[-1] != ys[0] else None
    assert b > 0
    for (px, py), x, y in zip(pts, xs, ys):
        assert math.isclose(px, pts[0][0] + b * (x - xs[0]), abs_tol=0.02)
        if d is not None:
            assert d < 0 and math.isclose(py, pts[0][1] + d * (y - ys[0]), abs_tol=0.02)
    return b, d


def test_a_run_draws_its_structure_and_training(tiny, tmp_path):
    out = tmp_path / "r"
    run(tiny, out, "--target", "0.3", "--steps", "16", "--interval", "0.1", "--save-every", "5")
    adapter, rows = load_file(str(out / "adapter.safetensors")), [json.loads(line) for line in open(out / "log.jsonl")]
    # structure.svg: one bar per layer and type, its height the kept count over the layer's full size
    root = parse(out / "structure.svg")
    for key, cls in (("z_head", "heads"), ("z_int", "ffn")):
        bars = [r for r in root.iter(NS + "rect") if r.get("class") == cls]
        kept, full = (adapter[key] > 0).sum(1).tolist(), adapter[key].shape[1]
        assert [int(b.get("data-layer")) for b in bars] == list(range(len(kept)))
        assert key == "z_head" or any(k < full for k in kept)  # (the tiny model loses FFN units only)
        heights = [float(b.get("height")) for b in bars]
        tallest = max(heights) / max(kept)  # pixels per unit
        assert all(math.isclose(hgt, k * tallest, abs_tol=0.02) for hgt, k in zip(heights, kept))
        assert math.isclose(tallest * full, 150, abs_tol=0.02)  # the full size fills the panel
    dim = len(adapter["z_hid"])
    assert any(f"hidden dims kept {dim} of {dim}" in t for t in texts(root))  # --prune-hidden no
    # training.svg: every line is log.jsonl's values scaled, target and expected sparsity on one scale
    root = parse(out / "training.svg")
    steps = [r["step"] for r in rows]
    b1, d1 = check_affine(points(root, "target"), steps, [r["target"] for r in rows])
    b2, d2 = check_affine(points(root, "expected_sparsity"), steps, [r["expected_sparsity"] for r in rows])
    assert math.isclose(b1, b2, rel_tol=1e-4) and math.isclose(d1, d2, rel_tol=1e-4)
    bs = {check_affine(points(root, k), steps, [math.log10(r[k]) for r in rows])[0] for k in ("kl", "layer", "ce")}
    assert all(math.isclose(b, b1, rel_tol=1e-4) for b in bs)  # one step axis for both panels
    changes = [r["step"] for p, r in zip(rows, rows[1:]) if r["teacher"] != p["teacher"]]
    assert changes and [e.find(NS + "title").text for e in root.iter(NS + "line") if e.get("class") == "teacher"] == \
        [f"step {s}: teacher {r['teacher']}" for s, r in zip(changes, [r for r in rows if r["step"] in changes])]
    stage2 = [e for e in root.iter(NS + "line") if e.get("class") == "stage2"]
    assert len(stage2) == 1 and any(r["stage2"] for r in rows)
    assert {"step", "sparsity", "loss (log)", "target", "expected", "kl", "layer", "ce", "stage 2"} <= set(texts(root))


def test_one_step_skipped_steps_and_a_resumed_run_draw(tiny, tmp_path, monkeypatch):
    run(tiny, tmp_path / "one", "--target", "0.3", "--steps", "1")
    assert len(points(parse(tmp_path / "one" / "training.svg"), "target")) == 1
    real, calls = nute.micro_step, []

    def nan_at_the_second_step(model_, x, m, adapter, *rest):
        calls.append(1)
        terms = real(model_, x, m, adapter, *rest)
        if len(calls) == 2:
            adapter["layers.0.attention.wq.lora_A"].grad[0, 0] = float("nan")
        return terms
    monkeypatch.setattr(nute, "micro_step", nan_at_the_second_step)
    run(tiny, tmp_path / "skip", "--target", "0.3", "--steps", "4")
    root = parse(tmp_path / "skip" / "training.svg")
    assert [t for t in root.iter(NS + "text") if t.get("class") == "skipped"] and len(points(root, "kl")) == 3
    monkeypatch.setattr(nute, "micro_step", real)
    assert run(tiny, tmp_path / "res", "--target", "0.3", "--steps", "6", "--save-every", "2", "--stop-after", "3") is None
    assert len(points(parse(tmp_path / "res" / "training.svg"), "target")) == 2  # drawn at the checkpoint of step 2
    run(tiny, tmp_path / "res", "--target", "0.3", "--steps", "6", "--save-every", "2", "--resume")
    assert len(points(parse(tmp_path / "res" / "training.svg"), "target")) == 6


def test_the_command_overlays_runs_and_refuses_a_folder_that_is_not_one(tiny, tmp_path):
    run(tiny, tmp_path / "a", "--target", "0.3", "--steps", "2")
    run(tiny, tmp_path / "b", "--target", "0.5", "--steps", "2", "--method", "taylor", "--distill", "none")
    (tmp_path / "a" / "training.svg").unlink()
    cmd = [sys.executable, "-m", "formats.svg", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "o.svg")]
    assert subprocess.run(cmd, cwd=ROOT).returncode == 0
    assert (tmp_path / "a" / "training.svg").exists()  # redrawn
    root = parse(tmp_path / "o.svg")
    bars = [r for r in root.iter(NS + "rect") if r.get("class") == "ffn"]
    z_int = [load_file(str(tmp_path / f / "adapter.safetensors"))["z_int"] for f in "ab"]
    kept = [(z > 0).sum(1) for z in z_int]
    assert sorted(int(b.get("data-run")) for b in bars) == [0] * len(kept[0]) + [1] * len(kept[1])
    heights = torch.tensor([[float(b.get("height")) for b in bars if b.get("data-run") == j] for j in "01"], dtype=torch.float64)
    assert torch.allclose(heights, torch.stack(kept).double() * 150 / z_int[0].shape[1], atol=0.02)
    r = subprocess.run([sys.executable, "-m", "formats.svg", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip() == f"error: {tmp_path}: not a run folder (no log.jsonl)"


def test_the_comparison_has_a_point_per_run_and_the_dense_line():
    pts = [("A", 0.2, 40.0, 44.0), ("A", 0.2, 42.0, 43.0), ("B", 0.5, 150.0, None), ("B", 0.2, 45.0, 41.5)]
    root = ET.fromstring(svg.comparison_svg(pts, (31.5, 45.0)))
    titles = [c.find(NS + "title").text for c in root.iter(NS + "circle")]
    assert titles == ["A, 20%: 40.00", "A, 20%: 42.00", "B, 50%: 150.00", "B, 20%: 45.00",
                      "A, 20%: 44.00", "A, 20%: 43.00", "B, 20%: 41.50"]
    dense = [points(root, "dense")]  # the first panel's (perplexity): a level line
    assert dense[0][0][1] == dense[0][1][1]
    assert {"A", "B", "dense", "held-out perplexity", "7-task average accuracy", "20%", "50%"} <= set(texts(root))
    root = ET.fromstring(svg.comparison_svg([("A", 0.2, 40.0, None)], (31.5, None)))  # --tasks none: one panel
    assert "7-task average accuracy" not in texts(root) and len(list(root.iter(NS + "circle"))) == 1
