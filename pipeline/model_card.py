"""The exported encoder's model card (``README.md``), rendered from what ``config.json`` holds.

One source for both: the card is written from the same document as ``config.json``, so the
numbers a person reads are the ones a program reads. Plain Python only (the encoder imports it).
"""

from __future__ import annotations

from typing import Any


def _number(value: Any, digits: int = 3) -> str:
    if value is None:
        return "not measured"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _data_section(training: dict[str, Any]) -> list[str]:
    urls = training.get("train_urls")
    urls = urls if isinstance(urls, list) else [urls]
    lines = ["## Training data", ""]
    lines += [f"- shards: {', '.join(f'`{u}`' for u in urls)}"]
    if training.get("manifest"):
        lines += [f"- manifest: `{training['manifest']}` (split `{training.get('split') or 'train'}`)"]
    lines += [f"- samples: {_number(training.get('train_samples'))}", ""]
    return lines


def _training_section(training: dict[str, Any]) -> list[str]:
    hours = training.get("device_hours")
    return [
        "## Training", "",
        f"- steps: {_number(training.get('steps'))} (batch {_number(training.get('batch_size'))} per process"
        f" x {_number(training.get('grad_accum_steps', 1))} accumulation x {_number(training.get('processes'))} processes)",
        f"- device-hours: {_number(hours, 4)} ({training.get('device_type', 'device')}; wall-clock of the training"
        " starts x processes, each start counted up to the export or its last checkpoint)",
        f"- compute: {_number(training.get('flops_per_image'))} FLOPs per image forward (convs, 2 x multiply-adds;"
        " a training step ~3x that); energy: "
        + (f"{training['energy_j']:,.0f} J ({training.get('energy_source')})" if training.get("energy_j") is not None
           else str(training.get("energy_source") or "not measured")),
        f"- weights: {training.get('weights', 'ema')}", "",
    ]  # fmt: skip


def _report_section(report: dict[str, Any] | None) -> list[str]:
    lines = ["## Evaluation", ""]
    if not report:
        return lines + ["No final report (`eval/final/report.json`) was available at export.", ""]
    lines += [
        f"On {_number(report.get('images'))} held-out images, step {_number(report.get('step'))}, "
        f"{report.get('weights', 'ema')} weights (from `eval/final/report.json`):", "",
        "| measure | value |", "|---|---|",
        f"| negative ELBO, bits/dim | {_number(report.get('nelbo_bpd'))} |",
        f"| importance-weighted bound (K={report.get('iw_samples')}), bits/dim | {_number(report.get('iw_bound_bpd'))} |",
        f"| 1. reconstruction vs KL: `recon_bpd` / `kl_bpd` | {_number(report.get('recon_bpd'))} / "
        f"{_number(report.get('kl_bpd'))} |",
    ]  # fmt: skip
    groups = report.get("groups") or []
    active = ", ".join(f"{g['active_units']}/{g['units']}" for g in groups)
    lines += [f"| 2. posterior collapse: collapsed groups; active units per group | "
              f"{report.get('collapsed_groups', 'not measured')}; {active or 'not measured'} |"]  # fmt: skip
    aggregate = ", ".join(f"group {a['group']}: {a['kl_nats']:.2f}" for a in report.get("aggregate_posterior_kl") or [])
    lines += [f"| 3. aggregate posterior vs prior, KL in nats | {aggregate or 'not measured'} |"]
    lines += [f"| 4. blurriness: variance ratio of samples / reconstructions; PSNR dB | "
              f"{_number(report.get('variance_ratio_samples'))} / {_number(report.get('variance_ratio_reconstructions'))}; "
              f"{_number(report.get('psnr_db'), 2)} |", ""]  # fmt: skip
    return lines


def render_model_card(document: dict[str, Any]) -> str:
    """``document``: the encoder's ``config.json`` (model, input, latents, optional training)."""
    model, inputs, latents = document["model"], document["input"], document["latents"]
    lines = [
        "# Hierarchical VAE encoder", "",
        "The bottom-up pass and the top-down inference path of a hierarchical VAE (VDVAE family):",
        "images in, the posterior of every latent group out. Needs only torch, safetensors, numpy.", "",
        "```python", "from pipeline import Encoder", "",
        'encoder = Encoder.from_pretrained("path/to/this/folder")',
        "latents = encoder(images)  # uint8 (N, C, H, W) 0..255, or float in [-1, 1]",
        "latents[0].mean, latents[0].log_std, latents[0].shape  # lowest resolution first", "```", "",
        "## Architecture", "",
        f"- parameters: {_number(document.get('parameters'))}; width {model['width']}"
        + (f" (per resolution {model['widths']})" if model.get("widths") else ""),
        f"- encoder blocks `{model['encoder_blocks']}`, decoder blocks `{model['decoder_blocks']}`",
        f"- input: {inputs['resolution']}x{inputs['resolution']}, {inputs['channels']} channel(s), "
        f"{inputs['bits']}-bit; standardised per channel with mean {inputs['input_mean']} and std "
        f"{inputs['input_std']} (pixel scale 0..255)", "",
        "| group | resolution | latent shape |", "|---|---|---|",
        *[f"| {g['group']} | {g['resolution']} | {tuple(g['shape'])} |" for g in latents["groups"]], "",
    ]  # fmt: skip
    training = document.get("training")
    if training is None:
        lines += ["Exported outside a training run: no data, training or evaluation facts recorded.", ""]
    else:
        lines += _data_section(training) + _training_section(training) + _report_section(training.get("report"))
    return "\n".join(lines)
