"""Result files: replaced atomically (a reader never sees half a file, a failed write keeps the
old one); an unknown schema or a damaged file is reported, never read as a result."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from prefetch_tune.errors import ConfigError
from prefetch_tune.results import REQUIRED, SCHEMA_VERSION, iter_results, load_result, write_result


def _doc(marker: str) -> dict[str, object]:
    """A result document `load_result` accepts (so it is replaced, not moved aside)."""
    typed: dict[str, object] = {  # the field types load_result checks
        "model": {"name": "m", "quant": "w8a8"},
        "layout": {"tp": 1, "dp": 1, "ep": False},
        "max_num_seqs": 8,
        "hardware": "atlas-a2",
        "backend": "sim",
        "semantics": "plugin",
        "simulated": True,
        "additional_config": "",
        "objective": {"metric": "output_throughput", "direction": "maximize"},
    }
    doc: dict[str, object] = {key: typed.get(key, {}) for key in REQUIRED}
    doc.update(schema_version=SCHEMA_VERSION, marker=marker, padding="x" * 100_000)
    return doc


def test_a_reader_of_the_old_file_keeps_reading_the_old_document(tmp_path: Path) -> None:
    # Replacing by rename leaves an already open file untouched; writing in place would change
    # (or truncate) what that reader sees.
    path = tmp_path / "r.json"
    path.write_text(json.dumps(_doc("old")))
    load_result(path)  # a sound result: write_result replaces it rather than moving it aside
    with path.open() as reader:
        write_result(path, _doc("new"))
        assert json.loads(reader.read())["marker"] == "old"
    assert json.loads(path.read_text())["marker"] == "new"


def test_a_write_that_fails_midway_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "r.json"
    path.write_text(json.dumps(_doc("old")))

    def disk_full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError):
        write_result(path, _doc("new"))
    assert json.loads(path.read_text())["marker"] == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]  # no temp file left


def test_an_unknown_schema_version_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    path.write_text(json.dumps({**_doc("future"), "schema_version": SCHEMA_VERSION + 1}))
    with pytest.raises(
        ConfigError, match=rf"unsupported result schema_version {SCHEMA_VERSION + 1}"
    ):
        load_result(path)


def test_listing_results_reports_damaged_files_instead_of_skipping_them(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps(_doc("good")))
    (tmp_path / "b.json").write_text('{"schema_version": 1, "model": ')  # cut short
    listed = dict(iter_results(tmp_path))
    assert sorted(p.name for p in listed) == ["a.json", "b.json"]
    good, bad = listed[tmp_path / "a.json"], listed[tmp_path / "b.json"]
    assert isinstance(good, dict) and good["marker"] == "good"
    assert isinstance(bad, ConfigError) and "damaged result file" in str(bad)
