"""Describe a checkpoint's model from its config alone: decoder blocks, their linear layers, and the
tensors outside the blocks. The model class (transformers', or wq's native modules: native_llama.py) is
instantiated on the meta device (no memory, no weights).

Entry point: `describe_model(config)`. Dense Llama, Mistral, Qwen2 and Qwen3 and the mixtures of experts of
`wq_ops.model.moe` are supported; any other architecture is refused before work starts.
"""

from __future__ import annotations

import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from wq_ops.errors import CheckpointError
from wq_ops.model.moe import MOE_ARCHITECTURES, MoeSpec, moe_spec
from wq_ops.model.native_llama import NativeLlamaConfig, NativeLlamaForCausalLM

__all__ = ["SUPPORTED_ARCHITECTURES", "CONFIG_WINDOW_ARCHITECTURES", "EAGER_ATTENTION_ARCHITECTURES", "LinearSpec",
           "attention_window", "BlockLayout", "ModelLayout", "describe_model", "import_transformers",
           "instantiate_on_meta", "storage_dtype_of", "transformers_import_lock", "unsupported_architecture"]

# Architectures whose decoder layers we have checked against the model's own forward (tests/model).
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                           *MOE_ARCHITECTURES)

# Architectures whose model masks every layer to config.sliding_window (their attention modules hold no
# window of their own); Llama's model never applies one, whatever its config.json says.
CONFIG_WINDOW_ARCHITECTURES = ("MistralForCausalLM",)

# Architectures whose attention transformers runs in its eager form only (gpt-oss: its sinks have no SDPA path);
# their layers take an additive float mask, the causal part included (`make_sequence_context`).
EAGER_ATTENTION_ARCHITECTURES = ("GptOssForCausalLM",)

# The pre-norm residual layout the block runner composes: x + attn(norm1(x)), then h + mlp(norm2(h)).
BLOCK_CHILDREN = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")


@dataclass(frozen=True)
class LinearSpec:
    """One linear layer of a block. name: block-local ("self_attn.q_proj"); stage: "self_attn" or "mlp"."""

    name: str
    in_features: int
    out_features: int
    has_bias: bool

    @property
    def stage(self) -> str:
        """The block's half it belongs to: the attention's, or the MLP's (a routed MLP's experts included,
        whatever its checkpoint calls it: Mixtral's block_sparse_moe)."""
        return "self_attn" if self.name.startswith("self_attn.") else "mlp"


@dataclass(frozen=True)
class BlockLayout:
    """One decoder block: its linear layers (block-local names, in call order) and every block-local tensor's
    shape (linears, norms, biases). Blocks need not be alike: a dense MLP here, routed experts there."""

    kind: str                                          # "dense": attention and one MLP; "moe": routed experts
    linears: tuple[LinearSpec, ...]
    params: dict[str, tuple[int, ...]]                 # block-local name -> shape
    moe: MoeSpec | None = None                         # the routed MLP, for a "moe" block
    kept: tuple[str, ...] = ()                         # modules (block-local) never quantized: a router

    def nbytes(self, dtype: torch.dtype) -> int:
        return sum(_numel(s) for s in self.params.values()) * torch.tensor([], dtype=dtype).element_size()


@dataclass(frozen=True)
class ModelLayout:
    """What the driver plans with. Tensor names are the checkpoint's; block-local names drop
    `{block_prefix}.{i}.`. `blocks` describes each decoder block (blocks alike share one BlockLayout)."""

    architecture: str
    model_type: str
    block_prefix: str                                  # "model.layers"
    blocks: tuple[BlockLayout, ...]                    # one per decoder block, in order
    outer_params: dict[str, tuple[int, ...]]           # tensors outside the blocks: embeddings, final norm, lm_head
    outer_linears: tuple[str, ...]                     # Linear modules outside the blocks (lm_head, even when tied)
    embed_name: str                                    # "model.embed_tokens.weight"
    hidden_size: int
    vocab_size: int
    tied_embeddings: bool
    dtype: torch.dtype
    # Heads of an eager-only attention (`EAGER_ATTENTION_ARCHITECTURES`), whose (heads, T, T) scores are
    # materialised; 0 where SDPA runs.
    eager_attention_heads: int = 0

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    def block(self, index: int) -> BlockLayout:
        return self.blocks[index]

    def block_linears(self, index: int) -> tuple[LinearSpec, ...]:
        return self.blocks[index].linears

    def kinds(self) -> tuple[BlockLayout, ...]:
        """The distinct block layouts, in order of first appearance."""
        return tuple({id(b): b for b in self.blocks}.values())

    @property
    def linears(self) -> tuple[LinearSpec, ...]:
        """Every block's linears, where all blocks are alike (a ValueError otherwise: ask `block(i)`)."""
        return self._uniform().linears

    @property
    def block_params(self) -> dict[str, tuple[int, ...]]:
        """Every block's tensor shapes, where all blocks are alike (a ValueError otherwise: ask `block(i)`)."""
        return self._uniform().params

    def _uniform(self) -> BlockLayout:
        kinds = self.kinds()
        if len(kinds) != 1:
            raise ValueError(f"{self.architecture}'s blocks differ ({len(kinds)} layouts): ask block(i)")
        return kinds[0]

    def block_tensor_name(self, block: int, local: str) -> str:
        return f"{self.block_prefix}.{block}.{local}"

    def block_nbytes(self, index: int | None = None) -> int:
        """One block's tensor bytes: block `index`'s, or the largest block's."""
        blocks = self.kinds() if index is None else (self.blocks[index],)
        return max(b.nbytes(self.dtype) for b in blocks)

    def outer_nbytes(self) -> int:
        elt = torch.tensor([], dtype=self.dtype).element_size()
        return sum(_numel(s) for s in self.outer_params.values()) * elt


