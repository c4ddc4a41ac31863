"""Write every option of each command, with its default, into the command's page (``docs/<command>.md``), between
the markers ``<!-- options -->`` and ``<!-- /options -->``: what ``d2mae <command> --help-all`` lists.

    python docs/options.py           # rewrite the blocks
    python docs/options.py --check   # exit 1 when a page's block is not what the code gives (tests/test_engine.py)
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from d2mae.commands.main import build_parser

DOCS = Path(__file__).resolve().parent
COMMANDS = ("pretrain", "obs", "finetune", "segment", "probe", "predict", "evaluate", "export", "view")
START, END = "<!-- options -->", "<!-- /options -->"


def block(command: str) -> str:
    """A Markdown table of every option of ``command``: the flag, its default, and what it does."""
    parser = build_parser(command, show_all=True)
    common = {a.dest for a in build_parser(command)._actions if a.help != argparse.SUPPRESS}
    rows = ["| option | default | what it sets |", "|---|---|---|"]
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS or action.dest in ("help", "help_all"):
            continue
        text = " ".join((action.help or "").split())
        match = re.search(r"\(default: ([^()]*)\)$", text)
        default = match.group(1) if match else ""
        text = text[:match.start()].strip() if match else text
        name = " / ".join(f"`{o}`" for o in action.option_strings if not o.startswith("--no-"))
        star = "" if action.dest in common else " ¹"
        rows.append(f"| {name}{star} | {default.replace('|', '/')} | {text.replace('|', '/')} |")
    note = ("¹ not in `--help`, only in `--help-all`: a config key (YAML or `--set KEY=VALUE`) as well as a flag.")
    return "\n".join([START, "", *rows, "", note, "", END])


def update(check: bool = False) -> list[str]:
    """Rewrite (or with ``check`` compare) each page's block; returns the pages whose block differs."""
    stale = []
    for command in COMMANDS:
        page = DOCS / f"{command}.md"
        text = page.read_text(encoding="utf-8")
        new = block(command)
        if START in text:
            updated = re.sub(re.escape(START) + r".*?" + re.escape(END), lambda _: new, text, flags=re.S)
        else:
            updated = text.rstrip() + "\n\n## Every option\n\n" + new + "\n"
        if updated != text:
            stale.append(str(page))
            if not check:
                page.write_text(updated, encoding="utf-8")
    return stale


if __name__ == "__main__":
    changed = update(check="--check" in sys.argv)
    print("\n".join(changed) or "every page is current")
    sys.exit(1 if changed and "--check" in sys.argv else 0)
