"""Atomic writes: a link to a file is written through; a path that is no regular file is refused, not replaced."""

from __future__ import annotations

import os

import pytest

from purify.storage import NotAFileError, atomic_write_text


def test_a_link_to_a_file_is_written_through_and_stays_a_link(tmp_path):
    target, link = tmp_path / "data.jsonl", tmp_path / "latest.jsonl"
    target.write_text("old")
    link.symlink_to(target)
    atomic_write_text(link, "new")
    assert link.is_symlink() and target.read_text() == "new"


def test_a_device_or_pipe_is_refused_not_replaced_by_a_file(tmp_path):
    """``--out /dev/stdout`` replaced the machine's /dev/stdout link by a regular file (as root)."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    link = tmp_path / "stdout"
    link.symlink_to(fifo)  # as /dev/stdout links to the process's output
    for path in (fifo, link, tmp_path):
        with pytest.raises(NotAFileError, match=r"is not a regular file \(a device, pipe or directory\); give the "
                                                r"path of a file to write"):
            atomic_write_text(path, "x")
    assert link.is_symlink() and not fifo.is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["pipe", "stdout"]


def test_leftovers_of_a_killed_atomic_dir_are_removed_beside_their_final_only(tmp_path):
    """A SIGKILL while exporting left .student.tmp-* (a complete-looking model) beside student/ for good."""
    from purify.storage import remove_leftovers

    for name in (".student.tmp-ab12", ".student.old-77", ".student-merged.tmp-x", ".other.tmp-1"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_text("x")
    (tmp_path / "student").mkdir()
    removed = remove_leftovers(tmp_path / "student")
    assert sorted(p.name for p in removed) == [".student.old-77", ".student.tmp-ab12"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-1", ".student-merged.tmp-x", "student"]


def test_a_byte_order_mark_is_not_read_as_text(tmp_path):
    """A BOM stayed in a .txt file's first record and made a .jsonl file's first line "not a JSON object"."""
    from purify.data import read_text
    from purify.generate import read_prompts

    plain, marked = tmp_path / "plain.txt", tmp_path / "marked.txt"
    plain.write_text("one line\nanother\n", encoding="utf-8")
    marked.write_text("one line\nanother\n", encoding="utf-8-sig")
    assert marked.read_bytes().startswith(b"\xef\xbb\xbf")
    assert read_text(str(marked)) == read_text(str(plain))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hello"}\n', encoding="utf-8-sig")
    assert read_prompts(prompts) == ["hello"]


def test_a_bad_byte_after_a_byte_order_mark_is_named_at_its_file_offset(tmp_path):
    from purify.storage import NotUTF8Error, read_utf8

    path = tmp_path / "f.txt"
    path.write_bytes(b"\xef\xbb\xbfab\xffcd")
    with pytest.raises(NotUTF8Error, match=r"byte 0xff at offset 5"):
        read_utf8(path)
    path.write_bytes(b"a\r\nb\rc\n")  # universal newlines, as Path.read_text gives them
    assert read_utf8(path) == "a\nb\nc\n"
