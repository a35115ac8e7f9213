"""registry/ sits between pipelines/ and adaloc/: it never imports Prefect or pipelines."""

from __future__ import annotations

import subprocess
import sys


def test_registry_never_imports_prefect_or_pipelines():
    code = (
        "import sys, registry\n"
        "import registry.site, registry.store, registry.sealing, registry.keyring\n"
        "import registry.local_servers\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('prefect', 'pipelines'))\n"
        "print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
