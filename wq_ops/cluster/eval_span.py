"""--eval on one actor: the perplexity windows through its span of blocks, once they are quantized, with the
weights the artifact holds (each block's staged shard, dequantized) or, for --eval-baseline, the source's.
The first actor embeds the windows; the last applies the final norm and lm_head and scores each window
(`wq_ops.evaluate.perplexity.window_nll`, the function `jobs.eval` scores with). One block is resident at a
time and the next one loads meanwhile; the windows' activations stay on the actor's device between blocks
and travel actor to actor as refs, as the calibration set's do."""

from __future__ import annotations

from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor, nn
from torch.func import functional_call

from wq_ops.block.calibration import replay_block_
from wq_ops.cluster.actor_job import ActorJob
from wq_ops.cluster.loader import BlockLoader, Loaded, prefetched
from wq_ops.cluster.spans import Compute
from wq_ops.errors import CheckpointError
from wq_ops.evaluate.perplexity import window_nll
from wq_ops.formats import quantized_modules
from wq_ops.io.checkpoint import read_tensors
from wq_ops.quant.activations import fake_quantize_input

__all__ = ["EvalSpan"]

# A static activation scale's tensor: FP8's per-tensor scale, NVFP4's global scale.
_INPUT_SCALES = (".input_scale", ".input_global_scale")


class EvalSpan:
    """quantized: the artifact's weights (True) or the source's (False)."""

    def __init__(self, job: ActorJob, loader: BlockLoader, compute: Compute, *, quantized: bool) -> None:
        self.job, self.loader, self.compute, self.quantized = job, loader, compute, quantized
        self.seq_len = job.spec.job.evaluation.seq_len

    def embed(self, windows: Tensor) -> list[Tensor]:
        """The windows (n_windows, seq_len) embedded, in micro-batches of --micro-batch-samples windows."""
        spec = self.job.spec
        name = spec.layout.embed_name
        weight = read_tensors(spec.checkpoint, [name])[name]
        embedding: Any = self.job.model.get_input_embeddings()     # type: ignore[operator]

        def run() -> list[Tensor]:
            with torch.no_grad():
                w = weight.to(self.job.device)
                return [functional_call(embedding, {"weight": w}, (chunk.to(self.job.device),))
                        for chunk in windows.split(spec.job.run.micro_batch_samples)]

        return self.compute(run)

    def forward(self, blocks: list[int], batches: list[Tensor]) -> list[Tensor]:
        """The span's outputs for the windows' micro-batches (consumed), block by block, the next block's
        weights loading while one computes."""
        for index, loaded in prefetched(self.loader.load_staged if self.quantized else self.loader.load_float, blocks):
            batches = self.compute(self._replay, index, loaded, batches)
        return batches

    def _replay(self, index: int, loaded: Loaded, batches: list[Tensor]) -> list[Tensor]:
        self.loader.await_copy(loaded)
        block = self.job.block(index, seq_len=self.seq_len)
        served = self.job.spec.job.quant.activations
        if not self.quantized or served is None:
            outputs = replay_block_(block, loaded.params, batches)
        else:
            # The artifact's activation quantization, as an engine applies it, on each quantized linear's input.
            scales = self._input_scales(index)
            device = self.job.device
            on_device = {name: s.to(device) for name, s in scales.items() if s is not None}

            def transform(name: str, x: Tensor) -> Tensor:
                return fake_quantize_input(x, served, static_scale=on_device.get(name))

            with block.quantizing_inputs(scales, transform):
                outputs = replay_block_(block, loaded.params, batches)
        del loaded.params
        return outputs

    def _input_scales(self, index: int) -> dict[str, Tensor | None]:
        """Each quantized linear of block `index` (block-local name) and its stored input scale (None: dynamic),
        read from its staged shard (the header, and the scales themselves)."""
        spec = self.job.spec
        prefix = f"{spec.layout.block_prefix}.{index}."
        with safe_open(str(spec.artifact.staged_block(index)), framework="pt") as f:
            names = list(f.keys())
            quantized = sorted(quantized_modules(spec.job.format, spec.job.quant, names))
            local = [(m, m[len(prefix):]) for m in quantized]
            stored = {m: next((m + leaf for leaf in _INPUT_SCALES if m + leaf in names), None) for m, _ in local}
            return {n: None if stored[m] is None else f.get_tensor(stored[m]).to(torch.float32).reshape(())
                    for m, n in local}

    def score(self, batches: list[Tensor], windows: Tensor) -> list[float]:
        """Each window's mean next-token NLL from the last block's outputs (consumed): final norm, lm_head,
        one window's logits at a time."""
        norm, norm_params, head, head_params = self._head()

        def run() -> list[float]:
            nlls: list[float] = []
            with torch.no_grad():
                on_device = {k: v.to(self.job.device) for k, v in norm_params.items()}
                head_on_device = {k: v.to(self.job.device) for k, v in head_params.items()}
                while batches:
                    normed = functional_call(norm, on_device, (batches.pop(0),))
                    for row in normed:
                        logits = functional_call(head, head_on_device, (row.unsqueeze(0),))[0]
                        nlls.append(window_nll(logits, windows[len(nlls)]))
            return nlls

        return self.compute(run)

    def _head(self) -> tuple[nn.Module, dict[str, Tensor], nn.Module, dict[str, Tensor]]:
        """The final norm and lm_head modules (meta) and their tensors from the checkpoint (lm_head's is the
        embedding table where the model ties them)."""
        spec = self.job.spec
        layout, model = spec.layout, self.job.model
        head_name = layout.outer_linears[0] if layout.outer_linears else "lm_head"
        head_weight = f"{head_name}.weight"
        rest = [n for n in layout.outer_params if n != layout.embed_name and not n.startswith(head_name + ".")]
        norms = {n.rsplit(".", 1)[0] for n in rest}
        if len(norms) != 1:
            raise CheckpointError(f"--eval: expected one final norm outside the decoder blocks besides the embeddings "
                                  f"and {head_name}, found {sorted(norms) or 'none'}")
        norm_name = norms.pop()
        names = rest + ([head_weight] if head_weight in layout.outer_params else [layout.embed_name])
        tensors = read_tensors(spec.checkpoint, names)
        norm_params = {n[len(norm_name) + 1:]: tensors[n].to(layout.dtype) for n in rest}
        head_params = {"weight": tensors[names[-1]].to(layout.dtype)}
        head_params.update({n[len(head_name) + 1:]: tensors[n].to(layout.dtype) for n in layout.outer_params
                            if n.startswith(head_name + ".") and n != head_weight})
        return model.get_submodule(norm_name), norm_params, model.get_submodule(head_name), head_params
