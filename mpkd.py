"""Multi-Part Knowledge Distillation (MPKD) for colorectal cancer histology: the functional core.

A MixNet-L teacher is trained and its logits on the training set are stored every few epochs (the
*stored epochs*). A MixNet-S student is then trained with cross-entropy plus a temperature-softened
KD term whose target follows the stored teacher logits interval by interval: with 50 student epochs
and logits stored at teacher epochs 5, 10, ..., 50, student epochs 0-4 learn from the teacher at
epoch 5, epochs 5-9 from epoch 10, and so on. Vanilla KD uses only the final teacher.

Five scripts wrap this module, one job each, and import nothing of each other: `train_teacher.py`
and `distill.py` train, `evaluate.py` scores checkpoints on labelled tiles (Table II), `predict.py`
classifies unlabelled pixels (a folder of tiles, large images, whole slides) and `export.py` writes
the deployable ONNX file. A user who copies one script and this file has everything it needs.
This module holds the method and what more than one script needs; sections, top to bottom: the
method (KD loss, schedule, the stored logits), models, data, stain, training, checkpoints, tiles at
another scale, and last the run machinery (settings checks, atomic files, resumable state).
"""

import argparse
import contextlib
import csv
import hashlib
import io
import json
import math
import multiprocessing
import os
import random
import re
import shutil
import socket
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing  # noqa: F401  (shares tensors with worker processes)
import torch.nn.functional as F
from PIL import Image

DEFAULT_DATA = "data/Kather_texture_2016_image_tiles_5000"
KATHER_URL = "https://zenodo.org/record/53169/files/Kather_texture_2016_image_tiles_5000.zip"
KATHER_MD5 = "0ddbebfc56344752028fda72602aaade"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp")
UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)  # what PIL raises for a bad file
IGNORED_NAMES = ("__MACOSX",)  # besides every path component that starts with a dot
SLIDE_PATTERN = re.compile(r"CRC-Prim-HE-\d+")  # Kather 2016 names carry their source slide
NETWORK_NAMES = {"mixnet_s": "MixNet-S", "mixnet_m": "MixNet-M", "mixnet_l": "MixNet-L"}
CHECKPOINT_FORMAT = "mpkd-checkpoint/2"  # a checkpoint is a model file and nothing else
LOGITS_FORMAT = "mpkd-teacher-logits/2"  # the stored teacher logits, keyed by stored epoch
STATE_FORMAT = "mpkd-state/2"
ONNX_FORMAT = "mpkd-onnx/1"  # the metadata of export.py's files, which predict.py reads
METHODS = {"teacher": "teacher", "alone": "student alone", "vanilla": "vanilla KD",  # key: Table II's row,
           "multipart": "Multi-Part KD", "auto": "Multi-Part KD, auto anchors",  # in Table II's order, and
           "ensemble": "snapshot ensemble KD"}  # those of --anchors auto and --ensemble
RESUME_FREE_ARGS = ("resume", "device", "compile")  # may change between a run and its resume


class UserError(Exception):
    """A mistake in the inputs: the scripts print it as one line on stderr and exit with status 2."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during training: the state of the last completed epoch is kept for --resume."""


# ----------------------------------------------------------------------------------------------
# The method, to copy into your own training loop: torch and math, nothing else of this file needed
# (docs/own-loop.md shows them in a DataLoader loop). The KD loss (Hinton et al. 2015; the paper's
# eq. 3 and 4); the schedule that decides which stored teacher epoch the student follows in each of
# its epochs (Multi-Part KD); the teacher's logits as they are stored (eval mode); and the lookup of
# a batch's stored teacher logits by the images' indices in the dataset.


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
            temperature: float, distill_weight: float, weights: torch.Tensor | None = None) -> torch.Tensor:
    """(1 - w) * CE(labels, S) + w * T^2 * KL(P_T || softmax(student / T)); a scalar.

    The target P_T is the teacher's softened distribution softmax(teacher / T), teacher logits
    (B, C); or, for teacher logits (B, M, C) of M teachers (a snapshot ensemble), the mean of their
    M softened distributions, each member weighing alike (distill.py --ensemble) or as `weights`
    (M,) say (normalised to sum 1; for a variant that weighs the stored epochs, not used by the
    scripts). Student logits (B, C), labels (B,). Both terms are batch means (KL with
    reduction="batchmean", computed from log-probabilities with log_target=True, which is stable
    for small probabilities). The paper's eq. (3) softens both networks with temperature T
    and eq. (4) adds lambda * H(T, S) to the cross-entropy; H(T, S) and KL(T || S) differ by the
    teacher's entropy, a constant for the student, so the gradients agree. The T^2 factor (keeping
    the soft term's gradient scale independent of T) and the (1 - w) weighting with the paper's
    "distill weight 0.5" follow Hinton et al. (2015). w = 0 is plain cross-entropy and ignores
    `teacher_logits`.

    An ensemble averages distributions, not logits: the mean of the members' logits is a product
    of their distributions (their agreement, sharpened), and it is ruled by the members with the
    largest logits (the late epochs), whereas the mean distribution is what the ensemble predicts.
    One member gives exactly the single-teacher loss.
    """
    ce = F.cross_entropy(student_logits.float(), labels)
    if distill_weight == 0:
        return ce
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teachers = teacher_logits.float() if teacher_logits.dim() == 3 else teacher_logits.float()[:, None]  # (B, M, C)
    log_p = F.log_softmax(teachers / temperature, dim=-1)  # (B, M, C)
    # log of the (weighted) mean of the M softened distributions, from log-probabilities: log P_T (B, C)
    if weights is None:
        log_t = torch.logsumexp(log_p, dim=1) - math.log(teachers.shape[1])
    else:
        log_t = torch.logsumexp(log_p + (weights / weights.sum()).log().to(log_p)[:, None], dim=1)
    kl = F.kl_div(log_s, log_t, reduction="batchmean", log_target=True)
    return (1 - distill_weight) * ce + distill_weight * temperature**2 * kl


