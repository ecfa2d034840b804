"""What the test files share: tiny synthetic data sets and the models trained on them once per test
session (a teacher, its Multi-Part KD student, a student that knows four colours, their ONNX
files), and helpers to run a script as a user does.
"""

import argparse
import csv
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import distill
import export
import mpkd
import train_teacher

HERE = Path(__file__).resolve().parent
SAMPLES = HERE.parent / "shared" / "data" / "kather2016_samples"
CRC_SAMPLES = HERE.parent / "shared" / "data" / "crc_val_he_7k_samples"
FAST = ["--img-size", "32", "--batch-size", "8", "--device", "cpu"]
TIMING = ("seconds", "train_seconds", "images_per_s", "logits_seconds", "compile_seconds")


def make_dataset(root, classes=4, per_class=10, size=40, slides=5, suffix=".png"):
    """Class folders of real image files; each class has its own colour so that it can be learnt."""
    return mpkd.make_standin(root, classes, per_class, size, slides, suffix)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def trained(tmp_path_factory, data_dir):
    """One teacher (3 epochs, logits stored after every epoch) shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("teacher")
    train_teacher.main(train_teacher.get_args([
        "--data", str(data_dir), "--out", str(out / "teacher.pt"), "--logits-out", str(out / "teacher_logits.pt"),
        "--no-pretrained", "--epochs", "3", "--save-every", "1", *FAST]))
    return out


def teacher_argv(data, out, *extra):
    return ["--data", str(data), "--out", str(out / "teacher.pt"), "--logits-out", str(out / "teacher_logits.pt"),
            "--no-pretrained", "--epochs", "2", "--save-every", "1", *FAST, *map(str, extra)]


def student_argv(data, teacher_dir, out, *extra):
    return ["--data", str(data), "--teacher-logits", str(teacher_dir / "teacher_logits.pt"), "--out", str(out),
            "--epochs", "3", *FAST, *extra]


def without_timing(history):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in history]


@pytest.fixture(scope="session")
def student(trained, data_dir, tmp_path_factory):
    """A Multi-Part KD student of the shared teacher."""
    out = tmp_path_factory.mktemp("student") / "student.pt"
    distill.main(distill.get_args(student_argv(data_dir, trained, out, "--multipart")))
    return out


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def parser_of(script, monkeypatch):
    """The ArgumentParser a script's get_args builds (parse_args made to hand it back)."""
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", lambda self, argv=None: self)
    return script.get_args([])


def run_script(name, *argv, cwd):
    # SIGINT back to its default in the child: a shell starts background jobs with SIGINT ignored,
    # which a child inherits, and Python turns Ctrl-C into KeyboardInterrupt only if it was not
    return subprocess.Popen([sys.executable, str(HERE / name), *map(str, argv)], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


# ----------------------------------------------------------------------------------------------
# Deployment: one ONNX file


@pytest.fixture(scope="session")
def exported(trained, student, data_dir, tmp_path_factory):
    """The student and the teacher exported to ONNX by export.py."""
    pytest.importorskip("onnxruntime")
    out = tmp_path_factory.mktemp("onnx")
    for ckpt, name in ((student, "student.onnx"), (trained / "teacher.pt", "teacher.onnx")):
        export.main(export.get_args([str(ckpt), "--data", str(data_dir), "--out", str(out / name)]))
    return out


# ----------------------------------------------------------------------------------------------
# Tissue maps


def standin_tile(c, size, rng, noise=20):
    """A tile of stand-in class c, as make_standin draws them; c = -1 is glass (background)."""
    colour = (np.array([245, 245, 245]) if c < 0 else
              np.array([(c * 70) % 256, (c * 150 + 40) % 256, (255 - c * 60) % 256]))
    return np.clip(colour + rng.normal(0, 3 if c < 0 else noise, (size, size, 3)), 0, 255).astype(np.uint8)


def layout_pixels(layout, tile, seed=1, noise=5):
    rng = np.random.default_rng(seed)
    return np.concatenate([np.concatenate([standin_tile(c, tile, rng, noise) for c in row], 1) for row in layout], 0)


LAYOUT = np.array([[0, 1, 2, 3, 0, 1, 2, -1],
                   [3, 3, 0, 0, 1, 1, 2, -1],
                   [2, 1, 0, 3, 2, 1, 0, -1],
                   [1, 2, 3, 0, 1, 2, 3, -1],
                   [-1, -1, -1, 2, 2, 3, 3, -1],
                   [0, 0, 1, 1, 2, 2, 3, 3]])


@pytest.fixture(scope="session")
def map_model(tmp_path_factory):
    """A student that knows the four stand-in colours, trained on 40 px tiles at 0.495 um/px."""
    root, rng = tmp_path_factory.mktemp("mapdata"), np.random.default_rng(0)
    for c in range(4):  # the stand-in's colours with less noise: 10 epochs of 100 tiles learn them
        (root / "d" / f"{c + 1:02d}_CLASS{c}").mkdir(parents=True)
        for i in range(100):
            Image.fromarray(standin_tile(c, 40, rng, 5)).save(root / "d" / f"{c + 1:02d}_CLASS{c}" / f"{i}.png")
    distill.main(distill.get_args(["--data", str(root / "d"), "--distill-weight", "0", "--teacher-logits",
                                   str(root / "none.pt"), "--out", str(root / "s.pt"), "--epochs", "10",
                                   "--step-size", "3", "--img-size", "32", "--batch-size", "8", "--device", "cpu"]))
    return root / "s.pt"


def external_folder(root, rng, names=("zero", "one", "two", "three"), size=160, inner=80):
    """Another lab's folders of the stand-in colours: tiles of `size` px whose centre `inner` px
    show their class and whose border shows the next class (so only the right field of view is right)."""
    for c, name in enumerate(names):
        (root / name).mkdir(parents=True)
        for i in range(3):
            tile = standin_tile((c + 1) % 4, size, rng, 5)
            start = (size - inner) // 2
            tile[start:start + inner, start:start + inner] = standin_tile(c, inner, rng, 5)
            Image.fromarray(tile).save(root / name / f"{name}_{i}.png")
    return root
