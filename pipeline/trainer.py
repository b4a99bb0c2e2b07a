"""The training run: builds the parts from the config, then trains, evaluates, checkpoints.

Every process runs this same code under Accelerate (one process on a laptop, DDP or DeepSpeed
across GPUs and nodes). Only the main process writes files and talks to MLflow; collective
calls (``reduce``, ``wait_for_everyone``) are made by all processes at the same points.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections import defaultdict
from functools import partial
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from tqdm.auto import tqdm

from pipeline.checkpoint import (
    capture_rng,
    latest_checkpoint,
    load_checkpoint,
    load_ema,
    remove_stale_temporaries,
    restore_rng,
    save_checkpoint,
)
from pipeline.config import Config, config_from_dict
from pipeline.data.loader import EpochIterator, make_loader
from pipeline.data.streams import StreamOptions
from pipeline.ema import EMA
from pipeline.encoder import Encoder
from pipeline.evaluate import evaluate, flat_metrics, plot_report
from pipeline.images import sample_and_reconstruction_grid
from pipeline.model import VAE
from pipeline.objective import kl_warmup_weight
from pipeline.runs import resolve_data_urls
from pipeline.tracking import Tracker

log = logging.getLogger(__name__)


def lr_factor(cfg: Config, step: int) -> float:
    """Multiplier of ``optim.lr`` at ``step``: linear warm-up, then cosine or constant."""
    warmup = max(1, cfg.optim.warmup_steps)
    if step < warmup:
        return (step + 1) / warmup
    if cfg.optim.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, cfg.train.steps - warmup))
    floor = cfg.optim.min_lr_ratio
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


class TrainingStalled(RuntimeError):
    """Training cannot make progress (e.g. every update is being skipped)."""


class Trainer:
    def __init__(self, cfg: Config, accelerator: Accelerator) -> None:
        self.cfg, self.accelerator = cfg, accelerator
        self.run_dir = Path(cfg.train.run_dir)
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.is_main = accelerator.is_main_process

        set_seed(cfg.train.seed)  # identical initial weights on every rank
        model = VAE(cfg.model)
        optimizer = torch.optim.AdamW(
            model.parameters(),
            lr=cfg.optim.lr,
            betas=(cfg.optim.beta1, cfg.optim.beta2),
            weight_decay=cfg.optim.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, cfg))
        # The data loaders are not prepared: the pipeline already splits shards by rank, and
        # Accelerate's dispatching would split our batches a second time.
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.ema = EMA(accelerator.unwrap_model(self.model), cfg.objective.ema_decay)
        self.consecutive_skips = 0
        set_seed(cfg.train.seed + accelerator.process_index)  # different latent noise per rank

        train_urls, eval_urls = self._data_urls()
        data = cfg.data
        options = StreamOptions.from_config(data)
        common = dict(
            batch_size=data.batch_size, num_workers=data.num_workers, rank=accelerator.process_index,
            world_size=accelerator.num_processes, channels=cfg.model.channels, seed=data.seed, options=options,
        )  # fmt: skip
        self.train_batches = EpochIterator(
            *make_loader(train_urls, train=True, mode=data.mode, shuffle_buffer=data.shuffle_buffer,
                         hflip=data.hflip, epoch_batches=data.epoch_batches, **common),
            max_skip_fraction=data.max_skip_fraction,
        )  # fmt: skip
        self.eval_loader, _ = make_loader(eval_urls, train=False, **common)

        self.step, self.skipped_updates = 0, 0
        self.first_eval: dict[str, float] | None = None
        run_id = self._resume()
        self.tracker = Tracker(
            active=self.is_main and cfg.tracking.enabled,
            tracking_uri=cfg.tracking.tracking_uri,
            experiment=cfg.tracking.experiment,
            run_name=cfg.tracking.run_name or self.run_dir.name,
            run_dir=self.run_dir,
            resume_run_id=run_id,
        )

    # --- set-up ----------------------------------------------------------------------------

    def _data_urls(self) -> tuple[str | list[str], str | list[str]]:
        # The main process writes the embedded dataset's shards; the others wait, then read.
        with self.accelerator.main_process_first():
            return resolve_data_urls(self.cfg)

    def _resume(self) -> str | None:
        """Load the newest checkpoint of this run directory, if any; returns its MLflow run id."""
        remove_stale_temporaries(self.checkpoint_dir)
        latest = latest_checkpoint(self.checkpoint_dir)
        if latest is None:
            return None
        model_state, optimizer_state, state = load_checkpoint(latest)
        saved = config_from_dict(state["config"])
        if dataclasses.asdict(saved.model) != dataclasses.asdict(self.cfg.model):
            raise SystemExit(f"{latest} was trained with a different model config; use a new train.run_dir")
        self.accelerator.unwrap_model(self.model).load_state_dict(model_state)
        self.ema.load_state_dict(load_ema(latest) or model_state)
        self.optimizer.load_state_dict(optimizer_state)
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.skipped_updates = state["step"], state["skipped_updates"]
        self.first_eval = state.get("first_eval")
        rank = self.accelerator.process_index
        if state["world_size"] == self.accelerator.num_processes:
            self.train_batches.load_state_dict(state["data"][rank])
            restore_rng(state["rng"][rank])
        else:
            log.warning("resuming %d processes from a %d-process checkpoint: the data order restarts at epoch %d",
                        self.accelerator.num_processes, state["world_size"], state["data"][0]["epoch"] + 1)
            self.train_batches.load_state_dict({"epoch": state["data"][0]["epoch"] + 1, "batches_in_epoch": 0})
        if self.is_main:
            log.info("resumed from %s (step %d)", latest, self.step)
        return state.get("mlflow_run_id")

    # --- the loop ----------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        cfg, acc = self.cfg, self.accelerator
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            self.tracker.log_params(cfg.flat())
            self.tracker.set_tags({"num_processes": acc.num_processes, "mixed_precision": acc.mixed_precision})
        if self.step == 0:
            self.first_eval = self.evaluate()
        progress = tqdm(total=cfg.train.steps, initial=self.step, disable=not self.is_main, desc="train", dynamic_ncols=True)
        sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=acc.device))
        interval_start, interval_steps = time.perf_counter(), 0
        while self.step < cfg.train.steps:
            stats = self.train_step()
            if stats is None:  # a micro-batch of gradient accumulation, no update yet
                continue
            self.step += 1
            interval_steps += 1
            progress.update(1)
            for key, value in stats.items():
                sums[key] = sums[key] + value
            if self.step % cfg.train.log_every == 0 or self.step == cfg.train.steps:
                elapsed = time.perf_counter() - interval_start
                metrics = {f"train/{k}": v for k, v in self._mean_over_processes(sums, interval_steps).items()}
                images = interval_steps * cfg.data.batch_size * cfg.train.grad_accum_steps * acc.num_processes
                metrics |= self._data_counts()
                metrics |= {
                    "train/images_per_s": images / elapsed,
                    "train/lr": self.scheduler.get_last_lr()[0],
                    "train/skipped_updates": self.skipped_updates,
                    "train/kl_weight": self.kl_weight(),
                    "train/ema_decay": self.ema.decay_at(self.step),
                    "train/epoch": self.train_batches.epoch,
                }
                self.tracker.log_metrics(metrics, self.step)
                progress.set_postfix(loss=f"{metrics['train/loss']:.3f}", img_s=f"{metrics['train/images_per_s']:.0f}")
                sums.clear()
                interval_start, interval_steps = time.perf_counter(), 0
            paused = time.perf_counter()
            if self.step % cfg.train.eval_every == 0 and self.step < cfg.train.steps:
                self.evaluate()
            if self.step % cfg.train.image_every == 0 and self.step < cfg.train.steps:
                self.log_images()
            if self.step % cfg.checkpoint.every == 0:
                self.save()
            interval_start += time.perf_counter() - paused  # images/s counts training time only
        progress.close()
        final = self.evaluate()
        self.log_images()
        self.save()
        self.export_encoder()
        self.write_eval_report()
        summary = {"step": self.step, "first_eval": self.first_eval, "final_eval": final, "mlflow_run_id": self.tracker.run_id}
        if self.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            log.info("held-out bits/dim: %.3f at the start, %.3f now, %.3f with the EMA weights (step %d)",
                     self.first_eval["eval/loss"], final["eval/loss"], final["eval_ema/loss"], self.step)
        return summary

    def kl_weight(self) -> float:
        """The KL term's weight in the objective at this step (linear warm-up)."""
        return kl_warmup_weight(self.step, self.cfg.objective.kl_warmup_steps)

    def train_step(self) -> dict[str, torch.Tensor] | None:
        """One micro-batch; returns detached stats when an optimizer update happened."""
        objective = self.cfg.objective
        batch = next(self.train_batches)
        with self.accelerator.accumulate(self.model):
            images = batch["image"].to(self.accelerator.device, non_blocking=True)
            out = self.model(images, kl_weight=self.kl_weight(), free_bits=objective.free_bits)
            self.accelerator.backward(out["loss"])
            if not self.accelerator.sync_gradients:
                return None
            grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
            # The norm is computed from all-reduced gradients, so every rank takes the same
            # decision here and the replicas stay identical (VDVAE's update skipping).
            skip = not torch.isfinite(grad_norm) or (0 < objective.skip_threshold < grad_norm.item())
            if skip:
                self.skipped_updates += 1
                self.consecutive_skips += 1
                if self.consecutive_skips >= objective.max_consecutive_skips:
                    raise TrainingStalled(
                        f"the last {self.consecutive_skips} updates were all skipped (grad norm {grad_norm.item():.4g}, "
                        f"objective.skip_threshold={objective.skip_threshold}): the model is not learning. Raise "
                        "objective.skip_threshold, lower optim.lr, or resume from an earlier checkpoint"
                    )
            else:
                self.optimizer.step()
                self.scheduler.step()
                self.consecutive_skips = 0
            self.optimizer.zero_grad(set_to_none=True)
        if not skip:
            self.ema.update(self.accelerator.unwrap_model(self.model), self.step)
        stats = {k: v.detach() for k, v in out.items() if k != "kl_bpd_per_group"}
        stats |= {f"kl_bpd/group_{i:02d}": v for i, v in enumerate(out["kl_bpd_per_group"])}
        stats["grad_norm"] = grad_norm.detach().float()
        stats["skip_rate"] = torch.tensor(float(skip), device=grad_norm.device)  # averaged over the log interval
        return stats

    def _mean_over_processes(self, sums: dict[str, torch.Tensor], count: int) -> dict[str, float]:
        keys = sorted(sums)
        stacked = torch.stack([sums[k].float() for k in keys]) / max(count, 1)
        stacked = self.accelerator.reduce(stacked, reduction="mean")  # a collective: all ranks call it
        return dict(zip(keys, stacked.tolist()))

    def _data_counts(self) -> dict[str, float]:
        """The loaders' fault counts, summed over processes: skipped samples must be seen."""
        counts = self.train_batches.counts()
        keys = ["corrupt", "missing", "retries", "shards_opened", "decoded"]
        totals = torch.tensor([float(counts.get(k, 0)) for k in keys], device=self.accelerator.device)
        totals = self.accelerator.reduce(totals, reduction="sum")
        return {f"data/{k}": v for k, v in zip(keys, totals.tolist())}

    def evaluate(self) -> dict[str, float]:
        """Held-out figures of the live weights (``eval/...``) and of their moving average
        (``eval_ema/...``), side by side: early on the average lags, later it is better."""
        model = self.accelerator.unwrap_model(self.model)
        metrics = self._evaluate(model, "eval")
        with self.ema.applied(model):
            metrics |= self._evaluate(model, "eval_ema")
            if self.is_main and self.cfg.train.diagnostics:
                # The four VAE problems as numbers, on this process's share of the held-out data.
                report = evaluate(model, self.eval_loader, max_images=self.cfg.train.eval_batches * self.cfg.data.batch_size,
                                  device=self.accelerator.device)  # fmt: skip
                diagnostics = {k: v for k, v in flat_metrics(report, "eval_ema").items() if k not in metrics}
                self.tracker.log_metrics(diagnostics, self.step)
                metrics |= diagnostics
            model.train()
        if self.is_main:
            tqdm.write(f"step {self.step}: held-out {metrics['eval/loss']:.4f} bits/dim "
                       f"(reconstruction {metrics['eval/recon_bpd']:.4f} + KL {metrics['eval/kl_bpd']:.4f}); "
                       f"EMA weights {metrics['eval_ema/loss']:.4f}")
        return metrics

    @torch.no_grad()
    def _evaluate(self, model: VAE, prefix: str) -> dict[str, float]:
        """Negative ELBO on the whole held-out split (or ``train.eval_batches`` per process)."""
        model.eval()
        totals = torch.zeros(3 + model.num_groups, device=self.accelerator.device)
        for i, batch in enumerate(self.eval_loader):
            if self.cfg.train.eval_batches and i >= self.cfg.train.eval_batches:
                break
            images = batch["image"].to(self.accelerator.device)
            if images.shape[0] == 0:  # every sample of the batch was unreadable (counted)
                continue
            with self.accelerator.autocast():
                out = model(images)
            n = images.shape[0]
            totals += torch.cat([torch.tensor([n], device=totals.device), out["recon_bpd"].reshape(1) * n,
                                 out["kl_bpd"].reshape(1) * n, out["kl_bpd_per_group"] * n])
        model.train()
        totals = self.accelerator.reduce(totals, reduction="sum")
        count = totals[0].clamp_min(1)
        recon, kl, per_group = totals[1] / count, totals[2] / count, totals[3:] / count
        metrics = {"loss": (recon + kl).item(), "recon_bpd": recon.item(), "kl_bpd": kl.item(), "images": totals[0].item()}
        metrics |= {f"kl_bpd/group_{i:02d}": v for i, v in enumerate(per_group.tolist())}
        metrics = {f"{prefix}/{k}": v for k, v in metrics.items()}
        self.tracker.log_metrics(metrics, self.step)
        return metrics

    def log_images(self) -> None:
        if not self.is_main:
            return
        model = self.accelerator.unwrap_model(self.model)
        model.eval()
        real = next(iter(self.eval_loader))["image"].to(self.accelerator.device)
        with self.ema.applied(model):
            path = sample_and_reconstruction_grid(model, real, self.run_dir / "images" / f"step_{self.step:06d}.png")
        model.train()
        self.tracker.log_artifact(path, "images")

    # --- outputs -----------------------------------------------------------------------------

    def save(self) -> None:
        acc = self.accelerator
        # Every rank contributes its own data position and RNG; the main process writes.
        per_rank = gather_object([{"data": self.train_batches.state_dict(), "rng": capture_rng()}])
        acc.wait_for_everyone()
        if self.is_main:
            model = acc.unwrap_model(self.model)
            state = {
                "world_size": acc.num_processes,
                "skipped_updates": self.skipped_updates,
                "data": [r["data"] for r in per_rank],
                "rng": [r["rng"] for r in per_rank],
                "scheduler": self.scheduler.state_dict(),
                "first_eval": self.first_eval,
                "mlflow_run_id": self.tracker.run_id,
                "config": self.cfg.to_dict(),
                "versions": {"torch": torch.__version__, "pipeline": __import__("pipeline").__version__},
            }
            path = save_checkpoint(
                self.checkpoint_dir, self.step, model.state_dict(), self.optimizer.state_dict(), state,
                keep_last=self.cfg.checkpoint.keep_last,
                model_metadata={"model_config": json.dumps(dataclasses.asdict(self.cfg.model))},
                ema_state=self.ema.state_dict(),
            )
            log.info("saved %s", path)
        acc.wait_for_everyone()

    def write_eval_report(self) -> None:
        """The final report (EMA weights, importance-weighted bound, the four VAE problems) and its
        figure, under <run_dir>/eval/final and in MLflow."""
        if not self.is_main:
            return
        model = self.accelerator.unwrap_model(self.model)
        with self.ema.applied(model):
            report = evaluate(model, self.eval_loader, iw_samples=self.cfg.train.final_iw_samples,
                              max_images=self.cfg.train.eval_batches * self.cfg.data.batch_size,
                              device=self.accelerator.device)  # fmt: skip
            model.train()
        directory = self.run_dir / "eval" / "final"
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "report.json").write_text(json.dumps({"step": self.step, "weights": "ema", **report}, indent=2) + "\n")
        plot_report(report, directory / "figure.png")
        self.tracker.log_metrics(flat_metrics(report, "final_ema"), self.step)
        self.tracker.log_artifact(directory, "eval/final")

    def export_encoder(self) -> None:
        if not self.is_main:
            return
        directory = self.run_dir / "encoder"
        model = self.accelerator.unwrap_model(self.model)
        with self.ema.applied(model):  # the averaged weights are the better encoder
            Encoder.from_vae(model).save_pretrained(directory)
        self.tracker.log_artifact(directory, "encoder")
        log.info("exported the encoder to %s", directory)

    def close(self, status: str = "FINISHED") -> None:
        self.tracker.close(status)
