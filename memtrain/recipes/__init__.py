"""The jobs built on the library: pretraining and fine-tuning recipes, the models they build, and their data."""
