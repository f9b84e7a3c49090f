"""The benchmark runner on the tiny preset: result structure, FLOP accounting, reports, MLflow.

No timing is asserted (timings belong in benchmarks/results); what is pinned is what math
gives exactly: tokens per step, trainable parameter counts, model FLOPs per step, pooling.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch

from benchmarks import cases, flops, gpu_train_path, memory, orchestration, profile_step, report
from benchmarks.spec import Spec, preset, with_workload
from llama_adapter_v2.config import load_config

TINY = preset("tiny")
TIMED_FIELDS = {"step_seconds", "items_per_step", "unit", "flops_per_step", "trainable_params", "peak_rss_mb"}


def tiny_layer_params(spec: Spec) -> tuple[int, int]:
    """Decoder matmul parameters and lm_head parameters of the tiny shape, written out by hand."""
    d, ffn, layers, vocab = 64, 176, 3, 256
    assert (spec.llama.hidden_size, spec.llama.intermediate_size) == (d, ffn)
    assert (spec.llama.num_hidden_layers, spec.llama.vocab_size) == (layers, vocab)
    return layers * (4 * d * d + 3 * d * ffn), d * vocab


def test_flop_accounting_is_4x_frozen_and_6x_full() -> None:
    decoder, head = tiny_layer_params(TINY)
    tokens, layers = 64, TINY.llama.num_hidden_layers
    full = flops.BackwardPlan(backprop_layers=layers, weight_grad_layers=layers, lm_head_weight_grad=True)
    frozen = flops.BackwardPlan(backprop_layers=layers)
    assert flops.llama_train_flops(TINY.llama, tokens, tokens, full) == 6 * (decoder + head) * tokens
    assert flops.llama_train_flops(TINY.llama, tokens, tokens, frozen) == 4 * (decoder + head) * tokens
    # The lm_head counts only where it is computed: 16 of 64 positions.
    assert flops.llama_train_flops(TINY.llama, tokens, 16, frozen) == 4 * decoder * tokens + 4 * head * 16
    # Gradients through the top layer only: the lower two layers run forward only.
    top = flops.BackwardPlan(backprop_layers=1)
    assert flops.llama_train_flops(TINY.llama, tokens, tokens, top) == (
        2 * decoder * tokens + 2 * (decoder // layers) * tokens + 4 * head * tokens
    )


# Minutes, not seconds, even on the tiny preset: they build the whole demo data set (and the
# orchestration case starts Prefect's server); `make bench` runs them, these tests do not.
DEMO_DATA_CASES = {"shard_reading", "orchestration_overhead"}


@pytest.fixture(scope="module")
def case_results() -> dict[str, dict]:
    """Every model case run once in this process on the tiny shape (1 warm-up, 1 step)."""
    return {name: fn(TINY) for name, fn in cases.CASES.items() if name not in DEMO_DATA_CASES}


def test_orchestration_runs_in_a_scratch_project_whose_config_both_sides_read(tmp_path: Path) -> None:
    """Bare and pipeline runs read one config, the scratch copy's, with the benchmark's steps; the
    project's own config is untouched and the train stage's dvc.lock entry is dropped between runs."""
    shipped = (orchestration.REPO / orchestration.CONFIG).read_text()
    project = orchestration.scratch_project(tmp_path, 7)
    assert (orchestration.REPO / orchestration.CONFIG).read_text() == shipped
    training = load_config(project / orchestration.CONFIG).training
    assert (training.steps, training.eval_every_steps, training.checkpoint.every_steps) == (7, 7, 7)
    assert (project / ".git").is_dir() and (project / "dvc.yaml").is_file()
    (project / "dvc.lock").write_text("schema: '2.0'\nstages:\n  train: {cmd: x}\n  shard: {cmd: y}\n")
    orchestration.forget_train(project)
    assert "train" not in (project / "dvc.lock").read_text() and "shard" in (project / "dvc.lock").read_text()


def test_every_case_reports_the_timed_fields(case_results: dict[str, dict]) -> None:
    for name, result in case_results.items():
        assert result.keys() >= TIMED_FIELDS, name
        assert len(result["step_seconds"]) == TINY.workload.timed_steps, name
        assert all(seconds > 0 for seconds in result["step_seconds"]), name
        assert result["peak_rss_mb"] >= result["rss_before_model_mb"] > 0, name


def test_training_cases_count_tokens_params_and_flops_exactly(case_results: dict[str, dict]) -> None:
    work = TINY.workload
    decoder, head = tiny_layer_params(TINY)
    tokens = work.batch_size * work.seq_len
    trainers = [name for name in case_results if name.startswith("train_")]
    assert trainers == [
        "train_full_finetune",
        "train_peft_lora",
        "train_peft_adaption_prompt",
        "train_adapter_v2_language",
        "train_adapter_v2_visual",
    ]
    for name in trainers:
        assert case_results[name]["items_per_step"] == tokens == 64
        assert case_results[name]["unit"] == "tokens/s"
    full = case_results["train_full_finetune"]
    embeddings_and_norms = 256 * 64 + 3 * 2 * 64 + 64
    assert full["trainable_params"] == decoder + head + embeddings_and_norms
    assert full["flops_per_step"] == 6 * (decoder + head) * tokens
    lora = case_results["train_peft_lora"]
    assert lora["trainable_params"] == 3 * 8 * (64 + 64) * 2  # A and B of q_proj and v_proj, rank 8
    assert lora["flops_per_step"] == 4 * (decoder + head) * tokens + 6 * lora["trainable_params"] * tokens
    adaption = case_results["train_peft_adaption_prompt"]
    assert adaption["trainable_params"] == 1 * (4 * 64 + 1)  # one prompted layer: 4 prompt tokens + 1 gate
    language = case_results["train_adapter_v2_language"]
    # Labels cover the last 16 of 32 positions, so only 16 rows per sequence reach the lm_head.
    assert language["extra"]["lm_head_positions"] == work.label_positions == 16
    assert language["flops_per_step"] == 4 * decoder * tokens + 4 * head * 16 * work.batch_size
    assert case_results["train_adapter_v2_visual"]["extra"]["images_per_step"] == work.batch_size


def test_generation_cases_decode_the_requested_tokens(case_results: dict[str, dict]) -> None:
    generators = [name for name in case_results if name.startswith("generate_")]
    assert len(generators) == 4
    for name in generators:
        assert case_results[name]["items_per_step"] == TINY.workload.batch_size * TINY.workload.gen_new_tokens
    assert case_results["generate_folded_without_prompts"]["extra"]["model_class"] == "LlamaForCausalLM"


def test_pooling_over_rounds_gives_median_min_max() -> None:
    rounds = [
        {
            "status": "ok",
            "step_seconds": [1.0, 2.0],
            "items_per_step": 8,
            "unit": "tokens/s",
            "peak_rss_mb": 10.0,
            "rss_before_model_mb": 5.0,
            "trainable_params": 3,
            "flops_per_step": 80.0,
        },
        {
            "status": "ok",
            "step_seconds": [4.0],
            "items_per_step": 8,
            "unit": "tokens/s",
            "peak_rss_mb": 12.0,
            "rss_before_model_mb": 5.0,
            "trainable_params": 3,
            "flops_per_step": 80.0,
        },
        {"status": "failed", "reason": "boom"},
    ]
    summary = report.summarise(rounds)
    assert (summary["median"], summary["min"], summary["max"]) == (4.0, 2.0, 8.0)
    assert summary["round_medians"] == [8 / 1.5, 2.0]
    assert (summary["rounds_ok"], summary["rounds"], summary["reason"]) == (2, 3, "boom")
    assert summary["peak_rss_mb"] == 12.0
    cases_ = {"matmul_ceiling": {"status": "ok", "median": 1e-8}, "x": summary}
    assert report.add_mfu(cases_) == 1e-8
    assert summary["mfu"] == pytest.approx(80.0 / 2.0 / 10.0)


def test_runner_runs_children_interleaved_and_logs_to_mlflow(tmp_path: Path, repo_root: Path) -> None:
    """Fresh processes, two rounds, a missing LitGPT venv reported, JSON + markdown + MLflow."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    command = [
        sys.executable,
        "-m",
        "benchmarks.runner",
        "--preset",
        "tiny",
        "--rounds",
        "2",
        "--steps",
        "2",
        "--cases",
        "matmul_ceiling,train_litgpt_adapter_v2",
        "--litgpt-python",
        str(tmp_path / "none"),
        "--out",
        str(tmp_path / "out"),
        "--tracking-uri",
        uri,
    ]
    subprocess.run(command, cwd=repo_root, check=True, capture_output=True, text=True, timeout=300)
    [json_path] = (tmp_path / "out").glob("bench-tiny-*.json")
    results = json.loads(json_path.read_text())
    matmul = results["cases"]["matmul_ceiling"]
    assert (matmul["status"], matmul["timed_steps"], matmul["rounds_ok"]) == ("ok", 4, 2)
    assert matmul["min"] <= matmul["median"] <= matmul["max"]
    assert results["matmul_ceiling_gflops"] == matmul["median"]
    litgpt = results["cases"]["train_litgpt_adapter_v2"]
    assert litgpt["status"] == "not available" and "make bench" in litgpt["reason"]
    assert [t["key"] for t in results["targets"]][:2] == [
        "language_vs_litgpt_adapter_v2",
        "language_vs_peft_adaption_prompt",
    ]
    assert all(t["met"] is None for t in results["targets"])  # none of their cases ran
    markdown = json_path.with_suffix(".md").read_text()
    assert "| matmul_ceiling | GFLOP/s |" in markdown
    assert "| train_litgpt_adapter_v2 | - |" in markdown and "not available" in markdown

    client = mlflow.MlflowClient(tracking_uri=uri)
    [run] = client.search_runs([client.get_experiment_by_name(report.EXPERIMENT).experiment_id])
    assert run.data.metrics["matmul_ceiling.median"] == pytest.approx(matmul["median"])
    assert run.data.params["preset"] == "tiny"
    artifacts = {Path(a.path).name for a in client.list_artifacts(run.info.run_id)}
    assert artifacts == {json_path.name, json_path.with_suffix(".md").name}
    noise = report.noise_markdown(results, replace_median(results, 2.0))
    assert "| matmul_ceiling (GFLOP/s) |" in noise and "+100.0 %" in noise


