"""--eval: after quantizing, the job scores the artifact (and with --eval-baseline the source) on the actors,
block by block, and must give jobs.eval's number: jobs.eval loads the written artifact with transformers and
runs the model whole. Tiny random checkpoints of each architecture family; the real SmolLM2 is in
tests/test_smollm2.py. Also: the refusals before work, the plan's memory for the pass, the report and card."""

import json

import pytest
import torch

from jobs import eval as eval_job
from tests.factory import write_checkpoint, write_text
from wq_ops.cluster.driver import run_job
from wq_ops.config import JobConfig
from wq_ops.errors import ConfigError, ResourceError

MOE = ("qwen3_moe", "deepseek_v3", "gpt_oss")


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    d = tmp_path_factory.mktemp("texts")
    return write_text(d / "calib.txt"), write_text(d / "eval.txt", n_chars=6000, seed=1)


def _job(tmp_path, model, texts, name="out", **options):
    calib, text = texts
    base = {"out": str(tmp_path / name), "model": str(model), "calib": str(calib), "samples": 6, "seq_len": 64,
            "micro_batch_samples": 4, "group_size": 32, "runtime": "local", "eval": str(text), "eval_seq_len": 96,
            "eval_max_windows": 7, "eval_baseline": True}
    return JobConfig.from_dict({**base, **options})


def _eager_experts(model, text) -> float:
    """The perplexity transformers gives with its eager expert loop (the per-expert linears wq runs), to 4
    decimals as jobs.eval prints it."""
    from transformers import AutoModelForCausalLM

    from wq_ops.evaluate.gpt_oss_experts import per_expert_gpt_oss
    from wq_ops.evaluate.load import load_tokenizer
    from wq_ops.evaluate.perplexity import Join, join_text, perplexity

    ids = load_tokenizer(model)(join_text(text.read_text(), Join.WIKITEXT), return_tensors="pt")["input_ids"][0]
    with per_expert_gpt_oss():      # a gpt-oss artifact's per-expert tensors (jobs.eval loads them the same way)
        loaded = AutoModelForCausalLM.from_pretrained(model, use_kernels=False, experts_implementation="eager").eval()
    return round(perplexity(loaded, ids, seq_len=96, max_windows=7).ppl, 4)


def _jobs_eval(model, text, tmp_path, *extra) -> float:
    out = tmp_path / "jobs_eval.json"
    assert eval_job.main(["--model", str(model), "--text", str(text), "--seq-len", "96", "--max-windows", "7",
                          "--device", "cuda" if "cuda" in extra else "cpu", "--json", str(out)]) == 0
    return json.loads(out.read_text())["ppl"]


@pytest.mark.parametrize("arch,method,options", [
    ("llama", "gptq", {}),                                          # wq's native modules
    ("qwen3", "awq", {"propagation": "float"}),                     # transformers' classes, q/k norms
    ("mistral", "rtn", {"tie_word_embeddings": True}),              # lm_head is the embedding table
    ("qwen3_moe", "gptq", {}),                                      # routed experts, a dense block 0
    ("deepseek_v3", "rtn", {}),                                     # latent attention, float32 router
    ("gpt_oss", "gptq", {}),                                        # sinks, a window, biased experts
])
def test_eval_on_the_actors_gives_jobs_eval_number(tmp_path, texts, arch, method, options):
    tied = options.pop("tie_word_embeddings", False)
    model = write_checkpoint(tmp_path / "m", arch, tie_word_embeddings=tied)
    result = run_job(_job(tmp_path, model, texts, method=method, **options), cache_dir=tmp_path / "cache")
    section = result.report["eval"]
    assert section["windows"] == 7 and section["seq_len"] == 96 and section["tokens"] == 7 * 96
    if arch in MOE:
        # transformers runs MoE experts with grouped_mm by default, which rounds bfloat16 sums in another
        # order (on these random models 1e-4 to 2e-3 of the perplexity); its eager loop, the linears wq runs,
        # gives wq's number to jobs.eval's 4 decimals.
        assert round(section["perplexity"], 4) == _eager_experts(result.out_dir, texts[1])
        assert round(section["baseline_perplexity"], 4) == _eager_experts(model, texts[1])
        assert section["perplexity"] == pytest.approx(_jobs_eval(result.out_dir, texts[1], tmp_path), rel=5e-3)
        assert section["baseline_perplexity"] == pytest.approx(_jobs_eval(model, texts[1], tmp_path), rel=5e-3)
    else:
        # jobs.eval prints 4 decimals: the same number, from the artifact on disk and from the source.
        assert round(section["perplexity"], 4) == _jobs_eval(result.out_dir, texts[1], tmp_path)
        assert round(section["baseline_perplexity"], 4) == _jobs_eval(model, texts[1], tmp_path)
    assert section["perplexity"] != section["baseline_perplexity"]
    card = (result.out_dir / "README.md").read_text()
    assert f"perplexity {section['perplexity']:.4f}" in card and f"{section['baseline_perplexity']:.4f}" in card
    assert f"perplexity {section['perplexity']:.4f}" in (result.out_dir / "wq_report.html").read_text()


