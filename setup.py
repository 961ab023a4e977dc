"""Package definition; Dataflow stages it to workers with --setup_file.

The base install is what a worker needs to serve a TFLite or an ONNX model
folder with any decoder: Beam, LiteRT, ONNX Runtime, Pillow, imagecodecs,
simplejpeg, pyarrow, numpy, and no TensorFlow. simplejpeg is libjpeg-turbo
with the choice of IDCT and upsampling TensorFlow makes (fast integer IDCT,
fancy upsampling), which neither Pillow nor imagecodecs exposes: with it the
card's `tensorflow` decoder recipe (model/keras_decoding.py) gives Keras'
pixels exactly, without TensorFlow, and it releases the GIL while it
decodes. ONNX Runtime is in the base because a worker serves an adopted
PyTorch model with it and Dataflow's --setup_file installs only the base;
it adds 78 MiB to the slim install (its other dependencies, protobuf and
flatbuffers, are there already). The extras add the rest:

  tensorflow  training (model.train), model.adopt of Keras and SavedModel
              sources, the keras and savedmodel engines
  onnx        model.adopt of ONNX sources: the `onnx` package reads and
              checks the graph and rewrites its batch axis (31 MiB). Its
              own extra, so a PyTorch author adopts without TensorFlow
              (`pip install '.[onnx]'`), and no worker installs it: serving
              needs ONNX Runtime only
  tools       tools.query (DuckDB) and tools.report (matplotlib)
  gcp         Beam's Google Cloud I/O, gcsfs, and `build` (for --setup_file)
  test        pytest, pandas

scripts/ensure_venv.sh installs all of them into .venv, and the base alone
into .venv-slim.
"""

import setuptools

REQUIRED = [
    "apache-beam>=2.77,<2.78",
    "ai-edge-litert>=2.0,<3",
    "numpy>=1.26,<3",
    "pillow>=10.0",
    "imagecodecs>=2024.1",
    "simplejpeg>=1.8,<2",
    "pyarrow>=14",
    "onnxruntime>=1.20,<2",
]

EXTRAS = {
    # model.export also plots the training curves with matplotlib.
    "tensorflow": ["tensorflow>=2.21,<2.22", "keras>=3.10,<4",
                   "matplotlib>=3.8,<4"],
    "onnx": ["onnx>=1.17,<2"],
    # tools.query's read-only file system for DuckDB is fsspec's.
    "tools": ["duckdb>=1.1,<3", "fsspec>=2023.1", "matplotlib>=3.8,<4"],
    # build and setuptools: Beam stages --setup_file with `python -m build
    # --sdist --no-isolation`, which a fresh Python 3.12 venv cannot run alone.
    "gcp": ["apache-beam[gcp]>=2.77,<2.78", "gcsfs", "build", "setuptools"],
    # pandas: the embedding column's round trip through a DataFrame.
    "test": ["pytest>=8", "pandas"],
}

setuptools.setup(
    name="beam-image-classification",
    version="0.1.0",
    description="Distributed batch image classification with Keras and "
    "Apache Beam",
    python_requires=">=3.10,<3.13",
    packages=setuptools.find_packages(include=["imagebatch", "model", "beam_jobs", "tools"]),
    install_requires=REQUIRED,
    # One command for all of them, from any folder: imagebatch predict ...
    entry_points={"console_scripts": [
        "imagebatch = imagebatch.commands:main"]},
    extras_require=EXTRAS,
)
