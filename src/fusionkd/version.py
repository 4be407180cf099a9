"""fusionkd's version, in a module of its own at the bottom layer (the package face imports the API, so a
module inside the package that reads the version from the face would import upwards)."""

__version__ = "0.1.0"
