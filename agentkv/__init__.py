"""agentkv: the SDK and the command line (`agentkv`)."""

__version__ = "0.1.0"
