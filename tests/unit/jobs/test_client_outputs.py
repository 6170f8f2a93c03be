"""`vmgrid job get`: a job service runs in a guest, which is untrusted; the output names it reports must not lead the
client's downloads out of the directory the user named."""
from __future__ import annotations

import pytest

from services.jobs.client import OUTPUT_NAME, JobClient, JobInfo

SHA = "0" * 64


@pytest.mark.parametrize("name", ["../escaped", "/tmp/absolute", "ok/../../escaped", "a//b", ".hidden", "", "a/"])
def test_an_output_name_that_leaves_the_directory_fetches_nothing(tmp_path, name):
    dest = tmp_path / "results"
    info = JobInfo("job-" + "a" * 32, state="Done", outputs=[("stdout", 0, SHA, None), (name, 5, SHA, None)],
                   directory_url="gsiftp://127.0.0.1:1/jobs/job-" + "a" * 32 + "/")
    with pytest.raises(RuntimeError, match="not a path inside the job's directory"):
        JobClient(service=None).fetch_outputs(info, dest)    # refused before any connection is made
    assert list(tmp_path.iterdir()) == []                    # nothing written, not even the directory


def test_the_names_the_service_itself_writes_pass():
    for name in ("stdout", "stderr", "sorted.txt", "out/tmap.1.png", "a-b_c+d.e"):
        assert OUTPUT_NAME.fullmatch(name), name


def test_a_file_named_as_the_output_directory_is_refused(tmp_path):
    (tmp_path / "afile").write_text("kept")
    info = JobInfo("job-" + "a" * 32, state="Done", outputs=[("stdout", 0, SHA, None)],
                   directory_url="gsiftp://127.0.0.1:1/jobs/job-" + "a" * 32 + "/")
    with pytest.raises(RuntimeError, match="is a file: name a directory for the outputs"):
        JobClient(service=None).fetch_outputs(info, tmp_path / "afile")
    assert (tmp_path / "afile").read_text() == "kept"
