"""Pages generated at build time (mkdocs-gen-files, run by `mkdocs build`).

* reference/cli.md: dbs-train's options, group by group, from its argparse
  parser (dbs_hvd.train.cli.train_parser), and the full `dbs-train --help`;
  then `dbs-plan --help` (dbs_hvd.train.whatif.plan_parser).
* results/*.png: the benchmark figures, copied from benchmarks/results/ where
  the benchmarks' output is kept.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import mkdocs_gen_files

ROOT = Path(__file__).resolve().parent.parent
FIGURES = ["hetero.png", "hetero_virtual.png", "external/external.png"]


def _flag_cell(action: argparse.Action) -> str:
    flags = ", ".join(f"`{s}`" for s in action.option_strings)
    if action.choices:
        flags += " `{" + ",".join(str(c) for c in action.choices) + "}`"
    elif action.metavar:
        flags += f" `{action.metavar}`"
    elif action.nargs != 0:
        flags += f" `{action.dest.upper()}`"
    return flags


def _default_cell(action: argparse.Action) -> str:
    if action.default is None or action.default is False or action.nargs == 0:
        return ""
    return f"`{action.default}`"


def _text(value: str) -> str:
    return value.replace("%%", "%").replace("|", "\\|").replace("\n", " ")


def cli_page() -> str:
    os.environ["COLUMNS"] = "100"  # a fixed width for the --help text below
    from dbs_hvd.train.cli import train_parser

    parser = train_parser()
    lines = [
        "# dbs-train command line",
        "",
        "Generated from dbs-train's argparse parser (`dbs_hvd.train.cli.train_parser`) when the",
        "site is built. Launch it under `horovodrun` or `mpirun`; see the",
        "[dbs-train guide](../guide/dbs-train.md) for what the outputs mean.",
        "",
    ]
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if a.help is not argparse.SUPPRESS
                   and a.dest != "help"]
        if not actions:
            continue
        lines += [f"## {group.title}", ""]
        if group.description:
            lines += [_text(group.description[0].upper() + group.description[1:]) + ".", ""]
        lines += ["| option | default | meaning |", "|---|---|---|"]
        for action in actions:
            lines.append(f"| {_flag_cell(action)} | {_default_cell(action)} | "
                         f"{_text(action.help or '')} |")
        lines.append("")
    lines += ["## `dbs-train --help`", "", "```text", parser.format_help().rstrip(), "```", ""]
    from dbs_hvd.train.whatif import plan_parser

    lines += ["## dbs-plan", "",
              "What-if planning from a dbs-train `--rebalance-log` ([what it answers]"
              "(../guide/dbs-train.md#what-if-planning-does-a-worker-pay-for-itself)).", "",
              "```text", plan_parser().format_help().rstrip(), "```", ""]
    return "\n".join(lines)


with mkdocs_gen_files.open("reference/cli.md", "w") as page:
    page.write(cli_page())

for name in FIGURES:
    with mkdocs_gen_files.open(f"results/{name}", "wb") as figure:
        figure.write((ROOT / "benchmarks" / "results" / name).read_bytes())
