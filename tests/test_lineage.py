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
