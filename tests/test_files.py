"""staged_folder: an output folder appears complete or not at all."""

from __future__ import annotations

import os
import stat

import pytest

from hf_fisher.files import staged_folder


def _leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


def test_success_renames_the_staging_folder_with_default_permissions(tmp_path):
    target = tmp_path / "sub" / "out"
    with staged_folder(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".out.tmp-")
        (tmp / "a.txt").write_text("x")
        assert not target.exists()
    assert (target / "a.txt").read_text() == "x"
    assert _leftovers(target.parent) == []
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o777 & ~mask  # not mkdtemp's private 0o700


def test_error_leaves_no_target_and_no_staging_folder(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"), staged_folder(target) as tmp:
        (tmp / "half.txt").write_text("x")
        raise RuntimeError("boom")
    assert not target.exists()
    assert _leftovers(tmp_path) == []


def test_existing_target_is_kept_unless_replace(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(FileExistsError, match="exists already"), staged_folder(target) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"]
    assert _leftovers(tmp_path) == []
    with staged_folder(target, replace=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]


def test_error_with_replace_keeps_the_old_folder(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(ValueError), staged_folder(target, replace=True):
        raise ValueError
    assert (target / "old.txt").read_text() == "old"
