"""The tool version recorded in every run and migration."""

from importlib.metadata import PackageNotFoundError, version

try:
    TOOL_VERSION = version("llava-interp")
except PackageNotFoundError:  # running from a source checkout without installing
    TOOL_VERSION = "0.1.0+source"
