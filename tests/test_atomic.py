import pytest

from textune.atomic import replace_atomically


def test_a_file_is_replaced_only_when_complete(tmp_path):
    target = tmp_path / "table.csv"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with replace_atomically(target) as tmp:
            assert tmp.suffix == ".csv" and tmp.parent == tmp_path  # writers that go by extension still can
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["table.csv"]
    with replace_atomically(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["table.csv"]


def test_a_folder_replaces_a_non_empty_one_and_survives_an_interrupt(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "weights").write_text("v1")
    with pytest.raises(KeyboardInterrupt):
        with replace_atomically(target, folder=True) as tmp:
            (tmp / "weights").write_text("v2, half")
            raise KeyboardInterrupt
    assert (target / "weights").read_text() == "v1" and [p.name for p in tmp_path.iterdir()] == ["model"]
    with replace_atomically(target, folder=True) as tmp:
        (tmp / "config").write_text("c")
    assert sorted(p.name for p in target.iterdir()) == ["config"]  # the old folder's files are not mixed in
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_a_missing_parent_folder_is_created(tmp_path):
    with replace_atomically(tmp_path / "a" / "b.json") as tmp:
        tmp.write_text("{}")
    assert (tmp_path / "a" / "b.json").read_text() == "{}"