def attention_window(layer: nn.Module, config: Any, architecture: str) -> int | None:
    """A decoder layer's sliding attention window, None for full attention: the layer's own (Qwen2,
    Qwen3), else the config's where the model applies it (CONFIG_WINDOW_ARCHITECTURES); a stray
    sliding_window in another config.json (Llama) is one transformers ignores too."""
    attention = layer.get_submodule("self_attn")
    if hasattr(attention, "sliding_window"):
        window: Any = attention.sliding_window
        return window
    return getattr(config, "sliding_window", None) if architecture in CONFIG_WINDOW_ARCHITECTURES else None


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def storage_dtype_of(config: Any) -> torch.dtype:
    """The checkpoint's floating dtype from config (`dtype`, or the older `torch_dtype`); bf16 if unset."""
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "bfloat16"
    dtype = getattr(torch, str(value).replace("torch.", "")) if not isinstance(value, torch.dtype) else value
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise CheckpointError(f"config dtype {value}: expected bfloat16, float16 or float32")
    return dtype


# Re-entrant: code that imports other parts of transformers (a tokenizer, the bundled model's writer)
# holds it around that import too, and may call import_transformers inside.
_TRANSFORMERS_IMPORT = threading.RLock()


@contextmanager
def transformers_import_lock() -> Iterator[None]:
    """Hold while importing any part of transformers in a thread that may run beside another's import
    (the driver's prepare thread beside an in-process actor's start)."""
    with _TRANSFORMERS_IMPORT:
        yield


# transformers checks for these optional packages while its model machinery imports, and imports them
# where installed, for features a quantization job never uses: scikit-learn (assisted generation's
# threshold, transformers up to about 5.20) and scipy (the matching in object-detection losses). About 1.8 s
# of every job on the H100 machine. The modules that check see them as absent for good, so only features
# that obscure are hidden: hiding Pillow, torchvision or torchaudio too (0.4 s more) left transformers'
# image and audio processing unimportable later in the same process.
_UNUSED_BACKENDS = ("is_sklearn_available", "is_scipy_available")


def import_transformers() -> None:
    """Import transformers' model machinery once per process, under one lock: the driver's prepare thread
    and an in-process actor's start-up thread both need it, and transformers' lazy modules are not safe to
    import from two threads at once. The modules imported here see the packages of _UNUSED_BACKENDS as
    absent for the rest of the process; checks made later see them again."""
    with _TRANSFORMERS_IMPORT:
        if "transformers.modeling_utils" in sys.modules:
            return
        import transformers.utils as transformers_utils
        import transformers.utils.import_utils as import_utils

        # Modules read a check from either namespace, by name at import time or as a global of import_utils.
        saved = [(namespace, name, getattr(namespace, name)) for namespace in (transformers_utils, import_utils)
                 for name in _UNUSED_BACKENDS if hasattr(namespace, name)]
        for namespace, name, _ in saved:
            setattr(namespace, name, _not_needed)
        try:
            import transformers.generation.utils  # noqa: F401  (where scikit-learn was imported)
            import transformers.modeling_layers  # noqa: F401  (what every decoder's modeling code imports)
            import transformers.modeling_utils  # noqa: F401
        finally:
            for namespace, name, check in saved:
                setattr(namespace, name, check)


def _not_needed() -> bool:
    return False


def unsupported_architecture(name: str) -> CheckpointError:
    """The one-line refusal of an architecture wq cannot calibrate, with what a user can do instead."""
    return CheckpointError(f"unsupported architecture {name}: wq calibrates {', '.join(SUPPORTED_ARCHITECTURES)} "
                           "checkpoints; --model-free quantizes any safetensors checkpoint without calibration")


