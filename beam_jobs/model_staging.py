"""A local model folder staged where Dataflow's workers can read it.

Dataflow's workers cannot read the launcher's disk. As Beam stages
`--setup_file` to the job's staging location before it submits the job, a
local `--model` folder is copied to `--temp_location`, under
`beam_jobs-models/MODEL_ID/`: the card and the model files it lists (those
its id hashes), nothing else, so the copy is a model folder in its own
right. It is named by the model's id (a hash of its files and of the
card's serving fields), so runs of the same model stage to the same place.
A dry run names the place and uploads nothing.
"""

import dataclasses
import shutil

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from imagebatch import paths
from model import card as card_lib

STAGING_FOLDER = "beam_jobs-models"
# Bytes copied at a time.
_CHUNK = 16 << 20


@dataclasses.dataclass(frozen=True)
class ModelStaging:
  """Which files of a local model folder go where, for the workers."""
  source: str
  destination: str
  files: tuple  # names relative to the folder, the card first


def plan(model_dir: str, card: card_lib.ModelCard,
         temp_location: str) -> ModelStaging:
  """Where the folder is staged, and what of it; reads nothing remote."""
  destination = paths.join(paths.join(temp_location, STAGING_FOLDER),
                           card.model_id)
  files = (card_lib.CARD_FILE,) + tuple(card_lib.model_files(model_dir, card))
  return ModelStaging(model_dir, destination, files)


def stage(staging: ModelStaging) -> None:
  """Copies the files, a chunk at a time (model files can be large)."""
  for name in staging.files:
    with paths.open_file(paths.join(staging.source, name)) as source, \
        FileSystems.create(
            paths.join(staging.destination, name),
            compression_type=CompressionTypes.UNCOMPRESSED) as target:
      shutil.copyfileobj(source, target, _CHUNK)