def teacher_schedule(student_epochs: int, stored_epochs: list[int]) -> list[int]:
    """For every student epoch e (0-based), the stored teacher epoch whose logits are its target.

    Stored epoch k is the teacher after k completed epochs, counted from 1 (the paper's "teacher at
    epoch 5" has trained five epochs). With E student epochs and K stored epochs (ascending), epoch
    e follows stored epoch number ceil((e + 1) * K / E) - 1: intervals as even as possible, the last
    student epoch always learns from the final teacher, and only stored epochs are returned. 50
    epochs over [5, 10, ..., 50] gives [5] * 5 + [10] * 5 + ... + [50] * 5, the paper's schedule.
    """
    stored = sorted(set(stored_epochs))
    if student_epochs <= 0 or not stored:
        raise ValueError("need at least one student epoch and one stored teacher epoch")
    k = len(stored)
    return [stored[-((-(e + 1) * k) // student_epochs) - 1] for e in range(student_epochs)]


@torch.no_grad()
def eval_logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """model(x) in eval mode (BatchNorm's running statistics, no dropout), without gradients: the
    logits (B, C) of a batch, as the teacher's are stored. The model's own train/eval mode is
    restored afterwards, whichever it was."""
    was_training = model.training
    model.eval()
    try:
        return model(x)
    finally:
        model.train(was_training)


def stored_logits(stored: torch.Tensor, index: torch.Tensor, view: torch.Tensor | None = None) -> torch.Tensor:
    """A batch's stored teacher logits (B, C): rows `index` (B,) of `stored`, where row i belongs to
    image i of the dataset in the dataset's own order (a shuffling DataLoader changes the batches,
    not that order, so a dataset that returns each image's index finds its row). `stored` is (N, C),
    or (N, V, C) with one row per view of every image (this project: 0 plain, 1 mirrored), and then
    `view` (B,) says which view each image of the batch was shown in."""
    return stored[index] if view is None else stored[index, view]


# The rest of the method as this project runs it: softened targets, how little a stored epoch
# teaches, and the key of each method (its Table II row). Choosing and following anchors, and the
# route, are distill.py's alone.


def soften(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(logits / T) over the class dimension: (B, C) -> (B, C)."""
    return F.softmax(logits / temperature, dim=-1)


NEAR_UNIFORM = 0.85  # above it, stored targets came from near-chance teacher epochs (docs/own-loop.md)


def target_uniformity(logits: torch.Tensor, temperature: float) -> float:
    """How little stored teacher logits (..., C) teach at temperature T: the mean entropy of
    softmax(logits / T) over their rows, divided by log C (1: uniform targets, 0: one-hot). A
    teacher trained from scratch starts near 1, a pretrained one well below."""
    p = soften(logits.float(), temperature)
    return float(-(p * p.clamp_min(1e-12).log()).sum(-1).mean() / math.log(p.shape[-1]))


def method_name(key: str, ensemble: list[int] | None = None, stain_augment: float | None = None) -> str:
    """A method's Table II row for display: its name, an ensemble's epochs, and a mark where the
    model trained with stain augmentation (so that it is never averaged with the paper's rows)."""
    epochs = f" (epochs {', '.join(map(str, ensemble))})" if key == "ensemble" else ""
    return METHODS[key] + epochs + (", stain-augmented" if stain_augment else "")


# ----------------------------------------------------------------------------------------------
# Models


def build_mixnet(name: str, num_classes: int, pretrained: bool, weights: str | Path | None = None
                 ) -> torch.nn.Module:
    """timm's `name` (mixnet_s, mixnet_l, ...) with a `num_classes` head, starting from ImageNet
    weights if asked: from the file `weights` when given, else from timm's cache or its hub."""
    import timm  # here, where a network is built: `import mpkd` stays light (a test counts its modules)

    if not timm.is_model(name):
        raise UserError(f"--model {name} is not a timm model (the paper uses mixnet_l and mixnet_s)")
    if weights is None and pretrained:  # cached: no network needed, and no retries against a hub that cannot answer
        weights = _cached_weights(name)
    if weights is not None:
        return load_imagenet_weights(timm.create_model(name, num_classes=num_classes), weights, name)
    if not pretrained:
        return timm.create_model(name, pretrained=False, num_classes=num_classes)
    ways_out = (f"pass --weights FILE (a state dict or .safetensors of timm's {name} ImageNet "
                f"weights), or --no-pretrained to train from scratch")
    if not _hub_reachable():  # offline: say so now rather than after a minute of download retries
        raise UserError(f"ImageNet weights for {name} are not cached and the Hugging Face hub cannot "
                        f"be reached; {ways_out}")
    try:
        return timm.create_model(name, pretrained=True, num_classes=num_classes)
    except Exception as err:  # only the weight download can fail here: hub down, proxy, quota
        raise UserError(f"could not fetch ImageNet weights for {name} ({type(err).__name__}); {ways_out}") from None


def _cached_weights(name: str) -> str | None:
    """The file of `name`'s default pretrained weights in the Hugging Face cache, if it is there."""
    try:
        import timm
        from huggingface_hub import try_to_load_from_cache
        hub_id = timm.models.get_pretrained_cfg(name).hf_hub_id
    except (ImportError, AttributeError, RuntimeError):
        return None
    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(hub_id, filename) if hub_id else None
        if isinstance(found, str):
            return found
    return None


def _hub_reachable(seconds: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection within `seconds`."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return False
    return _reachable(re.sub(r"^https?://", "", os.environ.get("HF_ENDPOINT", "https://huggingface.co")).split("/")[0],
                      seconds)


def _reachable(host: str, seconds: float = 3.0) -> bool:
    """Whether `host` ('name' or 'name:port'; port 443 by default) answers a TCP connection in `seconds`."""
    name, _, port = host.partition(":")
    try:
        socket.create_connection((name, int(port or 443)), timeout=seconds).close()
        return True
    except OSError:
        return False


def load_imagenet_weights(model: torch.nn.Module, path: str | Path, name: str) -> torch.nn.Module:
    """Load ImageNet weights for `model` from a torch.save state dict (weights_only: no pickled code
    runs) or a .safetensors file, as timm publishes them. Their classifier (1000 ImageNet classes)
    is dropped and the model keeps its own new head, as timm does for its own pretrained weights;
    every other tensor must fit, or the file belongs to another network."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--weights {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file  # installed with timm
        except ImportError:
            raise UserError(f"--weights {path} needs the safetensors package: pip install safetensors") from None
    try:
        state = (load_file(str(path)) if path.suffix == ".safetensors"
                 else torch.load(path, map_location="cpu", weights_only=True))
    except Exception as err:  # truncated, not a tensor file, or a pickle that would run code
        raise UserError(f"--weights {path} is not a state dict or safetensors file "
                        f"({type(err).__name__})") from None
    for key in ("state_dict", "model", "state_dict_ema"):  # training checkpoints wrap the weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"--weights {path} holds no state dict of tensors")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    head = model.pretrained_cfg.get("classifier", "classifier")
    own = model.state_dict()
    body = {k: v for k, v in state.items() if not k.startswith(head + ".")}
    missing = [k for k in own if not k.startswith(head + ".") and k not in body
               and not k.endswith("num_batches_tracked")]
    foreign = [k for k in body if k not in own or own[k].shape != body[k].shape]
    if missing or foreign:
        example = (foreign or missing)[0]
        raise UserError(f"--weights {path} does not fit {name}: {len(missing)} of its tensors missing, "
                        f"{len(foreign)} unknown or of another shape (e.g. {example}); are they the "
                        f"weights of another network?")
    model.load_state_dict(body, strict=False)  # the head keeps its fresh initialisation
    return model


def count_params(model: torch.nn.Module) -> int:
    """Number of parameters (buffers such as BatchNorm statistics excluded, as in the paper)."""
    return sum(p.numel() for p in model.parameters())


def model_size_mb(model: torch.nn.Module) -> float:
    """fp32 parameter bytes / 1e6: MixNet-S 10.44 MB and MixNet-L 23.218 MB with 8 classes."""
    return count_params(model) * 4 / 1e6


def network_name(name: str) -> str:
    """Table II's spelling of a timm model name."""
    return NETWORK_NAMES.get(name, name)


# ----------------------------------------------------------------------------------------------
# Data: a folder of class folders, decoded once into one uint8 tensor; flips and normalisation
# happen batch by batch on the training device.


def fetch_zip(root: str | Path, url: str, md5: str, page: str, or_else: str = "") -> None:
    """Download a data set's zip from `url` into the folder above `root`, check its md5 and unpack it
    so that `root` exists. Offline it stops at once, naming the file and where to unpack it, and
    `or_else` (", or pass --data DIR") at the end of every message."""
    from torchvision.datasets.utils import download_and_extract_archive

    root, name = Path(root), url.rsplit("/", 1)[-1]
    get_it = f"get {name} from {page} and unpack it into {root.parent}{or_else}"
    host = re.sub(r"^\w+://", "", url).split("/")[0]
    if url.startswith("http") and not _reachable(host):
        raise UserError(f"{root} is missing and {host} cannot be reached; {get_it}")
    try:
        download_and_extract_archive(url, download_root=root.parent, md5=md5)
    except Exception as err:  # a proxy, a bad md5, a broken zip: all end the same way for the user
        raise UserError(f"{root} is missing and the download failed ({type(err).__name__}: {err}); "
                        f"{get_it}") from None
    if not root.is_dir():
        raise UserError(f"the downloaded {name} did not unpack to {root}; {get_it}")


def ignored(relative: str | Path) -> bool:
    """True for paths no one means as data: any component that starts with a dot (.DS_Store,
    .ipynb_checkpoints/) and macOS zip debris (__MACOSX/)."""
    return any(part.startswith(".") or part in IGNORED_NAMES for part in Path(relative).parts)


def list_images(folder: str | Path) -> list[str]:
    """Image files under `folder` at any depth, as sorted paths relative to it; ignored paths skipped."""
    folder = Path(folder)
    found = (p.relative_to(folder) for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    return sorted(r.as_posix() for r in found if not ignored(r) and (folder / r).is_file())


def find_images(root: str | Path) -> tuple[list[str], list[int], list[str]]:
    """Image paths relative to `root`, their labels and the sorted class names (one per folder)."""
    root = Path(root)
    if not root.exists():
        raise UserError(f"data folder {root} does not exist")
    if not root.is_dir():
        raise UserError(f"data path {root} is not a folder")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not ignored(d.name))
    if len(classes) < 2:
        raise UserError(f"{root} must hold at least two class folders (<class>/<image>), found {len(classes)}")
    files, labels = [], []
    for label, name in enumerate(classes):
        found = list_images(root / name)
        if not found:
            hidden = any(p.suffix.lower() in IMAGE_SUFFIXES for p in (root / name).rglob("*"))
            why = "only hidden or __MACOSX images, which are ignored" if hidden else "no images"
            raise UserError(f"class folder {root / name} holds {why} ({' '.join(IMAGE_SUFFIXES)})")
        files += [f"{name}/{f}" for f in found]
        labels += [label] * len(found)
    return files, labels, classes


def model_input(img: Image.Image, size: int) -> np.ndarray:
    """An image as the network sees it, uint8 (3, size, size): RGB, resized with PIL bilinear (which
    antialiases when shrinking). Training tiles and tissue-map windows both pass through here."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    return np.asarray(img).transpose(2, 0, 1)


def _decode_into(job: tuple) -> list[tuple[str, str]]:
    """Decode files into `out` (a (n, 3, size, size) uint8 tensor, shared with the parent process
    when this runs in a worker); returns the files that failed, with the reason (rows stay zero)."""
    root, files, out = job
    rows = out.numpy()  # numpy only from here: torch's thread pools must not run in a forked worker
    size, bad = rows.shape[-1], []
    for i, name in enumerate(files):
        try:
            with Image.open(Path(root) / name) as img:
                rows[i] = model_input(img, size)
        except UNREADABLE as err:
            bad.append((name, str(err) or type(err).__name__))
    return bad


def decode_image(path: str | Path, size: int) -> torch.Tensor:
    """One image as a (3, size, size) uint8 tensor: any mode becomes RGB, any size is resized."""
    out = torch.zeros(1, 3, size, size, dtype=torch.uint8)
    if bad := _decode_into((Path(path).parent, [Path(path).name], out)):
        raise UserError(f"cannot decode image {path}: {bad[0][1]}")
    return out[0]


def decode_images(root: str | Path, files: list[str], size: int,
                  progress: "Progress | None" = None) -> tuple[torch.Tensor, dict[str, str]]:
    """Decode `files` into one (N, 3, size, size) uint8 tensor, on all cores for large sets: worker
    processes write chunks straight into shared memory (threads would not help: PIL holds the GIL
    while it decodes), and every image lands in its own row, so the result is the same as decoding
    one by one. Files that cannot be decoded are returned as {file: reason}, their rows left zero.
    `progress` (a Progress over the files) is told of every chunk decoded."""
    out = torch.zeros(len(files), 3, size, size, dtype=torch.uint8)
    chunk = 128
    starts = range(0, len(files), chunk)
    workers = min(os.cpu_count() or 1, len(starts))
    # fork: the workers start at once, with no re-import. In-process where there is no fork, or
    # where /dev/shm is too small to share the images (Docker's default is 64 MB).
    parallel = workers > 1 and "fork" in multiprocessing.get_all_start_methods() and _shm_room() > 1.2 * out.numel()
    if parallel:
        out.share_memory_()  # torch.multiprocessing passes views of it to the workers, not copies
    jobs = [(str(root), files[i:i + chunk], out[i:i + chunk]) for i in starts]
    bad = []
    pool = ProcessPoolExecutor(workers, multiprocessing.get_context("fork")) if parallel else None
    with pool or contextlib.nullcontext():
        for failed, job in zip(pool.map(_decode_into, jobs) if pool else map(_decode_into, jobs), jobs):
            bad += failed
            if progress is not None:
                progress.update(len(job[1]))
    return out, dict(bad)


def _shm_room() -> int:
    """Free bytes in /dev/shm, where shared tensors live; 0 where there is none."""
    try:
        stat = os.statvfs("/dev/shm")
        return stat.f_bavail * stat.f_frsize
    except OSError:
        return 0


def load_images(root: str | Path, files: list[str], size: int, progress: "Progress | None" = None) -> torch.Tensor:
    """Decode `files` once into a (N, 3, size, size) uint8 tensor; any undecodable file is an
    error that names every bad file, not only the first."""
    images, bad = decode_images(root, files, size, progress)
    if bad:
        named = first_few([f"{Path(root) / f}: {why}" for f, why in bad.items()])
        raise UserError(f"cannot decode image{'s' if len(bad) > 1 else ''} {named}")
    return images


def slide_ids(files: list[str]) -> list[str]:
    """The source slide of each Kather tile, parsed from its file name ('CRC-Prim-HE-07')."""
    found = [SLIDE_PATTERN.search(Path(name).name) for name in files]
    if not all(found):
        raise UserError(f"--split-by slide needs 'CRC-Prim-HE-<NN>' in every file name (Kather's "
                        f"tiles), {files[found.index(None)]} has none; for other data give --groups FILE.csv "
                        f"(columns file,group) to split by slide or patient")
    return [match.group(0) for match in found]


GROUP_FILE_COLUMNS = ("file", "path", "filename", "image", "tile")  # header names taken, any case
GROUP_COLUMNS = ("group", "slide", "patient", "case", "subject")


def read_groups(path: str | Path, files: list[str], flag: str = "--groups") -> tuple[list, list, list]:
    """The group (slide or patient) of every file, from a CSV whose header names a file column
    (file, path, filename, image or tile; relative to --data) and a group column (group, slide,
    patient, case or subject), or has exactly two columns of any names. Returns the groups, a line
    naming the columns taken, and warnings (rows naming files that are not in the data). A data file
    the CSV does not name is an error; `flag` names the option in messages."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{flag} {path} does not exist")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # utf-8-sig: Excel's byte-order mark
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise UserError(f"{flag} {path} is not a readable CSV ({err})") from None
    header = [h.strip() for h in rows[0]] if rows else []
    lower = [h.lower() for h in header]
    pick = lambda names: next((lower.index(n) for n in names if n in lower), None)
    file_col, group_col = pick(GROUP_FILE_COLUMNS), pick(GROUP_COLUMNS)
    if (file_col is None or group_col is None) and len(header) == 2:
        file_col, group_col = 0, 1
    headerless = file_col is not None and Path(header[file_col]).as_posix() in set(files)
    if file_col is None or group_col is None or len(rows) < 2 or headerless:
        raise UserError(f"{flag} {path} needs a header naming a file column ({', '.join(GROUP_FILE_COLUMNS)}) "
                        f"and a group column ({', '.join(GROUP_COLUMNS)}), or exactly two columns, and one "
                        f"row per image; its header is {','.join(header) or 'empty'}")
    group_of = {Path(r[file_col].strip()).as_posix(): r[group_col].strip()
                for r in rows[1:] if len(r) > max(file_col, group_col) and r[file_col].strip()}
    if missing := [f for f in files if not group_of.get(f)]:
        raise UserError(f"{flag} {path} names no group for {len(missing)} of {len(files)} images, "
                        f"e.g. {', '.join(missing[:3])}")
    known = set(files)
    absent = [f for f in group_of if f not in known]
    taken = f"groups from {path.name}: file column '{header[file_col]}', group column '{header[group_col]}'"
    warnings = [f"{len(absent)} rows of {path.name} name files that are not in the data (e.g. "
                f"{', '.join(absent[:3])}); they are ignored"] if absent else []
    return [group_of[f] for f in files], [taken], warnings


def file_sha256(path: str | Path) -> str:
    """A file's identity: the first 16 hex digits of the SHA-256 of its bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def locate_groups(identity: dict, data_root: str | Path, given: str | Path | None = None) -> str | None:
    """The groups file a run was made with (`identity` of its checkpoint or teacher logits), on
    this machine, found by its content: `given` (--groups) if given, else the recorded path, else a
    file of the same name in the data folder or beside it. None for a run made without one. A
    checkpoint trained on a GPU server thus finds its groups file again on a laptop."""
    if not identity.get("groups_fingerprint"):
        if given is not None:
            raise UserError(f"--groups {given}: the run was made without --groups; leave it out")
        return None
    recorded = Path(identity["groups_file"])
    places = [Path(given)] if given is not None else [recorded, Path(data_root) / recorded.name,
                                                      Path(data_root).parent / recorded.name]
    for place in places:
        if place.is_file() and file_sha256(place) == identity["groups_fingerprint"]:
            return str(place.resolve())
    if given is not None:
        raise UserError(f"--groups {given} is not the groups file the run was made with "
                        f"({recorded}): its content differs")
    raise UserError(f"the groups file the run was made with, {recorded.name}, is neither at {recorded} "
                    f"nor in or beside {data_root} with the same content; pass --groups PATH to a copy")


def _take(n: int, frac: float) -> int:
    """How many of n items a fraction takes: rounded, at least one and never all when frac > 0."""
    return 0 if frac == 0 or n < 2 else min(n - 1, max(1, int(n * frac + 0.5)))


def _stratified_cut(idx: list[int], labels: list[int], frac: float,
                    gen: torch.Generator) -> tuple[list, list]:
    """Split `idx` into (taken, rest), taking `frac` of every class at random."""
    taken, rest = [], []
    for c in sorted({labels[i] for i in idx}):
        members = [i for i in idx if labels[i] == c]
        members = [members[j] for j in torch.randperm(len(members), generator=gen).tolist()]
        k = _take(len(members), frac)
        taken += members[:k]
        rest += members[k:]
    return taken, rest


def _grouped_cut(idx: list[int], labels: list[int], groups: list[str], frac: float,
                 gen: torch.Generator) -> tuple[list, list]:
    """Split `idx` into (taken, rest) by whole groups, keeping class proportions as well as groups allow.

    Groups are visited in a seeded random order; each joins the taken side when that brings the taken
    side's class counts closer (in squared error) to `frac` of every class.
    """
    names = sorted({groups[i] for i in idx})
    if len(names) < 2:
        raise UserError(f"a split by slide or group needs at least two of them on each side of a cut, "
                        f"found {names}")
    num_classes = max(labels) + 1
    counts = {g: np.zeros(num_classes) for g in names}
    for i in idx:
        counts[groups[i]][labels[i]] += 1
    target = frac * sum(counts.values())
    chosen, have = [], np.zeros(num_classes)
    for j in torch.randperm(len(names), generator=gen).tolist():
        g = names[j]
        if len(chosen) < len(names) - 1 and (
            not chosen or ((have + counts[g] - target) ** 2).sum() < ((have - target) ** 2).sum()
        ):
            chosen.append(g)
            have += counts[g]
    return [i for i in idx if groups[i] in chosen], [i for i in idx if groups[i] not in chosen]


def split_indices(labels: list[int], test_frac: float, val_frac: float, seed: int,
                  groups: list[str] | None = None) -> dict[str, list[int]]:
    """Deterministic stratified train/val/test split: disjoint, covering, each part sorted.

    `test_frac` of every class is held out for testing, then `val_frac` of the rest for validation
    (paper: 0.2 and 0.2). With `groups` (slide ids) whole groups go to one side only.
    """
    gen = torch.Generator().manual_seed(seed)  # its own generator: the split never moves with --seed
    everything = list(range(len(labels)))
    if groups is None:
        test, rest = _stratified_cut(everything, labels, test_frac, gen)
        val, train = _stratified_cut(rest, labels, val_frac, gen)
    else:
        test, rest = _grouped_cut(everything, labels, groups, test_frac, gen)
        val, train = _grouped_cut(rest, labels, groups, val_frac, gen) if val_frac > 0 else ([], rest)
    return {"train": sorted(train), "val": sorted(val), "test": sorted(test)}


def tiles_fingerprint(files: list[str], labels: list[int]) -> str:
    """A short hash of a file list and its labels: tells whether two runs saw the same images."""
    return hashlib.sha256("".join(f"{name}\t{label}\n" for name, label in zip(files, labels)).encode()).hexdigest()[:16]


def load_dataset(root: str | Path, img_size: int, split_by: str, split_seed: int, test_frac: float,
                 val_frac: float, groups_file: str | Path | None = None, classes_of: tuple | None = None) -> dict:
    """Index a class-folder data set and split it; images are decoded later, part by part.
    `classes_of` = (classes, source): refuse, before anything else is read, a folder whose classes
    are not those of `source` (a checkpoint or teacher logits file). `data["notes"]` says where the
    groups came from; `data["warnings"]` names classes that the split leaves without a training or
    test tile and rows of a groups file that name no data file."""
    if not Path(root).exists() and Path(root) == Path(DEFAULT_DATA):
        fetch_zip(root, KATHER_URL, KATHER_MD5, "https://zenodo.org/record/53169", ", or pass --data DIR")
    files, labels, classes = find_images(root)
    if classes_of is not None and classes != classes_of[0]:
        raise UserError(f"{classes_of[1]} does not belong to the data folder {root}: its classes are "
                        f"{', '.join(classes_of[0])}; the folder's are {', '.join(classes)}")
    if split_by == "group" and groups_file is None:
        raise UserError("--split-by group needs --groups FILE.csv (columns file,group)")
    if split_by != "group" and groups_file is not None:
        raise UserError(f"--groups is for --split-by group, not --split-by {split_by}")
    groups, notes, warnings = None, [], []
    if split_by == "slide":
        groups = slide_ids(files)
    elif split_by == "group":
        groups, notes, warnings = read_groups(groups_file, files)
    split = split_indices(labels, test_frac, val_frac, split_seed, groups)
    train = split["train"]
    identity = {  # everything the stored teacher logits and checkpoints must agree on
        "classes": classes, "img_size": img_size, "split_by": split_by, "split_seed": split_seed,
        "test_frac": test_frac, "val_frac": val_frac,
        "train_fingerprint": tiles_fingerprint([files[i] for i in train], [labels[i] for i in train]),
        "groups_file": str(Path(groups_file).resolve()) if groups_file else None,
        "groups_fingerprint": file_sha256(groups_file) if groups_file else None,
    }
    warnings += [f"class {name} has no {part} tile in this split"
                 for c, name in enumerate(classes) for part in ("train", "test")
                 if not any(labels[i] == c for i in split[part])]
    return {"root": str(root), "files": files, "labels": labels, "classes": classes, "groups": groups,
            "split": split, "identity": identity, "notes": notes, "warnings": warnings}


def check_images_open(data: dict) -> None:
    """Open every image of the data set, all parts, before any training: a header read, no full
    decode, on all cores; every file that does not open is named at once."""
    def opens(name):
        try:
            with Image.open(Path(data["root"]) / name) as img:
                img.verify()
        except UNREADABLE as err:
            return f"{name} ({err or type(err).__name__})"

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        bad = [r for r in pool.map(opens, data["files"]) if r is not None]
    if bad:
        raise UserError(f"{len(bad)} of {len(data['files'])} images under {data['root']} do not open: "
                        f"{first_few(bad)}")


def check_memory(data: dict, parts: tuple[str, ...], device: torch.device) -> None:
    """Refuse to decode parts that cannot fit: uint8 bytes against the device's free memory (and
    the host's, where every image is decoded first)."""
    size, count = data["identity"]["img_size"], sum(len(data["split"][p]) for p in parts)
    need = count * 3 * size * size
    budgets = [("this machine's available memory", _available_host_bytes())]
    if device.type == "cuda":
        budgets.append((f"{device}'s free memory", free_device_bytes(device)))
    for where, have in budgets:
        if have is not None and need > 0.8 * have:  # leave room for the model and activations
            raise UserError(f"{count} images at {size} px need {_size(need)} as uint8, more than 80% "
                            f"of {where} ({_size(have)}); lower --img-size or use fewer images")


def free_device_bytes(device: torch.device) -> int:
    """Memory a CUDA device can still give this process: what the driver reports free, plus what
    PyTorch's caching allocator holds without a tensor in it (left by an earlier model, reusable)."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def _size(n: int) -> str:
    """Bytes for a reader: 98.3 kB, 3.8 GB."""
    return next(f"{n / 10 ** e:.1f} {u}" for e, u in ((12, "TB"), (9, "GB"), (6, "MB"), (3, "kB"), (0, "B"))
                if n >= 10 ** e or e == 0)


def _available_host_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else None (unknown: not checked)."""
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


MIN_BATCHES = 16  # per epoch: the five-minute run's 16 x 5 epochs learn; 10 x 3 were seen not to


def batches_per_epoch(n_train: int, batch_size: int) -> int:
    """Training steps per epoch: full batches, and a last one of at least 2 images."""
    return n_train // batch_size + (n_train % batch_size >= 2)


def few_batches_note(n_train: int, batch_size: int) -> str | None:
    """A note for tiny data: with few batches per epoch, BatchNorm's running statistics (eval mode)
    lag far behind the batch statistics the network trains with. Names the --batch-size that gives
    MIN_BATCHES batches for this data."""
    batches = batches_per_epoch(n_train, batch_size)
    if batches >= MIN_BATCHES:
        return None
    fit = n_train // MIN_BATCHES  # the largest batch size with MIN_BATCHES full batches
    fix = (f"--batch-size {fit} gives {batches_per_epoch(n_train, fit)} batches per epoch here" if fit >= 2
           else f"{n_train} images cannot make {MIN_BATCHES} batches of 2 or more: add images")
    return (f"note: only {batches} batch(es) per epoch ({n_train} training images, --batch-size "
            f"{batch_size}). Eval mode (validation, the teacher logits, testing) uses BatchNorm's "
            f"running statistics, which move 10% towards each batch's: after an epoch they still "
            f"carry {0.9 ** batches:.0%} of what they were before it, so eval-mode accuracy can sit at "
            f"chance with every tile given one class while training accuracy rises. {fix}; more "
            f"epochs also help (README, Five minutes on a CPU).")


def load_part(data: dict, part: str, device: torch.device, say=None) -> dict:
    """Decode one part of the split onto `device`: uint8 images (N, 3, S, S) and labels (N,);
    `say` prints the progress of a long decode (Progress)."""
    idx = data["split"][part]
    progress = Progress(len(idx), "images", say, label=f"decoded ({part}) ") if say else None
    images = load_images(data["root"], [data["files"][i] for i in idx], data["identity"]["img_size"], progress)
    labels = torch.tensor([data["labels"][i] for i in idx], dtype=torch.long)
    return {"images": images.to(device), "labels": labels.to(device),
            "files": [data["files"][i] for i in idx],
            "groups": [data["groups"][i] for i in idx] if data["groups"] else None}


def decode_for_training(data: dict, device: torch.device, batch_size: int, say, warn) -> tuple[dict, dict]:
    """What both training scripts do before their first epoch: show the split, check that every
    image (test part included) opens and that the decoded parts fit, then decode the training and
    validation parts onto `device`. `say` and `warn` print to stdout and stderr."""
    say("\n".join(data["notes"] + split_table(data)))
    for line in data["warnings"]:
        warn(f"warning: {line}")
    check_images_open(data)
    check_memory(data, ("train", "val"), device)
    train, val = load_part(data, "train", device, say), load_part(data, "val", device, say)
    if note := few_batches_note(len(train["labels"]), batch_size):
        warn(note)
    return train, val


def split_table(data: dict) -> list[str]:
    """Lines that show the split: tiles (and slides, if grouped) per class and side."""
    kind, unit = ("slides", "sl") if data["identity"]["split_by"] == "slide" else ("groups", "gr")
    lines = [f"{'class':<14}" + "".join(f"{p:>16}" for p in ("train", "val", "test"))]
    for c, name in enumerate(data["classes"]):
        cells = []
        for part in ("train", "val", "test"):
            idx = [i for i in data["split"][part] if data["labels"][i] == c]
            slides = f" ({len({data['groups'][i] for i in idx})} {unit})" if data["groups"] else ""
            cells.append(f"{len(idx)}{slides}")
        lines.append(f"{name:<14}" + "".join(f"{cell:>16}" for cell in cells))
    if data["groups"]:
        sides = {p: sorted({data["groups"][i] for i in data["split"][p]}) for p in ("train", "val", "test")}
        lines.append(f"{kind}: " + "; ".join(f"{p} {' '.join(names)}" for p, names in sides.items()))
    return lines


def make_standin(root: str | Path, classes: int = 8, per_class: int = 625, size: int = 150,
                 slides: int = 10, suffix: str = ".tif") -> Path:
    """Write a generated stand-in of Kather's shape: `classes` folders of `per_class` noisy tiles of
    one colour per class, named like Kather's tiles (so --split-by slide works). Not tissue: it is
    for trying the scripts and measuring speed; accuracies on it say nothing about histology.
    Idempotent: a stand-in already made with the same settings is kept as it is (the content is
    seeded, so it would be the same); a folder holding anything else is refused."""
    root = Path(root)
    settings = {"classes": classes, "per_class": per_class, "size": size, "slides": slides, "suffix": suffix}
    manifest = root / "standin.json"  # not an image: find_images passes it by
    if root.exists() and not (root.is_dir() and not any(root.iterdir())):  # an empty folder is filled
        if manifest.is_file() and json.loads(manifest.read_text()) == settings:
            return root
        raise UserError(f"{root} exists and is not a stand-in made with these settings ({settings}); "
                        f"remove it or choose another folder")
    partial = root.parent / f".{root.name}.partial"  # renamed into place when complete
    if partial.exists():
        shutil.rmtree(partial)
    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = partial / f"{c + 1:02d}_CLASS{c}"
        folder.mkdir(parents=True)
        colour = np.array([(c * 70) % 256, (c * 150 + 40) % 256, (255 - c * 60) % 256])
        for i in range(per_class):
            pixels = np.clip(colour + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{c}{i:03d}_CRC-Prim-HE-{i % slides + 1:02d}_x{suffix}")
    (partial / "standin.json").write_text(json.dumps(settings))
    partial.rename(root)  # also onto an empty folder
    return root


def network_input(images: torch.Tensor, flip: torch.Tensor | None = None,
                  stain: torch.Tensor | None = None) -> torch.Tensor:
    """What the network is shown of uint8 tiles (B, 3, H, W): float, HED-jittered where `stain`
    (B, 2, 3) is given (hed_jitter's scale and shift of each stain), mirrored where `flip` (B,) is
    true, ImageNet-normalised. Images of another dtype are refused: floats in 0..1 would be read as
    near-black."""
    if images.dtype != torch.uint8:
        raise TypeError(f"network_input takes uint8 images (B, 3, H, W) in 0..255, not {images.dtype}; "
                        f"for float images in 0..1 use (x * 255).round().to(torch.uint8)")
    x = images.float()
    if stain is not None:
        x = hed_jitter(x, stain[:, 0], stain[:, 1])
    x = x.div_(255)
    if flip is not None:
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    for c, (mean, std) in enumerate(zip(IMAGENET_MEAN, IMAGENET_STD)):
        x[:, c].sub_(mean).div_(std)  # Python scalars: no host-to-device copy, so no sync per batch
    return x


# ----------------------------------------------------------------------------------------------
# Stain: colour deconvolution of H&E (Ruifrok and Johnston 2001), the HED augmentation of training
# tiles (Tellez et al. 2018, 2019) and Macenko et al.'s (2009) normalisation of another lab's tiles
# (--stain-norm of evaluate.py --external and of predict.py). Both work on optical density,
# od = -ln((I + 1) / LIGHT) per channel of an intensity I in 0..255, which intensity() inverts
# exactly: a tile comes back from a round trip within float rounding.

LIGHT = 240.0  # the intensity of glass, as Macenko et al. and torchstain take it
RUIFROK_HED = ((0.65, 0.70, 0.29), (0.07, 0.99, 0.11), (0.27, 0.57, 0.78))  # OD (R, G, B) of haematoxylin, eosin, DAB
STAIN_AUGMENT = 0.05  # --stain-augment's strength when the flag has no value (docs/generalisation.md)
MACENKO_ALPHA = 1.0  # percent: the stain vectors are the 1st and 99th percentile angles of tissue OD
MACENKO_BETA = 0.15  # OD below which, in any channel, a pixel is glass and left out of the estimate
MIN_STAIN_PIXELS = 256  # fewer tissue pixels (a 16 x 16 patch) give no stain estimate: fat, glass
STAIN_PIXELS = 1_000_000  # an estimate from more pixels than this takes every k-th
STAIN_TILES = 512  # a folder's stain is the median of the estimates of at most this many of its tiles


def optical_density(x: torch.Tensor) -> torch.Tensor:
    """Intensities 0..255 (any shape) -> float optical density -ln((I + 1) / LIGHT)."""
    return -torch.log((x.float() + 1) / LIGHT)


def intensity(od: torch.Tensor) -> torch.Tensor:
    """optical_density's inverse: float intensities, not clamped to 0..255."""
    return LIGHT * torch.exp(-od) - 1


def hed_jitter(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Tellez et al.'s HED augmentation: float intensities (B, 3, H, W) in 0..255 are unmixed into
    haematoxylin, eosin and DAB concentrations c with Ruifrok and Johnston's stain vectors (od = c @ M),
    each stain becomes c * scale + shift ((B, 3) each, per image and stain) and the image is mixed
    back, clamped to 0..255. scale 1 and shift 0 return the input within float rounding."""
    mix = torch.nn.functional.normalize(torch.tensor(RUIFROK_HED, device=x.device), dim=1)  # (stain, channel)
    conc = torch.einsum("bchw,cs->bshw", optical_density(x), torch.linalg.inv(mix))  # (B, 3 stains, H, W)
    conc = conc * scale[:, :, None, None] + shift[:, :, None, None]
    return intensity(torch.einsum("bshw,sc->bchw", conc, mix)).clamp_(0, 255)


def stain_draws(n: int, strength: float, gen: torch.Generator) -> torch.Tensor:
    """(n, 2, 3) HED jitter for n images: scale ~ U(1 - strength, 1 + strength) and shift ~
    U(-strength, strength) (in optical density) per stain, from `gen` (on the CPU, like the flips)."""
    u = 2 * torch.rand(n, 2, 3, generator=gen) - 1
    return torch.stack([1 + strength * u[:, 0], strength * u[:, 1]], 1)


def concentrations(od: torch.Tensor, stains: torch.Tensor) -> torch.Tensor:
    """Least-squares stain concentrations (P, 2) of optical densities (P, 3) given unit stain
    vectors (2, 3): od ~= conc @ stains."""
    return od @ torch.linalg.pinv(stains)


def macenko_fit(pixels: torch.Tensor) -> dict:
    """Macenko et al.'s stain estimate from uint8 RGB pixels (P, 3) (every k-th of them where there
    are more than STAIN_PIXELS): the haematoxylin and eosin vectors are the extreme angles
    (MACENKO_ALPHA percentiles) of tissue optical densities in the plane of their two largest
    principal directions, and each stain's concentration scale is its 99th percentile over all
    pixels. Returns plain lists, {"stains": [H, E] (2 x 3), "max_conc": [h, e], "pixels": tissue
    pixels used}, as torchstain's MacenkoNormalizer computes them. Too few tissue pixels (fat,
    glass) are a ValueError."""
    od = optical_density(pixels[::-(-len(pixels) // STAIN_PIXELS)]).double()
    tissue = od[(od >= MACENKO_BETA).all(1)]
    if len(tissue) < MIN_STAIN_PIXELS:
        raise ValueError(f"{len(tissue)} tissue pixels, fewer than {MIN_STAIN_PIXELS}: no stain estimate")
    plane = torch.linalg.eigh(torch.cov(tissue.T))[1][:, 1:]  # (3, 2): 2nd and 1st principal directions
    plane = plane * torch.where(plane.sum(0) < 0, -1.0, 1.0)  # optical densities are positive
    along = tissue @ plane  # (P, 2): each pixel along the 2nd and the 1st direction
    angle = torch.atan2(along[:, 1], along[:, 0])  # in (0, pi): the 1st direction's part is positive
    ends = [torch.quantile(angle, q) for q in (MACENKO_ALPHA / 100, 1 - MACENKO_ALPHA / 100)]
    lo, hi = (plane @ torch.stack([torch.cos(a), torch.sin(a)]) for a in ends)
    stains = torch.stack([lo, hi] if lo[0] > hi[0] else [hi, lo])  # haematoxylin absorbs more red
    max_conc = torch.quantile(concentrations(od, stains), 0.99, dim=0)
    return {"stains": stains.tolist(), "max_conc": max_conc.tolist(), "pixels": len(tissue)}


def tile_stain(tile: torch.Tensor) -> dict:
    """macenko_fit of one uint8 tile (3, H, W)."""
    return macenko_fit(tile.cpu().permute(1, 2, 0).reshape(-1, 3))


def median_stain(fits: list[dict]) -> dict:
    """The stain of many tiles: the median of their own Macenko estimates (stain vectors brought
    back to unit length). A pooled estimate takes its stain vectors from the extreme 1% of all
    pixels' angles, which a few odd tiles (ink, a fold, another stain) decide; a median is
    decided by the typical tile (docs/generalisation.md)."""
    if not fits:
        raise ValueError("no tile holds enough stained tissue for an estimate")
    median = lambda key: torch.tensor([f[key] for f in fits], dtype=torch.float64).median(0).values
    return {"stains": torch.nn.functional.normalize(median("stains"), dim=1).tolist(),
            "max_conc": median("max_conc").tolist(), "pixels": sum(f["pixels"] for f in fits), "tiles": len(fits)}


def tile_stains(images: torch.Tensor, most: int = STAIN_TILES) -> list[dict]:
    """The own Macenko estimates of every k-th of uint8 tiles (N, 3, H, W), at most `most` of them;
    tiles of too little stained tissue (fat, glass) give none."""
    fits = []
    for tile in images[::-(-len(images) // most)] if len(images) else []:
        with contextlib.suppress(ValueError):
            fits.append(tile_stain(tile))
    return fits


def stain_record(images: torch.Tensor) -> dict | None:
    """The stain of a model's training tiles, uint8 (N, 3, S, S), recorded in its checkpoint as the
    target of --stain-norm (so the data folder is not needed later): their median_stain; None
    where no tile holds enough stained tissue."""
    try:
        return median_stain(tile_stains(images))
    except ValueError:
        return None


def normalise_stain(images: torch.Tensor, source: dict | None, target: dict) -> tuple[torch.Tensor, int]:
    """uint8 tiles (N, 3, H, W) restained to `target`: from `source`, the stain of their folder or
    slide, or where it is None from each tile's own estimate (Macenko per tile), which leaves a tile
    of too little tissue as it is. Returns the tiles and how many were left as they were."""
    if source is not None:
        return macenko_apply(images, source, target), 0
    out, unchanged = images.clone(), 0
    for i, tile in enumerate(images):
        try:
            out[i] = macenko_apply(tile[None], tile_stain(tile), target)[0]
        except ValueError:
            unchanged += 1
    return out, unchanged


def macenko_apply(images: torch.Tensor, source: dict, target: dict) -> torch.Tensor:
    """uint8 (N, 3, H, W) tiles stained as `source` (macenko_fit of them, their folder or their
    slide) restained as `target`: each pixel's concentrations under the source stains, scaled by
    target / source max_conc, mixed with the target stains. uint8 (N, 3, H, W)."""
    od = optical_density(images.permute(0, 2, 3, 1)).double()  # (N, H, W, 3)
    src, tgt = (torch.tensor(s["stains"], dtype=torch.float64) for s in (source, target))
    ratio = (torch.tensor(target["max_conc"], dtype=torch.float64)
             / torch.tensor(source["max_conc"], dtype=torch.float64))
    out = intensity(concentrations(od, src) * ratio @ tgt)
    return out.clamp_(0, 255).round_().to(torch.uint8).permute(0, 3, 1, 2).contiguous()


def stain_target(mode: str | None, reference: str | None, recorded: dict | None, model_path) -> dict | None:
    """The stain --stain-norm `mode` restains to, with where it comes from: the --stain-ref image's
    (`reference`), else the stain of the model's training tiles (`recorded` at training). None
    without --stain-norm."""
    if not mode:
        return None
    if reference:
        try:
            with Image.open(reference) as img:
                pixels = torch.from_numpy(np.asarray(img.convert("RGB")).reshape(-1, 3).copy())
            return {**macenko_fit(pixels), "from": f"--stain-ref {reference}"}
        except UNREADABLE as err:
            raise UserError(f"--stain-ref {reference} does not open as an image ({err})") from None
        except ValueError as err:
            raise UserError(f"--stain-ref {reference}: {err}; choose an image of stained tissue") from None
    if not recorded:
        raise UserError(f"{model_path} records no stain of its training tiles (too pale to estimate): "
                        f"pass --stain-ref IMAGE, e.g. a training tile")
    return {**recorded, "from": f"the training tiles of {Path(str(model_path)).name}"}


def folder_stain(views: list[torch.Tensor]) -> dict:
    """The stain of a folder of tiles: the median of its tiles' own estimates (median_stain), from
    uint8 (N, 3, H, W) views, at most STAIN_TILES of them."""
    n = sum(len(v) for v in views)
    try:
        return median_stain([f for v in views for f in tile_stains(v, max(1, STAIN_TILES * len(v) // n))])
    except ValueError as err:
        raise UserError(f"--stain-norm macenko: {err} in this folder; leave --stain-norm out") from None


def stain_normalised(groups: list, target: dict, mode: str, source: dict | None = None) -> tuple[list, dict]:
    """Views grouped by shape (decode_views), restained to `target`: from the stain estimated over
    all of them, or given as `source` (macenko: one folder, one lab), or per view (macenko-tile);
    and what was done."""
    if mode == "macenko" and source is None:
        source = folder_stain([views for views, _ in groups])
    restained = [normalise_stain(views, source, target) for views, _ in groups]  # (views, unchanged) each
    out = [(views, owner) for (views, _), (_, owner) in zip(restained, groups)]
    return out, {"stain_target_from": target["from"], "stain_target": target, "stain_source": source,
                 "stain_unchanged": sum(left for _, left in restained)}


# ----------------------------------------------------------------------------------------------
# Training


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    """'auto' -> the current CUDA device when there is one, else cpu. A CUDA device always carries
    its index: torch before 2.5 refuses a bare 'cuda' in its memory queries. A device this machine
    does not have is a user error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name} is not a device (use auto, cpu, cuda or cuda:N)") from None
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    count = torch.cuda.device_count()
    index = torch.cuda.current_device() if device.index is None else device.index
    if index >= count:
        raise UserError(f"--device {name}: this machine has {count} CUDA device(s), "
                        f"{', '.join(f'cuda:{i}' for i in range(count))}; pass one of them, or --device cpu")
    device = torch.device("cuda", index)
    torch.cuda.set_device(device)  # compiled kernels and cuDNN's autotuning run on the current device
    torch.backends.cuda.matmul.allow_tf32 = True  # TF32: free speed on Ampere and newer
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    return device


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 natively: CUDA compute capability 8.0 and newer (A100, H100,
    RTX 30xx and later). Older GPUs (T4, V100) emulate it; on the CPU bf16 runs only when asked
    (--amp), so that the tests run the GPU's autocast lines there."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8


def pick_precision(device: torch.device, amp: bool | None) -> str:
    """The precision a script computes in, 'bf16' (autocast) or 'fp32', from its --amp flag: unset
    (None) is bf16 where the device has it natively and fp32 elsewhere; True asks for bf16, on the
    CPU too (it runs the GPU's autocast lines there); False is fp32."""
    if amp is None:
        return "bf16" if native_bf16(device) else "fp32"
    if amp and device.type == "cuda" and not native_bf16(device):
        major, minor = torch.cuda.get_device_capability(device)
        raise UserError(f"--amp: {torch.cuda.get_device_name(device)} (compute capability {major}.{minor}) "
                        f"has no native bf16 and would emulate it slowly; leave out --amp to use fp32")
    return "bf16" if amp else "fp32"


def autocast(device: torch.device, precision: str):
    """bf16 autocast on `device` for precision 'bf16', else nothing (fp32). The KD loss and the route
    cast logits to fp32 themselves."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def fused_adam(device: torch.device) -> bool:
    """Fused Adam (one kernel for all parameters) on CUDA; the for-each implementation elsewhere,
    which on the CPU is as fast (the tests run the fused branch on the CPU too)."""
    return device.type == "cuda"


def make_optimizer(model: torch.nn.Module, lr: float, device: torch.device) -> torch.optim.Optimizer:
    """The paper's Adam, in the implementation that suits `device`."""
    return torch.optim.Adam(model.parameters(), lr=lr, fused=fused_adam(device))


OPTIMIZER_DEVICE_SETTINGS = ("fused", "foreach", "capturable")  # chosen per device, not per run


def load_optimizer_state(opt: torch.optim.Optimizer, saved: dict) -> None:
    """Load a saved optimizer state into `opt`, keeping `opt`'s device-dependent settings: plain
    load_state_dict restores the saving run's, so a GPU run resumed on the CPU would run fused Adam
    there (other numbers; an error before torch 2.4) and a CPU run resumed on a GPU would lose it.
    Adam's step counters go where the kept settings want them: on the parameter's device for fused
    or capturable Adam, on the CPU otherwise."""
    kept = [{k: g[k] for k in OPTIMIZER_DEVICE_SETTINGS if k in g} for g in opt.param_groups]
    opt.load_state_dict(saved)
    for group, settings in zip(opt.param_groups, kept):
        group.update(settings)
        on_device = group.get("fused") or group.get("capturable")
        for p in group["params"]:
            state = opt.state.get(p, {})
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].to(p.device if on_device else "cpu", torch.float32)


def rng_states(device: torch.device) -> dict:
    """The random generators a resumed run continues: torch's CPU generator, and the CUDA device's
    where the run trains on one (dropout and drop-path draw there; MixNet has neither)."""
    states = {"torch_rng": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda_rng"] = torch.cuda.get_rng_state(device)
    return states


def set_rng_states(states: dict, device: torch.device) -> None:
    """Restore what rng_states saved; a CUDA state only on a CUDA device (a run resumed on another
    kind of device keeps that device's seeded generator)."""
    torch.set_rng_state(states["torch_rng"])
    if device.type == "cuda" and "cuda_rng" in states:
        torch.cuda.set_rng_state(states["cuda_rng"], device)


COMPILE_BACKEND = "inductor"  # torch.compile's default; the tests use a cheap one


def compile_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model compiled for training steps; `model` itself keeps its parameter names (no
    '_orig_mod.' prefix in checkpoints) and runs the eval passes uncompiled."""
    return torch.compile(model, backend=COMPILE_BACKEND)


def to_device(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Move a model to `device` in channels_last layout: MixNet's depthwise and pointwise convs are
    faster so on CUDA, and on the CPU too (measured: docs/performance.md)."""
    return model.to(device, memory_format=torch.channels_last)


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """The memory layout the models run in (see to_device)."""
    return x.contiguous(memory_format=torch.channels_last)


def eval_batch(device: torch.device) -> int:
    """Batch size of inference passes: large on a GPU; on a CPU small batches stay in cache (faster)."""
    return 500 if device.type == "cuda" else 64


def sync(device: torch.device) -> None:
    """Wait for the device's queued work: the only way to time CUDA work from the host."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def predict(model, images: torch.Tensor, precision: str, flip: bool = False) -> torch.Tensor:
    """Eval-mode logits (N, C) float32 of uint8 images (N, 3, S, S), mirrored if `flip`, on the
    images' device, computed in `precision` ('fp32' or 'bf16'); the model's mode is left as it was."""
    outs, batch = [], eval_batch(images.device)
    for first in range(0, len(images), batch):
        x = images[first:first + batch]
        with autocast(images.device, precision):
            outs.append(eval_logits(model, channels_last(network_input(x.flip(3) if flip else x))).float())
    return torch.cat(outs)


def both_views_logits(model, images: torch.Tensor, precision: str) -> torch.Tensor:
    """Logits (N, 2, C) on the CPU of uint8 images (N, 3, S, S), as the teacher stores them: [:, 0]
    of every image, [:, 1] of its mirror, so that a student trained on either view has the teacher's
    logits of that very view (stored_logits with view = flip)."""
    plain, mirrored = predict(model, images, precision), predict(model, images, precision, flip=True)
    return torch.stack([plain, mirrored], dim=1).cpu()


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent."""
    return 100 * (logits.argmax(1) == labels).float().mean().item()


def train_one_epoch(model, opt, part: dict, batch_size: int, gen: torch.Generator, precision: str,
                    teacher_logits: torch.Tensor | None, temperature: float,
                    distill_weight: float, compiled: set | None = None, stain_augment: float = 0.0) -> dict:
    """One pass over `part` in a seeded random order with seeded flips, and with a seeded HED jitter
    of strength `stain_augment` where it is not 0; `teacher_logits` (N, 2, C) are the stored teacher
    logits of each image and of its mirror (never jittered). No host-device sync inside, but
    for a compiled `model`: `compiled` holds the batch sizes it has been compiled for, and the first
    batch of a new size (which compiles) is timed apart, as compile_seconds, and left out of
    images_per_s."""
    images, labels = part["images"], part["labels"]
    device, n = images.device, len(labels)
    order = torch.randperm(n, generator=gen).to(device)
    flips = (torch.rand(n, generator=gen) < 0.5).to(device)
    # drawn only when asked: a run without it draws the same numbers as a run of the paper's recipe
    stains = stain_draws(n, stain_augment, gen).to(device) if stain_augment else None  # (N, 2, 3)
    model.train()
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    bad_batch = torch.zeros((), dtype=torch.long, device=device)  # first non-finite batch (from 1), if any
    seen, compile_images, compile_seconds = 0, 0, 0.0
    sync(device)
    start = time.perf_counter()
    for step, first in enumerate(range(0, n, batch_size)):
        idx = order[first:first + batch_size]
        if len(idx) < 2:  # BatchNorm cannot train on a single image; only a last leftover is skipped
            break
        compiles = compiled is not None and len(idx) not in compiled
        if compiles:  # two sync points, in the few steps that compile
            sync(device)
            compile_start = time.perf_counter()
        flip = flips[idx]
        x = channels_last(network_input(images[idx], flip, None if stains is None else stains[idx]))
        with autocast(device, precision):
            logits = model(x)  # (B, C)
        # the teacher's logits of exactly the view (plain or mirrored) the student sees: (B, C)
        teacher = None if teacher_logits is None else stored_logits(teacher_logits, idx, flip.long())
        loss = kd_loss(logits, teacher, labels[idx], temperature, distill_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bad_batch = torch.where((bad_batch == 0) & ~torch.isfinite(loss), step + 1, bad_batch)
        total_loss += loss.detach() * len(idx)
        correct += (logits.argmax(1) == labels[idx]).sum()
        seen += len(idx)
        if compiles:
            sync(device)
            compile_seconds += time.perf_counter() - compile_start
            compiled.add(len(idx))
            compile_images += len(idx)
    sync(device)  # the one sync point of the epoch
    seconds = time.perf_counter() - start
    timed = seen - compile_images  # None below: every step of the epoch compiled, none was timed
    stats = {"loss": total_loss.item() / max(seen, 1), "train_acc": 100 * correct.item() / max(seen, 1),
             "images_per_s": timed / (seconds - compile_seconds) if timed else None, "train_seconds": seconds,
             "bad_batch": int(bad_batch) or None}
    if compiled is not None:
        stats["compile_seconds"] = compile_seconds
    return stats


def format_record(r: dict) -> str:
    """The printed form of one epoch's log record."""
    parts = [f"epoch {r['epoch']:3d}", f"loss {r['loss']:.4f}", f"train {r['train_acc']:6.2f}%"]
    if "val_acc" in r:
        parts.append(f"val {r['val_acc']:6.2f}%")
    if "teacher_epoch" in r:
        parts.append(f"follows teacher@{r['teacher_epoch']}")
    if r.get("route"):  # the stored teacher epoch the student is now closest to
        near = min(r["route"], key=lambda d: d["kl"])
        parts.append(f"nearest teacher@{near['teacher_epoch']} (KL {near['kl']:.3f})")
    if "logits_seconds" in r:
        parts.append(f"logits stored {r['logits_seconds']:.1f}s")
    if r.get("compile_seconds"):  # left out of img/s
        parts.append(f"compiling {r['compile_seconds']:.1f}s")
    speed = f"{r['images_per_s']:7.1f}" if r["images_per_s"] is not None else "      -"
    parts += [f"{speed} img/s", f"{r['seconds']:6.1f}s"]
    return " | ".join(parts)


def fit(model, train: dict, val: dict, args: dict, identity: dict, state: dict | None = None,
        teacher_logits_for=None, after_epoch=None, say=lambda line: None, extra: dict | None = None) -> dict:
    """The epoch loop shared by teacher and student: Adam + StepLR as in the paper, per-epoch log
    line and JSON line, resumable state written atomically after every epoch.

    `teacher_logits_for(epoch, extra)` gives the stored teacher logits (N, 2, C) a 0-based epoch
    follows; `after_epoch(epochs_done, model, extra, val_logits)` (val_logits: (N_val, C) in eval
    mode, None without a validation part) may store things in `extra` (kept in the state, starting
    as `extra` on a fresh run) and
    returns fields for the log. Returns {"history": [...], "extra": {...}}.
    """
    device = train["images"].device
    opt = make_optimizer(model, args["lr"], device)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=args["step_size"], gamma=args["gamma"])
    gen = torch.Generator().manual_seed(args["seed"])  # shuffling and flips, saved with the state
    run = {"history": [], "extra": extra or {}, "epoch": 0}
    if state is not None:  # the device may differ from the saving run's: see load_optimizer_state
        model.load_state_dict(state["model"])
        load_optimizer_state(opt, state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        gen.set_state(state["generator"])
        set_rng_states(state, device)
        run = {"history": state["history"], "extra": state["extra"], "epoch": state["epoch"]}
    log, spath = log_path(args["out"]), state_path(args["out"])
    # a resumed run's log is cut back to the saved state: lines of a lost epoch go
    write_text_atomic("".join(json.dumps(r) + "\n" for r in run["history"]), log)
    step_model, compiled = (compile_model(model), set()) if args.get("compile") else (model, None)
    prec = pick_precision(device, args.get("amp"))
    on_disk = run["epoch"]  # the epoch the state file holds: what a message may call saved
    try:
        for epoch in range(run["epoch"], args["epochs"]):
            start = time.perf_counter()
            teacher = teacher_logits_for(epoch, run["extra"]) if teacher_logits_for else None
            stats = train_one_epoch(step_model, opt, train, args["batch_size"], gen, prec, teacher,
                                    args.get("temperature", 1.0), args.get("distill_weight", 0.0), compiled,
                                    args.get("stain_augment") or 0.0)
            bad = stats.pop("bad_batch")
            if bad is not None:
                kept = f"epoch {on_disk} is kept in {spath}" if on_disk else "no epoch had completed"
                raise UserError(f"the loss became NaN or infinite in epoch {epoch + 1}, batch {bad}; "
                                f"{kept} (try a lower --lr)")
            # "lr" is the rate this epoch trained with, read before the scheduler steps
            record = {"epoch": epoch + 1, **stats, "lr": opt.param_groups[0]["lr"], "precision": prec}
            sched.step()
            val_logits = predict(model, val["images"], prec) if len(val["labels"]) else None  # (N_val, C)
            if val_logits is not None:
                record["val_acc"] = accuracy(val_logits, val["labels"])
            if after_epoch:
                record.update(after_epoch(epoch + 1, model, run["extra"], val_logits))
            record.update(peak_memory(device))
            record["seconds"] = time.perf_counter() - start
            run["history"].append(record)
            run["epoch"] = epoch + 1
            save_atomic({"format": STATE_FORMAT, "args": args, "identity": identity, "epoch": epoch + 1,
                         "model": model.state_dict(), "optimizer": opt.state_dict(),
                         "scheduler": sched.state_dict(), "generator": gen.get_state(),
                         **rng_states(device), "history": run["history"], "extra": run["extra"]}, spath)
            on_disk = epoch + 1
            with open(log, "a") as f:
                f.write(json.dumps(record) + "\n")
            say(format_record(record))
    except KeyboardInterrupt:
        done = f"epoch {on_disk} is saved in {spath}" if on_disk else "no epoch is saved"
        raise Interrupted(f"interrupted in epoch {on_disk + 1}; {done}: "
                          f"run the same command with --resume") from None
    return run


def peak_memory(device: torch.device) -> dict:
    """{"peak_memory_mb": ...}: the most CUDA memory tensors have held so far in this process ({} on
    the CPU, where the operating system keeps that count)."""
    return {"peak_memory_mb": torch.cuda.max_memory_allocated(device) / 1e6} if device.type == "cuda" else {}


def precisions(history: list[dict]) -> str:
    """The precision a run's epochs trained in, for its checkpoint: 'bf16', 'fp32', or both in
    order ('fp32, then bf16') for a run resumed on another device."""
    return ", then ".join(dict.fromkeys(r["precision"] for r in history))


# ----------------------------------------------------------------------------------------------
# Checkpoints: a trained model and everything the other scripts need to rebuild and test it

DEFAULT_MPP = 0.495  # micrometres per pixel of Kather 2016's tiles (20x); NCT-CRC-HE-100K: 0.5


def make_checkpoint(model, args: dict, data: dict, train_images: torch.Tensor, method: str, history: list) -> dict:
    """A trained model and everything the other scripts need besides the data folder, as plain types
    and tensors (weights_only-safe): its METHODS key, the data's identity, the training tiles' field
    of view (tile_record, for tissue maps and tiles at another scale) and stain (stain_record of
    the uint8 training images (N, 3, S, S), the target of --stain-norm)."""
    return {"format": CHECKPOINT_FORMAT, "model": args["model"], "method": method,
            "identity": data["identity"], "precision": precisions(history), "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD), "args": args, "history": history, "tile": tile_record(data, args["mpp"]),
            "stain": stain_record(train_images),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}


def tile_record(data: dict, mpp: float, sample: int = 64) -> dict:
    """The training tiles' size as a model records it: the most common width in pixels of (up to
    `sample` of) the data's images, their microns per pixel, and so the field of view in
    micrometres that a tissue map must show the model."""
    sizes = []
    for name in data["files"][::max(1, len(data["files"]) // sample)][:sample]:
        with Image.open(Path(data["root"]) / name) as img:
            sizes.append(img.size[0])
    px = max(set(sizes), key=sizes.count)
    return {"px": px, "mpp": mpp, "um": px * mpp}


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint (weights_only), or a one-line error naming what the file is instead."""
    return load_file(path, CHECKPOINT_FORMAT)


def load_model(ckpt: dict, path: str | Path) -> torch.nn.Module:
    """Rebuild the network of a checkpoint and load its weights."""
    model = build_mixnet(ckpt["model"], len(ckpt["identity"]["classes"]), pretrained=False)
    try:
        model.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, KeyError) as err:
        raise UserError(f"{path}: weights do not fit {ckpt['model']} ({str(err).splitlines()[0]})") from None
    return model


def load_test_split(ckpt: dict, path, data_dir: str | None, groups_file: str | None, device: torch.device,
                    cache: dict, say=lambda line: None) -> tuple[dict, dict]:
    """The data a checkpoint was made from (load_dataset) and its test part decoded onto `device`
    (load_part), once per data folder, split and image size (`cache`). The folder is `data_dir`, or
    the one the checkpoint records; its groups file is found by content (locate_groups), so a
    checkpoint moves between machines. `say` prints notes and the progress of a long decode."""
    ident = ckpt["identity"]
    root, note = resolve_data_folder(data_dir, ckpt["args"].get("data"), path)
    key = (root, *(ident.get(k) for k in ("img_size", "split_by", "split_seed", "test_frac", "val_frac")),
           locate_groups(ident, root, groups_file))
    if key not in cache:
        if note:
            say(note)
        data = load_dataset(*key, classes_of=(ident["classes"], path))  # the folder first
        check_memory(data, ("test",), device)
        cache[key] = (data, load_part(data, "test", device, say))
    data, part = cache[key]
    if differ := mismatches(ident, data["identity"]):
        raise UserError(f"{path} does not belong to the data folder {root} ({'; '.join(differ)})")
    return data, part


# ----------------------------------------------------------------------------------------------
# Tiles at another scale (evaluate.py --external, predict.py --images): a model trained on tiles of
# a known field of view (the tile record: px, mpp, um) shown each tile at that scale, by a rule.

SCALE_RULES = ("crop", "cover", "whole", "resize")
SCANNER_MPP = (0.05, 2.0)  # um/px that slide scanners and microscope cameras write; outside: a typo, 5 for 0.5
MANY_VIEWS = 16  # views per tile above which a run says, before it starts, how much it will read
DEFAULT_SCALE_RULE = "cover"  # measured on the real tiles against crop, whole and resize: docs/generalisation.md


def add_scale_and_stain_flags(p, scope: str, mpp_unset: str, stain_over: str) -> None:
    """The flags that show tiles of another scale and stain as the model was trained, the same in
    evaluate.py (`scope` "--external") and predict.py ("--images"); `mpp_unset` and `stain_over`
    say what an unset --image-mpp means and what --stain-norm estimates the stain over there."""
    p.add_argument("--image-mpp", type=float, default=None,
                   help=f"microns per pixel of the tiles (unset: {mpp_unset})")
    p.add_argument("--any-mpp", action="store_true",
                   help=f"accept an --image-mpp outside {SCANNER_MPP[0]:g}-{SCANNER_MPP[1]:g} um/px, "
                        f"the scales scanners write")
    p.add_argument("--scale-rule", choices=SCALE_RULES, default=None,
                   help=f"{scope} with a known scale: crop (the training field of view at the training "
                        "scale, centred), cover (the fewest such fields covering the tile, logits "
                        "averaged), whole (the tile at the training scale, one larger input), or resize "
                        f"(squeezed whole; what runs without a scale) (unset: {DEFAULT_SCALE_RULE})")
    p.add_argument("--stain-norm", choices=("macenko", "macenko-tile"), default=None,
                   help="restain to the training tiles' stain (recorded in the model) or --stain-ref's, "
                        f"Macenko's method with the stain estimated over {stain_over} (macenko) or per "
                        "tile or window (macenko-tile)")
    p.add_argument("--stain-ref", default=None, metavar="IMAGE",
                   help="--stain-norm: the image whose stain is the target (unset: the model's)")
    p.add_argument("--tile-um", type=float, default=None,
                   help="the training tiles' width in micrometres (unset: as the model records it)")


def class_key(name: str) -> str:
    """A class name as maps and class maps compare it: a folder's '01_' prefix dropped, upper case."""
    return re.sub(r"^\d+_", "", name).upper()


def view_boxes(width: int, height: int, size: int, rule: str, image_mpp: float | None = None,
               tile_um: float | None = None) -> list[tuple[tuple[float, float, float, float], tuple[int, int]]]:
    """Where in a tile (width x height px at image_mpp) the network looks, for a model trained on
    tiles of tile_um micrometres resized to `size` px: (box in tile pixels, output size) per view.
    - crop: the centred square of the training field of view, resized to size;
    - cover: the fewest such squares, evenly spaced, that cover the tile; their logits are averaged
      (evaluate.py's default where the tiles' scale is known);
    - whole: the tile resampled to the training scale, one larger (or smaller) input;
    - resize: the whole tile squeezed into size x size, whatever its scale (no scale needed).
    Boxes are in fractional pixels: one resampling from the tile to the network's input."""
    if rule == "resize":
        return [((0.0, 0.0, float(width), float(height)), (size, size))]
    field = tile_um / image_mpp  # the training field of view, in tile pixels
    if rule == "whole":
        ratio = size / field
        out = (max(1, round(width * ratio)), max(1, round(height * ratio)))
        return [((0.0, 0.0, float(width), float(height)), out)]
    if field > 1.02 * min(width, height):  # 2%: slack for rounded scales
        raise UserError(f"a {width} x {height} px tile at {image_mpp:g} um/px shows "
                        f"{width * image_mpp:.4g} x {height * image_mpp:.4g} um, less than the "
                        f"{tile_um:.4g} um field the model was trained on: --scale-rule whole or resize")
    field = min(field, width, height)
    if rule == "crop":
        starts = [[(width - field) / 2], [(height - field) / 2]]
    else:  # cover
        starts = [np.linspace(0, side - field, math.ceil(side / field - 1e-6)).tolist() for side in (width, height)]
    return [((x, y, x + field, y + field), (size, size)) for y in starts[1] for x in starts[0]]


def tile_views(img: Image.Image, size: int, rule: str, image_mpp: float | None = None,
               tile_um: float | None = None) -> list[np.ndarray]:
    """The network's inputs for one tile by a scale rule (view_boxes): uint8 (3, h, w) arrays, RGB,
    resampled with PIL bilinear (antialiased when shrinking), as training tiles are."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    return [np.asarray(img.resize(out, Image.BILINEAR, box=box)).transpose(2, 0, 1)
            for box, out in view_boxes(img.width, img.height, size, rule, image_mpp, tile_um)]


def scale_rule(given: str | None, mpp: float | None) -> str:
    """The scale rule tiles are brought to the model with: --scale-rule (`given`), else
    DEFAULT_SCALE_RULE where the tiles' scale is known and resize (the whole tile squeezed) where not."""
    if mpp is None and given not in (None, "resize"):
        raise UserError(f"--scale-rule {given} needs the tiles' scale: pass --image-mpp")
    return given or (DEFAULT_SCALE_RULE if mpp else "resize")


def rule_line(rule: str, views: int, tiles: int) -> str:
    """The scale rule that ran, in words."""
    seen = {"crop": "the centred training field of view", "cover": "the mean over the fewest training fields "
            "that cover it", "whole": "all of it at the training scale", "resize": "all of it squeezed into the "
            "training size"}[rule]
    return f"scale rule {rule}: the network saw of each tile {seen} ({views} views of {tiles} tiles)"


def check_scale(mpp: float | None, any_mpp: bool, consequence: str) -> None:
    """Refuse a --image-mpp outside SCANNER_MPP unless `any_mpp` (--any-mpp), saying what it would
    mean (`consequence`: the views per tile, the window in pixels), before any work."""
    lo, hi = SCANNER_MPP
    if mpp is not None and not lo <= mpp <= hi and not any_mpp:
        raise UserError(f"--image-mpp {mpp:g} is outside {lo:g}-{hi:g} um/px, the scales scanners write: "
                        f"{consequence}; pass --any-mpp to use it on purpose")


def tile_plan(path: str | Path, size: int, rule: str, mpp: float | None, tile_um: float) -> tuple[int, str]:
    """How many views a scale rule makes of a tile like `path`, and in words why: (4, 'a 224 x 224
    px tile at 0.5 um/px (112 x 112 um) gives 4 views of the 74.25 um training field')."""
    try:
        with Image.open(path) as img:
            width, height = img.size
    except UNREADABLE:
        return 1, f"{Path(path).name} does not open"
    views = len(view_boxes(width, height, size, rule, mpp, tile_um))
    scale = f" at {mpp:g} um/px ({width * mpp:.4g} x {height * mpp:.4g} um)" if mpp else ""
    return views, (f"a {width} x {height} px tile{scale} gives {views} view{'s' if views > 1 else ''} of the "
                   f"{tile_um:.4g} um training field")


def decode_views(root, files: list[str], size: int, rule: str, mpp: float | None,
                 tile_um: float | None, progress: "Progress | None" = None) -> tuple[list, dict[str, str]]:
    """Every file's views (tile_views), grouped by shape: [(uint8 (m, 3, h, w), owner (m,))]
    where owner is the index of each view's file; and {file: reason} of files that do not decode.
    `progress` (a Progress over the files) is told of every file decoded."""
    def views(name):
        try:
            with Image.open(Path(root) / name) as img:
                return tile_views(img, size, rule, mpp, tile_um)
        except UNREADABLE as err:
            return str(err) or type(err).__name__

    groups, bad = {}, {}
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # PIL resizes without the GIL
        for i, (name, got) in enumerate(zip(files, pool.map(views, files))):
            if progress is not None:
                progress.update(1)
            if isinstance(got, str):
                bad[name] = got
                continue
            for view in got:
                group = groups.setdefault(view.shape, ([], []))
                group[0].append(view)
                group[1].append(i)
    return [(torch.from_numpy(np.stack(v)), torch.tensor(o)) for v, o in groups.values()], bad


def view_logits(logits_of, groups: list, n: int, tta: bool = False,
                progress: "Progress | None" = None) -> torch.Tensor:
    """Logits (n, C) of n tiles: the mean over each tile's views (and, with `tta`, their mirrors),
    computed 1024 views at a time; `progress` (a Progress over the views) is told of each."""
    sums, counts = None, torch.zeros(n)
    for all_views, all_owners in groups:
        for first in range(0, len(all_views), 1024):
            views, owner = all_views[first:first + 1024], all_owners[first:first + 1024]
            logits = logits_of(views).float()
            if tta:  # the two views the teacher logits cover: the tile and its mirror
                logits = (logits + logits_of(views.flip(3)).float()) / 2
            sums = torch.zeros(n, logits.shape[1]) if sums is None else sums
            sums.index_add_(0, owner, logits)
            counts.index_add_(0, owner, torch.ones(len(owner)))
            if progress is not None:
                progress.update(len(views))
    return sums / counts[:, None]


# ----------------------------------------------------------------------------------------------
# Statistics that more than one script reports (evaluate.py's own are there)

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of a proportion correct / n, in percent; (0, 100) for n = 0."""
    if n == 0:
        return 0.0, 100.0
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return 100 * max(0.0, centre - half), 100 * min(1.0, centre + half)


# ----------------------------------------------------------------------------------------------
# Run machinery: settings checks, atomic files, resumable state, the teacher logits file


def check_settings(args: dict) -> None:
    """Refuse out-of-range settings before any time is spent; `args` is vars(argparse args)."""
    rules = [
        ("epochs", lambda v: v > 0, "must be positive"),
        ("batch_size", lambda v: v > 0, "must be positive"),
        ("lr", lambda v: v > 0 and math.isfinite(v), "must be positive"),
        ("step_size", lambda v: v > 0, "must be positive"),
        ("gamma", lambda v: 0 < v <= 1, "must be in (0, 1]"),
        ("img_size", lambda v: v >= 32, "must be at least 32 (MixNet downsamples 32 times)"),
        ("temperature", lambda v: v > 0 and math.isfinite(v), "must be positive"),
        ("distill_weight", lambda v: 0 <= v <= 1, "must be in [0, 1]"),
        ("stain_augment", lambda v: v is None or 0 < v < 1, "must be in (0, 1)"),
        ("test_frac", lambda v: 0 < v < 1, "must be in (0, 1)"),
        ("val_frac", lambda v: 0 <= v < 1, "must be in [0, 1)"),
        ("save_every", lambda v: v > 0, "must be positive"),
    ]
    for name, ok, why in rules:
        if name in args and not ok(args[name]):
            raise UserError(f"--{name.replace('_', '-')} {args[name]} {why}")


def _atomic_write(path: str | Path, write) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        mask = os.umask(0)  # mkstemp makes 0600 files: give the mode a new file gets here (e.g. 0644)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, path)
        for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a run killed mid-save
            stale.unlink(missing_ok=True)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def save_atomic(obj: dict, path: str | Path) -> None:
    """torch.save `obj` (plain types and tensors only, so weights_only loading works) atomically."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def write_text_atomic(text: str, path: str | Path) -> None:
    """Write a JSON report, CSV or log atomically."""
    _atomic_write(path, lambda f: f.write(text.encode()))


def write_bytes_atomic(data: bytes, path: str | Path) -> None:
    """Write a file made elsewhere (an ONNX model) atomically."""
    _atomic_write(path, lambda f: f.write(data))


def write_csv(header: list[str], rows: list[list], path) -> None:
    """Write a CSV file (a header row, then `rows`) atomically."""
    buf = io.StringIO()
    csv.writer(buf).writerows([header, *rows])
    write_text_atomic(buf.getvalue(), path)


FILE_KINDS = {CHECKPOINT_FORMAT: "a checkpoint (a model, written by train_teacher.py or distill.py: teacher.pt, "
                                 "student.pt)",
              LOGITS_FORMAT: "the stored teacher logits (train_teacher.py's teacher_logits.pt)",
              STATE_FORMAT: "the resumable state of an interrupted run (*.state.pt, for --resume)"}


def load_file(path: str | Path, kind: str, wanted: str | None = None) -> dict:
    """torch.load(weights_only=True) a file of `kind` (CHECKPOINT_FORMAT, ...), refusing anything
    else with what it is and what to pass (`wanted`, else the kind's FILE_KINDS line)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist")
    wanted = wanted or FILE_KINDS[kind]
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, random bytes, a text file, a pickle of arbitrary objects
        raise UserError(f"{path} is corrupt or not a torch file ({type(err).__name__}); pass {wanted}") from None
    if not isinstance(obj, dict) or obj.get("format") != kind:
        found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        if str(found).startswith("mpkd-") and found not in FILE_KINDS:
            raise UserError(f"{path} was written by an earlier version of this code ({found}): re-run "
                            f"the command that made it with the current code")
        what = f"{FILE_KINDS[found]} ({found})" if found in FILE_KINDS else f"something else ({found})"
        raise UserError(f"{path} is not a {kind} file: it is {what}; pass {wanted}")
    return obj


def check_writable(*paths: str | Path) -> None:
    """Refuse output paths whose folder is missing or read-only before any training starts."""
    for path in paths:
        folder = Path(path).parent
        if not folder.is_dir():
            raise UserError(f"cannot write {path}: folder {folder} does not exist")
        if Path(path).is_dir():
            raise UserError(f"cannot write {path}: it is a folder")
        try:  # a real write: permissions, read-only mounts and full quotas all show up here
            tempfile.TemporaryFile(dir=folder).close()
        except OSError as err:
            raise UserError(f"cannot write {path}: folder {folder} is not writable ({err.strerror})") from None


def median_seconds(fns: list, device: torch.device, repeats: int, warmup: int) -> list[float]:
    """Median wall time of each function, the functions taking turns (A B B A ...) so drift cancels."""
    times = [[] for _ in fns]
    for i in range(warmup + repeats * len(fns)):
        k = i % len(fns) if (i // len(fns)) % 2 == 0 else len(fns) - 1 - i % len(fns)
        sync(device)
        start = time.perf_counter()
        fns[k]()
        sync(device)
        if i >= warmup:
            times[k].append(time.perf_counter() - start)
    return [float(np.median(t)) for t in times]


class Progress:
    """The progress of a job longer than a few seconds, counted in `unit`s: a tqdm bar where stderr
    is a terminal and tqdm is installed; else, so that logs stay clean, a line through `say` every
    `every` seconds with what is done, the rate and the time left (none for a short job)."""

    def __init__(self, total: int, unit: str, say, label: str = "", every: float = 5.0):
        self.total, self.unit, self.say, self.label, self.every = total, unit, say, label, every
        self.done, self.start = 0, time.perf_counter()
        self.last, self.bar = self.start, None
        if sys.stderr.isatty():
            with contextlib.suppress(ImportError):
                from tqdm import tqdm
                self.bar = tqdm(total=total, unit=f" {unit}", desc=label.strip(), leave=False, file=sys.stderr)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            if self.done >= self.total:
                self.bar.close()
            return
        now = time.perf_counter()
        if now - self.last >= self.every and self.done < self.total:
            rate = self.done / (now - self.start)
            self.say(f"  {self.label}{self.done} / {self.total} {self.unit}, {rate:.0f} {self.unit}/s, "
                     f"{(self.total - self.done) / rate:.0f} s left")
            self.last = now


def first_few(items: list[str], most: int = 10) -> str:
    """'a; b; c' for a message, the first `most` of them, and how many more: 'a; b; and 5 more'."""
    more = f"; and {len(items) - most} more" if len(items) > most else ""
    return "; ".join(items[:most]) + more


def require(*modules: str, feature: str, install: str):
    """The optional modules a feature needs, imported; or a one-line error naming the pip command."""
    try:
        return [__import__(m, fromlist=["_"]) for m in modules]
    except (ImportError, OSError):  # OSError: a Python package without its library (openslide)
        raise UserError(f"{feature}: an optional package is missing: pip install {install}") from None


def state_path(out: str | Path) -> Path:
    """Where a run writing `out` keeps its resumable state: teacher.pt -> teacher.state.pt."""
    return Path(out).with_suffix(".state.pt")


def log_path(out: str | Path) -> Path:
    """Where a run writing `out` keeps its JSON-lines log: teacher.pt -> teacher.log.jsonl."""
    return Path(out).with_suffix(".log.jsonl")


IDENTITY_NOTES = ("groups_file",)  # recorded for the reader; the groups file's fingerprint identifies it


def mismatches(expected: dict, found: dict, skip: tuple = IDENTITY_NOTES) -> list[str]:
    """Keys on which two settings dicts differ, as 'key: found X, expected Y'."""
    keys = sorted((set(expected) | set(found)) - set(skip))
    return [f"{k}: found {found.get(k)!r}, expected {expected.get(k)!r}"
            for k in keys if expected.get(k) != found.get(k)]


def open_state(args: dict, data_identity: dict) -> dict | None:
    """The state to resume from, or None for a fresh run; refuses a state that belongs to another run."""
    path = state_path(args["out"])
    if not args["resume"]:
        if path.exists():
            raise UserError(f"an interrupted run left {path}: add --resume to continue it, "
                            f"or delete it to start over")
        return None
    if not path.exists():
        if Path(args["out"]).exists():  # a finished run: never silently train it again
            raise UserError(f"nothing to resume: {args['out']} is complete and {path} does not exist; "
                            f"run without --resume to train again")
        return None  # killed before its first epoch ended: start from epoch 1
    state = load_file(path, STATE_FORMAT)
    differ = (mismatches(state["args"], args, skip=RESUME_FREE_ARGS + ("groups",))  # by content below
              + mismatches(state["identity"], data_identity))
    if differ:
        raise UserError(f"--resume refused, {path} was made with other settings ({'; '.join(differ)})")
    return state


def resolve_data_folder(given: str | None, recorded: str | None, source: str) -> tuple[str, str | None]:
    """The data folder of a run: --data when given; else the folder `source` (a teacher logits file
    or a checkpoint) was made from, with a line saying so; else Kather 2016's. A recorded folder that
    is not on this machine is an error naming it, never a download of the default."""
    if given is not None:
        return given, None
    if recorded is None:
        return DEFAULT_DATA, None
    if not Path(recorded).is_dir() and Path(recorded) != Path(DEFAULT_DATA):
        raise UserError(f"no --data given, and {recorded}, the data folder {source} was made from, is "
                        f"not here (relative paths count from where you run); pass --data DIR")
    return recorded, f"data: {recorded}, the folder {source} was made from (--data changes it)"


def add_training_flags(p) -> None:
    """The flags train_teacher.py and distill.py share: the image size, the split, the optimiser and
    schedule, the seeds, the tiles' scale and stain augmentation, the device and --resume."""
    p.add_argument("--img-size", type=int, default=None,
                   help="images are resized to this square size, at least 32 (unset: 112, or in "
                        "distill.py what the teacher logits were made with; likewise the split flags)")
    p.add_argument("--batch-size", type=int, default=64, help="batch size (the paper says 64 and 128; 64 is used)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--step-size", type=int, default=5,
                   help="StepLR: multiply the learning rate by --gamma every this many epochs")
    p.add_argument("--gamma", type=float, default=0.5, help="StepLR factor")
    p.add_argument("--seed", type=int, default=0, help="seed of weights init, shuffling and flips")
    p.add_argument("--split-seed", type=int, default=None,
                   help="seed of the train/val/test split, teacher and students must agree (unset: 0)")
    p.add_argument("--split-by", choices=("tile", "slide", "group"), default=None,
                   help="split tiles at random (paper), by Kather slide id, or by the groups of "
                        "--groups (unset: tile, or group with --groups)")
    p.add_argument("--groups", default=None, metavar="FILE.csv",
                   help="CSV with columns file (relative to --data) and group (slide or patient id) "
                        "for --split-by group")
    p.add_argument("--test-frac", type=float, default=None,
                   help="fraction of every class held out for testing (unset: 0.2)")
    p.add_argument("--val-frac", type=float, default=None,
                   help="fraction of the rest used for validation (unset: 0.2)")
    p.add_argument("--weights", default=None, metavar="FILE",
                   help="ImageNet weights to start from instead of timm's download: a state dict "
                        "(.pt/.pth/.bin) or .safetensors of the same network, 1000-class head")
    p.add_argument("--mpp", type=float, default=DEFAULT_MPP,
                   help="microns per pixel of the training tiles (Kather 2016: 0.495; NCT-CRC-HE-100K: "
                        "0.5), recorded with the tiles' size for tissue maps")
    p.add_argument("--stain-augment", type=float, nargs="?", const=STAIN_AUGMENT, default=None,
                   metavar="STRENGTH",
                   help="jitter each training image's haematoxylin, eosin and DAB (Tellez et al.'s HED "
                        "augmentation): scale by U(1-s, 1+s) and shift by U(-s, s) in optical density "
                        f"per stain; the flag alone: s = {STAIN_AUGMENT} (default off, as in the paper)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (unset: on CUDA GPUs with native bf16, compute capability 8.0 "
                        "or newer, and fp32 elsewhere; --amp asks for it on the CPU too; --no-amp: fp32)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model for training")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its saved state")


DATA_DEFAULTS = {"img_size": 112, "split_by": "tile", "split_seed": 0, "test_frac": 0.2, "val_frac": 0.2,
                 "groups": None}  # the paper's (--groups FILE has none); flags default to None


def resolve_data_settings(given: dict, data_dir: str | Path, recorded: dict | None = None, source: str = "") -> dict:
    """The data settings of a run, DATA_DEFAULTS' keys: each as the user gave it (`given`, the
    flags as a dict, None where unset), else as `recorded` (the identity in a teacher logits file)
    says when given, else the paper's default. A setting the user gave that differs from `recorded`
    is refused, naming the flag and the value to pass. A groups file is found by its content in or
    beside `data_dir` (locate_groups), so files may move between machines."""
    out = {}
    for key, default in DATA_DEFAULTS.items():
        if key == "groups":
            out[key] = (locate_groups(recorded, data_dir, given[key]) if recorded is not None
                        else str(Path(given[key]).resolve()) if given[key] is not None else None)
            continue
        if key == "split_by" and given["groups"] and recorded is None:
            default = "group"  # --groups FILE alone asks for a split by its groups
        known = default if recorded is None else recorded.get(key)
        out[key] = known if given[key] is None else given[key]
        if recorded is not None and given[key] is not None and given[key] != known:
            flag = "--" + key.replace("_", "-")
            fix = f"pass {flag} {known}" if known is not None else f"leave out {flag}"
            raise UserError(f"{flag} {given[key]} differs from {source}, which was made with "
                            f"{f'{flag} {known}' if known is not None else f'no {flag}'}: {fix}, or "
                            f"leave it out to take it from that file")
    return out