def replace_median(results: dict, factor: float) -> dict:
    """A copy of a run whose matmul median is ``factor`` times higher (a second run, for the noise table)."""
    second = json.loads(json.dumps(results))
    second["cases"]["matmul_ceiling"]["median"] *= factor
    return second


def test_unknown_preset_and_workload_keys_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        preset("huge")
    with pytest.raises(ValueError, match="expected KEY=VALUE with KEY one of"):
        with_workload(TINY, ["batchsize=4"])
    changed = with_workload(TINY, ["orchestration_pairs=3", "label_fraction=0.25"]).workload
    assert (changed.orchestration_pairs, changed.label_fraction, changed.label_positions) == (3, 0.25, 8)


def test_profile_counts_saved_activations_and_sorts_operators() -> None:
    """x * w with only x trainable keeps w (and nothing else) for the backward: 1000 floats."""
    x = torch.ones(1000, requires_grad=True)
    w = torch.full((1000,), 2.0)

    def loss() -> torch.Tensor:
        return (x * w).sum()  # inside the hook: the product must happen while it listens

    assert profile_step.saved_for_backward_mb(loss) == 4000 / 2**20
    assert x.grad is not None and torch.equal(x.grad, w)
    assert [profile_step.category(n) for n in ("aten::mm", "aten::_log_softmax", "aten::mul")] == [
        "gemm",
        "loss_softmax",
        "other",
    ]


