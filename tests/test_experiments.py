"""experiments.py end to end on a tiny model: every row trains, evaluates and lands in the table."""
import json
import subprocess
import sys

from conftest import ROOT, make_tiny


def test_experiments_smoke(tmp_path):
    ckpt = make_tiny(tmp_path / "ckpt")
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(f"document {i}: the cat sat on the mat and looked at bird number {i}." for i in range(200)))
    cmd = [sys.executable, "experiments.py", "--ckpt", ckpt, "--data", text, "--heldout", text, "--tasks", "none",
           "--steps", "3", "--batch-size", "2", "--seq-len", "32", "--dtype", "fp32", "--targets", "0.3", "--out", tmp_path / "res"]
    r = subprocess.run(list(map(str, cmd)), cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    table = (tmp_path / "res" / "table.md").read_text()
    for name in ("dense", "NutePrune", "KD (intact teacher)", "no KD", "masks only", "magnitude + LoRA"):
        assert name in table
    mag = json.loads((tmp_path / "res" / "magnitude-+-LoRA-30.json").read_text())
    assert mag["results"][0]["ppl"] > 1 and mag["results"][0]["ratio"] == "30%"
    # magnitude pruning stops at the first unit past the target; the export counts what was really removed
    assert 0.3 <= mag["sparsity"] < 0.4 and f"| 30% ({mag['sparsity']:.1%}) | magnitude + LoRA |" in table
    log = [json.loads(line) for line in open(tmp_path / "res" / "magnitude-+-LoRA-30" / "log.jsonl")]
    assert all(abs(r["expected_sparsity"] - mag["sparsity"]) < 1e-9 for r in log)  # Eq. 3 on fixed masks = the export
    # a second call finds every row done and trains nothing
    r = subprocess.run(list(map(str, cmd)), cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "prune" not in r.stderr
