"""The evaluation run end to end on a tiny model and hand-made held-out shards (real Java scorers,
real MLflow sqlite store); the CLI's generate and chat on an adapter folder (in process)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
import pytest
import torch
from PIL import Image, ImageDraw
from tiny_adapted import random_gates, tiny_config, write_tiny_base
from typer.testing import CliRunner

from llama_adapter_v2.cli.main import app
from llama_adapter_v2.data.formatting import encode_record
from llama_adapter_v2.data.records import Record, Turn, caption_record
from llama_adapter_v2.data.shards import write_split
from llama_adapter_v2.evaluate.instruction_metrics import InstructionSample, score_instructions
from llama_adapter_v2.evaluate.report import pipeline_report
from llama_adapter_v2.evaluate.run import EvalOptions, evaluate
from llama_adapter_v2.infer.chat import ChatSession
from llama_adapter_v2.infer.generation import GenerationSettings, generate_texts, instruction_prompt
from llama_adapter_v2.infer.holdout import image_control_losses
from llama_adapter_v2.infer.loading import load_for_inference
from llama_adapter_v2.model.build import build_model, load_tokenizer
from llama_adapter_v2.model.checkpoint import save_adapter
from llama_adapter_v2.registry import register
from llama_adapter_v2.store import ensure_experiment, evaluation_run_of

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 180, 30)}


def held_out_records(folder: Path) -> tuple[list[Record], list[Record]]:
    captions, instructions = [], []
    for name, rgb in COLOURS.items():
        path = folder / f"{name}.png"
        image = Image.new("RGB", (40, 40), "white")
        ImageDraw.Draw(image).ellipse((8, 8, 32, 32), fill=rgb)
        image.save(path)
        for n, text in enumerate([f"a {name} circle", f"a {name} circle on white"]):
            captions.append(caption_record(f"{name}-{n}", "tiny-coco", text, str(path), {}))
    for task, question, reply in [
        ("sums", "What is 2 plus 3?", "5"),
        ("sums", "What is 1 plus 1?", "2"),
        ("colours", "What colour is grass?", "Grass is green."),
    ]:
        turns = (Turn("user", question), Turn("assistant", reply))
        record = Record(f"{task}-{question}", task, "instruction", "alpaca", turns)
        instructions.append(record)
    chat = (
        Turn("user", "What is drawn?"),
        Turn("assistant", "A red circle."),
        Turn("user", "Where?"),
        Turn("assistant", "In the middle."),
    )
    instructions.append(
        Record("chat-0", "tiny-chat", "instruction", "chat", chat, image=str(folder / "red.png"))
    )
    return captions, instructions


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("eval-run")
    cfg = tiny_config(write_tiny_base(root / "base"))
    cfg.data.work_dir = root / "data"
    cfg.training.output_dir = root / "train"
    cfg.tracking.uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg.tracking.artifact_root = root / "artifacts"
    cfg.tracking.experiment = "tiny-eval"
    captions, instructions = held_out_records(root)
    write_split(captions, cfg.data.work_dir / "shards" / "caption" / "holdout", "caption", "holdout", 4)
    write_split(
        instructions, cfg.data.work_dir / "shards" / "instruction" / "holdout", "instruction", "holdout", 2
    )
    model = build_model(cfg).eval()
    random_gates(model, seed=2)
    adapter = save_adapter(model, root / "train" / "adapter")
    choices = root / "mmlu.jsonl"
    choices.write_text(
        '{"question": "What is 2 plus 3?", "choices": ["5", "7"], "answer": 0}\n', encoding="utf-8"
    )

    mlflow.set_tracking_uri(cfg.tracking.uri)

    with mlflow.start_run(experiment_id=ensure_experiment(cfg)) as run:  # stands in for a training run
        run_id = run.info.run_id
        mlflow.log_param("training.steps", 3)
        mlflow.log_metric("loss/caption", 2.5, step=3)
    training_run = mlflow.MlflowClient(tracking_uri=cfg.tracking.uri).get_run(run_id)
    options = EvalOptions(
        caption_tokens=8,
        instruction_tokens=8,
        choice_files=(choices,),
        run_id=run_id,
        phrasings=("Generate caption of this image", "Describe this image."),
    )
    metrics = evaluate(cfg, adapter, options)
    return {
        "cfg": cfg,
        "model": model,
        "metrics": metrics,
        "run_id": run_id,
        "training_run": training_run,
        "root": root,
        "adapter": adapter,
    }


def test_metrics_file_is_flat_and_consistent_with_per_sample_outputs(tiny_run: dict[str, Any]) -> None:
    out = tiny_run["cfg"].training.output_dir / "eval"
    metrics = tiny_run["metrics"]
    assert json.loads((out / "metrics.json").read_text()) == metrics
    for key in [
        "caption_bleu_4",
        "caption_cider",
        "caption_meteor",
        "caption_rouge_l",
        "instruction_rouge_l",
        "instruction_exact_match",
        "instruction_sums_exact_match",
        "instruction_tiny_chat_rouge_l",
        "caption_loss",
        "instruction_loss",
        "caption_cider_words_phrasing_std",
        "mc_mmlu_accuracy",
        "mc_mmlu_accuracy_norm",
    ]:
        assert key in metrics, key
    captions = json.loads((out / "captions.json").read_text())
    assert len(captions["images"]) == 3
    assert sorted(len(row["references"]) for row in captions["images"]) == [2, 2, 2]
    per_image_cider = [row["cider"] for row in captions["images"]]
    assert metrics["caption_cider"] == pytest.approx(sum(per_image_cider) / 3)  # CIDEr-D: mean over images
    rows = json.loads((out / "instructions.json").read_text())
    assert [row["task"] for row in rows] == ["sums", "sums", "colours", "tiny_chat"]
    assert rows[3]["reference"] == "In the middle."
    assert rows[3]["prompt"].endswith("Human: Where?###Assistant:")
    again = score_instructions(InstructionSample(r["task"], r["prediction"], r["reference"]) for r in rows)
    assert metrics["instruction_rouge_l"] == pytest.approx(again["rouge_l"])
    assert "| caption_cider |" in (out / "metrics.md").read_text()


def test_holdout_loss_matches_a_direct_forward(tiny_run: dict[str, Any]) -> None:
    cfg, model = tiny_run["cfg"], tiny_run["model"]
    tokenizer = load_tokenizer(cfg)
    _, instructions = held_out_records(tiny_run["root"])
    total = tokens = 0.0
    with torch.no_grad():
        for record in instructions:
            ids, labels = encode_record(record, tokenizer, cfg.training.max_tokens_instruction)
            image = None
            if record.image:
                with Image.open(record.image) as raw:
                    image = model.image_transform(raw.convert("RGB")).unsqueeze(0)
            loss = model(torch.tensor([ids]), labels=torch.tensor([labels]), images=image).loss
            count = sum(label != -100 for label in labels[1:])
            total, tokens = total + float(loss) * count, tokens + count
    assert tiny_run["metrics"]["instruction_loss"] == pytest.approx(total / tokens, rel=1e-4)


def test_caption_loss_with_another_image_is_the_blind_control(tiny_run: dict[str, Any]) -> None:
    cfg, model = tiny_run["cfg"], tiny_run["model"]
    tokenizer = load_tokenizer(cfg)
    groups = {"colour": list(COLOURS)}
    seen = image_control_losses(model, tokenizer, cfg, groups, device=torch.device("cpu"))
    metrics = tiny_run["metrics"]
    assert metrics["caption_loss_shuffled_image"] == pytest.approx(seen["caption_loss_shuffled_image"])
    assert seen["caption_loss_shuffled_image"] != metrics["caption_loss"]  # the gates are open
    encoded = {name: tokenizer.encode(f" {name}", add_special_tokens=False) for name in COLOURS}
    colour_ids = {ids[0] for ids in encoded.values() if len(ids) == 1}  # words of several tokens are left out
    assert len(colour_ids) == 1  # of the tiny tokenizer's colours, only " blue" is one token
    captions, _ = held_out_records(tiny_run["root"])
    total = count = 0.0
    with torch.no_grad():  # the colour words' loss with their own image, one caption at a time
        for record in captions:
            ids, labels = encode_record(record, tokenizer, cfg.training.max_tokens_caption)
            with Image.open(record.image or "") as raw:
                image = model.image_transform(raw.convert("RGB")).unsqueeze(0)
            out = model(torch.tensor([ids]), labels=torch.tensor([labels]), images=image)
            losses = torch.nn.functional.cross_entropy(out.logits, out.targets, reduction="none")
            targets = out.targets.tolist()
            picked = [float(loss) for loss, t in zip(losses, targets, strict=True) if t in colour_ids]
            total, count = total + sum(picked), count + len(picked)
    assert count == 2  # the two captions of the blue circle
    assert seen["caption_loss_colour_words"] == pytest.approx(total / count, rel=1e-4)
    zero = build_model(cfg).eval()  # zero-init gates: the image changes nothing, to the last bit
    blind = image_control_losses(zero, tokenizer, cfg, groups, device=torch.device("cpu"))
    assert blind["caption_loss_colour_words"] == blind["caption_loss_colour_words_shuffled_image"]


def test_the_experiment_opens_on_its_runs_not_on_the_genai_overview(tiny_run: dict[str, Any]) -> None:
    cfg = tiny_run["cfg"]
    experiment = mlflow.MlflowClient(tracking_uri=cfg.tracking.uri).get_experiment(ensure_experiment(cfg))
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def _as_it_was(run: Any) -> tuple[Any, ...]:
    """What a later stage must not change in a training run: metrics, params, status and duration."""
    return (run.data.metrics, run.data.params, run.info.status, run.info.start_time, run.info.end_time)


def test_scores_go_to_a_child_run_and_registering_leaves_the_training_run_as_it_was(
    tiny_run: dict[str, Any],
) -> None:
    cfg, run_id = tiny_run["cfg"], tiny_run["run_id"]
    client = mlflow.MlflowClient(tracking_uri=cfg.tracking.uri)
    evaluation = evaluation_run_of(client, ensure_experiment(cfg), run_id)
    assert evaluation is not None and evaluation != run_id
    child = client.get_run(evaluation)
    assert child.data.tags["mlflow.parentRunId"] == run_id  # MLflow's UI nests it under the training run
    assert child.data.metrics["eval/caption_cider"] == pytest.approx(tiny_run["metrics"]["caption_cider"])
    logged = {item.path for item in client.list_artifacts(evaluation, "eval")}
    assert {"eval/metrics.json", "eval/metrics.md", "eval/captions.json", "eval/instructions.json"} <= logged

    assert _as_it_was(client.get_run(run_id)) == _as_it_was(tiny_run["training_run"])  # evaluate
    version = register(cfg, run_id, tiny_run["adapter"], tiny_run["metrics"])
    assert _as_it_was(client.get_run(run_id)) == _as_it_was(tiny_run["training_run"])  # register
    found = client.get_model_version(cfg.tracking.registered_model, version.version)
    assert (found.run_id, found.tags["training_run_id"], found.tags["evaluation_run_id"]) == (
        run_id, run_id, evaluation)
    assert [model.source_run_id for model in client.search_logged_models([ensure_experiment(cfg)])] == [
        evaluation]  # one logged model, in the evaluation run


def test_the_zero_init_baseline_is_a_run_of_its_own_never_taken_for_a_model_evaluation(
    tiny_run: dict[str, Any],
) -> None:
    cfg, run_id = tiny_run["cfg"], tiny_run["run_id"]
    client = mlflow.MlflowClient(tracking_uri=cfg.tracking.uri)
    options = EvalOptions(caption_tokens=4, instruction_tokens=4, run_id=run_id, max_images=2,
                          max_instructions=2, phrasings=("Describe this image.",))
    evaluate(cfg, None, options)  # even handed the training run's id
    assert (cfg.training.output_dir / "eval-zero-init" / "metrics.json").is_file()
    [baseline] = client.search_runs([ensure_experiment(cfg)], filter_string="tags.`lav2.stage` = 'baseline'")
    assert "mlflow.parentRunId" not in baseline.data.tags
    assert baseline.info.run_name.startswith("baseline-zero-init-")
    assert evaluation_run_of(client, ensure_experiment(cfg), run_id) != baseline.info.run_id


def test_cli_generate_and_chat_on_an_adapter_folder(tiny_run: dict[str, Any]) -> None:
    model, tokenizer = tiny_run["model"], load_tokenizer(tiny_run["cfg"])
    image_path = tiny_run["root"] / "blue.png"

    runner = CliRunner()
    common = ["--model", str(tiny_run["adapter"]), "--max-new-tokens", "6", "--image", str(image_path)]
    generated = runner.invoke(app, ["generate", *common, "--prompt", "What is drawn?"])
    assert generated.exit_code == 0, generated.output
    with Image.open(image_path) as raw:
        picture = raw.convert("RGB")
    settings = GenerationSettings(max_new_tokens=6)
    [expected] = generate_texts(
        model, tokenizer, [instruction_prompt("What is drawn?", "", picture)], settings
    )
    assert generated.stdout.strip() == expected
    chatted = runner.invoke(app, ["chat", *common], input="What is drawn?\nAnd the colour?\n")
    assert chatted.exit_code == 0, chatted.output
    session = ChatSession(model, tokenizer, image=picture, settings=settings)
    answers = [session.ask("What is drawn?").text, session.ask("And the colour?").text]
    assert chatted.stdout.split("you> ")[1:] == [f"assistant> {a}\n" for a in answers] + [""]
    missing = runner.invoke(app, ["generate", "--model", str(tiny_run["root"]), "--prompt", "hi"])
    assert missing.exit_code == 2
    assert "not an adapter folder" in missing.stderr


def test_a_training_run_loads_for_inference_from_its_adapter_artifact(tiny_run: dict[str, Any]) -> None:
    """``runs:/<id>`` downloads the run's ``adapter`` artifact, as training logs it, and rebuilds it."""
    cfg = tiny_run["cfg"]
    client = mlflow.MlflowClient(tracking_uri=cfg.tracking.uri)
    with mlflow.start_run(experiment_id=ensure_experiment(cfg)) as run:
        client.log_artifacts(run.info.run_id, str(tiny_run["adapter"]), "adapter")
    loaded = load_for_inference(f"runs:/{run.info.run_id}", tracking_uri=cfg.tracking.uri)
    assert loaded.adapter_dir.name == "adapter" and loaded.adapter_dir != tiny_run["adapter"]
    saved = tiny_run["model"].adapter_state_dict()
    assert all(torch.equal(value, saved[name]) for name, value in loaded.model.adapter_state_dict().items())
    assert not loaded.model.training


def test_the_pipeline_report_prints_counts_as_whole_numbers() -> None:
    report = pipeline_report(
        validation={"caption_input": 1_000_000, "caption_clean": 999_990, "caption_quarantined": 10,
                    "caption_duplicates": 0},
        metrics={"caption_cider": 0.5}, baseline={"caption_cider": 0.25}, names=["caption_cider"],
        decision={"outcome": "promoted", "reason": "better"}, version={"name": "m", "version": "3"},
        data_hash="abc", run_link="http://127.0.0.1/run")
    assert "| caption | 1000000 | 999990 | 10 | 0 |" in report and "e+" not in report
