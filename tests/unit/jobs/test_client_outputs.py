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


@pytest.mark.parametrize("name", ["x.vmgrid-part", "out/x.vmgrid-part.ranges"])
def test_an_output_named_as_another_outputs_part_file_fetches_nothing(tmp_path, name):
    """Output X is received as X.vmgrid-part: an output of that name would be overwritten by, or overwrite, X's part
    file. A vmgrid job service refuses such names at submission (test_jobs_service); a client refuses them too."""
    info = JobInfo("job-" + "a" * 32, state="Done", outputs=[("x", 5, SHA, None), (name, 5, SHA, None)],
                   directory_url="gsiftp://127.0.0.1:1/jobs/job-" + "a" * 32 + "/")
    with pytest.raises(RuntimeError, match="a name the transfer keeps for its own part files"):
        JobClient(service=None).fetch_outputs(info, tmp_path / "results")
    assert list(tmp_path.iterdir()) == []


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


def test_an_output_served_larger_than_the_service_recorded_is_refused_before_a_byte(tmp_path):
    """The job service records each output's size and sha256; the GridFTP face that serves it is the same untrusted
    guest. One that announces (SIZE) more bytes than recorded would have the client reserve and receive them all
    (up to a full disk) before the sha256 told it apart: it is refused before any byte is received."""
    import hashlib
    from types import SimpleNamespace

    from gridftp.errors import ProtocolError
    from gridftp.server import GridFTPServer

    served = tmp_path / "served" / "jobs" / ("job-" + "a" * 32)
    served.mkdir(parents=True)
    (served / "result.txt").write_bytes(b"x" * (3 << 20))                       # 3 MiB where 10 bytes were recorded
    server = GridFTPServer(tmp_path / "served", "127.0.0.1", 0, anonymous=True).start()
    try:
        info = JobInfo("job-" + "a" * 32, state="Done",
                       outputs=[("result.txt", 10, hashlib.sha256(b"0123456789").hexdigest(), None)],
                       directory_url=server.url("/jobs/job-" + "a" * 32 + "/"))
        dest = tmp_path / "results"
        with pytest.raises(ProtocolError, match="announces 3145728 bytes, 10 were expected"):
            JobClient(service=SimpleNamespace(credential=None, trust=None)).fetch_outputs(info, dest)
    finally:
        server.stop()
    assert [p.name for p in dest.iterdir()] == []                # no file, no partial file left


def test_an_output_asked_for_by_name_that_the_service_did_not_record_fetches_nothing(tmp_path):
    from services.jobs.client import NoSuchOutput

    info = JobInfo("job-" + "a" * 32, state="Cancelled", outputs=[("stdout", 0, SHA, None), ("stderr", 0, SHA, None)],
                   directory_url="gsiftp://127.0.0.1:1/jobs/job-" + "a" * 32 + "/")
    with pytest.raises(NoSuchOutput, match=r"no output result.txt \(its outputs: stdout, stderr\): nothing fetched"):
        JobClient(service=None).fetch_outputs(info, tmp_path / "results", names=["stdout", "result.txt"])
    assert list(tmp_path.iterdir()) == []


def test_a_bad_name_among_outputs_not_asked_for_does_not_stop_the_one_asked_for(tmp_path):
    """Only the outputs named are checked and fetched: here the one asked for is already there, so nothing connects."""
    import hashlib

    dest = tmp_path / "results"
    dest.mkdir()
    (dest / "stdout").write_text("ok\n")
    info = JobInfo("job-" + "a" * 32, state="Done",
                   outputs=[("stdout", 3, hashlib.sha256(b"ok\n").hexdigest(), None), ("../escaped", 5, SHA, None)],
                   directory_url="gsiftp://127.0.0.1:1/jobs/job-" + "a" * 32 + "/")
    assert JobClient(service=None).fetch_outputs(info, dest, names=["stdout"]) == [dest / "stdout"]
    with pytest.raises(RuntimeError, match="not a path inside the job's directory"):
        JobClient(service=None).fetch_outputs(info, dest)


@pytest.mark.parametrize("names, why", [(["a", "a/b"], "outputs a and a/b"), (["out/x/y", "out"], "outputs out and out/x/y"),
                                        (["a", "a"], "output a twice")])
def test_outputs_that_cannot_all_be_files_of_one_directory_fetch_nothing(tmp_path, names, why):
    """An untrusted job service naming outputs a and a/b (a is a file, then a directory) or one name twice is refused
    in one line before anything is fetched (attack report F7: `a` was fetched, then a raw `[Errno 17]`)."""
    info = JobInfo("job-" + "a" * 32, state="Done", outputs=[("stdout", 0, SHA, None)] + [(n, 4, SHA, None) for n in names],
                   directory_url="gsiftp://127.0.0.1:1/jobs/job-" + "a" * 32 + "/")
    with pytest.raises(RuntimeError, match=f"^the job service named {why}: nothing fetched$"):
        JobClient(service=None).fetch_outputs(info, tmp_path / "results")      # refused before any connection
    assert list(tmp_path.iterdir()) == []
