"""The spec front end: a YAML file in, a validated `Spec` out, or a `SpecError` naming file:line:column."""

from .import_hf import import_hf_config, spec_from_hf_config
from .loader import Issue, SpecError, load_spec
from .schema import Spec

__all__ = ["Issue", "Spec", "SpecError", "import_hf_config", "load_spec", "spec_from_hf_config"]
