"""formats/run.py: a run folder belongs to one run, and to one process at a time; its files are written whole."""
import errno
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from formats import checkpoint, run

HOLD = "import sys, time; from formats import run; run.lock_run_folder(sys.argv[1]); print('held', flush=True); time.sleep(60)"


def opened(out, settings, resume):
    with run.open_run(out, settings, resume) as (folder, run_id):
        return folder, run_id


def test_one_process_at_a_time_writes_a_run_folder(tmp_path):
    """Two runs started at once on one --out: both find it empty, only the first to lock it goes on."""
    (tmp_path / "r").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "r")], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ValueError, match="another process is writing this run folder"):
            opened(tmp_path / "r", {"seed": 1}, False)
        assert not (tmp_path / "r" / "settings.json").exists()
    finally:
        holder.kill()
        holder.wait()
    with run.open_run(tmp_path / "r", {"seed": 1}, False) as (out, run_id):  # the lock ends with its process
        assert json.loads((out / "settings.json").read_text()) == {"seed": 1, "run_id": run_id}
        with pytest.raises(ValueError, match="another process"):  # (a second opening, even in this process)
            opened(out, {"seed": 1}, True)
    assert opened(out, {"seed": 1}, True) == (out, run_id)  # and with the block: a resume goes on


@pytest.mark.parametrize("text", ["[1, 2]", "3", "null", "{not json"])
def test_settings_that_are_not_an_object_are_refused_in_one_line(tmp_path, text):
    (tmp_path / "settings.json").write_text(text)
    with pytest.raises(ValueError, match="settings.json is corrupt"):
        run.check_run_folder(tmp_path, resume=True)


def test_a_full_disk_leaves_the_file_as_it_was_and_no_tmp(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"the last checkpoint")

    def full(tmp):  # the disk fills mid-write
        open(tmp, "wb").write(b"part of the new one")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with pytest.raises(OSError, match=r"checkpoint.pt: not written \(No space left on device\); it is as it was"):
        checkpoint.write_atomic(tmp_path / "checkpoint.pt", full)
    assert os.listdir(tmp_path) == ["checkpoint.pt"] and (tmp_path / "checkpoint.pt").read_bytes() == b"the last checkpoint"
    checkpoint.write_atomic(tmp_path / "checkpoint.pt", lambda tmp: open(tmp, "wb").write(b"new"))
    assert os.listdir(tmp_path) == ["checkpoint.pt"] and (tmp_path / "checkpoint.pt").read_bytes() == b"new"