def test_gpu_train_path_keeps_groups_disjoint_and_dtypes_apart_on_the_tiny_preset() -> None:
    """The GPU script's step (bf16 autocast, bf16 base, fp32 trainables) run on CPU at tiny size."""
    spec = with_workload(preset("tiny"), ["device=cpu"])
    result = gpu_train_path.run(spec, frozen_dtype=None)
    assert result["frozen_dtype"] == str(torch.bfloat16)
    assert result["trainable_dtypes"] == [str(torch.float32)]
    assert result["other_group_unchanged"] == {"caption": True, "instruction": True}
    steps = spec.workload.warmup_steps + spec.workload.timed_steps
    assert {task: len(losses) for task, losses in result["losses"].items()} == {
        "caption": steps, "instruction": steps
    }
    assert result["losses"]["caption"][-1] < result["losses"]["caption"][0]


def test_memory_model_counts_7b_weights_and_orders_the_cases() -> None:
    """Llama-2 7B's decoder: 32 x (4 x 4096^2 + 3 x 4096 x 11008) weights, NF4 at ~4.13 bits each."""
    seven = memory.BIG_SHAPES["7B"]
    assert memory.decoder_params(seven) == 32 * (4 * 4096**2 + 3 * 4096 * 11008) == 6_476_005_376
    assert memory.other_params(seven) == 2 * 32000 * 4096 + 65 * 4096
    activation = memory.Activation(full=10.0, checkpointed=1.0)
    totals = {
        (kind, checkpointed): memory.predicted_peak_bytes(
            seven, kind=kind, checkpointed=checkpointed, tokens=2048, supervised=1024, trainable=4_000_000,
            compute_bytes=2, activation=activation)
        for kind in memory.KINDS for checkpointed in (False, True)
    }
    assert totals["nf4", False]["decoder_weights"] == 6_476_005_376 * (4 + 8 / 64 + 32 / 16384) / 8
    assert totals["none", False]["decoder_weights"] == 2 * 6_476_005_376
    for checkpointed in (False, True):
        assert totals["nf4", checkpointed]["total"] < totals["int8", checkpointed]["total"] \
            < totals["none", checkpointed]["total"]
    # checkpointed: 1 unit per layer for 32 layers plus one layer's 10 units recomputed
    assert totals["none", True]["activations"] == 0.5 * 4096 * 2048 * (1.0 * 32 + 10.0)


def test_memory_child_measures_a_quantised_checkpointed_step_on_the_tiny_shape() -> None:
    spec = memory.memory_spec("tiny")
    plain, checkpointed = (memory.run_child(case, spec) for case in ("nf4", "nf4+ckpt"))
    for result in (plain, checkpointed):
        assert result["peak_reset"] and result["step_peak_rss_mb"] > 0
        assert len(result["step_seconds"]) == spec.workload.timed_steps
        assert result["tokens_per_step"] == spec.workload.tokens_per_step
    assert checkpointed["activations_mb"] < plain["activations_mb"] / 3
    assert plain["trainable_params"] == checkpointed["trainable_params"] > 0
