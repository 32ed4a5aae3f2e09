"""Code generation: a decided IR graph becomes a Python package rendered from the templates beside this file."""

from k2c.codegen.build import BuildResult, CodegenError, build_package, compile_spec, render_package

__all__ = ["BuildResult", "CodegenError", "build_package", "compile_spec", "render_package"]
