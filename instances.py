"""Objects, not just pixels: what an instance-id image becomes for training (a separation map beside the class
map), and back, the model's class and separation maps -> one id per object (seeded watershed, scikit-image), and
each object's class and measurements.

Two separations, as the strong tools draw them for a U-Net: "distance", each object's distance to its own edge
divided by its largest (1 at its centre, falling to 0 at its edge: the "cell distance" of the Cell Tracking
Challenge's U-Net entries), seeds where it is high; "boundary", the pixels of each object that touch another object
or the background (nnU-Net's border class), seeds where the foreground is not boundary. Either way the watershed
grows the seeds over the foreground the class map gives, so two objects that touch get two ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image
from scipy import ndimage
from skimage.measure import label, regionprops_table
from skimage.segmentation import find_boundaries, relabel_sequential, watershed

from files import replace_atomically

SEPARATIONS = ("distance", "boundary")
DEFAULT_SEPARATION = "boundary"  # chosen by measurement (docs/results.md)
SEPARATION_CHANNELS = 1  # the separation head's outputs beside the class logits
SEPARATION_LEVELS = 254  # a training sample carries its separation map as uint8 0..254 (255: ignored)
DISTANCE_SEED, BOUNDARY_SEED = 0.4, 0.3  # seeds: the distance map above, the boundary map below (ObjectRule)
SIZE_SAMPLE = 200  # training instance masks read for the smallest object kept
FRAGMENT_SHARE = 0.25  # objects under this share of the 5th percentile of training objects' areas are fragments


@dataclass(frozen=True)
class ObjectRule:
    """How the separation map becomes objects: the seed threshold (distance: the map above it; boundary: the
    foreground where the map is below it) and the smallest object kept, in pixels."""

    separation: str
    seed_threshold: float
    min_size: int

    @classmethod
    def for_separation(cls, separation: str, areas: np.ndarray) -> ObjectRule:
        """The defaults (docs/results.md): distance seeds where the map passes DISTANCE_SEED, boundary seeds where it
        stays under BOUNDARY_SEED; the smallest object kept from the training objects' areas (smallest_object)."""
        seed = DISTANCE_SEED if separation == "distance" else BOUNDARY_SEED
        return cls(separation, seed, smallest_object(areas))

    def to_dict(self) -> dict:
        return {"separation": self.separation, "seed_threshold": self.seed_threshold, "min_size": self.min_size}

    @classmethod
    def from_dict(cls, data: dict) -> ObjectRule:
        return cls(str(data["separation"]), float(data["seed_threshold"]), int(data["min_size"]))


def smallest_object(areas: np.ndarray) -> int:
    """The smallest object worth keeping: FRAGMENT_SHARE of the 5th percentile of the training objects' areas (in
    pixels), so a size rule follows the data (a nucleus, a grain, a cell) instead of one number for all."""
    return max(1, round(FRAGMENT_SHARE * float(np.percentile(areas, 5)))) if len(areas) else 1


def object_areas(ids: np.ndarray) -> np.ndarray:
    """Each object's area in pixels."""
    counts = np.bincount(sequential_ids(ids).ravel())[1:]
    return counts[counts > 0]


def sequential_ids(ids: np.ndarray) -> np.ndarray:
    """ids renumbered 1..N in the order of their values, 0 kept for the background (int32)."""
    return relabel_sequential(ids.astype(np.int64, copy=False))[0].astype(np.int32)


def object_distance(ids: np.ndarray) -> np.ndarray:
    """Each object pixel's distance to the nearest pixel of any other id (the background included) divided by the
    object's largest: 1 at its centre, small at its edge, 0 outside objects. Computed object by object within its
    box, so objects that touch each have their own edge."""
    ids = sequential_ids(ids)
    out = np.zeros(ids.shape, np.float32)
    for index, box in enumerate(ndimage.find_objects(ids), 1):
        if box is None:
            continue
        grown = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in box)  # a pixel of the edge around the box
        inside = ids[grown] == index
        distance = ndimage.distance_transform_edt(np.pad(inside, 1))[1:-1, 1:-1]  # padding: the image edge is an edge
        out[grown][inside] = distance[inside] / distance.max()
    return out


def object_boundaries(ids: np.ndarray) -> np.ndarray:
    """1.0 on the pixels of each object that touch another id (another object or the background), else 0."""
    return find_boundaries(ids, connectivity=1, mode="inner").astype(np.float32)


