"""Pool the children's results into one summary, check the targets, write JSON + markdown, log to MLflow.

Targets are reported, never asserted: a missed target is a row with ``met: false``.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any

from benchmarks.spec import Spec

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = "benchmarks"
LANGUAGE = "train_adapter_v2_language"


# --------------------------------------------------------------------------- summary


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Pool the step times of every successful round of one case."""
    ok = [r for r in results if r.get("status") == "ok"]
    if not ok:
        first = results[0]
        return {
            "status": first.get("status", "failed"),
            "reason": first.get("reason", "no result"),
            "rounds_ok": 0,
            "rounds": len(results),
        }
    seconds = [s for r in ok for s in r["step_seconds"]]
    items = ok[0]["items_per_step"]
    median_s = statistics.median(seconds)
    return {
        "status": "ok",
        "rounds_ok": len(ok),
        "rounds": len(results),
        "reason": "; ".join(r.get("reason", "") for r in results if r.get("status") != "ok"),
        "unit": ok[0]["unit"],
        "timed_steps": len(seconds),
        "median": items / median_s,
        "min": items / max(seconds),
        "max": items / min(seconds),
        "median_step_s": median_s,
        "round_medians": [items / statistics.median(r["step_seconds"]) for r in ok],
        "peak_rss_mb": max(r["peak_rss_mb"] for r in ok),
        "rss_before_model_mb": ok[0]["rss_before_model_mb"],
        "gpu_peak_mb": ok[0].get("gpu_peak_mb"),
        "trainable_params": ok[0]["trainable_params"],
        "flops_per_step": ok[0]["flops_per_step"],
        "child_wall_s": [round(r.get("wall_seconds", 0.0), 1) for r in ok],
        "extra": ok[0].get("extra", {}),
    }


def add_mfu(cases: dict[str, dict[str, Any]]) -> float | None:
    """Model FLOPs utilisation of each timed training case against this run's matmul ceiling."""
    ceiling = cases.get("matmul_ceiling", {})
    if ceiling.get("status") != "ok":
        return None
    ceiling_flops = ceiling["median"] * 1e9
    for summary in cases.values():
        if summary.get("status") == "ok" and summary.get("flops_per_step"):
            summary["mfu"] = summary["flops_per_step"] / summary["median_step_s"] / ceiling_flops
    return float(ceiling["median"])


def target(
    key: str, name: str, measured: float | None, goal: float, *, higher_is_better: bool = True, note: str = ""
) -> dict[str, Any]:
    met = None if measured is None else (measured >= goal if higher_is_better else measured <= goal)
    return {
        "key": key,
        "target": name,
        "measured": measured,
        "goal": goal,
        "direction": ">=" if higher_is_better else "<=",
        "met": met,
        "note": note,
    }


def _ratio(cases: dict[str, dict[str, Any]], a: str, b: str, key: str = "median") -> float | None:
    if cases.get(a, {}).get("status") != "ok" or cases.get(b, {}).get("status") != "ok":
        return None
    return cases[a][key] / cases[b][key]


def targets(cases: dict[str, dict[str, Any]], spec: Spec) -> list[dict[str, Any]]:
    """The issue's targets, each as a measured ratio against its goal (None: a side did not run)."""
    language = cases.get(LANGUAGE, {})
    on_gpu = spec.workload.device == "cuda"  # the accelerator's memory is what limits a GPU run
    memory, memory_key = ("peak GPU memory", "gpu_peak_mb") if on_gpu else ("peak RSS", "peak_rss_mb")
    training_samples_per_s = (
        spec.workload.batch_size / language["median_step_s"] if language.get("status") == "ok" else None
    )
    shard = cases.get("shard_reading", {})
    shard_ratio = (
        shard["median"] / training_samples_per_s
        if shard.get("status") == "ok" and training_samples_per_s
        else None
    )
    orchestration = cases.get("orchestration_overhead", {})
    overhead = (
        orchestration.get("extra", {}).get("overhead_fraction")
        if orchestration.get("status") == "ok"
        else None
    )
    return [
        target(
            "language_vs_litgpt_adapter_v2",
            "adapter V2 language tokens/s / LitGPT adapter_v2",
            _ratio(cases, LANGUAGE, "train_litgpt_adapter_v2"),
            1.3,
        ),
        target(
            "language_vs_peft_adaption_prompt",
            "adapter V2 language tokens/s / PEFT adaption prompt",
            _ratio(cases, LANGUAGE, "train_peft_adaption_prompt"),
            1.1,
        ),
        target(
            "language_rss_vs_peft_lora",
            f"adapter V2 language {memory} / PEFT LoRA {memory}",
            _ratio(cases, LANGUAGE, "train_peft_lora", memory_key),
            1.0,
            higher_is_better=False,
        ),
        target("language_mfu", "adapter V2 language MFU", language.get("mfu"), 0.8),
        target(
            "folded_generation_vs_base",
            "folded generation tokens/s / base",
            _ratio(cases, "generate_adapter_v2_folded", "generate_base"),
            0.97,
        ),
        target(
            "folded_no_prompts_generation_vs_base",
            "folded prompt-free adapter (stock Llama + biases) tokens/s / base",
            _ratio(cases, "generate_folded_without_prompts", "generate_base"),
            0.97,
        ),
        target(
            "unfolded_generation_vs_base",
            "unfolded generation tokens/s / base",
            _ratio(cases, "generate_adapter_v2_unfolded", "generate_base"),
            0.90,
        ),
        target(
            "shard_reading_vs_training",
            "shard reading samples/s / training samples/s",
            shard_ratio,
            10.0,
            note="training = the adapter V2 language case",
        ),
        target(
            "orchestration_overhead",
            "orchestration overhead (Prefect + MLflow vs bare loop)",
            overhead,
            0.05,
            higher_is_better=False,
        ),
    ]


