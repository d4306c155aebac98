"""fastdelta's version, in one place: fastdelta.__version__, `fastdelta --version` and setup.py read it."""
__version__ = "0.2.0"
