"""Apache Beam batch inference over image directories and Parquet shards."""
