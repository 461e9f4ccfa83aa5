import shutil

import pytest

from histo_wsl.errors import InputError
from histo_wsl.runtime.inputs import collect_inputs, parse_shard, select_shard


def _touch_slides(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        (folder / n).write_bytes(b"x")
    return folder


def test_folder_glob_and_file(tmp_path):
    d = _touch_slides(tmp_path / "s", ["a.svs", "b.ndpi", "c.png", "readme.txt", "d.mrxs"])
    items = collect_inputs([str(d)])
    assert [it.name for it in items] == ["a", "b", "c", "d"]
    assert [it.name for it in collect_inputs([str(d / "*.svs")])] == ["a"]
    assert collect_inputs([d / "b.ndpi"])[0].path == d / "b.ndpi"


def test_same_file_twice_is_one_item(tmp_path):
    d = _touch_slides(tmp_path / "s", ["a.svs"])
    assert len(collect_inputs([d, d / "a.svs"])) == 1


def test_csv_with_relative_paths_mpp_label_and_extra(tmp_path):
    d = _touch_slides(tmp_path / "s", ["a.svs", "b.svs"])
    csv = tmp_path / "list.csv"
    csv.write_text(
        "path,slide_mpp,label,tissue_geojson\ns/a.svs,0.25,tumour,a.geojson\n"
        f"{d / 'b.svs'},,normal,\n"
    )
    a, b = collect_inputs([csv])
    assert a.path == tmp_path / "s" / "a.svs" and a.slide_mpp == 0.25 and a.label == "tumour"
    assert a.extra == {"tissue_geojson": "a.geojson"}
    assert b.slide_mpp is None and b.label == "normal"


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("file,label\na.svs,x\n", "no 'path' column"),
        ("path,slide_mpp\na.svs,abc\n", "line 2: slide_mpp 'abc' is not a number"),
        ("path,slide_mpp\na.svs,-1\n", "must be positive"),
        ("path\n", "no rows"),
    ],
)
def test_csv_errors_name_the_file_and_line(tmp_path, text, pattern):
    csv = tmp_path / "bad.csv"
    csv.write_text(text)
    with pytest.raises(InputError, match=pattern) as err:
        collect_inputs([csv])
    assert str(csv) in str(err.value)


def test_missing_inputs(tmp_path):
    with pytest.raises(InputError, match="no such file or folder"):
        collect_inputs([tmp_path / "nothing.svs"])
    with pytest.raises(InputError, match="matches no slide"):
        collect_inputs([str(tmp_path / "*.svs")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no slide or image files"):
        collect_inputs([tmp_path / "empty"])


def test_name_collision_is_refused(tmp_path):
    _touch_slides(tmp_path / "x", ["a.svs"])
    _touch_slides(tmp_path / "y", ["a.ndpi"])
    with pytest.raises(InputError, match="two inputs are named 'a'"):
        collect_inputs([tmp_path / "x", tmp_path / "y"])


def test_shards_partition_the_items(tmp_path):
    d = _touch_slides(tmp_path / "s", [f"s{i}.svs" for i in range(7)])
    items = collect_inputs([d])
    parts = [select_shard(items, parse_shard(f"{k}/3")) for k in (1, 2, 3)]
    names = [it.name for part in parts for it in part]
    assert sorted(names) == sorted(it.name for it in items) and len(names) == 7
    assert [it.name for it in parts[0]] == ["s0", "s3", "s6"]
    assert select_shard(items, None) == items


@pytest.mark.parametrize("text", ["3", "0/2", "3/2", "a/b", "1/0"])
def test_bad_shard(text):
    with pytest.raises(InputError, match="--shard"):
        parse_shard(text)


def test_dicom_series_counts_once(wsi_dir, tmp_path):
    d = tmp_path / "dicom"
    d.mkdir()
    for name in ("boxes_0.dcm", "boxes_1.dcm"):
        shutil.copy(wsi_dir / name, d / name)
    assert [it.name for it in collect_inputs([d])] == ["boxes_0"]


def test_files_of_other_types_in_a_folder_are_named_never_left_out_silently(tmp_path, capsys):
    """Issue 26: a QPTIFF inside a folder was skipped without a word."""
    d = _touch_slides(tmp_path / "s", ["a.svs", "notes.txt", "panel.qptiff", "x.vsi", ".hidden"])
    items = collect_inputs([str(d)])
    assert [it.name for it in items] == ["a", "panel"]  # a QPTIFF is read (and explained there)
    err = capsys.readouterr().err
    assert "2 file(s) left out" in err and "notes.txt" in err and "x.vsi" in err
    assert ".hidden" not in err
    collect_inputs([str(d / "*")])
    assert "2 matching file(s) left out" in capsys.readouterr().err
    only = _touch_slides(tmp_path / "only", ["readme.txt"])
    with pytest.raises(InputError, match="other file.*readme.txt"):
        collect_inputs([only])


def test_a_dash_reads_the_paths_on_standard_input(tmp_path, synthetic_slide, monkeypatch):
    """``find . -name '*.svs' | histo-wsl localize -``: one path per line, comments skipped."""
    import io

    listing = f"# slides to map\n{synthetic_slide}\n\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(listing))
    items = collect_inputs(["-"])
    assert [i.path for i in items] == [synthetic_slide]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n"))
    with pytest.raises(InputError, match="standard input"):
        collect_inputs(["-"])
