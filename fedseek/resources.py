"""Locating the package's data files (shipped datasets, embedded model).

Under `flwr run` the code runs from a Flower app bundle (FAB), which carries source files only
(no CSV or safetensors), so a resource missing beside the code is looked up in the installed
`fedseek` distribution (an editable install points back at its source tree).
"""
from __future__ import annotations

import json
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from urllib.parse import unquote, urlparse

PACKAGE_DIR = Path(__file__).parent


@lru_cache(maxsize=None)
def resource_path(relative: str, marker: str) -> Path:
    """`fedseek/<relative>` beside this code if it holds `marker` (a file a FAB never carries),
    else the same directory in the installed distribution."""
    local = PACKAGE_DIR / relative
    if (local / marker).exists():
        return local
    try:
        dist = distribution("fedseek")
    except PackageNotFoundError:
        return local
    direct_url = json.loads(dist.read_text("direct_url.json") or "{}")
    if direct_url.get("dir_info", {}).get("editable"):
        root = Path(unquote(urlparse(direct_url["url"]).path))
    else:
        root = Path(str(dist.locate_file("")))
    installed = root / "fedseek" / relative
    return installed if (installed / marker).exists() else local
