# The Dataflow worker image: Beam's own Python SDK container with this
# project and its dependencies preinstalled, so a worker starts serving
# without pip-installing anything (see docs/dataflow.md). Build it from the
# repository root:
#   docker build -f dataflow/worker.Dockerfile -t IMAGE .                  # TFLite, Pillow decoder
#   docker build -f dataflow/worker.Dockerfile --build-arg EXTRAS=tensorflow -t IMAGE .
# and pass --sdk_container_image IMAGE (without --setup_file) to the job.
# The tag must match the launcher's Beam (setup.py) and Python versions.
FROM apache/beam_python3.11_sdk:2.77.0

# tensorflow: for the keras and savedmodel engines and the tensorflow
# decoder. Empty: the slim serving install (LiteRT, Pillow, pyarrow).
ARG EXTRAS=""

WORKDIR /opt/beam-image-classification
COPY setup.py .
COPY model model
COPY beam_jobs beam_jobs
COPY tools tools

# The image's Beam already satisfies setup.py's apache-beam pin, so pip
# keeps it and adds the rest. The image's entry point stays Beam's boot.
RUN pip install --no-cache-dir ".${EXTRAS:+[${EXTRAS}]}" \
    && python -c "import beam_jobs.pipeline, model.engines"
