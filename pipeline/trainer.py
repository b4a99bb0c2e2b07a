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
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object, set_seed

from pipeline.checkpoint import (
    CHECKPOINT_DIR,
    CheckpointError,
    capture_rng,
    checkpoint_name,
    list_checkpoints,
    load_checkpoint,
    load_ema,
    remove_stale_temporaries,
    restore_rng,
    save_checkpoint,
    verify_checkpoint,
)
from pipeline.config import Config, config_from_dict
from pipeline.cost import (
    EnergyMeter,
    RunCost,
    energy_over_processes,
    plot_quality_against_cost,
    read_history,
    record_evaluation,
    save_history,
    vae_flops_per_image,
)
from pipeline.distributed import full_training_state, is_deepspeed, load_optimizer_state, zero_stage
from pipeline.data.loader import EpochIterator, make_loader
from pipeline.data.streams import DataError, StreamOptions
from pipeline.data.verify import verify_checksums
from pipeline.ema import EMA
from pipeline.encoder import Encoder
from pipeline.evaluate import evaluate, flat_metrics, plot_report
from pipeline.fault_injection import NonfiniteInjection
from pipeline.images import sample_and_reconstruction_grid
from pipeline.model import VAE
from pipeline.model.noise import StepNoise
from pipeline.objective import kl_warmup_weight
from pipeline.progress import Progress
from pipeline.run_info import gather_hostnames, loggable_params, mask_text, run_tags, secret_values
from pipeline.runs import (
    check_shards_fit_model,
    checkpoint_to_resume,
    manifest_splits,
    resolve_data_urls,
    resolve_input_statistics,
)
from pipeline.speed import make_optimizer, prepare_model
from pipeline.stopping import StopRequests, TrainingStopped, clear_stopped, reason, write_stopped
from pipeline.tracking import Tracker
from pipeline.updates import TrainingDiverged, UpdateGuard

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