@pytest.mark.usefixtures("ray_session")
def test_actors_pass_the_windows_on_as_one_actor_scores_them(tmp_path, texts):
    """Three Ray actors (float propagation: resident spans, the windows in micro-batches of 2) and one
    in-process actor: the same artifact, so the same window NLLs, bit for bit."""
    model = write_checkpoint(tmp_path / "m", "llama", num_hidden_layers=4)
    one = run_job(_job(tmp_path, model, texts, "one", propagation="float"), cache_dir=tmp_path / "cache")
    three = run_job(_job(tmp_path, model, texts, "three", propagation="float", runtime="ray", actors=3,
                         micro_batch_samples=2), cache_dir=tmp_path / "cache")
    assert three.plan.streamed
    for key in ("perplexity", "baseline_perplexity", "mean_nll"):
        assert three.report["eval"][key] == pytest.approx(one.report["eval"][key], rel=1e-6, abs=0)


@pytest.mark.usefixtures("ray_session")
def test_eval_with_expert_actors_scores_what_one_actor_scores(tmp_path, texts):
    """With expert actors the block actor replays staged routed blocks with their experts kept on the host (its
    memory was planned without them): the same artifact, the same window NLLs as one in-process actor."""
    model = write_checkpoint(tmp_path / "m", "qwen3_moe")
    one = run_job(_job(tmp_path, model, texts, "one"), cache_dir=tmp_path / "cache")
    split = run_job(_job(tmp_path, model, texts, "split", runtime="ray", expert_actors=2),
                    cache_dir=tmp_path / "cache")
    for key in ("perplexity", "baseline_perplexity", "mean_nll"):
        assert split.report["eval"][key] == one.report["eval"][key]


def test_no_eval_leaves_the_report_without_one(tmp_path, texts):
    model = write_checkpoint(tmp_path / "m", "llama")
    result = run_job(_job(tmp_path, model, texts, eval=None, eval_baseline=False), cache_dir=tmp_path / "cache")
    assert result.report["eval"] is None
    assert "not evaluated" in (result.out_dir / "wq_report.html").read_text()


@pytest.mark.parametrize("options,message", [
    ({"eval": "missing.txt"}, r"eval=.*missing.txt: cannot read it"),
    ({"eval_seq_len": 4096}, "eval_seq_len=4096: longer than the model's max_position_embeddings=512"),
    ({"eval_seq_len": 500, "eval_max_windows": None}, "fewer than one window of eval_seq_len=500"),
])
def test_bad_eval_options_stop_before_any_work(tmp_path, texts, options, message):
    model = write_checkpoint(tmp_path / "m", "llama")
    if options.get("eval") == "missing.txt":
        options = {**options, "eval": str(tmp_path / "missing.txt")}
    if options.get("eval_seq_len") == 500:     # the eval text: about 6000 characters, 1 byte-level token each
        short = tmp_path / "short.txt"
        short.write_text("a few words only\n" * 20)
        options = {**options, "eval": str(short)}
    with pytest.raises(ConfigError, match=message):
        run_job(_job(tmp_path, model, texts, **options), cache_dir=tmp_path / "cache")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_binary_eval_text_is_refused(tmp_path, texts):
    model = write_checkpoint(tmp_path / "m", "llama")
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes([0xff, 0xfe, 0x00, 0x80]) * 100)
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        run_job(_job(tmp_path, model, texts, eval=str(binary)), cache_dir=tmp_path / "cache")


