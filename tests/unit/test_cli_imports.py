"""The CLI's start-up cost: every `node` command pays its imports before it does anything
(a `node share` of 256 MiB spent about half its wall time starting the CLI)."""

from __future__ import annotations

import subprocess
import sys


def test_the_cli_loads_the_folder_commands_only_for_a_folder_command() -> None:
    probe = ("import sys, node.cli; "
             "print(sorted(m for m in ('node.folders.commands', 'node.folders.disk', "
             "'node.folders.ignore', 'node.transfer.store', 'pathspec') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout
