#!/usr/bin/env python
"""
Download one release file of a project through the package indexes pip is configured with, and
check its sha256:

    python tools/fetch_sdist.py PROJECT FILENAME SHA256 DEST
    python tools/fetch_sdist.py pb1-detectron2 pb1-detectron2-0.6.tar.gz 5d2e9e51... d2.tar.gz

tools/install.sh gets detectron2's sdist this way. ``pip download`` cannot: it prepares the
metadata of every sdist it downloads and refuses pb1-detectron2's, which declares a direct-URL
dependency (panopticapi), whatever the options. The indexes are the ones pip would use: its
index URL and extra index URLs from the command-line defaults, ``PIP_*`` variables and pip.conf
(pip's own default index when none is set), read as PEP 691 (JSON) or PEP 503 (HTML) simple
pages; pip's CA bundle, proxy and timeout apply too.
"""
import argparse
import hashlib
import json
import os
import re
import ssl
import sys
import urllib.error
import urllib.request
from html.parser import HTMLParser
from urllib.parse import unquote, urldefrag, urljoin, urlsplit

# What pip asks a simple index for: JSON (PEP 691) first, HTML (PEP 503) otherwise.
SIMPLE_ACCEPT = (
    "application/vnd.pypi.simple.v1+json, application/vnd.pypi.simple.v1+html;q=0.2, "
    "text/html;q=0.01"
)
PEP691_JSON = "application/vnd.pypi.simple.v1+json"


class FetchError(RuntimeError):
    """The file is on none of the indexes, or not with the expected sha256."""


def pip_settings():
    """pip's index URLs, CA bundle, proxy and timeout, as its own command-line parser resolves
    them (defaults, ``PIP_*`` variables, pip.conf): the same indexes ``pip install`` reads."""
    from pip._internal.commands import create_command

    options, _ = create_command("download").parse_args([])
    indexes = [] if options.no_index else [options.index_url, *options.extra_index_urls]
    return indexes, options.cert, options.proxy, options.timeout


def build_opener(cert=None, proxy=None):
    handlers = [urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=cert))]
    if proxy:
        handlers.append(urllib.request.ProxyHandler({"http": proxy, "https": proxy}))
    return urllib.request.build_opener(*handlers)


def normalize(project):
    """PEP 503's normalized project name: the folder of its simple page."""
    return re.sub(r"[-_.]+", "-", project).lower()


class _Hrefs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.hrefs = []

    def handle_starttag(self, tag, attrs):
        href = dict(attrs).get("href")
        if tag == "a" and href:
            self.hrefs.append(href)


def file_urls(page, content_type, page_url, charset="utf-8"):
    """``{filename: absolute URL}`` of the files that a simple page (bytes) lists. A PEP 691
    page names each file; on a PEP 503 page the name is the last part of the link's path."""
    if content_type == PEP691_JSON:
        return {f["filename"]: urljoin(page_url, f["url"]) for f in json.loads(page)["files"]}
    parser = _Hrefs()
    parser.feed(page.decode(charset))
    urls = [urldefrag(urljoin(page_url, href)).url for href in parser.hrefs]
    return {unquote(urlsplit(url).path.rsplit("/", 1)[-1]): url for url in urls}


def simple_page_url(index, project):
    url = f"{index.rstrip('/')}/{normalize(project)}/"
    # pip reads a local index folder's index.html; urllib cannot open a folder
    if url.startswith("file:") and os.path.isdir(urllib.request.url2pathname(urlsplit(url).path)):
        url += "index.html"
    return url


def read_simple_page(opener, index, project, timeout):
    request = urllib.request.Request(simple_page_url(index, project), headers={"Accept": SIMPLE_ACCEPT})
    with opener.open(request, timeout=timeout) as r:
        headers = r.headers
        return file_urls(r.read(), headers.get_content_type(), r.geturl(), headers.get_content_charset("utf-8"))


def fetch(project, filename, sha256, dest, indexes, opener, timeout):
    """Download ``filename`` from the first of ``indexes`` that lists it into ``dest``; returns
    its URL. Raises :class:`FetchError` naming every index and why it did not serve the file."""
    misses = []
    for index in indexes:
        try:
            urls = read_simple_page(opener, index, project, timeout)
        except (OSError, ValueError) as e:  # URLError and HTTPError are OSErrors
            misses.append(f"{index}: {e}")
            continue
        if filename not in urls:
            misses.append(f"{index}: its {normalize(project)} page does not list {filename}")
            continue
        try:
            with opener.open(urls[filename], timeout=timeout) as r:
                data = r.read()
        except OSError as e:
            raise FetchError(f"{urls[filename]} is listed but cannot be downloaded: {e}") from e
        got = hashlib.sha256(data).hexdigest()
        if got != sha256:
            raise FetchError(f"{urls[filename]} has sha256 {got}, not the expected {sha256}.")
        with open(dest, "wb") as f:
            f.write(data)
        return urls[filename]
    where = "; ".join(misses) or "pip is configured with no index (no_index)"
    raise FetchError(f"No package index that pip is configured with has {filename}: {where}.")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("project")
    parser.add_argument("filename")
    parser.add_argument("sha256")
    parser.add_argument("dest")
    args = parser.parse_args(argv)
    indexes, cert, proxy, timeout = pip_settings()
    try:
        url = fetch(args.project, args.filename, args.sha256, args.dest, indexes, build_opener(cert, proxy), timeout)
    except FetchError as e:
        sys.exit(f"error: {e}")
    print(f"[fetch_sdist] {args.filename} (sha256 checked) from {url}")


if __name__ == "__main__":
    main()
