"""nnU-Net v2 trainer for the peer comparison: stock nnUNetTrainer (network, loss, augmentation, SGD + poly lr, deep
supervision) trained for a wall-clock budget instead of 1000 epochs x 250 iterations.

Found by nnUNetv2_train / nnUNetv2_predict through the env var nnUNet_extTrainer (a folder that holds only this file;
nnunet_2d.sh copies it there, because nnU-Net imports every module of that folder while it searches).

Env:  PEER_DEADLINE   when training must end (unix time; compare.py's clock: the budget after nnunet_2d.sh started,
                      its conversion, planning and preprocessing inside it); without it, PEER_BUDGET_S:
      PEER_BUDGET_S   training budget in seconds, counted from the start of on_train_start (dataloaders, unpacking and
                      all epochs; not the process start-up, the final checkpoint write or prediction)  [600]
      PEER_ITERS      training iterations per epoch  [25]
      PEER_VAL_ITERS  'pseudo dice' iterations per epoch (fold all: on training cases; logging only)  [1]
      PEER_SUMMARY    where to write a JSON summary of what was trained  [output folder/peer_summary.json]

Budget: training stops after the first iteration that ends past the budget (so it overruns by at most one iteration,
plus the epoch's pseudo-dice iteration and the final checkpoint write); the last epoch is usually cut short. The
poly lr is stepped every iteration (nnU-Net steps it per epoch: in a budget of a few epochs it would hardly leave
its first value): its horizon is the iterations done plus those the time left holds at the mean training iteration
time so far (the first iteration, which carries the warm-up, left out; the first two iterations run at the initial
lr), so the lr decays towards 0 at the end of the budget as it does at the end of a full nnU-Net schedule (1000
epochs x 250 iterations), even where the default plan fits less than one epoch in the budget.
Bookkeeping that does not train is trimmed: no checkpoint_best/latest writes (only checkpoint_final), the progress
plot is drawn once at the end, and the final full-image validation (perform_actual_validation) is skipped, since the
script predicts the validation images and score_masks.py scores them.
"""

import json
import os
from time import time

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

CUDA = torch.device("cuda")  # nnUNetTrainer's own default


class nnUNetTrainer_PeerBudget(nnUNetTrainer):
    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = CUDA,
    ):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.budget_s = float(os.environ.get("PEER_BUDGET_S", "600"))
        self.num_iterations_per_epoch = int(os.environ.get("PEER_ITERS", "25"))
        self.num_val_iterations_per_epoch = max(1, int(os.environ.get("PEER_VAL_ITERS", "1")))
        self.num_epochs = 10**6  # replaced by the budget estimate after the first epoch
        self.save_every = 10**9
        self._t0 = None
        self._epoch_times = []
        self._iters_done = 0
        self._iteration_times = []  # seconds of each training iteration
        self._plot = None

    # ---- time budget -------------------------------------------------------------------------------------------
    def _elapsed(self) -> float:
        return time() - self._t0

    def on_train_start(self):
        self._t0 = time()
        if os.environ.get("PEER_DEADLINE"):
            self.budget_s = float(os.environ["PEER_DEADLINE"]) - self._t0
        super().on_train_start()
        # draw the progress plot once at the end instead of after every epoch
        self._plot = self.logger.plot_progress_png
        self.logger.plot_progress_png = lambda *a, **k: None

    def on_epoch_start(self):
        self._epoch_t0 = time()
        super().on_epoch_start()

    def on_epoch_end(self):
        super().on_epoch_end()  # increments self.current_epoch
        self._epoch_times.append(time() - self._epoch_t0)
        done = self.current_epoch
        times = self._epoch_times[1:] if len(self._epoch_times) > 1 else self._epoch_times
        per_epoch = float(np.mean(times))
        remaining = self.budget_s - self._elapsed()
        more = int(np.ceil(remaining / per_epoch)) if remaining > 0 else 0
        self.num_epochs = done + more
        self.print_to_log_file(
            f"peer budget: {self._elapsed():.1f}/{self.budget_s:.0f} s used, "
            f"{per_epoch:.1f} s/epoch, planned epochs {self.num_epochs}"
        )

    def run_training(self):
        # nnUNetTrainer.run_training with a loop that re-reads num_epochs (range() would freeze it) and a hard stop
        # inside an epoch once the budget is spent
        self.on_train_start()
        while self.current_epoch < self.num_epochs:
            self.on_epoch_start()

            self.on_train_epoch_start()
            train_outputs = []
            for _batch_id in range(self.num_iterations_per_epoch):
                self._step_lr()
                started = time()
                train_outputs.append(self.train_step(next(self.dataloader_train)))
                self._iteration_times.append(time() - started)
                self._iters_done += 1
                if self._elapsed() > self.budget_s:
                    break
            self.on_train_epoch_end(train_outputs)

            with torch.no_grad():
                self.on_validation_epoch_start()
                val_outputs = []
                for _batch_id in range(self.num_val_iterations_per_epoch):
                    val_outputs.append(self.validation_step(next(self.dataloader_val)))
                self.on_validation_epoch_end(val_outputs)

            self.on_epoch_end()
            if self._elapsed() > self.budget_s:
                break
        train_s = self._elapsed()
        self.on_train_end()
        if self._plot is not None:
            self.logger.plot_progress_png = self._plot
            self._plot(self.output_folder)
        summary = {
            "epochs": int(self.current_epoch),
            "iterations_per_epoch": int(self.num_iterations_per_epoch),
            "iterations": int(self._iters_done),
            "batch_size": int(self.batch_size),
            "patch_size": [int(i) for i in self.configuration_manager.patch_size],
            "train_seconds": round(train_s, 1),
            "budget_seconds": self.budget_s,
            "epoch_seconds": [round(t, 2) for t in self._epoch_times],
            "final_lr": float(self.optimizer.param_groups[0]["lr"]),
            "device": str(self.device),
            "torch_threads": torch.get_num_threads(),
        }
        with open(os.environ.get("PEER_SUMMARY", os.path.join(self.output_folder, "peer_summary.json")), "w") as f:
            json.dump(summary, f, indent=1)

    def _step_lr(self) -> None:
        """The poly lr at this iteration, over the iterations expected to fit (the first two at the initial lr)."""
        if len(self._iteration_times) < 2:
            return
        left = max(0.0, self.budget_s - self._elapsed())
        horizon = self._iters_done + max(1, int(left / float(np.mean(self._iteration_times[1:]))))
        self.lr_scheduler.max_steps = horizon
        self.lr_scheduler.step(self._iters_done)

    # ---- trimmed bookkeeping ------------------------------------------------------------------------------------
    def save_checkpoint(self, filename: str) -> None:
        if os.path.basename(filename) == "checkpoint_final.pth":
            super().save_checkpoint(filename)

    def perform_actual_validation(self, save_probabilities: bool = False):
        self.print_to_log_file(
            "peer: final validation skipped (nnunet_2d.sh predicts the validation images; score_masks.py scores them)"
        )
