"""Flex Template entry point: the template launcher runs this file.

It receives the template's parameters as flags and hands them, with any Beam
pipeline options, to `python -m beam_jobs.predict`'s own `main`.
"""

import sys

from beam_jobs import predict

if __name__ == "__main__":
  sys.exit(predict.main())