def machine(litgpt_python: Path) -> dict[str, Any]:
    """Where and with what the run happened: CPU, cores, load and the peers' versions."""
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    versions = {
        name: _version(name) for name in ("torch", "transformers", "peft", "mlflow", "prefect", "webdataset")
    }
    versions["litgpt"] = _litgpt_version(litgpt_python)
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
    }


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _litgpt_version(python: Path) -> str | None:
    if not python.is_file():
        return None
    probe = "import importlib.metadata as m; print(m.version('litgpt'))"
    done = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, check=False)
    return done.stdout.strip() or None


def build(
    spec: Spec, per_case: dict[str, list[dict[str, Any]]], *, rounds: int, started: float, litgpt_python: Path
) -> dict[str, Any]:
    cases = {name: summarise(results) for name, results in per_case.items()}
    ceiling = add_mfu(cases)
    loads = [r["load_average_1m"] for results in per_case.values() for r in results if "load_average_1m" in r]
    return {
        "schema": 1,
        "preset": spec.preset,
        "spec": asdict(spec),
        "rounds": rounds,
        "started_utc": _utc(started),
        "finished_utc": _utc(time.time()),
        "load_average_1m": {"min": min(loads, default=None), "max": max(loads, default=None)},
        "machine": machine(litgpt_python),
        "matmul_ceiling_gflops": ceiling,
        "cases": cases,
        "targets": targets(cases, spec),
    }


def _utc(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


# --------------------------------------------------------------------------- markdown


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def cases_markdown(results: dict[str, Any]) -> list[str]:
    gpu = any(c.get("gpu_peak_mb") is not None for c in results["cases"].values())
    lines = [
        "| case | unit | median | min | max | peak RSS MiB |"
        + (" peak GPU MiB |" if gpu else "")
        + " trainable params | MFU | note |",
        "|---|---|---:|---:|---:|---:|" + ("---:|" if gpu else "") + "---:|---:|---|",
    ]
    for name, c in results["cases"].items():
        if c["status"] != "ok":
            blanks = "- | " * (7 if gpu else 6)
            lines.append(f"| {name} | {blanks}- | {c['status']}: {c['reason']} |")
            continue
        mfu = f"{100 * c['mfu']:.1f} %" if c.get("mfu") is not None else "-"
        trainable = "-" if c["trainable_params"] is None else f"{c['trainable_params']:,}"
        note = f"{c['timed_steps']} steps over {c['rounds_ok']}/{c['rounds']} rounds"
        if c["reason"]:
            note += f"; {c['reason']}"
        lines.append(
            f"| {name} | {c['unit']} | {_fmt(c['median'])} | {_fmt(c['min'])} | {_fmt(c['max'])} "
            f"| {_fmt(c['peak_rss_mb'], 0)} |"
            + (f" {_fmt(c.get('gpu_peak_mb'), 0)} |" if gpu else "")
            + f" {trainable} | {mfu} | {note} |"
        )
    return lines


def targets_markdown(results: dict[str, Any]) -> list[str]:
    lines = ["| target | measured | goal | met |", "|---|---:|---:|---|"]
    for t in results["targets"]:
        met = {True: "yes", False: "**no**", None: "not measured"}[t["met"]]
        lines.append(f"| {t['target']} | {_fmt(t['measured'], 3)} | {t['direction']} {t['goal']} | {met} |")
    return lines


def details_markdown(results: dict[str, Any]) -> list[str]:
    """Each case's extra figures (GEMM rates at the model's shapes, orchestration split, ...)."""
    lines = []
    for name, c in results["cases"].items():
        extra = {k: v for k, v in c.get("extra", {}).items() if v is not None}
        if c["status"] == "ok" and extra:
            lines.append(f"- `{name}`: " + ", ".join(f"{k} = {_compact(v)}" for k, v in extra.items()))
    return lines


def _compact(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3g}"
    if isinstance(value, list):
        return "[" + ", ".join(_compact(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_compact(v)}" for k, v in value.items()) + "}"
    return str(value)


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
    load = results["load_average_1m"]
    work = results["spec"]["workload"]
    llama = results["spec"]["llama"]
    head = [
        f"# Benchmark `{results['preset']}` {results['started_utc']} .. {results['finished_utc']}",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}; {versions}.",
        f"Load average (1 min) during the run: {_fmt(load['min'], 2)} .. {_fmt(load['max'], 2)}.",
        f"Shape: width {llama['hidden_size']}, {llama['num_hidden_layers']} layers, "
        f"{llama['num_attention_heads']} heads, vocab {llama['vocab_size']}; batch {work['batch_size']} x "
        f"seq {work['seq_len']} ({work['label_fraction']:.0%} labelled), {work['threads']} threads, "
        f"{work['dtype']} on {work['device']}; {work['warmup_steps']} warm-up + {work['timed_steps']} timed "
        f"steps per child, {results['rounds']} rounds interleaved.",
        f"Matmul ceiling: {_fmt(results['matmul_ceiling_gflops'])} GFLOP/s.",
        "",
    ]
    body = [*cases_markdown(results), "", *targets_markdown(results), "", *details_markdown(results), ""]
    return "\n".join([*head, *body])


