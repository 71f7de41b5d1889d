"""Check command lines against the entrypoints' real argparse parsers, with argparse's own message on failure."""

from __future__ import annotations

import argparse
import contextlib
import io

from jobs.quantize import parser


def parse_quantize_argv(argv: list[str]) -> argparse.Namespace:
    """jobs.quantize's options for `argv`; AssertionError with argparse's message if a flag or value is wrong."""
    return parse_strict(parser(), argv)


def parse_strict(p: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """p.parse_args(argv), raising AssertionError with argparse's message instead of exiting."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return p.parse_args(argv)
    except SystemExit:
        raise AssertionError(f"{p.prog} rejects {argv}: {err.getvalue().strip()}") from None
