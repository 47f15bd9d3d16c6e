"""Pytorch-UNet's own train.py (in the working folder), run as its __main__ runs it for SECONDS, saving the model as
it stands when they end: train.py saves only after a whole epoch, so a budget that ends inside one would otherwise
lose everything since. The alarm reaches this process only (a `timeout` would also kill its loader's workers, whose
deaths its loader reports first); the save has the layout of its epoch checkpoints (the state dict and the dataset's
mask_values), which its predict.py reads. Prints its optimiser steps as JSON.

    python pytorch_unet_budget.py SECONDS [its train.py flags]"""

import json
import runpy
import signal
import sys
from pathlib import Path

import torch
import unet
import utils.data_loading as data_loading
from torch.optim.optimizer import register_optimizer_step_post_hook

BUDGET_END = Path("checkpoints/checkpoint_budget_end.pth")


class BudgetEnded(Exception):
    pass


def stop(signum, frame):
    raise BudgetEnded


def recorded(cls: type, found: list) -> type:
    """cls, whose instances are kept in found (train.py makes its model and dataset inside its __main__ block)."""

    class Recorded(cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            found.append(self)

    Recorded.__name__ = cls.__name__
    return Recorded


def main() -> int:
    models, datasets, steps = [], [], [0]
    unet.UNet = recorded(unet.UNet, models)
    data_loading.BasicDataset = recorded(data_loading.BasicDataset, datasets)
    data_loading.CarvanaDataset = recorded(data_loading.CarvanaDataset, datasets)
    register_optimizer_step_post_hook(lambda *_: steps.__setitem__(0, steps[0] + 1))
    signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, float(sys.argv[1]))
    sys.argv = ["train.py", *sys.argv[2:]]
    try:
        runpy.run_path("train.py", run_name="__main__")
        signal.setitimer(signal.ITIMER_REAL, 0)
    except BudgetEnded:
        if models and datasets and steps[0]:
            state = models[-1].state_dict()
            state["mask_values"] = datasets[-1].mask_values
            BUDGET_END.parent.mkdir(exist_ok=True)
            torch.save(state, BUDGET_END)
    print(json.dumps({"steps": steps[0]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
