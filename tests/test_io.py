import pytest

from aloe.errors import AloeError
from aloe.io import JsonlAppender, atomic_path, read_jsonl, write_jsonl


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.jsonl"
    write_jsonl(target, [{"id": 1}])
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert read_jsonl(target) == [{"id": 1}]
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_torn_tail(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"id": 1}\n{"id": 2}\n{"id": 3, "te')
    with pytest.raises(AloeError, match=r"a.jsonl: line 3"):
        read_jsonl(p)
    assert read_jsonl(p, allow_torn_tail=True) == [{"id": 1}, {"id": 2}]
    with JsonlAppender(p) as f:  # the appender drops the torn tail before appending
        f.append({"id": 3})
    assert read_jsonl(p) == [{"id": 1}, {"id": 2}, {"id": 3}]


def test_bad_line_in_middle_is_an_error(tmp_path):
    p = tmp_path / "b.jsonl"
    p.write_text('{"id": 1}\nnot json\n{"id": 2}\n')
    with pytest.raises(AloeError, match="line 2"):
        read_jsonl(p, allow_torn_tail=True)
