"""lab/experiments.py end to end on a tiny model: every row trains, evaluates and lands in the table."""
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
import torch
from safetensors.torch import save_file

import evaluate
import masks
from conftest import ROOT
from formats.checkpoint import load
from helpers import make_tiny
from lab import experiments
from masks import mask_shapes, mask_sparsity
from model import ModelConfig


def test_experiments_smoke(tmp_path):
    ckpt = make_tiny(tmp_path / "ckpt")
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(f"document {i}: the cat sat on the mat and looked at bird number {i}." for i in range(200)))
    cmd = [sys.executable, "-m", "lab.experiments", "--ckpt", ckpt, "--data", text, "--heldout", text, "--tasks", "none",
           "--steps", "5", "--batch-size", "2", "--seq-len", "32", "--dtype", "fp32", "--targets", "0.3", "--at-target",
           "--valid", text, "--out", tmp_path / "res"]
    r = subprocess.run(list(map(str, cmd)), cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    table = (tmp_path / "res" / "table.md").read_text()
    for name in ("dense", "NutePrune", "KD (intact teacher)", "no KD", "masks only", "magnitude + LoRA"):
        assert name in table
    mag = json.loads((tmp_path / "res" / "magnitude-+-LoRA-30.json").read_text())
    assert mag["results"][0]["ppl"] > 1 and mag["results"][0]["ratio"] == "30%"
    # magnitude pruning stops at the first unit past the target; the Ratio cell shows what the masks remove
    assert 0.3 <= mag["sparsity"] < 0.4 and f"| 30% ({mag['sparsity']:.1%}) | magnitude + LoRA |" in table
    log = [json.loads(line) for line in open(tmp_path / "res" / "magnitude-+-LoRA-30" / "log.jsonl")]
    assert all(abs(r["expected_sparsity"] - mag["sparsity"]) < 1e-9 for r in log)  # Eq. 3 on fixed masks = the export
    for name in ("NutePrune", "KD", "no-KD", "NutePrune-masks-only"):  # the trained masks moved to the target
        assert 0.3 - 1 / 48 < json.loads((tmp_path / "res" / f"{name}-30-at-target.json").read_text())["sparsity"] <= 0.3
    res = tmp_path / "res"
    for m in ("Taylor", "Bonsai"):  # one choice of masks, recovered and not (same cost record: copied, not redone)
        a, b = res / f"{m}-+-LoRA-30", res / f"{m}-no-recovery-30"
        assert (a / "masks.safetensors").read_bytes() == (b / "masks.safetensors").read_bytes()
        assert (a / "masks.json").read_text() == (b / "masks.json").read_text()
        cost = json.loads((a / "masks.json").read_text())
        row = next(line for line in table.split("Per row")[1].splitlines() if f"{m} + LoRA |" in line)
        assert row.split(" | ")[2] == f"{cost['seconds'] / 60:.1f}" and row.split(" | ")[4] != "-"  # minutes, peak MB
        valid = json.loads((res / f"{m}-+-LoRA-30-valid.json").read_text())["results"][0]["ppl"]  # the validation text
        assert row.split(" | ")[1] == f"{valid:.2f}" and json.loads((res / f"{m}-+-LoRA-30.json").read_text())["valid_ppl"] == valid
    # comparison.svg: a point per row (--tasks none: perplexity only), its title the row's perplexity
    titles = [c.find("{http://www.w3.org/2000/svg}title").text
              for c in ET.parse(res / "comparison.svg").getroot().iter("{http://www.w3.org/2000/svg}circle")]
    ppl = [(f, json.loads(f.read_text())["results"][0]["ppl"]) for f in sorted(res.glob("*-30*.json")) if "valid" not in f.name]
    assert len(titles) == len(ppl) and sorted(float(t.split(": ")[1]) for t in titles) == sorted(round(p, 2) for _, p in ppl)
    # a second call finds every row done and trains nothing
    r = subprocess.run(list(map(str, cmd)), cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "prune" not in r.stderr


def test_rows_named_with_a_comma():
    args = experiments.get_args(["--rows", "NutePrune,Taylor, no recovery,NutePrune, masks only", "--targets", "0.2"])
    assert [job[0] for job in experiments.make_jobs(args)] == ["dense", "NutePrune", "Taylor, no recovery", "NutePrune, masks only"]


def test_a_row_after_nuteprune_continues_its_run():
    args = experiments.get_args(["--rows", "NutePrune,NutePrune, then 100 steps dynamic", "--targets", "0.5", "--seeds",
                                 "0,1", "--out", "res"])
    flags = {job[1]: job[4] for job in experiments.make_jobs(args)}
    assert flags["NutePrune-then-100-steps-dynamic-50-seed1"][:2] == ["--run", os.path.join("res", "NutePrune-50-seed1")]


def test_experiments_seeds_give_mean_and_spread(tmp_path):
    ckpt = make_tiny(tmp_path / "ckpt")
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(f"document {i}: the cat sat on the mat and looked at bird number {i}." for i in range(200)))
    cmd = [sys.executable, "-m", "lab.experiments", "--ckpt", ckpt, "--data", text, "--heldout", text, "--tasks", "none",
           "--steps", "3", "--batch-size", "2", "--seq-len", "32", "--dtype", "fp32", "--targets", "0.3",
           "--rows", "no KD (next-token loss)", "--seeds", "0,1", "--out", tmp_path / "res"]
    r = subprocess.run(list(map(str, cmd)), cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    ppl = [json.loads((tmp_path / "res" / f"{f}.json").read_text())["results"][0]["ppl"]
           for f in ("no-KD-30", "no-KD-30-seed1")]
    assert ppl[0] != ppl[1]  # the seeds really differ
    settings = json.loads((tmp_path / "res" / "no-KD-30-seed1" / "settings.json").read_text())
    assert settings["seed"] == 1
    mean, sd = sum(ppl) / 2, abs(ppl[0] - ppl[1]) / 2 ** 0.5
    assert f"| 30% | no KD (next-token loss) | 2 | {mean:.2f} +- {sd:.2f} | - |" in (tmp_path / "res" / "table.md").read_text()


def test_at_target_keeps_the_ranking_and_hits_the_target(tmp_path, capsys):
    config = ModelConfig(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=96)
    gen = torch.Generator().manual_seed(0)
    log_alpha = {k: torch.randn(v.shape, generator=gen) * 2 + 1 for k, v in masks.init_log_alpha(config, gen).items()}
    torch.save({"log_alpha": log_alpha}, tmp_path / "checkpoint.pt")
    z0 = {k: masks.deterministic_z(v) for k, v in log_alpha.items()}
    save_file({**z0, "lora_scale": torch.tensor(1.0)}, str(tmp_path / "adapter.safetensors"))
    s0 = mask_sparsity(z0, config)
    for target in (s0 - 0.1, s0 + 0.1):
        z = experiments.at_target(tmp_path, target, config)
        # at or just below the target: one more hidden dim (the finest unit, 1/64 of everything) would pass it
        assert target - 1 / 64 < mask_sparsity(z, config) <= target
        for k, v in log_alpha.items():  # in every group the kept units are those with the largest log_alpha
            rows, kept = v.reshape(-1, v.shape[-1]), z[k].reshape(-1, v.shape[-1]) > 0
            for r, m in zip(rows, kept):
                assert m.sum() == 0 or m.sum() == len(r) or r[m].min() > r[~m].max()
            soft = torch.sigmoid(v / masks.BETA * 0.8)
            assert torch.equal(z[k][z[k] > 0], soft[z[k] > 0])  # kept units keep their soft values
    save_file({**z0, "z_hid": torch.ones(64), "lora_scale": torch.tensor(1.0)}, str(tmp_path / "adapter.safetensors"))
    with pytest.raises(SystemExit) as e:
        experiments.at_target(tmp_path, s0, config)
    assert e.value.code == 2 and "does not hold the masks" in capsys.readouterr().err


def test_teachers_table(tmp_path):
    model, _ = load(make_tiny(tmp_path / "ckpt"))
    ids = [i % model.config.vocab_size for i in range(4 * 128)]
    identity = {k: torch.ones(shape) for k, shape in mask_shapes(model.config).items()}
    pruned = {**identity, "z_int": torch.zeros_like(identity["z_int"])}
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"queue": {"snapshots": {1: identity, 2: pruned}, "stage2_start": None}}, run / "checkpoint.pt")
    (run / "log.jsonl").write_text("".join(json.dumps({"step": i + 1, "snapshot": k}) + "\n"
                                           for i, k in enumerate([None, 1, None, 2])))
    rows = experiments.teachers(run, model, ids, every=1).splitlines()[2:]
    assert rows == [f"| 1% | 2 | {evaluate.perplexity(model, ids):.2f} |",  # an identity snapshot is the intact model
                    f"| 2% | 4 | {evaluate.perplexity(model, ids, adapter=pruned):.2f} |"]
    assert rows[0] != rows[1]
