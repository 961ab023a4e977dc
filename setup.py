"""Package definition; Dataflow stages it to workers with --setup_file."""

import setuptools

REQUIRED = [
    "apache-beam>=2.77,<2.78",
    "tensorflow>=2.21,<2.22",
    "keras>=3.10,<4",
    "ai-edge-litert>=2.0,<3",
    "numpy>=1.26,<3",
    "pillow>=10.0",
    "imagecodecs>=2024.1",
    "pyarrow>=14",
    "duckdb>=1.1,<3",
    # tools.query's read-only file system for DuckDB.
    "fsspec>=2023.1",
    "matplotlib>=3.8,<4",
]

setuptools.setup(
    name="beam-image-classification",
    version="0.1.0",
    description="Distributed batch image classification with Keras and "
    "Apache Beam",
    python_requires=">=3.10,<3.13",
    packages=setuptools.find_packages(include=["model", "beam_jobs", "tools"]),
    install_requires=REQUIRED,
    extras_require={
        "test": ["pytest>=8"],
        # build: Beam stages --setup_file with `python -m build --sdist`.
        "gcp": ["apache-beam[gcp]>=2.77,<2.78", "gcsfs", "build"],
    },
)
