"""Atomic writes with several writers of one file: hosts of one machine share a cache folder."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from hetserve.files import write_atomic


def test_concurrent_writers_of_one_file_all_succeed_and_leave_one_whole_copy(tmp_path):
    target = tmp_path / "cache" / "manifest.msgpack"
    contents = [bytes([i]) * 200_000 for i in range(16)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda data: [write_atomic(target, data) for _ in range(5)], contents))
    assert target.read_bytes() in contents
    assert [p.name for p in target.parent.iterdir()] == ["manifest.msgpack"], "no temporary file is left"


def test_text_is_written_as_utf8(tmp_path):
    write_atomic(tmp_path / "a.json", '{"name": "café"}')
    assert (tmp_path / "a.json").read_text(encoding="utf-8") == '{"name": "café"}'
