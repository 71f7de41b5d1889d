"""Quantize a Hugging Face checkpoint: `python -m jobs.quantize --model DIR_OR_REPO --out DIR [...]`,
`wq [...]`, or `ray job submit --working-dir . -- python -m jobs.quantize [...]` against a cluster.

With no --model, quantizes wq's bundled tiny random-weight Llama on its bundled public-domain text.
Every flag can also come from `--config job.yaml` (keys: the flag names with '_'); flags override.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from pathlib import Path

import yaml

from wq_ops.api import quantize
from wq_ops.config.options import add_arguments
from wq_ops.errors import ActorLostError, WqError

RERUN_RESUMES = 75                     # EX_TEMPFAIL: actors kept dying; a rerun resumes from the staged blocks


def parser() -> argparse.ArgumentParser:
    """The command line: --config and --log-level, and one flag per option of the table
    (`wq_ops.config.options`), which states each default."""
    p = argparse.ArgumentParser(prog="wq", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=argparse.SUPPRESS,
                   help="YAML file of options (flag names, '-' as '_'); flags override it")
    add_arguments(p)
    p.add_argument("--log-level", dest="log_level", default="INFO", help="(default: INFO)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = vars(parser().parse_args(argv))
    level = str(args.pop("log_level")).upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        print(f"wq: error: --log-level {level.lower()}: expected debug, info, warning, error or critical",
              file=sys.stderr)
        return 2
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        options = _read_yaml(Path(args.pop("config"))) if "config" in args else {}
        options.update(args)
        if not sys.stderr.isatty():         # downloads show bars on a terminal; logs get no bar fragments
            os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        command = shlex.join(["wq", *(argv if argv is not None else sys.argv[1:])])
        result = quantize(progress=True, command=command, **options)
    except ActorLostError as e:         # a rerun resumes: jobs.retry runs the driver again
        print(f"wq: error: {e}", file=sys.stderr)
        return RERUN_RESUMES
    except (WqError, OSError, yaml.YAMLError) as e:
        print(f"wq: error: {e}", file=sys.stderr)
        return 2
    if result.dry_run:
        print(result.plan.describe())
        if result.calibration is not None:
            print(result.calibration.describe())
        print(result.disk)
        from wq_ops.cluster.plan import JobPlan, check_fits

        try:
            if isinstance(result.plan, JobPlan):
                check_fits(result.plan)
            print("dry run: the plan fits; nothing written")
        except WqError as e:
            print(f"dry run: the plan does not fit: {e}")
            return 2
    else:
        print(result.summary())
    return 0


def _read_yaml(path: Path) -> dict:
    """The options of a YAML job file; a file that is not a mapping is an error naming it."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise WqError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise WqError(f"{path}: expected a mapping of option names to values, got {type(data).__name__}")
    return data


def cli() -> None:
    """The command line (`wq`, `python -m jobs.quantize`): main(), then exit without the interpreter's
    teardown. Everything the job writes is closed and renamed into place before main returns; what is
    left is freeing the GPU's memory and context object by object, 1.7 s of a 15 s job on the H100."""
    code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    cli()