def write(results: dict[str, Any], out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    stem = f"bench-{results['preset']}-{results['started_utc'].replace(':', '')}"
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    json_path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    md_path.write_text(markdown(results), encoding="utf-8")
    return json_path, md_path


def noise_markdown(a: dict[str, Any], b: dict[str, Any]) -> str:
    """Median of each case in two runs and their relative difference (the run-to-run noise)."""
    lines = [
        f"| case | run A {a['started_utc']} | run B {b['started_utc']} | B / A - 1 |",
        "|---|---:|---:|---:|",
    ]
    for name, ca in a["cases"].items():
        cb = b["cases"].get(name, {})
        if ca.get("status") != "ok" or cb.get("status") != "ok":
            continue
        lines.append(
            f"| {name} ({ca['unit']}) | {_fmt(ca['median'])} | {_fmt(cb['median'])} "
            f"| {100 * (cb['median'] / ca['median'] - 1):+.1f} % |"
        )
    for ta, tb in zip(a["targets"], b["targets"], strict=True):
        lines.append(f"| target: {ta['target']} | {_fmt(ta['measured'], 3)} | {_fmt(tb['measured'], 3)} | |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- MLflow


def log_to_mlflow(results: dict[str, Any], files: list[Path], *, tracking_uri: str | None) -> str:
    """One MLflow run per benchmark run: spec as params, every figure as a metric, files as artifacts."""
    import mlflow

    uri = tracking_uri or f"sqlite:///{REPO / 'mlruns' / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    mlflow.set_tracking_uri(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    experiment_id = (
        experiment.experiment_id
        if experiment
        else client.create_experiment(EXPERIMENT, artifact_location=_artifact_location(uri))
    )
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"bench-{results['preset']}") as run:
        mlflow.log_params(_params(results))
        mlflow.log_metrics(_metrics(results))
        for path in files:
            mlflow.log_artifact(str(path))
        return str(run.info.run_id)


def _artifact_location(uri: str) -> str | None:
    """Beside a sqlite store (``<dir>/artifacts/benchmarks``); a server decides for itself."""
    if not uri.startswith("sqlite:///"):
        return None
    folder = Path(uri.removeprefix("sqlite:///")).parent / "artifacts" / EXPERIMENT
    folder.mkdir(parents=True, exist_ok=True)
    return folder.resolve().as_uri()


def _params(results: dict[str, Any]) -> dict[str, str]:
    spec = results["spec"]
    flat = {f"{part}.{k}": str(v) for part in ("llama", "workload") for k, v in spec[part].items()}
    flat.update({f"version.{k}": str(v) for k, v in results["machine"]["versions"].items()})
    flat.update(
        {"preset": results["preset"], "rounds": str(results["rounds"]), "cpu": results["machine"]["cpu"]}
    )
    return flat


def _metrics(results: dict[str, Any]) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for name, c in results["cases"].items():
        if c["status"] != "ok":
            continue
        for key in ("median", "min", "max", "peak_rss_mb", "mfu"):
            if c.get(key) is not None:
                metrics[f"{name}.{key}"] = float(c[key])
    for t in results["targets"]:
        if t["measured"] is not None:
            metrics[f"target.{t['key']}"] = float(t["measured"])
    return metrics
