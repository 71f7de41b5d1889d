"""Check command lines against the entrypoints' real argparse parsers, with argparse's own message on failure.

The push flags are being added to jobs/quantize.py alongside the scheduler. Until the parser takes one
of them, `parse_quantize_argv` drops it (with its value), parses the rest strictly, and reports it as
pending; a test then xfails naming it. Once the parser takes the flag, it is checked like any other.
"""

from __future__ import annotations

import argparse
import contextlib
import io

from jobs.quantize import parser

# flag -> number of values it takes
PUSH_FLAGS = {"--push-to-hub": 1, "--push-revision": 1, "--commit-message": 1, "--private": 0}


def _takes(p: argparse.ArgumentParser, flag: str) -> bool:
    _, unknown = p.parse_known_args([flag, *["x"] * PUSH_FLAGS[flag]])
    return not unknown


def parse_quantize_argv(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """(the parsed options, the push flags the parser does not take yet). Raises AssertionError with
    argparse's message if any other flag or value is wrong."""
    p = parser()
    pending = [f for f in PUSH_FLAGS if f in argv and not _takes(p, f)]
    rest, i = [], 0
    while i < len(argv):
        if argv[i] in pending:
            i += 1 + PUSH_FLAGS[argv[i]]
            continue
        rest.append(argv[i])
        i += 1
    return parse_strict(p, rest), pending


def parse_strict(p: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """p.parse_args(argv), raising AssertionError with argparse's message instead of exiting."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return p.parse_args(argv)
    except SystemExit:
        raise AssertionError(f"{p.prog} rejects {argv}: {err.getvalue().strip()}") from None
