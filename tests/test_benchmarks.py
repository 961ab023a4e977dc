"""The benchmark machinery that figures rest on: the process-tree sampler and
the peers' shared classifier (run here in the project's venv)."""

import sys

import numpy as np
import pytest

from benchmarks import process_tree
from benchmarks.peers import common
from tests.helpers import expected_labels

# A parent that starts a child; the child holds 200 MiB and burns CPU.
_TREE = """
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", '''
import time
block = bytearray(200 * 2**20)
for i in range(0, len(block), 4096):
  block[i] = 1
end = time.process_time() + 0.6
while time.process_time() < end:
  pass
time.sleep(0.6)
'''])
child.wait()
print("done")
"""


@pytest.mark.slow
def test_process_tree_counts_descendants_memory_and_cpu():
  figures, stdout = process_tree.measure([sys.executable, "-c", _TREE],
                                         interval=0.05)
  assert stdout.strip() == "done"
  assert figures["returncode"] == 0
  # The child's 200 MiB are the tree's, not the parent's alone.
  assert figures["peak_rss_mib"] > 200 and figures["peak_pss_mib"] > 200
  assert figures["peak_processes"] == 2
  assert figures["cpu_s"] >= 0.5
  names = [name for name, _ in figures["cpu_by_process"]]
  assert any(name.startswith("python") for name in names)
  assert figures["wall_s"] >= 1.0


def test_process_tree_reports_a_failing_command():
  figures, _ = process_tree.measure([sys.executable, "-c", "exit(3)"])
  assert figures["returncode"] == 3


def test_peer_classifier_gives_the_engines_labels(tiny_model, sample,
                                                   png_dir):
  from tests.helpers import png_ids  # pylint: disable=import-outside-toplevel
  payloads = []
  for path in png_ids(png_dir, sample):
    with open(path, "rb") as handle:
      payloads.append(handle.read())
  classify = common.Classifier(tiny_model)
  labels, confidences = classify(payloads + [b"not an image"])
  assert list(labels[:-1]) == expected_labels(tiny_model, sample, "tflite")
  assert labels[-1] is None and np.isnan(confidences[-1])
  assert np.all((confidences[:-1] > 0) & (confidences[:-1] <= 1))
