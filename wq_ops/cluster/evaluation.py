"""--eval on the driver's side: once every block is quantized, the perplexity windows go through the actors'
spans as the calibration set did (refs actor to actor, never through the driver), scored by the last actor;
with --eval-baseline the source's pass follows on the same actors, one span behind, so the two overlap.
Entry point: `evaluate_on_actors`; the per-actor pass is `eval_span.EvalSpan`."""

from __future__ import annotations

import logging
import time
from typing import Any

from wq_ops.cluster.actor import BlockActor
from wq_ops.cluster.plan import JobPlan
from wq_ops.cluster.prepare import PreparedJob
from wq_ops.cluster.protocol import ActivationRef, ActorSpec
from wq_ops.cluster.runtime import ActorHandle, ActorRuntime, Pending
from wq_ops.evaluate.perplexity import perplexity_of

__all__ = ["evaluate_on_actors"]

log = logging.getLogger(__name__)


def evaluate_on_actors(runtime: ActorRuntime, prepared: PreparedJob, plan: JobPlan, actors: list[ActorHandle],
                       specs: list[ActorSpec]) -> dict[str, Any]:
    """The report's `eval` section: the artifact's perplexity on --eval's windows (and the source's with
    --eval-baseline), each window's NLL summed as `jobs.eval` does."""
    assert prepared.eval_ids is not None
    spec = prepared.job.evaluation
    t = time.perf_counter()
    windows = runtime.put(prepared.eval_ids)
    log.info("eval: %d windows of %d tokens through %d actor(s)%s", len(prepared.eval_ids), spec.seq_len,
             len(actors), ", then the source's" if spec.baseline else "")
    scored: dict[bool, Pending[list[float]]] = {}
    for quantized in (True, False) if spec.baseline else (True,):
        handoff: list[ActivationRef] | None = None
        for actor, actor_spec, a in zip(actors, specs, plan.actors):
            blocks = list(a.blocks)
            if a is plan.actors[-1]:
                scored[quantized] = runtime.call(actor, BlockActor.eval_score, actor_spec, blocks, windows, handoff,
                                                 quantized)
            else:
                handoff = runtime.passed(runtime.call(actor, BlockActor.eval_forward, actor_spec, blocks,
                                                      windows if a.rank == 0 else None, handoff, quantized))
    nlls = dict(zip(scored, runtime.get_all(list(scored.values()))))
    result = perplexity_of(nlls[True], seq_len=spec.seq_len)
    section: dict[str, Any] = {"text": spec.text, "join": spec.join.value, "seq_len": spec.seq_len,
                               "windows": result.n_windows, "tokens": result.n_tokens, "perplexity": result.ppl,
                               "mean_nll": result.mean_nll, "baseline_perplexity": None}
    if False in nlls:
        baseline = perplexity_of(nlls[False], seq_len=spec.seq_len)
        section.update(baseline_perplexity=baseline.ppl, baseline_mean_nll=baseline.mean_nll)
    section["seconds"] = round(time.perf_counter() - t, 3)
    log.info("eval: perplexity %.4f%s on %s (%d windows of %d tokens) in %.1f s", result.ppl,
             f" (the source: {section['baseline_perplexity']:.4f})" if False in nlls else "", spec.text,
             result.n_windows, spec.seq_len, section["seconds"])
    return section
