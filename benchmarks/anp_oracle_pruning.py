"""How far pruning *can* go against a backdoor: rank the neurons with the trigger in hand, then prune the top k.

    python benchmarks/anp_oracle_pruning.py --model runs/reproduce/gtsrb/attacks/badnets [--counts 20 40 80 120 160]

This is an oracle, not a defense: it reads triggered images, which a defender does not have. It ranks the same
neurons ANP scores (``find_neurons``, the classifier's last layer excluded) by how much the model's own trigger
raises their mean activation (after ReLU; the spatial mean for a convolution channel) on 2,000 training-split
images, relative to the clean mean, prunes the ``k`` highest in the original weights, and measures clean accuracy
and ASR on the whole test split. When ANP leaves a backdoor in place, this tells whether a neuron set that removes
it within the accuracy budget exists at all, that is, whether ANP's ranking or pruning as such is what falls short.
The ranking is the nc-guided defense's (``trojanlab.defenses.defend("nc-guided", ...)``), with the planted trigger in
place of a reversed one.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from trojanlab.data import to_tensor
from trojanlab.data.datasets import load_dataset
from trojanlab.defenses.anp import find_neurons, prune_neurons, pruned_per_layer
from trojanlab.defenses.guided import trigger_scores
from trojanlab.evaluation.metrics import evaluate_model
from trojanlab.models.artifacts import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="an attacked model artefact (its spec carries the trigger)")
    parser.add_argument("--data", default="gtsrb")
    parser.add_argument("--counts", type=int, nargs="+", default=[10, 20, 40, 80, 120, 160])
    parser.add_argument("--images", type=int, default=2000, help="training-split images used for the ranking")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    loaded = load_model(args.model)
    model, trigger = loaded.module, loaded.triggers[0]
    data = load_dataset(args.data)
    pick = np.random.default_rng(args.seed).choice(len(data.train), min(args.images, len(data.train)), replace=False)
    images = data.train.subset(pick)
    layers = find_neurons(model, to_tensor(images.x[:2]), num_classes=data.num_classes)
    # the nc-guided variant's score, with the planted trigger in place of a reversed one
    order = trigger_scores(model, layers, images, [trigger]).argsort(descending=True)

    before = evaluate_model(model, data.test, [trigger])
    print(
        f"{args.model}: {len(order)} neurons; before: CA {before['clean_accuracy']:.2%}, "
        f"ASR {before['attack_success_rate']:.2%}"
    )
    print("| neurons pruned | CA | CA drop (points) | ASR | per layer |\n|---|---|---|---|---|")
    rows = []
    for k in args.counts:
        after = evaluate_model(prune_neurons(model, layers, order[:k]), data.test, [trigger])
        per_layer = pruned_per_layer(layers, order[:k])
        drop = 100 * (before["clean_accuracy"] - after["clean_accuracy"])
        rows.append({"pruned": k, **after, "clean_accuracy_drop_points": drop, "per_layer": per_layer})
        print(
            f"| {k} | {after['clean_accuracy']:.2%} | {drop:.2f} | {after['attack_success_rate']:.2%} | {per_layer} |",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"model": args.model, "before": before, "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
