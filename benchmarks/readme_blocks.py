"""Copy the benchmarks' generated tables into the README between their markers (never typed by hand).

    python benchmarks/readme_blocks.py [--readme README.md]

Each block ``<!-- NAME:begin -->`` ... ``<!-- NAME:end -->`` of the README gets the file ``BLOCKS[NAME]`` (written by
the benchmark named in it); a block whose file does not exist yet is left as it is.
"""

from __future__ import annotations

import argparse
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
BLOCKS = {
    "new-attacks": RESULTS / "new_attacks.md",  # benchmarks/new_attacks.py
    # benchmarks/trojannn_model_only.py --name trojannn_model_only_first_block (the paper's recipe and the default)
    "trojannn-model-only-first-block": RESULTS / "trojannn_model_only_first_block.md",
    "trojannn-model-only": RESULTS / "trojannn_model_only.md",  # the same, earlier: from the classifier's input
    # the same, earlier: --recipes paper "...trigger maximises the weakest unit" --name trojannn_model_only_min
    "trojannn-model-only-min": RESULTS / "trojannn_model_only_min.md",
    "zoo-throughput": RESULTS / "zoo_throughput.md",  # benchmarks/zoo_throughput.py
    "zoo": RESULTS / "zoo" / "table.md",  # benchmarks/zoo_table.py
    "scan-zoo": RESULTS / "scan_zoo.md",  # benchmarks/scan_zoo.py
    "scan-onnx": RESULTS / "scan_onnx.md",  # benchmarks/scan_onnx.py
    "scan-targets": RESULTS / "scan_targets.md",  # benchmarks/scan_targets.py
    "removal-zoo": RESULTS / "removal_zoo.md",  # benchmarks/removal_zoo.py
    "removal-zoo-quiet": RESULTS / "removal_zoo_quiet.md",  # the same, --name removal_zoo_quiet
    "removal-zoo-auto": RESULTS / "removal_zoo_auto.md",  # the same, --methods auto --name removal_zoo_auto
    "removal-zoo-region": RESULTS / "removal_zoo_region.md",  # the same, --name removal_zoo_region
    # the same, every method (one member per family for all but auto), --name removal_zoo_methods
    "removal-zoo-methods": RESULTS / "removal_zoo_methods.md",
    # the same, defend auto after the target check and the patch rule, --name removal_zoo_auto_targets
    "removal-zoo-auto-targets": RESULTS / "removal_zoo_auto_targets.md",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readme", type=Path, default=Path("README.md"))
    args = parser.parse_args()
    text = args.readme.read_text()
    for name, source in BLOCKS.items():
        begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
        if begin not in text or end not in text:
            raise SystemExit(f"{args.readme}: no {begin} ... {end} block")
        if not source.is_file():
            print(f"{name}: {source} not written yet; block left as it is")
            continue
        start, stop = text.index(begin), text.index(end) + len(end)
        text = text[:start] + f"{begin}\n{source.read_text().strip()}\n{end}" + text[stop:]
        print(f"{name}: {source}")
    args.readme.write_text(text)


if __name__ == "__main__":
    main()