def instantiate_on_meta(config: Any, *, trust_remote_code: bool = False) -> nn.Module:
    """The causal-LM class for `config`, built on the meta device: wq's native modules for a
    NativeLlamaConfig, else transformers' class with SDPA attention."""
    if isinstance(config, NativeLlamaConfig):
        with torch.device("meta"):
            return NativeLlamaForCausalLM(config)
    import_transformers()
    from transformers import AutoModelForCausalLM

    architectures = list(getattr(config, "architectures", None) or [])
    name = architectures[0] if architectures else f"<none; model_type={getattr(config, 'model_type', '?')}>"
    if name not in SUPPORTED_ARCHITECTURES:
        raise unsupported_architecture(name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            config, trust_remote_code=trust_remote_code,
            attn_implementation="eager" if name in EAGER_ATTENTION_ARCHITECTURES else "sdpa")
    # from_config leaves the model in training mode, where a config's attention_dropout would apply.
    return model.eval()


def _find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder layers: the one whose items are the class's `_no_split_modules`."""
    layer_classes = set(getattr(model, "_no_split_modules", None) or ())
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and type(module[0]).__name__ in layer_classes:
            return name, module
    raise CheckpointError(f"{type(model).__name__}: found no list of decoder layers ({sorted(layer_classes)})")


def _block_layout(block: nn.Module, moe: MoeSpec | None) -> BlockLayout:
    """A decoder layer's linears (in module order) and tensor shapes; for a routed MLP (`moe`), its router and
    its experts under the checkpoint's per-expert names (the module fuses the experts)."""
    # A routed MLP's router and experts are the spec's (the module fuses the experts); a shared expert is an
    # ordinary dense module of the block.
    routed = ("mlp.experts", "mlp." + moe.router_leaf) if moe else ()

    def is_routed(name: str) -> bool:
        return any(name == r or name.startswith(r + ".") for r in routed)

    linears = tuple(
        LinearSpec(name=n, in_features=m.in_features, out_features=m.out_features, has_bias=m.bias is not None)
        for n, m in block.named_modules() if isinstance(m, nn.Linear) and not is_routed(n)
    )
    outside = [s.name for s in linears if s.name.split(".", 1)[0] not in ("self_attn", "mlp")]
    if outside:
        raise CheckpointError(f"{type(block).__name__}: linear layers outside self_attn and mlp: {outside}")
    params = {n: tuple(p.shape) for n, p in block.named_parameters() if not is_routed(n)}
    if moe is None:
        return BlockLayout(kind="dense", linears=linears, params=params)
    experts = tuple(LinearSpec(name=n, in_features=i, out_features=o, has_bias=moe.expert_bias)
                    for n, i, o in moe.linear_shapes())
    return BlockLayout(kind="moe", linears=linears + experts, params={**params, **moe.params()}, moe=moe,
                       kept=(moe.router,))


def describe_model(config: Any, *, trust_remote_code: bool = False) -> ModelLayout:
    """Layout of the model `config` describes (a transformers PretrainedConfig, or a NativeLlamaConfig)."""
    model = instantiate_on_meta(config, trust_remote_code=trust_remote_code)
    prefix, blocks = _find_blocks(model)
    first = blocks[0]
    children = {name for name, _ in first.named_children()}
    missing = [c for c in BLOCK_CHILDREN if c not in children]
    if missing:
        raise CheckpointError(f"{type(first).__name__} lacks {missing}: wq runs pre-norm decoder layers "
                              f"with children {list(BLOCK_CHILDREN)}")
    moe = moe_spec(config)
    layouts: dict[tuple, BlockLayout] = {}
    blocks_layout = []
    for i, block in enumerate(blocks):
        layout = _block_layout(block, moe if moe is not None and i in moe.sparse_blocks else None)
        key = (layout.kind, layout.linears, tuple(layout.params.items()))
        blocks_layout.append(layouts.setdefault(key, layout))     # blocks alike share one object
    outer: dict[str, tuple[int, ...]] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if name.startswith(prefix + ".") or id(p) in seen:
            continue
        seen.add(id(p))
        outer[name] = tuple(p.shape)
    embed: Any = model.get_input_embeddings()  # type: ignore[operator]
    embed_name = next(n + ".weight" for n, m in model.named_modules() if m is embed)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    # The class transformers builds for this config (the native skeleton stands in for it).
    layout_name = config.architectures[0] if isinstance(config, NativeLlamaConfig) else type(model).__name__
    return ModelLayout(
        architecture=layout_name,
        model_type=str(getattr(config, "model_type", "")),
        block_prefix=prefix,
        blocks=tuple(blocks_layout),
        outer_params=outer,
        outer_linears=tuple(n for n, m in model.named_modules()
                            if isinstance(m, nn.Linear) and not n.startswith(prefix + ".")),
        embed_name=embed_name,
        hidden_size=int(config.hidden_size),
        vocab_size=int(config.vocab_size),
        tied_embeddings=tied,
        dtype=storage_dtype_of(config),
        eager_attention_heads=int(config.num_attention_heads) if layout_name in EAGER_ATTENTION_ARCHITECTURES else 0,
    )