class Trainer:
    def __init__(self, cfg: Config, accelerator: Accelerator, stop: StopRequests | None = None) -> None:
        self.cfg, self.accelerator = cfg, accelerator
        # Device-hours for the encoder's model card: wall-clock of each start x processes, the
        # starts before this one carried in the checkpoint (_resume).
        self.started, self.device_seconds_before = time.perf_counter(), 0.0
        # Signals and the time limit (train.py installs the handlers); none when used as a library.
        self.stop = stop or StopRequests()
        self.run_dir = Path(cfg.train.run_dir)
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.is_main = accelerator.is_main_process

        self.checkpoint = self._find_checkpoint()
        train_urls, eval_urls = self._data_urls()
        self.train_urls = train_urls
        check_shards_fit_model(cfg, train_urls, eval_urls)
        self.cfg = cfg = self._model_statistics(cfg, train_urls)
        # The same seed on every rank: identical initial weights, and identical generator states
        # from which each rank takes its slice of the step's latent noise (model/noise.py).
        set_seed(cfg.train.seed)
        model = VAE(cfg.model)
        names = [name for name, _ in model.named_parameters()]
        resumed = load_checkpoint(self.checkpoint, names) if self.checkpoint else None
        if resumed:
            saved = config_from_dict(resumed[2]["config"])
            if dataclasses.asdict(saved.model) != dataclasses.asdict(cfg.model):
                raise SystemExit(f"{self.checkpoint} was trained with a different model config; use a new train.run_dir")
            # Before prepare(): DeepSpeed builds its float32 masters and ZeRO partitions from these.
            model.load_state_dict(resumed[0])
        prepare_model(model, cfg.train, deepspeed=accelerator.distributed_type == DistributedType.DEEPSPEED)
        self.ema = EMA(model, cfg.objective.ema_decay)
        if resumed:
            self.ema.load_state_dict(load_ema(self.checkpoint) or resumed[0])
        optimizer = make_optimizer(model.parameters(), cfg.optim)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, cfg))
        # The data loaders are not prepared: the pipeline already splits shards by rank, and
        # Accelerate's dispatching would split our batches a second time.
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.deepspeed = is_deepspeed(self.model)
        self.noise = StepNoise(accelerator.process_index, accelerator.num_processes, cfg.train.grad_accum_steps,
                               accelerator.device)  # fmt: skip
        self.micro_batch = 0
        self.data_wait_s = self.step_s = 0.0  # this update's micro-batches so far (train_step)
        self.side_model: VAE | None = None  # the model evaluation and exports use (_side_work)
        self.updates = UpdateGuard(accelerator, self.scheduler, cfg)
        self.injection = NonfiniteInjection(cfg.faults, accelerator.process_index, accelerator.num_processes)

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
        self.eval_urls = eval_urls
        self.eval_loader, _ = make_loader(eval_urls, train=False, **common)
        self._first_heldout_images()  # at start: not after hours of training, in the final evaluation

        self.step = 0
        self.saved_step: int | None = None  # the step this process last checkpointed
        self.first_eval: dict[str, float] | None = None
        self.progress: Progress | None = None
        run_id = self._resume(*resumed[1:]) if resumed else None
        # Counted on a meta-device copy: no compute, and no ZeRO-3 gather on one process alone.
        meter = EnergyMeter(accelerator.device, count_node=accelerator.local_process_index == 0)
        self.cost = RunCost(vae_flops_per_image(cfg.model), meter, self.device_seconds_before,
                            resumed[2].get("cost") if resumed else None)  # fmt: skip
        # Every evaluation with the device-hours spent until it, for the quality-against-cost figure.
        self.history_path = self.run_dir / "eval" / "history.json"
        self.eval_history = read_history(self.history_path, self.step) if resumed and self.is_main else []
        self.final_cost: dict[str, Any] | None = None
        self.tracker = Tracker(
            active=self.is_main and cfg.tracking.enabled,
            tracking_uri=cfg.tracking.tracking_uri,
            experiment=cfg.tracking.experiment,
            run_name=cfg.tracking.run_name or self.run_dir.name,
            run_dir=self.run_dir,
            resume_run_id=run_id,
            new_run=not (resumed and self._own_checkpoint()),
            flush_timeout=cfg.tracking.flush_timeout,
            request_timeout=cfg.tracking.request_timeout,
            system_metrics_interval=cfg.tracking.system_metrics_interval if cfg.tracking.system_metrics else 0.0,
        )

    # --- set-up ----------------------------------------------------------------------------

    def _data_urls(self) -> tuple[str | list[str], str | list[str]]:
        # The main process writes the embedded dataset's shards; the others wait, then read.
        with self.accelerator.main_process_first():
            urls = resolve_data_urls(self.cfg)
        if self.cfg.data.verify_checksums:
            # Shards are dealt anew each epoch (every process reads every one in time): one reader
            # per node hashes them all, its own disks' copies, before its other processes start.
            with self.accelerator.local_main_process_first():
                if self.accelerator.is_local_main_process:
                    verify_checksums(list(urls), StreamOptions.from_config(self.cfg.data))
        return urls

    def _model_statistics(self, cfg: Config, train_urls: str | list[str]) -> Config:
        """The encoder's input statistics: the checkpoint's when resuming (the shards may have
        been rewritten since), else the training manifest's."""
        model = cfg.model
        if self.checkpoint and model.standardize_input and not (model.input_mean or model.input_std):
            saved = json.loads((self.checkpoint / "state.json").read_text())["config"]["model"]
            if saved.get("input_mean"):
                model = dataclasses.replace(model, input_mean=saved["input_mean"], input_std=saved["input_std"])
                cfg = dataclasses.replace(cfg, model=model)
        return resolve_input_statistics(cfg, train_urls)

    def _find_checkpoint(self) -> Path | None:
        """The run directory's newest whole checkpoint, else ``checkpoint.resume_from``, else None."""
        remove_stale_temporaries(self.checkpoint_dir)
        try:
            return checkpoint_to_resume(self.cfg)
        except CheckpointError as err:
            raise SystemExit(f"checkpoint error: {err}") from None

    def _resume(self, optimizer_state, state: dict[str, Any]) -> str | None:
        """Everything of the checkpoint but the weights (loaded before prepare); returns its
        MLflow run id when it is this run directory's own."""
        load_optimizer_state(self.accelerator, self.model, self.optimizer, optimizer_state)
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        self.device_seconds_before = state.get("device_seconds", 0.0)  # checkpoints before it: unknown
        self.updates.skipped, self.updates.overflows = state["skipped_updates"], state.get("overflow_steps", 0)
        self.updates.nonfinite, self.updates.rollbacks = state.get("nonfinite_updates", 0), state.get("rollbacks", 0)
        if state.get("loss_scale") and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["loss_scale"])
        self.first_eval = state.get("first_eval")
        rank, same_layout = self.accelerator.process_index, state["world_size"] == self.accelerator.num_processes
        # Another number of processes continues the same epoch with exactly the unseen samples.
        self.train_batches.resume(state["data"])
        # The generators are in step on every rank (model/noise.py): any saved rank's will do.
        restore_rng(state["rng"][rank] if same_layout else state["rng"][0])
        if self.is_main:
            log.info("resumed from %s (step %d, saved by %d process(es))", self.checkpoint, self.step, state["world_size"])
        return state.get("mlflow_run_id") if self._own_checkpoint() else None

    def _own_checkpoint(self) -> bool:
        """The checkpoint resumed is this run directory's (not ``checkpoint.resume_from``'s)."""
        return self.checkpoint.resolve().parent == self.checkpoint_dir.resolve()

    def _first_heldout_images(self) -> torch.Tensor:
        """The first held-out batch that has an image (this process's share); DataError naming the
        URLs when none has one (every shard missing, unreadable, or without images)."""
        for batch in self.eval_loader:
            if batch["image"].shape[0]:
                return batch["image"]
        raise DataError(f"the held-out set {self.eval_urls} gave no readable image (rank "
                        f"{self.accelerator.process_index}); check data.eval_urls and the warnings above")  # fmt: skip

    # --- the loop ----------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        cfg, acc = self.cfg, self.accelerator
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        hostnames = gather_hostnames()  # a collective: before the main-only block
        if self.is_main:
            self.tracker.log_params(loggable_params(cfg.flat()))
            strategy = f"deepspeed-zero{zero_stage(self.model)}" if self.deepspeed else str(acc.distributed_type).lower()
            self.tracker.set_tags(run_tags(world_size=acc.num_processes, precision=acc.mixed_precision, strategy=strategy,
                                           hostnames=hostnames) | {"energy_source": self.cost.energy_source()})  # fmt: skip
        if self.is_main:
            clear_stopped(self.run_dir)  # a stop record of an earlier start is history now
        self.progress = Progress(cfg.train.steps, self.step, enabled=self.is_main, every_s=cfg.train.progress_every)
        if self.step == 0 and cfg.train.eval_at_start:
            with self._side_work():
                self.first_eval = self.evaluate()
        sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=acc.device))
        interval_start, interval_steps = time.perf_counter(), 0
        # Asked at every step boundary, this one included: a signal during set-up or the step-0
        # evaluation stops the run before it trains further.
        stop = self.stop.should_stop(acc, self.step)
        while not stop and self.step < cfg.train.steps:
            stats = self.train_step()
            if stats is None:  # a micro-batch of gradient accumulation, no update yet
                continue
            self.step += 1
            interval_steps += 1
            for key, value in stats.items():
                sums[key] = sums[key] + value
            if self.step % cfg.train.log_every == 0 or self.step == cfg.train.steps:
                elapsed = time.perf_counter() - interval_start
                metrics = {f"train/{k}": v for k, v in self._mean_over_processes(sums, interval_steps).items()}
                images = interval_steps * cfg.data.batch_size * cfg.train.grad_accum_steps * acc.num_processes
                # Over the whole interval and all processes: the share of step time spent waiting for a batch.
                metrics["train/data_wait_fraction"] = metrics.pop("train/data_wait_s") / metrics.pop("train/step_s")
                metrics |= self._data_counts()
                self.cost.add_training(images, elapsed)
                metrics |= RunCost.metrics(self.cost.report(self.device_seconds(), energy_over_processes(acc, self.cost.meter)))
                metrics |= {
                    "train/images_per_s": images / elapsed,
                    "train/lr": self.scheduler.get_last_lr()[0],
                    "train/skipped_updates": self.updates.skipped,
                    "train/overflow_steps": self.updates.overflows,
                    "train/nonfinite_updates": self.updates.nonfinite,
                    "train/kl_weight": self.kl_weight(),
                    "train/ema_decay": self.ema.decay_at(self.step),
                    "train/epoch": self.train_batches.epoch,
                }
                self.tracker.log_metrics(metrics, self.step)
                self.progress.metrics(metrics["train/loss"], metrics["train/images_per_s"])
                sums.clear()
                interval_start, interval_steps = time.perf_counter(), 0
            self.progress.update(self.step)
            if self.updates.rollback_due:  # train.rollback_after_nonfinite non-finite updates in a row
                self.roll_back()
                continue
            # Before this step's evaluation and images: a stop must not wait for them.
            stop = self.stop.should_stop(acc, self.step)
            if stop:
                break
            paused = time.perf_counter()
            if self.step % cfg.train.eval_every == 0 and self.step < cfg.train.steps:
                with self._side_work():
                    self.evaluate()
            if self.step % cfg.train.image_every == 0 and self.step < cfg.train.steps:
                with self._side_work():
                    self.log_images()
            if self.step % cfg.checkpoint.every == 0 and not self.updates.diverging:
                self.save()
            interval_start += time.perf_counter() - paused  # images/s counts training time only
        self.progress.close()
        if stop:
            self._stop_now(stop)
        # First: a failure in the final evaluation, images, exports or report must not lose the steps.
        self.save()
        with self._side_work():
            final = self.evaluate()
            self.log_images()
        # The final evaluation can take minutes: a stop asked meanwhile is honoured here, the
        # checkpoint written before it; the rerun evaluates again, then exports.
        stop = self.stop.should_stop(acc, self.step)
        if stop:
            self._stop_now(stop)
        self._account_cost()  # before the main-only report: it reduces over processes
        with self._side_work():
            # The report first: the encoder's model card quotes it.
            report = self.write_eval_report()
            self.export_encoder(report)
        summary = {"step": self.step, "first_eval": self.first_eval, "final_eval": final, "cost": self.final_cost,
                   "mlflow_run_id": self.tracker.run_id}  # fmt: skip
        if self.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            self.tracker.log_artifact(self.run_dir / "summary.json")
            start = f"{self.first_eval['eval/loss']:.3f}" if self.first_eval else "not measured"
            log.info("held-out bits/dim: %s at the start, %.3f now, %.3f with the EMA weights (step %d)",
                     start, final["eval/loss"], final["eval_ema/loss"], self.step)
        return summary

    def _account_cost(self) -> None:
        """The run's cost up to its final evaluation, as metrics and in ``self.final_cost``, and
        the figure of held-out bits/dim against device-hours (main process)."""
        self.final_cost = self.cost.report(self.device_seconds(), energy_over_processes(self.accelerator, self.cost.meter))
        self.tracker.log_metrics(RunCost.metrics(self.final_cost), self.step)
        if self.is_main:
            figure = plot_quality_against_cost(self.eval_history, self.run_dir / "eval" / "quality_vs_cost.png",
                                               self.final_cost)  # fmt: skip
            self.tracker.log_artifact(figure, "eval")
            self.tracker.log_artifact(self.history_path, "eval")
            self.tracker.set_tags({"energy_source": self.final_cost["energy_source"]})

    def _stop_now(self, code: int) -> None:
        """Every rank agreed to stop after ``self.step``: checkpoint it (the save is a no-op when
        this step is saved already), leave the record job scripts read, raise TrainingStopped
        (train.py closes the MLflow run as KILLED and exits with 75)."""
        self.save()
        stopped = TrainingStopped(code, self.step)
        if self.is_main:
            log.warning("%s", stopped)
            write_stopped(self.run_dir, code, self.step, self.checkpoint_dir / checkpoint_name(self.step))
            self.tracker.set_tags({"last_stop": f"step {self.step}: {reason(code)}"})
        raise stopped

    def kl_weight(self) -> float:
        """The KL term's weight in the objective at this step (linear warm-up)."""
        return kl_warmup_weight(self.step, self.cfg.objective.kl_warmup_steps)

    def train_step(self) -> dict[str, torch.Tensor] | None:
        """One micro-batch; returns detached stats when an optimizer update happened (or was skipped)."""
        objective = self.cfg.objective
        started = time.perf_counter()
        batch = next(self.train_batches)
        self.data_wait_s += time.perf_counter() - started
        with self.accelerator.accumulate(self.model), self.noise.micro_batch(self.micro_batch):
            images = batch["image"].to(self.accelerator.device, non_blocking=True)
            out = self.model(images, kl_weight=self.kl_weight(), free_bits=objective.free_bits)
            if self.injection.due(self.step + 1, self.micro_batch):  # faults.*: fault tests only
                out["loss"] = self.injection.poison(out["loss"], self.model)
            skipped_before = self.model.skipped_steps if self.deepspeed else 0
            # Under DeepSpeed this also clips and steps on the last micro-batch (one engine call).
            self.accelerator.backward(out["loss"])
            if not self.accelerator.sync_gradients:
                self.micro_batch += 1
                self.step_s += time.perf_counter() - started
                return None
            self.micro_batch = 0
            if self.deepspeed:
                grad_norm, outcome = self.updates.after_deepspeed_step(self.model, skipped_before)
            else:
                grad_norm, outcome = self.updates.step(self.model, self.optimizer)
        if outcome == "stepped":
            self._update_ema()
        elif outcome == "skipped" and not torch.isfinite(grad_norm):  # on every rank: each must have skipped it
            log.warning("rank %d: update of step %d skipped, gradient norm %s", self.accelerator.process_index,
                        self.step + 1, grad_norm.item())  # fmt: skip
        stats = {k: v.detach() for k, v in out.items() if k != "kl_bpd_per_group"}
        stats |= {f"kl_bpd/group_{i:02d}": v for i, v in enumerate(out["kl_bpd_per_group"])}
        stats["grad_norm"] = grad_norm.detach().float()
        # CPU-side times (an update's micro-batches together); fit turns them into the wait fraction.
        self.step_s += time.perf_counter() - started
        stats["data_wait_s"] = torch.tensor(self.data_wait_s, device=grad_norm.device)
        stats["step_s"] = torch.tensor(self.step_s, device=grad_norm.device)
        self.data_wait_s = self.step_s = 0.0
        # Averaged over the log interval: the share of updates skipped for a large or non-finite
        # norm, and (fp16) of steps dropped by the loss scaler for an overflow.
        stats["skip_rate"] = torch.tensor(float(outcome == "skipped"), device=grad_norm.device)
        stats["overflow_rate"] = torch.tensor(float(outcome == "overflow"), device=grad_norm.device)
        return stats

    def roll_back(self) -> None:
        """``train.rollback_after_nonfinite`` non-finite updates in a row: back to the newest
        checkpoint written before they began. Weights, optimizer, EMA, schedule, loss scale and
        the step counter (which the schedule, the KL and EMA warm-ups and checkpoint names read)
        go back; the data position and the random numbers do not: the run goes on with the
        batches after those that diverged, as PaLM did, since replaying them would meet the same
        spike. The same on every rank (the decision comes from all-reduced gradients)."""
        diverged_at = self.step
        newest_allowed = self.updates.begin_rollback(self.step)  # raises after train.max_rollbacks
        path = self._checkpoint_before(newest_allowed)
        module = self.accelerator.unwrap_model(self.model)
        weights, optimizer_state, state = load_checkpoint(path, [name for name, _ in module.named_parameters()])
        module.load_state_dict(weights)
        self.ema.load_state_dict(load_ema(path) or weights)
        load_optimizer_state(self.accelerator, self.model, self.optimizer, optimizer_state)
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("loss_scale") and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["loss_scale"])
        self.step = state["step"]
        message = (f"step {diverged_at}: {self.cfg.train.rollback_after_nonfinite} updates in a row with a non-finite "
                   f"gradient norm; rolled back to {path} (rollback {self.updates.rollbacks} of at most "
                   f"{self.cfg.train.max_rollbacks}), the data going on past the batches that diverged")  # fmt: skip
        if self.is_main:
            log.warning("%s", message)
            self.tracker.log_metrics({"train/rollbacks": self.updates.rollbacks}, diverged_at)
            self.tracker.set_tags({"last_rollback": message})

    def _checkpoint_before(self, step: int) -> Path:
        """The newest whole checkpoint of at most ``step``: this run's, else checkpoint.resume_from."""
        own = [p for p in reversed(list_checkpoints(self.checkpoint_dir))
               if int(CHECKPOINT_DIR.match(p.name)[1]) <= step]  # fmt: skip
        resume_from = [Path(self.cfg.checkpoint.resume_from)] if self.cfg.checkpoint.resume_from else []
        for path in own + resume_from:
            try:
                if verify_checkpoint(path)["step"] <= step:
                    return path
            except CheckpointError as err:
                log.warning("cannot roll back to %s: %s", path, err)
        raise TrainingDiverged(f"{self.cfg.train.rollback_after_nonfinite} updates in a row with a non-finite gradient "
                               f"norm up to step {self.step}, and no whole checkpoint of step {step} or earlier to roll "
                               "back to: lower optim.lr, or checkpoint more often (checkpoint.every)")  # fmt: skip

    def _update_ema(self) -> None:
        module = self.accelerator.unwrap_model(self.model)
        if zero_stage(self.model) == 3:  # each rank holds a slice of every weight: gather them
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(module.parameters())):
                self.ema.update(module, self.step)
        else:
            self.ema.update(module, self.step)

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
        model = self.side_model
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
                self._watch_collapse(report["collapsed_groups"], model.num_groups)
            model.train()
        if self.is_main:
            self.eval_history = record_evaluation(self.eval_history, self.step, self.device_seconds() / 3600, metrics)
            save_history(self.eval_history, self.history_path)
            self.progress.write(f"step {self.step}: held-out {metrics['eval/loss']:.4f} bits/dim "
                       f"(reconstruction {metrics['eval/recon_bpd']:.4f} + KL {metrics['eval/kl_bpd']:.4f}); "
                       f"EMA weights {metrics['eval_ema/loss']:.4f}")
        return metrics

    def _watch_collapse(self, collapsed: list[int], groups: int) -> None:
        """Posterior collapse is watched, not only reported: past ``train.collapse_warning_share``
        of the latent groups without an active unit, the log and the MLflow run say so."""
        share = len(collapsed) / groups
        if share <= self.cfg.train.collapse_warning_share:
            return
        message = (f"step {self.step}: {len(collapsed)} of {groups} latent groups collapsed (no active unit): "
                   f"{collapsed}; more than train.collapse_warning_share={self.cfg.train.collapse_warning_share}. "
                   "Consider objective.kl_warmup_steps or objective.free_bits, or fewer groups")  # fmt: skip
        log.warning(message)
        self.tracker.set_tags({"collapse_warning": message})

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
        if totals[0].item() == 0:  # (the same sum on every rank: all raise) never a made-up 0.0
            raise DataError(f"step {self.step}: the held-out set {self.eval_urls} gave no readable image to evaluate; "
                            "check data.eval_urls and the warnings above")  # fmt: skip
        count = totals[0]
        recon, kl, per_group = totals[1] / count, totals[2] / count, totals[3:] / count
        metrics = {"loss": (recon + kl).item(), "recon_bpd": recon.item(), "kl_bpd": kl.item(), "images": totals[0].item()}
        metrics |= {f"kl_bpd/group_{i:02d}": v for i, v in enumerate(per_group.tolist())}
        metrics = {f"{prefix}/{k}": v for k, v in metrics.items()}
        self.tracker.log_metrics(metrics, self.step)
        return metrics

    def log_images(self) -> None:
        if not self.is_main:
            return
        model = self.side_model
        model.eval()
        real = self._first_heldout_images().to(self.accelerator.device)
        with self.ema.applied(model):
            path = sample_and_reconstruction_grid(model, real, self.run_dir / "images" / f"step_{self.step:06d}.png")
        model.train()
        self.tracker.log_artifact(path, "images")

    # --- outputs -----------------------------------------------------------------------------

    def save(self) -> None:
        if self.saved_step == self.step:  # (same on every rank) e.g. a periodic save, then a stop
            return
        acc = self.accelerator
        # Every rank contributes its own data position and RNG, and under ZeRO its slices of the
        # weights and optimizer state (gathered: a collective); the main process writes.
        per_rank = gather_object([{"data": self.train_batches.state_dict(), "rng": capture_rng(),
                                   "energy_j": self.cost.meter.joules()}])  # fmt: skip
        weights, optimizer_state = full_training_state(acc, self.model, self.optimizer)
        acc.wait_for_everyone()
        if self.is_main:
            state = {
                "world_size": acc.num_processes,
                "strategy": f"deepspeed-zero{zero_stage(self.model)}" if self.deepspeed else str(acc.distributed_type).lower(),
                "skipped_updates": self.updates.skipped,
                "overflow_steps": self.updates.overflows,
                "nonfinite_updates": self.updates.nonfinite,
                "rollbacks": self.updates.rollbacks,
                "loss_scale": acc.scaler.state_dict() if acc.scaler is not None else None,
                "data": [r["data"] for r in per_rank],
                "rng": [r["rng"] for r in per_rank],
                "scheduler": self.scheduler.state_dict(),
                "first_eval": self.first_eval,
                "device_seconds": self.device_seconds(),
                "cost": self.cost.state(self.device_seconds(), None if any(r["energy_j"] is None for r in per_rank)
                                        else sum(r["energy_j"] for r in per_rank)),  # fmt: skip
                "mlflow_run_id": self.tracker.run_id,
                "config": self.cfg.to_dict(),
                "versions": {"torch": torch.__version__, "pipeline": __import__("pipeline").__version__},
            }
            path = save_checkpoint(
                self.checkpoint_dir, self.step, weights, optimizer_state, state,
                keep_last=self.cfg.checkpoint.keep_last,
                model_metadata={"model_config": json.dumps(dataclasses.asdict(self.cfg.model))},
                ema_state=self.ema.state_dict(),
            )
            log.info("saved %s", path)
        acc.wait_for_everyone()
        self.saved_step = self.step

    @contextmanager
    def _side_work(self) -> Iterator[None]:
        """Evaluation, images and reports: on a model with the full weights (``self.side_model``)
        and with their own random numbers, so that how often one evaluates never changes the
        noise, hence the weights, of training.

        Under ZeRO-3 every process holds a slice of each weight and the engine's hooks gather
        them in every forward pass, a collective that the main process's image grids and report
        (run on it alone) would hang in. There, the weights are gathered once into a plain copy.
        """
        devices = [self.accelerator.device] if self.accelerator.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            module = self.accelerator.unwrap_model(self.model)
            if zero_stage(self.model) == 3:
                import deepspeed

                with deepspeed.zero.GatheredParameters(list(module.parameters())):
                    full = {k: v.detach().clone() for k, v in module.state_dict().items()}
                module = VAE(self.cfg.model).to(self.accelerator.device)
                module.load_state_dict(full)
            self.side_model = module
            try:
                yield
            finally:
                self.side_model = None

    def device_seconds(self) -> float:
        return self.device_seconds_before + (time.perf_counter() - self.started) * self.accelerator.num_processes

    def write_eval_report(self) -> dict[str, Any] | None:
        """The final report (EMA weights, importance-weighted bound, the four VAE problems) and its
        figure, under <run_dir>/eval/final and in MLflow; returned on the main process."""
        if not self.is_main:
            return None
        model = self.side_model
        with self.ema.applied(model):
            report = evaluate(model, self.eval_loader, iw_samples=self.cfg.train.final_iw_samples,
                              max_images=self.cfg.train.eval_batches * self.cfg.data.batch_size,
                              device=self.accelerator.device)  # fmt: skip
            model.train()
        directory = self.run_dir / "eval" / "final"
        directory.mkdir(parents=True, exist_ok=True)
        report = {"step": self.step, "weights": "ema", **report}
        (directory / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        plot_report(report, directory / "figure.png")
        self.tracker.log_metrics(flat_metrics(report, "final_ema"), self.step)
        self.tracker.log_artifact(directory, "eval/final")
        return report

    def training_facts(self, report: dict[str, Any] | None) -> dict[str, Any]:
        """What the encoder's model card says about the run that trained it."""
        cfg, acc = self.cfg, self.accelerator
        urls = self.train_urls
        # The manifest split the training URLs were read through (the same lookup as the input statistics').
        manifest, _, split = next(iter(manifest_splits(urls, StreamOptions.from_config(cfg.data))), "").rpartition("#")
        counts = [s.samples for s in self.train_batches.dataset.shards]
        secrets = secret_values()  # a token expanded into a pipe: URL must not reach the card
        urls = [mask_text(u, secrets) for u in urls] if isinstance(urls, list) else mask_text(urls, secrets)
        manifest = mask_text(manifest, secrets)
        cost = self.final_cost or {}
        return {
            "train_urls": urls, "manifest": manifest or None, "split": split or None,
            "train_samples": None if None in counts else sum(counts),
            "steps": self.step, "batch_size": cfg.data.batch_size, "grad_accum_steps": cfg.train.grad_accum_steps,
            "processes": acc.num_processes, "device_type": acc.device.type,
            "device_hours": self.device_seconds() / 3600, "weights": "ema",
            "flops_per_image": cost.get("flops_per_image"), "energy_j": cost.get("energy_j"),
            "energy_source": cost.get("energy_source"),
            "report": report,
        }  # fmt: skip

    def export_encoder(self, report: dict[str, Any] | None = None) -> None:
        if not self.is_main:
            return
        directory = self.run_dir / "encoder"
        model = self.side_model
        with self.ema.applied(model):  # the averaged weights are the better encoder
            Encoder.from_vae(model).save_pretrained(directory, training=self.training_facts(report))
        self.tracker.log_artifact(directory, "encoder")
        log.info("exported the encoder to %s", directory)

    def close(self, status: str = "FINISHED") -> None:
        self.tracker.close(status)
