"""Models in and out: readers of what convert_weights.py accepts, conversion into the folder
format, and loading a folder into a model."""
