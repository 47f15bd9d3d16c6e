"""Peer: StarDist 2D (stardist 0.9.2, tensorflow-cpu 2.21) from random init with its default Config2D for the channel
count (32 rays, grid 2x2, 256 px patches, batch 4, Adam 3e-4 with its ReduceLROnPlateau), its example augmenter
(flips, 90-degree turns, intensity jitter), trained until the wall-clock budget (counted from this script's start)
less THRESHOLD_SHARE of it, in which its examples' optimize_thresholds picks the probability and NMS thresholds on up
to THRESHOLD_IMAGES training images (never the validation images; in a child process the budget stops, keeping its
default thresholds), then predict_instances on the validation images, written as uint16 PNGs.

    /tmp/stardist-venv/bin/python peers/stardist_2d.py DATA OUT SECONDS [--seed N]

DATA/images/{train,val}/*.png and DATA/masks_instance/{train,val}/*.png (uint16 ids), as fetch_real_data.py writes.
Prints one JSON line: steps, threads, precision, training seconds.
"""

import json
import os
import random
import subprocess
import sys
import time

import numpy as np
from peer_common import is_rgb, load_split, peer_args, write_labels

t_start = time.time()
THRESHOLD_SHARE = 0.1  # of the budget, kept for optimize_thresholds (its examples' last training step)
THRESHOLD_IMAGES = 4
args = peer_args(thresholds_only=True)

import tensorflow as tf  # noqa: E402
from csbdeep.utils import normalize  # noqa: E402
from stardist import fill_label_holes  # noqa: E402
from stardist.models import Config2D, StarDist2D  # noqa: E402

random.seed(args.seed)
np.random.seed(args.seed)
tf.random.set_seed(args.seed)


RGB = is_rgb(args.data)


def load(split: str):
    """The split normalised to its 1-99.8 percentiles (StarDist's examples), holes in the labels filled."""
    images, labels, names = load_split(args.data, split, "RGB" if RGB else "L")
    return [normalize(x, 1, 99.8, axis=(0, 1)) for x in images], [fill_label_holes(y) for y in labels], names


X, Y, _ = load("train")
chosen = np.random.default_rng(args.seed).permutation(len(X))[:THRESHOLD_IMAGES]
if args.thresholds_only:  # the child process below: the trained model's thresholds, into its thresholds.json
    StarDist2D(None, name="peer", basedir=args.out).optimize_thresholds([X[i] for i in chosen], [Y[i] for i in chosen])
    raise SystemExit(0)
Xv, _, names = load("val")
config = Config2D(n_channel_in=3 if RGB else 1, train_epochs=100000, train_steps_per_epoch=20, train_tensorboard=False)
model = StarDist2D(config, name="peer", basedir=args.out)


class TimeStop(tf.keras.callbacks.Callback):
    steps = 0

    def on_train_batch_end(self, batch, logs=None):
        TimeStop.steps += 1
        if time.time() - t_start > args.seconds * (1 - THRESHOLD_SHARE):
            self.model.stop_training = True


def augment(x, y):
    """StarDist's example augmenter: a random 90-degree turn and flip, intensity scaled and shifted."""
    turns = np.random.randint(4)
    x, y = np.rot90(x, turns, axes=(0, 1)), np.rot90(y, turns)
    if np.random.rand() < 0.5:
        x, y = np.flip(x, 1), np.flip(y, 1)
    return x * np.random.uniform(0.8, 1.2) + np.random.uniform(-0.1, 0.1), y


model.prepare_for_training()
model.callbacks.append(TimeStop())
model.train(X, Y, validation_data=(X[:1], Y[:1]), augmenter=augment, epochs=100000, steps_per_epoch=20)
# optimize_thresholds runs in a child process that the budget can stop: on a barely trained model the low
# probability thresholds it tries leave so many candidates that NMS runs for hours; stopped, the defaults stay
try:
    left = max(1.0, args.seconds - (time.time() - t_start))
    subprocess.run([sys.executable, *sys.argv, "--thresholds-only"], timeout=left, check=True, capture_output=True)
    model.thresholds = json.loads((args.out / "peer/thresholds.json").read_text())
    chosen_by = "optimize_thresholds"
except subprocess.TimeoutExpired:
    chosen_by = "its defaults: optimize_thresholds did not finish within the budget"
except subprocess.CalledProcessError as err:
    chosen_by = f"its defaults: optimize_thresholds failed ({err.stderr.strip().splitlines()[-1:]})"
trained = time.time() - t_start
predicted = [model.predict_instances(x)[0] for x in Xv]
threads = tf.config.threading.get_intra_op_parallelism_threads() or os.cpu_count()
thresholds = {key: round(float(value), 3) for key, value in model.thresholds._asdict().items()}
summary = {"steps": TimeStop.steps, "threads": threads, "precision": "fp32", "train_s": round(trained)}
write_labels(args.out, names, predicted, summary | {"thresholds": thresholds, "chosen_by": chosen_by})