def test_eval_baseline_needs_eval():
    with pytest.raises(ConfigError, match="eval_baseline: nothing to compare with"):
        JobConfig.from_dict({"out": "o", "eval_baseline": True})


def test_plan_states_the_eval_pass_and_refuses_it_with_the_numbers(tmp_path, texts):
    """The pass holds every window's activations: with enough windows it needs more than the quantization,
    and an actor that fits the one but not the other is refused before work, naming the way out."""
    model = write_checkpoint(tmp_path / "m", "llama")
    long_text = tmp_path / "long.txt"
    long_text.write_text(texts[1].read_text() * 40)
    job = _job(tmp_path, model, texts, eval=str(long_text), eval_max_windows=None, dry_run=True)
    plan = run_job(job, cache_dir=tmp_path / "cache").plan
    [actor] = plan.actors
    assert actor.evaluation is not None and plan.eval_windows > 1000 // 96
    assert actor.evaluation.activations >= plan.eval_windows * 96 * 128 * 2
    assert "eval: " in plan.describe() and f"{plan.eval_windows} windows of 96 tokens" in plan.describe()
    assert actor.evaluation.total > actor.memory.total
    between = (actor.memory.total + actor.evaluation.total) / 2 / 0.9 / 2**30
    with pytest.raises(ResourceError, match="--eval needs .* lower --eval-max-windows or --eval-seq-len"):
        run_job(_job(tmp_path, model, texts, eval=str(long_text), eval_max_windows=None, actor_memory_gib=between),
                cache_dir=tmp_path / "cache")


@pytest.mark.gpu
@pytest.mark.parametrize("options", [{}, {"scheme": "FP8_DYNAMIC", "group_size": "channel"},
                                     {"scheme": "W8A8", "group_size": "channel"}], ids=["w4", "fp8-dynamic", "w8a8"])
def test_eval_on_a_gpu_actor_gives_jobs_eval_number(tmp_path, texts, options):
    """On a GPU actor, also for the schemes whose activations the evaluation quantizes. Those agree to 0.2%
    rather than to the digit: somewhere wq's blocks and transformers' model round a last bit differently on the
    GPU (not in the norm, bit-equal on an H100; the rest was not traced), which the weight-only 4-decimal check
    cannot see, and quantizing the activations turns such differences into other codes: 0.04% (FP8_DYNAMIC) and
    0.06% (W8A8) on an H100. On the CPU they are equal to the digit (tests/cluster/test_scheme.py)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model = write_checkpoint(tmp_path / "m", "llama")
    result = run_job(_job(tmp_path, model, texts, gpus_per_actor=1, **options), cache_dir=tmp_path / "cache")
    want = _jobs_eval(result.out_dir, texts[1], tmp_path, "cuda")
    if options:
        assert result.report["eval"]["perplexity"] == pytest.approx(want, rel=2e-3)
    else:
        assert round(result.report["eval"]["perplexity"], 4) == want
    assert round(result.report["eval"]["baseline_perplexity"], 4) == _jobs_eval(model, texts[1], tmp_path, "cuda")


def test_the_python_api_gives_the_perplexity(tmp_path, texts):
    from wq_ops.api import quantize

    result = quantize(out=tmp_path / "o", samples=8, seq_len=128, eval=texts[1], eval_seq_len=96, eval_max_windows=3,
                      progress=False)
    assert result.perplexity == result.report["eval"]["perplexity"] > 1.0
    assert quantize(out=tmp_path / "dry", dry_run=True, progress=False).perplexity is None
