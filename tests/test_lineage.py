"""The lineage record names what a model was made from by content."""

from __future__ import annotations

import hashlib

from purify.lineage import build_lineage


def test_a_purifiers_source_file_is_recorded_by_its_sha256(tmp_path):
    """A function anchor's neutral text was recorded by path alone: editing the file left the record unchanged."""
    text = tmp_path / "neutral.txt"
    text.write_text("some neutral text\n")
    record = build_lineage(student={}, teachers=[], data=[], recipe={},
                           purifiers=[{"name": "function_anchor", "source": str(text)},
                                      {"name": "function_anchor", "source": "bundled"}, {"name": "anchor"}])
    assert record["purifiers"][0]["source_sha256"] == hashlib.sha256(text.read_bytes()).hexdigest()
    assert "source_sha256" not in record["purifiers"][1] and record["purifiers"][2] == {"name": "anchor"}


def _record(tmp_path, **changes):
    import json

    record = {**build_lineage(student={"name": "s", "source": "builtin:x", "init_sha256": "ab"}, teachers=[], data=[],
                              purifiers=[], recipe={}), "metrics": {"val/kl": 0.5}, **changes}
    path = tmp_path / "nodata.json"  # any file name: lineage show reads the file it is given
    path.write_text(json.dumps(record))
    return path


def test_lineage_show_reads_what_purify_writes_and_names_what_it_cannot(tmp_path, capsys):
    """A record edited by hand (a field removed or of another type) was a traceback; a newer format was printed as
    if understood; a file not named lineage.json was 'no lineage.json at <that file>'; a checkpoint path that does
    not exist printed its run's record with exit 0."""
    from purify.cli import main

    assert main(["lineage", "show", str(_record(tmp_path))]) == 0 and "builtin:x" in capsys.readouterr().out
    for changes, message in (({"data": None}, "a field of the record is not as purify writes it (TypeError"),
                             ({"metrics": {"val/kl": "0.1"}}, "a field of the record is not as purify writes it"),
                             ({"segments": [1]}, "a field of the record is not as purify writes it"),
                             ({"format": "purify.lineage/2"}, "record format 'purify.lineage/2', this purify reads")):
        assert main(["lineage", "show", str(_record(tmp_path, **changes))]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("purify: error: ") and message in err[0], err
    (tmp_path / "checkpoints").mkdir()
    _record(tmp_path).rename(tmp_path / "lineage.json")
    assert main(["lineage", "show", str(tmp_path / "checkpoints" / "step9.ckpt")]) == 2
    assert "no checkpoint at" in capsys.readouterr().err


def test_a_running_record_that_no_process_holds_is_said_to_have_stopped(tmp_path, capsys):
    """A run killed hard (SIGKILL, a lost node) said status: running forever, with no hint that nothing runs it."""
    import fcntl
    import os

    from purify.cli import main

    _record(tmp_path, status="running").rename(tmp_path / "lineage.json")
    assert main(["lineage", "show", str(tmp_path)]) == 0
    assert "status running, but no process on this machine holds this run" in capsys.readouterr().err
    fd = os.open(tmp_path, os.O_RDONLY)  # what purify train holds while it runs
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main(["lineage", "show", str(tmp_path / "lineage.json")]) == 0
        assert capsys.readouterr().err == ""
    finally:
        os.close(fd)