def separation_target(ids: np.ndarray, separation: str) -> np.ndarray:
    """What the separation head learns to predict from an instance-id image (float32 in 0..1)."""
    if separation == "distance":
        return object_distance(ids)
    if separation == "boundary":
        return object_boundaries(ids)
    raise ValueError(f"unknown separation {separation!r}; choose one of {', '.join(SEPARATIONS)}")


def objects_from(foreground: np.ndarray, separation_map: np.ndarray, rule: ObjectRule) -> np.ndarray:
    """The model's foreground (H, W) bool and separation map (H, W) float in 0..1 -> object ids (int32, 0 outside
    objects, 1..N). Seeds are the connected components of the map's confident part; the watershed grows them over
    the foreground. A piece of foreground that holds no seed becomes an object of its own (nothing is dropped
    for want of a seed); objects under rule.min_size pixels are dropped."""
    if rule.separation == "distance":
        seeds, elevation = foreground & (separation_map > rule.seed_threshold), -separation_map
    else:
        seeds, elevation = foreground & (separation_map < rule.seed_threshold), separation_map
    markers = label(seeds, connectivity=1)
    ids = watershed(elevation, markers, mask=foreground) if markers.any() else np.zeros(foreground.shape, np.int32)
    unseeded = label(foreground & (ids == 0), connectivity=1)
    ids = np.where(unseeded > 0, unseeded + ids.max(), ids)
    if rule.min_size > 1:
        sizes = np.bincount(ids.ravel())
        ids[(sizes < rule.min_size)[ids]] = 0
    return sequential_ids(ids)


def object_classes(ids: np.ndarray, classes: np.ndarray, num_classes: int) -> np.ndarray:
    """Each object's class (index 1..N-1 of the model's classes): the one most of its pixels have, background
    left out; (N + 1,) with entry 0 for the background."""
    pairs = ids.ravel().astype(np.int64) * num_classes + classes.ravel()
    counts = np.bincount(pairs, minlength=(int(ids.max()) + 1) * num_classes).reshape(-1, num_classes)
    counts[:, 0] = -1  # an object is foreground: its class is the most frequent of the others
    found = counts.argmax(1)
    found[0] = 0
    return found


def object_table(
    ids: np.ndarray, classes: np.ndarray, image: np.ndarray, confidence: np.ndarray, class_names: list[str]
) -> list[dict]:
    """One row per object: id, class (its name), area in pixels, centroid, bounding box (top, left, bottom, right;
    bottom and right exclusive), equivalent diameter, mean intensity per channel of the image as read, and the
    model's mean confidence (its foreground probability) over the object."""
    if not ids.any():
        return []
    image = image if image.ndim == 3 else image[..., None]
    props = regionprops_table(
        ids,
        intensity_image=np.dstack([image.astype(np.float32), confidence[..., None]]),
        properties=("label", "area", "centroid", "bbox", "equivalent_diameter_area", "intensity_mean"),
    )
    per_object = object_classes(ids, classes, len(class_names))
    channels = image.shape[2]
    rows = []
    for k, index in enumerate(props["label"]):
        row = {
            "id": int(index),
            "class": class_names[per_object[index]],
            "area": int(props["area"][k]),
            "centroid_y": round(float(props["centroid-0"][k]), 2),
            "centroid_x": round(float(props["centroid-1"][k]), 2),
            "bbox_top": int(props["bbox-0"][k]),
            "bbox_left": int(props["bbox-1"][k]),
            "bbox_bottom": int(props["bbox-2"][k]),
            "bbox_right": int(props["bbox-3"][k]),
            "equivalent_diameter": round(float(props["equivalent_diameter_area"][k]), 2),
        }
        row.update({f"mean_intensity_{c}": round(float(props[f"intensity_mean-{c}"][k]), 4) for c in range(channels)})
        row["confidence"] = round(float(props[f"intensity_mean-{channels}"][k]), 4)
        rows.append(row)
    return rows


PNG_IDS = 2**16 - 1  # more objects than this in one image: a 32-bit TIFF


def write_instance_mask(ids: np.ndarray, path: Path) -> Path:
    """ids as a 16-bit PNG at path, or past PNG_IDS objects a 32-bit TIFF beside it (path with .tif); returns the
    file written."""
    path = path.with_suffix(".png" if ids.max(initial=0) <= PNG_IDS else ".tif")
    with replace_atomically(path) as tmp:
        if path.suffix == ".png":
            Image.fromarray(ids.astype(np.uint16)).save(tmp, format="PNG")
        else:
            tifffile.imwrite(tmp, ids.astype(np.int32), compression="zlib")
    return path
