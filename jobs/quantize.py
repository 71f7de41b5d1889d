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

from wq_ops.cluster.runtime import choose_runtime
from wq_ops.config import JobConfig, default_options
from wq_ops.device.cuda_context import start_primary_context
from wq_ops.errors import WqError
from wq_ops.io.hub_push import resolve_token

S = argparse.SUPPRESS


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wq", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                argument_default=S)
    p.add_argument("--config", help="YAML file of options (flag names, '-' as '_'); flags override it")
    p.add_argument("--model", help="local checkpoint directory or Hub repo id (default: the bundled tiny model)")
    p.add_argument("--revision", help="Hub branch, tag or commit")
    p.add_argument("--out", help="output directory (default: out/<model>-<method>-w<bits>)")
    p.add_argument("--format", choices=["compressed-tensors", "gptq"], help="artifact format (compressed-tensors)")
    p.add_argument("--method", choices=["gptq", "awq", "rtn"], help="algorithm (gptq)")
    p.add_argument("--bits", type=int, help="2, 3, 4 or 8 (4)")
    p.add_argument("--group-size", dest="group_size", help="columns per scale: a multiple of 32, or 'channel' (128)")
    p.add_argument("--sym", dest="sym", action="store_true", help="symmetric grid (default)")
    p.add_argument("--asym", dest="sym", action="store_false", help="asymmetric grid with zero points (vLLM loads "
                   "it; transformers cannot yet, llm-compressor#1618)")
    p.add_argument("--damp", type=float, help="GPTQ damping, fraction of mean diag(H) (0.01)")
    p.add_argument("--act-order", dest="act_order", action="store_true", help="GPTQ: activation order, static "
                   "groups (default for gptq)")
    p.add_argument("--no-act-order", dest="act_order", action="store_false", help="GPTQ: natural column order")
    p.add_argument("--block-size", dest="block_size", type=int, help="GPTQ columns per lazy-update block (128)")
    p.add_argument("--awq-grid", dest="awq_grid", type=int, help="AWQ scale-search grid points (20)")
    p.add_argument("--awq-search-samples", dest="awq_search_samples", type=int,
                   help="AWQ samples replayed per candidate with --awq-loss module (32)")
    p.add_argument("--awq-loss", dest="awq_loss", choices=["module", "layer"],
                   help="AWQ scale search measures the group's own linear outputs on every token, from the "
                   "Hessian (layer), or the attention's or MLP's output on replayed samples (module) (layer)")
    p.add_argument("--ignore", action="append", help="module-name pattern to leave unquantized (repeatable)")
    p.add_argument("--backend", choices=["reference", "cuda"],
                   help="kernel backend (cuda when --gpus-per-actor > 0, else reference)")
    p.add_argument("--calib", help="text file, folder of text files, parquet, jsonl or datasets folder")
    p.add_argument("--text-column", dest="text_column", help="column/field holding the text (text)")
    p.add_argument("--samples", type=int, help="calibration samples (128)")
    p.add_argument("--seq-len", dest="seq_len", type=int, help="tokens per sample (2048)")
    p.add_argument("--seed", type=int, help="calibration sampling seed (0)")
    p.add_argument("--actors", type=int, help="block actors, one per GPU (1)")
    p.add_argument("--gpus-per-actor", dest="gpus_per_actor", type=float, help="0 runs on CPU (0)")
    p.add_argument("--cpus-per-actor", dest="cpus_per_actor", type=int, help="CPUs and torch threads per actor (1)")
    p.add_argument("--micro-batch-samples", dest="micro_batch_samples", type=int, help="samples per forward (8)")
    p.add_argument("--actor-memory-gib", dest="actor_memory_gib", type=float, help="memory per actor (measured)")
    p.add_argument("--propagation", choices=["quantized", "float"], help="block inputs from the quantized model "
                   "(quantized, GPTQ's scheme) or the float one (float)")
    p.add_argument("--span-mode", choices=["auto", "stream", "block"],
                   help="float propagation: stream micro-batches through each actor's resident span, actor to "
                        "actor (all actors busy at once), or move one block at a time (least memory); auto: "
                        "stream when there are several actors and the span fits (default auto)")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray, or none "
                   "for one actor: see --runtime)")
    p.add_argument("--runtime", choices=["auto", "ray", "local"],
                   help="where the actors run: ray, or local (one actor in this process, no Ray start-up); "
                        "auto: local for one actor without --address, else ray (default auto)")
    p.add_argument("--tp-sizes", dest="tp_sizes", help="vLLM tensor-parallel sizes the artifact must load with, "
                   "e.g. 1,2,4,8: refuse before any work if one cannot (default: report 1,2,4,8)")
    p.add_argument("--tp-policy", dest="tp_policy", choices=["refuse", "pad"],
                   help="a --tp-sizes size vLLM cannot load: refuse before work (default), or zero-pad "
                        "intermediate_size so it loads (outputs unchanged)")
    p.add_argument("--push-to-hub", dest="push_to_hub", help="publish the artifact to this Hub repo (ORG/NAME); "
                   "token from HF_TOKEN or the huggingface_hub login, checked before any work")
    p.add_argument("--push-revision", dest="push_revision", help="branch to push to (main)")
    p.add_argument("--private", action="store_true", help="create the Hub repo private")
    p.add_argument("--commit-message", dest="commit_message", help="Hub commit message")
    p.add_argument("--overwrite", action="store_true", help="replace a complete artifact in --out")
    p.add_argument("--dry-run", dest="dry_run", action="store_true", help="print the plan and its memory, then exit")
    p.add_argument("--trust-remote-code", dest="trust_remote_code", action="store_true")
    p.add_argument("--modeling", choices=["auto", "native", "transformers"],
                   help="whose modules compute the blocks: wq's native Llama/Qwen2/Qwen3 (the same bits, without "
                        "transformers' import at start-up) or transformers' classes; auto: native where the "
                        "config reads natively (auto)")
    p.add_argument("--log-level", dest="log_level", default="INFO", help="INFO")
    return p


