"""Training and export of the Keras image classifiers that `beam_jobs` serves."""
