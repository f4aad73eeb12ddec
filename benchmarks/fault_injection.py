"""The slow SIGKILL drill: kill a training run many times at random moments (the first one
while a checkpoint is being written), resume each time, and check that every logged loss is
bit-identical to an uninterrupted run. Prints one JSON line.

    python benchmarks/fault_injection.py [--kills=10] [--steps=100] [--seed=0]

tests/test_faults.py runs the same drill with 3 kills.
"""

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from test_faults import kill_drill  # noqa: E402  (the drill itself lives with the tests)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--kills", type=int, default=10)
  ap.add_argument("--steps", type=int, default=100)
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args()
  start = time.perf_counter()
  with tempfile.TemporaryDirectory() as tmp:
    kill_drill(pathlib.Path(tmp), kills=args.kills, steps=args.steps, seed=args.seed)
  print(json.dumps({"benchmark": "fault_injection", "kills": args.kills, "steps": args.steps,
                    "bit_identical": True, "seconds": round(time.perf_counter() - start, 1)}))


if __name__ == "__main__":
  main()
