"""tools/fetch_sdist.py, which tools/install.sh uses for detectron2's sdist: simple pages in both
formats, pip's index settings, and a download from local (file://) indexes."""
import hashlib
import json
import os
import subprocess
import sys

import pytest

from helpers import ROOT, load_tool

TOOL = os.path.join(ROOT, "tools/fetch_sdist.py")
fetch_sdist = load_tool("fetch_sdist")

PAGE_URL = "https://mirror.example/simple/pb1-detectron2/"
HTML_PAGE = b"""<!DOCTYPE html>
<html><head><title>Links for pb1-detectron2</title></head><body>
<a href="../../files/pb1-detectron2-0.5.tar.gz#sha256=aa" data-requires-python="&gt;=3.6">pb1-detectron2-0.5.tar.gz</a><br/>
<a href="https://files.mirror.example/ab/cd/pb1_detectron2-0.6-py3-none-any.whl">pb1_detectron2-0.6-py3-none-any.whl</a>
<a href="/packages/pb1-detectron2-0.6%2Blocal.tar.gz#sha256=bb">pb1-detectron2-0.6+local.tar.gz</a>
</body></html>
"""
JSON_PAGE = json.dumps({
    "meta": {"api-version": "1.1"},
    "name": "pb1-detectron2",
    "files": [
        {"filename": "pb1-detectron2-0.6.tar.gz", "url": "../../files/60/26/pb1-detectron2-0.6.tar.gz",
         "hashes": {"sha256": "cc"}},
        {"filename": "pb1-detectron2-0.5.tar.gz", "url": "https://files.mirror.example/pb1-detectron2-0.5.tar.gz",
         "hashes": {}},
    ],
}).encode()  # fmt: skip


def test_html_page_links_resolve_against_the_page_without_hash_fragments():
    assert fetch_sdist.file_urls(HTML_PAGE, "text/html", PAGE_URL) == {
        "pb1-detectron2-0.5.tar.gz": "https://mirror.example/files/pb1-detectron2-0.5.tar.gz",
        "pb1_detectron2-0.6-py3-none-any.whl": "https://files.mirror.example/ab/cd/pb1_detectron2-0.6-py3-none-any.whl",
        "pb1-detectron2-0.6+local.tar.gz": "https://mirror.example/packages/pb1-detectron2-0.6%2Blocal.tar.gz",
    }


def test_json_page_files_by_their_filename():
    assert fetch_sdist.file_urls(JSON_PAGE, "application/vnd.pypi.simple.v1+json", PAGE_URL) == {
        "pb1-detectron2-0.6.tar.gz": "https://mirror.example/files/60/26/pb1-detectron2-0.6.tar.gz",
        "pb1-detectron2-0.5.tar.gz": "https://files.mirror.example/pb1-detectron2-0.5.tar.gz",
    }


def _in_a_fresh_process(code, **env):
    """What ``code`` prints, run with ``env`` and no pip.conf: importing pip in the test process
    would turn setuptools' distutils shim off for every later test (torch's inductor needs it)."""
    clean = {k: v for k, v in os.environ.items() if k not in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_NO_INDEX")}
    clean.update(env, PIP_CONFIG_FILE=os.devnull)
    return subprocess.run([sys.executable, "-c", code], env=clean, capture_output=True, text=True, check=True).stdout


def test_indexes_are_pips_own():
    def indexes(**env):
        code = f"import json, runpy; print(json.dumps(runpy.run_path({TOOL!r})['pip_settings']()[0]))"
        return json.loads(_in_a_fresh_process(code, **env))

    default = _in_a_fresh_process("from pip._internal.models.index import PyPI; print(PyPI.simple_url)").strip()
    assert indexes() == [default]
    extra = {"PIP_INDEX_URL": "https://mirror.example/simple", "PIP_EXTRA_INDEX_URL": "file:///srv/a file:///srv/b"}
    assert indexes(**extra) == ["https://mirror.example/simple", "file:///srv/a", "file:///srv/b"]
    assert indexes(**extra, PIP_NO_INDEX="1") == []


@pytest.fixture
def local_indexes(tmp_path):
    """Two file:// indexes laid out as pip's local indexes are: ``empty`` has no pb1-detectron2
    page; ``full`` lists the sdist in its ``index.html`` with a relative link."""
    data = b"not really a tar.gz"
    (tmp_path / "empty" / "simple").mkdir(parents=True)
    page = tmp_path / "full" / "simple" / "pb1-detectron2"
    page.mkdir(parents=True)
    (tmp_path / "full" / "files").mkdir()
    (tmp_path / "full" / "files" / "pb1-detectron2-0.6.tar.gz").write_bytes(data)
    (page / "index.html").write_text(
        '<a href="../../files/pb1-detectron2-0.6.tar.gz#sha256=00">pb1-detectron2-0.6.tar.gz</a>'
    )
    indexes = [(tmp_path / name / "simple").as_uri() for name in ("empty", "full")]
    return indexes, hashlib.sha256(data).hexdigest(), data


def _fetch(filename, sha256, dest, indexes):
    return fetch_sdist.fetch("pb1_Detectron2", filename, sha256, str(dest), indexes, fetch_sdist.build_opener(), 10)


def test_download_from_the_first_index_that_lists_the_file(local_indexes, tmp_path):
    indexes, sha256, data = local_indexes
    url = _fetch("pb1-detectron2-0.6.tar.gz", sha256, tmp_path / "d2.tar.gz", indexes)
    assert url == (tmp_path / "full" / "files" / "pb1-detectron2-0.6.tar.gz").as_uri()
    assert (tmp_path / "d2.tar.gz").read_bytes() == data


def test_wrong_sha256_is_refused_and_nothing_written(local_indexes, tmp_path):
    indexes, sha256, _ = local_indexes
    with pytest.raises(fetch_sdist.FetchError, match=f"has sha256 {sha256}, not the expected 1234."):
        _fetch("pb1-detectron2-0.6.tar.gz", "1234", tmp_path / "d2.tar.gz", indexes)
    assert not (tmp_path / "d2.tar.gz").exists()


def test_file_on_no_index_names_each_index_and_why(local_indexes, tmp_path):
    indexes, sha256, _ = local_indexes
    with pytest.raises(fetch_sdist.FetchError) as e:
        _fetch("pb1-detectron2-0.7.tar.gz", sha256, tmp_path / "d2.tar.gz", indexes)
    msg = str(e.value)
    assert msg.startswith("No package index that pip is configured with has pb1-detectron2-0.7.tar.gz: ")
    assert f"{indexes[0]}: <urlopen error [Errno 2] No such file or directory" in msg
    assert msg.endswith(f"{indexes[1]}: its pb1-detectron2 page does not list pb1-detectron2-0.7.tar.gz.")
    with pytest.raises(fetch_sdist.FetchError, match="pip is configured with no index"):
        _fetch("pb1-detectron2-0.6.tar.gz", sha256, tmp_path / "d2.tar.gz", [])
