"""The ``d2mae`` command: a thin layer that parses flags and calls the library.

This package is the only place that knows about flags. Each command is a module here with ``add(parser)`` (its
flags, one per field of the command's config dataclass) and ``run(args)`` (build the config, call the library,
print; returns an exit status). Only the chosen command's module is imported. Input problems raise
:class:`~d2mae.runtime.errors.D2maeError`; they are printed as one line — a problem with one option named by its flag
— and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from d2mae.runtime.errors import D2maeError, os_error_message
from d2mae.runtime.memory import keep_freed_memory
from d2mae.runtime.threads import wait_policy_environment

# command: (module, one-line description)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("d2mae.commands.demo", "run the whole pipeline on synthetic phantoms in minutes on a CPU"),
    "phantoms": ("d2mae.commands.phantoms", "write synthetic ultrasound phantoms (PNG + labels.csv)"),
    "pretrain": ("d2mae.commands.pretrain", "pre-train D²MAE (or MAE / DeblurrMAE / an ablation) on unlabeled images"),
    "obs": ("d2mae.commands.obs", "optimal blurriness search: the best blur level t* per image"),
    "finetune": ("d2mae.commands.finetune", "fine-tune a classifier from a pre-trained encoder, blurred at t*"),
    "segment": ("d2mae.commands.segment", "fine-tune a lesion segmenter from a pre-trained encoder, blurred at t*"),
    "probe": ("d2mae.commands.probe", "linear probe, kNN and partial fine-tuning of a pre-trained encoder, per fold"),
    "evaluate": ("d2mae.commands.evaluate", "metrics with 95% confidence intervals, tables and figures for a run"),
    "compare": ("d2mae.commands.compare", "compare two runs with paired significance tests"),
    "predict": ("d2mae.commands.predict", "classify new images (runs OBS on each first)"),
    "experiment": ("d2mae.commands.experiment", "run every method of a config on every dataset and write a report"),
    "view": ("d2mae.commands.view", "a page to look through a run's images, blur searches and predictions"),
    "export": ("d2mae.commands.export", "export a pre-trained encoder for timm or Hugging Face"),
    "shards": ("d2mae.commands.shards", "pack images into tar shards for corpora larger than memory"),
}


def _usage() -> str:
    lines = ["usage: d2mae COMMAND [options]   (d2mae COMMAND --help for a command's options)", "", "commands:"]
    lines += [f"  {name:<11} {desc}" for name, (_, desc) in COMMANDS.items()]
    lines += ["", "Start with `d2mae demo`; the README has a worked example on real images."]
    return "\n".join(lines)


def _one_line_warning(message, category, filename, lineno, line=None) -> str:  # noqa: ANN001 (warnings API)
    """Warnings on the command line are one line each, without the source line Python shows by default."""
    return f"d2mae: warning: {message}\n"


def build_parser(command: str, show_all: bool = False) -> argparse.ArgumentParser:
    """The command's parser; ``show_all`` lists its advanced options too (``--help-all``)."""
    from d2mae.commands import flags

    flags.SHOW_ALL = show_all
    module_name, description = COMMANDS[command]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"d2mae {command}", description=description)
    module.add(parser)
    parser.set_defaults(_run=module.run)
    return parser


def error_line(exc: D2maeError, parser: argparse.ArgumentParser | None = None) -> str:
    """The error as the command line shows it: a problem with one option names its flag (``option --epochs:
    must be ≥ 1``) when the command has that flag, else the option's own name."""
    from d2mae.commands.flags import flag

    if exc.option is None:
        return exc.message
    known = parser is None or any(flag(exc.option) in a.option_strings for a in parser._actions)
    return f"option {flag(exc.option)}: {exc.message}" if known else str(exc)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from d2mae import __version__
        print(f"d2mae {__version__}")
        return 0
    command = argv[0]
    if command not in COMMANDS:
        print(f"d2mae: error: unknown command '{command}'\n\n{_usage()}", file=sys.stderr)
        return 2
    helping = any(a in ("-h", "--help", "--help-all") for a in argv[1:])  # help computes nothing: no policy, no note
    if not helping and "torch" not in sys.modules and wait_policy_environment():  # before OpenMP loads (threads.py)
        print("note: other programs are using the CPU; OpenMP threads sleep while they wait "
              "(OMP_WAIT_POLICY=PASSIVE), so this run keeps its share", file=sys.stderr)
    if not helping:
        keep_freed_memory()  # tensors' freed memory is reused, not page-faulted in again (runtime/memory.py)
    default_format, warnings.formatwarning = warnings.formatwarning, _one_line_warning
    parser = None
    try:
        if "--help-all" in argv[1:]:
            build_parser(command, show_all=True).print_help()
            return 0
        parser = build_parser(command)
        args = parser.parse_args(argv[1:])
        from d2mae.runtime.files import release  # torch: after the OpenMP wait policy (runtime/threads.py)

        release()  # what an earlier command in this process kept or claimed is not this one's
        return int(args._run(args) or 0)
    except D2maeError as exc:
        print(f"d2mae {command}: error: {error_line(exc, parser)}", file=sys.stderr)
        return 2
    except OSError as exc:  # a disk that fails mid-run (full, read-only, gone): the file and the cause, one line
        print(f"d2mae {command}: error: {os_error_message(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"d2mae {command}: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = default_format


if __name__ == "__main__":
    sys.exit(main())
