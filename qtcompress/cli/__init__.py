"""The ``qtcompress`` command line: ``main`` (the entry point), parsing and printing only.

``parser.py`` holds the grammar, ``commands.py`` what each subcommand does; the work is in the
library.

Exit codes: 0 success; 1 a qtcompress error (bad input, bad file, failed check), with a one-line
message on stderr; 2 a usage error (unknown flag or bad flag value); 3 an unexpected internal
error. ``--debug`` shows the full traceback.
"""

from __future__ import annotations

import os

# Idle OpenMP threads spin briefly, then sleep. libgomp's default spin holds a core for long
# after each operator: next to one other busy 2-thread process a 1e6-weight MLP's training
# step took 291 ms instead of 3.8 ms quiet. Sleeping at once (OMP_WAIT_POLICY=PASSIVE, the
# setting before) pays a thread wake-up on every parallel operator: 8.2 ms quiet, 20 ms busy.
# 1000 spins: 5.4 ms quiet, 12.7 ms busy (tools/bench_step.py --wait, docs/benchmarks.md).
# libgomp reads this once, when torch loads: in the CLI, later. A user's own setting wins.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")

import sys  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from typing import Any  # noqa: E402

from qtcompress.cli.commands import EXIT_ERROR, EXIT_INTERNAL, EXIT_OK, EXIT_USAGE, UsageError  # noqa: E402
from qtcompress.cli.parser import build_parser  # noqa: E402
from qtcompress.errors import QTCompressError  # noqa: E402

__all__ = ["build_parser", "main"]


def _one_line_warning(
    message: Warning | str, category: type[Warning], *_args: Any, **_kwargs: Any
) -> str:
    return f"qtcompress: warning: {message}\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads is not None:
        # Before torch and qsim load (their imports are lazy): the thread pools read these once.
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(args.threads)
        from qtcompress.qnn.backends import set_threads

        set_threads(args.threads)
    if args.command is None:
        parser.print_help()
        return EXIT_OK
    formatter = warnings.formatwarning
    if not args.debug:
        # Library warnings (an ignored checkpoint key, an unknown config key) as one line each.
        warnings.formatwarning = _one_line_warning  # type: ignore[assignment]
    try:
        code: int = args.handler(args)
        return code
    except UsageError as exc:
        print(f"qtcompress {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except QTCompressError as exc:
        if args.debug:
            raise
        print(f"qtcompress {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"qtcompress {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - last-resort guard so users see one line
        if args.debug:
            raise
        print(
            f"qtcompress {args.command}: internal error: {type(exc).__name__}: {exc} "
            "(rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL
    finally:
        warnings.formatwarning = formatter
