"""How long a fit with a bad flag takes to fail (docs/reliability.md, "Checked before the first job").

Runs ``stackcat fit TABLE --target TARGET`` once per bad input (a tree file
with a cycle, an empty tree file, one without its parent column, a --param
naming a missing column, the target among the text columns, an empty or
absent label separator, a signing key that cannot be created, a scheduler
address that is an HTTP server), each in a fresh run folder, and prints the
exit code, the seconds to fail, whether a job had started, and the message.

    PYTHONPATH=$PWD python experiments/fail_fast.py /work/shared/data/myntra/styles_merged.csv articleType
"""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

LIMIT_S = 600


class _Quiet(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def cases(folder: Path, http_address: str) -> dict[str, tuple[list[str], dict[str, str]]]:
    cycle = folder / "cycle.csv"
    cycle.write_text("id,parent_id,title\nShirts,Jeans,a\nJeans,Shirts,b\n")
    empty = folder / "empty.csv"
    empty.write_text("")
    no_parent = folder / "no_parent.csv"
    no_parent.write_text("id,title\nShirts,a\n")
    blocker = folder / "a-file"
    blocker.write_text("")
    return {
        "tree with a cycle": (["--tree", str(cycle)], {}),
        "empty tree file": (["--tree", str(empty)], {}),
        "tree without parent_id": (["--tree", str(no_parent)], {}),
        "--param naming a missing column": (["--param", "fasttext__text_column=nope"], {}),
        "target among the text columns": (["--text-columns", "productDisplayName,articleType"], {}),
        "--label-separator ''": (["--label-separator", ""], {}),
        "separator that never occurs": (["--label-separator", " > "], {}),
        "key file cannot be created": ([], {"STACKCAT_KEY_FILE": str(blocker / "key")}),
        "--scheduler is an HTTP server": (["--scheduler", http_address], {}),
    }


def main(table: str, target: str) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for number, (name, (flags, env)) in enumerate(cases(folder, f"tcp://127.0.0.1:{server.server_address[1]}")
                                                      .items()):
            run_dir = folder / f"run-{number}"
            command = [sys.executable, "-m", "stackcat.cli", "fit", table, "--target", target, "--run-dir",
                       str(run_dir), "--no-progress", *flags]
            started = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True, timeout=LIMIT_S,
                                  env={**os.environ, **env})
            seconds = time.perf_counter() - started
            error = next((line for line in done.stderr.splitlines() if "error" in line), done.stderr[-200:])
            jobs = (run_dir / "jobs").exists()
            print(f"{name:<34} exit {done.returncode}  {seconds:5.1f} s  jobs started: {jobs}\n    {error[:220]}")
    server.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