def main(argv: list[str] | None = None) -> int:
    args = vars(parser().parse_args(argv))
    logging.basicConfig(level=args.pop("log_level"), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        options = yaml.safe_load(Path(args.pop("config")).read_text()) or {} if "config" in args else {}
        if "ignore" in args:
            args["ignore"] = [p for item in args["ignore"] for p in item.split(",") if p]
        options.update(args)
        if "address" not in options and os.environ.get("RAY_ADDRESS"):
            options["address"] = os.environ["RAY_ADDRESS"]
        job = JobConfig.from_dict(default_options(options))
        if job.run.gpus_per_actor > 0 and choose_runtime(job.run).name == "local":
            # The in-process actor's CUDA context, made while torch imports (the driver imports it).
            # torch's own default, set first: the CUDA driver reads it once, at cuInit.
            os.environ.setdefault("CUDA_MODULE_LOADING", "LAZY")
            start_primary_context(0)
        from wq_ops.cluster.driver import run_job
        from wq_ops.cluster.plan import check_fits
        cache_root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        cache = Path(os.environ.get("WQ_CACHE_DIR") or cache_root / "wq")
        command = shlex.join(["wq", *(argv if argv is not None else sys.argv[1:])])
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")       # unattended logs, not terminals
        token = resolve_token(None) if job.push_to_hub else None
        result = run_job(job, cache_dir=cache, command=command, hub_token=token)
    except (WqError, OSError, yaml.YAMLError) as e:
        print(f"wq: error: {e}", file=sys.stderr)
        return 2
    if result.report is None:
        print(result.plan.describe())
        try:
            check_fits(result.plan)
            print("dry run: the plan fits; nothing written")
        except WqError as e:
            print(f"dry run: the plan does not fit: {e}")
            return 2
    else:
        t = result.report["totals"]
        print(f"wrote {result.out_dir}: {t['layers_quantized']} layers quantized, mean output error "
              f"{t['mean_output_error']:.3e}, {t['wall_seconds']:.1f} s; report in {result.out_dir / 'wq_report.html'}")
    return 0


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
