"""The fault-injection cases of ``test_fault_injection.py``, also read by ``benchmarks/fault_table.py`` (which prints
the measured table of command, exit code and message)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from trojanlab.cli import main
from trojanlab.demo import OFFICIAL_TROJANNET

GTSRB5 = Path(__file__).parents[1] / "data" / "gtsrb5"
TINY = ["--epochs", "1", "--batch-size", "32", "--quiet"]


class Pickled:
    """An object ``torch.load(weights_only=True)`` must refuse to rebuild."""


def build_inputs(root: Path, bright_thirds) -> dict[str, str]:
    """The files and folders the cases read, made under ``root``: two tiny data sets, two trained models, a folder
    of a stranger's files, a file where a folder should be, image folders with odd classes, a model whose spec
    carries a bad trigger, a pickle."""
    d = bright_thirds(root / "d.npz", 300, 90, seed=0)
    e = bright_thirds(root / "e.npz", 300, 90, seed=1)
    victim = root / "victim"
    assert main(["train", "--data", str(d), *TINY, "--out", str(victim)]) == 0
    named = root / "named"  # a 5-class model whose classes have names (the GTSRB-5 folder)
    assert main(["train", "--data", str(GTSRB5), *TINY, "--out", str(named)]) == 0
    foreign = root / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("a user's notes")
    a_file = root / "a_file"
    a_file.write_text("not a folder")
    odd = root / "odd-classes"  # stop (known to the named model) and banana (not)
    for name in ("stop", "banana"):
        (odd / name).mkdir(parents=True)
        for png in sorted((GTSRB5 / "stop").glob("*.png"))[:5]:
            shutil.copy(png, odd / name / png.name)
    single = root / "one-per-class"
    for name in ("a", "b", "c"):
        (single / name).mkdir(parents=True)
        shutil.copy(min((GTSRB5 / "stop").glob("*.png")), single / name / "0.png")
    bad_trigger = root / "bad-trigger"
    shutil.copytree(victim, bad_trigger, ignore=shutil.ignore_patterns("checkpoint", "trojanlab-run.json"))
    spec = json.loads((bad_trigger / "model.json").read_text())
    spec["triggers"] = [{"pattern": [[1.0]], "location": [0, 0], "target_label": 999}]
    (bad_trigger / "model.json").write_text(json.dumps(spec))
    pickled = root / "pickled.pt"
    torch.save({"weight": torch.zeros(2), "extra": Pickled()}, pickled)
    return {
        "D": str(d), "E": str(e), "V": str(victim), "NAMED": str(named), "FOREIGN": str(foreign),
        "FILE": str(a_file), "ODD": str(odd), "SINGLE": str(single), "BADTRIGGER": str(bad_trigger),
        "PICKLED": str(pickled), "TN": str(OFFICIAL_TROJANNET), "G5": str(GTSRB5), "NEW": str(root / "new"),
        "UNDER_FILE": str(a_file / "run"),
    }  # fmt: skip


# (case, argv with {PLACEHOLDERS}, the message's pattern, the folder whose files must stay unchanged)
CASES = [
    ("another command into a run folder", "attack badnets --data {D} --target 1 --epochs 1 --out {V}",
     r"holds a `trojanlab train` run, not `attack badnets`.*--force", "V"),
    ("an injection into another run's folder", "attack trojannet --victim {V} --trojannet {TN} --data {D} --targets 0 --out {V}",
     r"holds a `trojanlab train` run, not `attack trojannet`", "V"),
    ("the same command on other data", "train --data {E} --epochs 1 --batch-size 32 --out {V}",
     r"other settings or inputs \(inputs\.data: other content \(.*d\.npz there, .*e\.npz now\).*--restart", "V"),
    ("the same command with other settings", "train --data {D} --epochs 2 --batch-size 32 --out {V}",
     r"config\.TrainConfig\.epochs: 1 there, 2 now", "V"),
    ("the same command with another architecture",
     "train --data {D} --epochs 1 --batch-size 32 --arch resnet18 --out {V}", r"config\.ModelConfig\.arch: \"gtsrb_cnn\" there, \"resnet18\" now", "V"),
    ("evaluate writing over a run's result", "evaluate --model {V} --data {D} --out {V}",
     r"holds a `trojanlab train` run, not `evaluate`", "V"),
    ("a folder of files no run wrote", "train --data {D} --epochs 1 --out {FOREIGN}",
     r"holds files no trojanlab run recorded \(notes\.txt\).*--force", "FOREIGN"),
    ("--out is a file", "train --data {D} --epochs 1 --out {FILE}", r"--out .*a_file: exists and is not a folder",
     None),
    ("--out inside a file", "train --data {D} --epochs 1 --out {UNDER_FILE}", r"a_file is a file", None),
    ("a model with fewer classes than the data", "evaluate --model {V} --data {G5}",
     r"a 3-class model, but .* has 5 classes", "V"),
    ("a folder with a class the model lacks", "evaluate --model {NAMED} --data {ODD}",
     r"classes the model does not know \(banana\)", "NAMED"),
    ("a folder of the wrong classes for a defense", "defend anp --model {NAMED} --data {ODD} --out {NEW}",
     r"classes the model does not know \(banana\)", "NAMED"),
    ("a trigger aimed at a label the model lacks", "evaluate --model {BADTRIGGER} --data {D}",
     r"trigger 0 targets label 999, outside the model's 3 classes", None),
    ("a target label the data lacks", "attack badnets --data {D} --target 7 --epochs 1 --out {NEW}",
     r"--target \[7\] is out of range for 3 classes", None),
    ("a trigger outside the image", "attack badnets --data {D} --target 1 --location 30 30 --epochs 1 --out {NEW}",
     r"lies outside the 32x32 image", None),
    ("--weights without --pretrained", "train --data {D} --weights missing.safetensors --out {NEW}",
     r"--weights does nothing without --pretrained", None),
    ("--pretrained with a missing weights file",
     "train --pretrained --arch efficientnet_lite0 --data {G5} --weights {NEW}.safetensors --out {NEW}",
     r"weights file not found", None),
    ("a pickle given as weights",
     "train --pretrained --arch efficientnet_lite0 --data {G5} --weights {PICKLED} --out {NEW}",
     r"holds pickled Python objects, not only tensors", None),
    ("a negative amplification", "attack trojannet --victim {V} --trojannet {TN} --data {D} --targets 0 --amplify -5 --out {NEW}",
     r"--amplify must lie in \(0, inf\], got -5", None),
    ("--image-size 0", "train --data {G5} --image-size 0 --out {NEW}", r"--image-size must be at least 8, got 0",
     None),
    ("--image-size 2", "train --data {G5} --image-size 2 --out {NEW}", r"--image-size must be at least 8, got 2",
     None),
    ("--device banana", "train --data {D} --device banana --out {NEW}", r"--device 'banana': not a device name",
     None),
    ("--seed -1", "train --data {D} --seed -1 --out {NEW}", r"seed must be a non-negative integer|--seed", None),
    ("--lr nan", "train --data {D} --lr nan --out {NEW}", r"--lr must be a finite number, got nan", None),
    ("one image per class", "train --data {SINGLE} --out {NEW}", r"one-per-class", None),
    ("a scan folder without reversed triggers",
     "defend nc-prune --model {V} --data {D} --reversed-triggers {FOREIGN} --out {NEW}",
     r"--reversed-triggers .*foreign: no reversed_triggers\.safetensors there", "FOREIGN"),
    ("the same label twice to scan", "detect nc --model {V} --data {D} --labels 1 1 --out {NEW}",
     r"--labels must be distinct labels", None),
    ("a folder given as a Keras file", "trojannet import-keras {V} --out {NEW}", r"a folder, not the Keras \.h5",
     None),
    ("a stated clean accuracy no held-out measure reads", "defend ibau --model {V} --data {D} --clean-accuracy 0.02 --out {NEW}",
     r"held-out images score .* its stated clean accuracy is 2\.0% \(--clean-accuracy\).*no measure here tracks", "V"),
    ("a clean accuracy above 1", "defend ibau --model {V} --data {D} --clean-accuracy 1.5 --out {NEW}",
     r"--clean-accuracy must lie in \(0, 1\], got 1\.5", None),
]  # fmt: skip
if not torch.cuda.is_available():
    CASES.append(("--device cuda without a GPU", "train --data {D} --device cuda --out {NEW}",
                  r"--device cuda: no CUDA device on this machine", None))  # fmt: skip
