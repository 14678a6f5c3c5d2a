#!/usr/bin/env python3
"""Drive an older ``e2b`` SDK (run by the interpreter of its own venv) against a Clawdspace URL.

    e2b_old_sdk.py create URL KEY   create, connect again, run, write and read a file
    e2b_old_sdk.py kill URL KEY ID  kill twice

Each mode prints one JSON line. e2b <= 2.50.0 creates with ``POST /sandboxes`` and connects with
``POST /sandboxes/{id}/connect`` (the paths that newer SDKs replaced with ``/v2/...``).
This file must stay importable by that venv alone: no imports from the test suite.
"""

from __future__ import annotations

import importlib.metadata
import json
import sys
import warnings
from typing import Any

warnings.simplefilter("error")  # a deprecation in the old SDK's path should show, not hide

from e2b import Sandbox  # noqa: E402 - after the warnings filter


def main(argv: list[str]) -> int:
    mode, url, key = argv[1], argv[2], argv[3]
    opts: dict[str, Any] = {"api_url": url, "sandbox_url": url, "api_key": key,
                            "request_timeout": 30}
    result: dict[str, Any] = {"version": importlib.metadata.version("e2b")}
    if mode == "create":
        sbx = Sandbox.create("base", timeout=300, metadata={"sdk": "old"}, **opts)
        again = Sandbox.connect(sbx.sandbox_id, **opts)
        run = again.commands.run("echo old-$((6*7)); echo warn >&2")
        again.files.write("/workspace/old.txt", "from the old sdk")
        result.update(id=sbx.sandbox_id, stdout=run.stdout, stderr=run.stderr,
                      exitCode=run.exit_code, text=again.files.read("/workspace/old.txt"),
                      metadata=again.get_info().metadata)
    elif mode == "kill":
        result.update(first=Sandbox.kill(argv[4], **opts), second=Sandbox.kill(argv[4], **opts))
    else:
        print(f"unknown mode {mode!r}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
