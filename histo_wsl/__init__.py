"""histo-wsl: weakly-supervised localization for histology whole-slide images."""

__version__ = "0.1.0"
