"""What the model, the Beam job and the tools share: paths and the command line."""
